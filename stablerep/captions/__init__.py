"""Caption sampling: caption data-set files or synthetic concepts -> a captions folder.

`make_captions` is the stage; `load_manifest` is how later stages read its output.
"""

from stablerep.captions.stage import (
    CaptionsManifest,
    format_summary,
    load_manifest,
    make_captions,
    shard_sizes,
)

__all__ = ["CaptionsManifest", "format_summary", "load_manifest", "make_captions", "shard_sizes"]
