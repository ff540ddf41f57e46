"""Caption sampling: caption data-set files or synthetic concepts -> a captions folder.

`make_captions` is the stage; later stages read its output with
:func:`stablerep.contracts.load_captions_manifest`.
"""

from stablerep.captions.stage import (
    CaptionsManifest,
    format_summary,
    make_captions,
    shard_sizes,
)

__all__ = ["CaptionsManifest", "format_summary", "make_captions", "shard_sizes"]
