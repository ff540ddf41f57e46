"""A tiny, randomly initialised Stable Diffusion pipeline, built entirely offline.

The pipeline has exactly the component classes of Stable Diffusion v1.5 -- a
``UNet2DConditionModel``, an ``AutoencoderKL`` with 8x spatial downsampling, a ``CLIPTextModel``
and a ``CLIPTokenizer`` -- plus a ``DDIMScheduler`` configured like SD v1.5's, and no safety
checker. Saved with ``save_pretrained`` it loads back with
``StableDiffusionPipeline.from_pretrained(folder)`` like any real model, so the code path under
test is the one a real SD v1.5 checkpoint takes; only the sizes are tiny (64px images, 8x8
latents, 32/64-channel UNet), which makes drawing a handful of images on a CPU take seconds.

The tokenizer's ``vocab.json`` and ``merges.txt`` are derived from the BPE merges file that
``open_clip`` ships (``bpe_simple_vocab_16e6.txt.gz``), reproducing how open_clip's
``SimpleTokenizer`` builds its vocabulary, so token ids equal those of the real CLIP tokenizer
(49,408 tokens; ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407).

All weights come from a fixed torch seed, so the saved folder is the same on every build.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from stablerep.errors import ConfigError, InputError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "CONTEXT_LENGTH",
    "EOS_TOKEN",
    "VOCAB_SIZE",
    "build_tiny_pipeline",
    "build_tokenizer",
    "clip_vocab_and_merges",
    "save_tiny_pipeline",
    "tokenizer_files",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip keeps the merges on lines 1 .. 49152-256-2 of its file (line 0 is a header): that
# many merges plus 2*256 byte symbols plus the two special tokens make 49,408 tokens.
_N_MERGES = 49152 - 256 - 2
_MODEL_INDEX = "model_index.json"


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character, as GPT-2/CLIP byte-level BPE does.

    Printable Latin-1 bytes map to themselves; the other bytes (controls, space, a few
    separators) map, in increasing byte order, to code points 256, 257, ...

    Returns:
        A dict from byte value to a one-character string, in the order CLIP's vocabulary
        lists the byte symbols.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build CLIP's BPE vocabulary and merge list from the merges file open_clip ships.

    The vocabulary is, in id order: the 256 byte symbols, the same 256 with ``</w>`` appended,
    one token per merge (the pair joined), then ``<|startoftext|>`` and ``<|endoftext|>``.

    Returns:
        ``(vocab, merges)``: token -> id (49,408 entries) and the merges in rank order.

    Raises:
        InputError: If open_clip's BPE file is missing or does not yield 49,408 tokens.
    """
    vocab, merges = _cached_vocab_and_merges()
    return dict(vocab), merges


@functools.cache
def _cached_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    source = importlib.resources.files("open_clip").joinpath(_BPE_FILE)
    try:
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    except (FileNotFoundError, OSError) as exc:
        raise InputError(f"open_clip's BPE file {_BPE_FILE} cannot be read: {exc}") from exc
    merges: list[tuple[str, str]] = []
    for line in lines[1 : _N_MERGES + 1]:
        first, second = line.split()
        merges.append((first, second))
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = [
        *byte_symbols,
        *(s + "</w>" for s in byte_symbols),
        *(a + b for a, b in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(merges) != _N_MERGES or len(vocab) != VOCAB_SIZE:
        raise InputError(
            f"open_clip's {_BPE_FILE} gave {len(merges)} merges and {len(vocab)} distinct "
            f"tokens; expected {_N_MERGES} and {VOCAB_SIZE}"
        )
    return vocab, tuple(merges)


def tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (Hugging Face format) into a folder.

    Each file is written to a temporary name and renamed, so a reader never sees half a file.

    Args:
        folder: Directory to write into; created if missing.

    Returns:
        ``(vocab_path, merges_path)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_text = json.dumps(vocab, ensure_ascii=False)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    paths = (folder / "vocab.json", folder / "merges.txt")
    for path, text in zip(paths, (vocab_text, merges_text), strict=True):
        staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, path)
    return paths


def build_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """Build a ``CLIPTokenizer`` from the vocabulary derived from open_clip's BPE file.

    Args:
        folder: Where to write ``vocab.json`` and ``merges.txt`` first; a temporary directory
            (removed afterwards) when None.

    Returns:
        The tokenizer, with ``model_max_length`` 77 and ``<|endoftext|>`` as its padding token.

    Raises:
        InputError: If the tokenizer does not come out with 49,408 tokens.
    """
    from transformers import CLIPTokenizer

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="stablerep-clip-bpe-") as tmp:
            return build_tokenizer(tmp)
    vocab_path, merges_path = tokenizer_files(folder)
    # transformers 5: the files go in as ``vocab``/``merges`` (positionally); the keywords
    # ``vocab_file``/``merges_file`` are silently ignored and leave a 2-token vocabulary. Without
    # ``model_max_length`` the length limit is "infinite" and prompts are not truncated.
    tokenizer = CLIPTokenizer(
        str(vocab_path),
        str(merges_path),
        model_max_length=CONTEXT_LENGTH,
        pad_token=EOS_TOKEN,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise InputError(
            f"CLIPTokenizer built from {vocab_path} has {len(tokenizer)} tokens; "
            f"expected {VOCAB_SIZE}"
        )
    return tokenizer


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ConfigError(f"image_size must be an int, got {image_size!r}")
    if image_size < 16 or image_size % 16:
        raise ConfigError(f"image_size must be a multiple of 16 and at least 16, got {image_size}")


def build_tiny_pipeline(*, seed: int = 0, image_size: int = 64) -> StableDiffusionPipeline:
    """Build a tiny randomly initialised Stable Diffusion pipeline with SD v1.5's classes.

    Sizes: UNet with 32/64 channels (a cross-attention level and a plain one, 1 layer per
    block, 32-dim cross-attention, 4 heads); a VAE with four 32/32/64/64 levels (8x
    downsampling, 4 latent channels, scaling factor 0.18215); a 2-layer CLIP text encoder of
    width 32 over the full 49,408-token vocabulary and 77 positions. The global torch RNG state
    is left as it was.

    Args:
        seed: Torch seed for the random weights; the same seed gives the same weights.
        image_size: Side in pixels of the images the pipeline draws by default (the UNet's
            sample size is ``image_size // 8``); a multiple of 16.

    Returns:
        The pipeline, on CPU, in float32.

    Raises:
        ConfigError: If ``image_size`` is not a positive multiple of 16.
    """
    _check_image_size(image_size)
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(image_size)
        torch.manual_seed(seed + 1)
        vae = _tiny_vae(image_size)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_text_encoder(tokenizer)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_unet(image_size: int):
    """SD v1.5's UNet class at 32/64 channels: one cross-attention level and a plain one."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def _tiny_vae(image_size: int):
    """SD v1.5's VAE class with four 32/32/64/64 levels (8x downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=image_size,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder(tokenizer):
    """A 2-layer CLIP text encoder of width 32 over the full vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def save_tiny_pipeline(folder: str | Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """Build the tiny pipeline and save it so ``StableDiffusionPipeline.from_pretrained`` loads it.

    The pipeline is saved into a hidden temporary sibling of ``folder`` and renamed into place,
    so a build that fails or is killed leaves nothing at ``folder``. If ``folder`` already holds
    a saved pipeline (it has ``model_index.json``) it is returned untouched, without building.
    The tokenizer folder also gets ``vocab.json`` and ``merges.txt``, so older transformers
    versions load it too.

    Args:
        folder: Local directory to create; it must not exist or be empty.
        seed: Torch seed for the random weights.
        image_size: Default image side in pixels; a multiple of 16.

    Returns:
        ``folder`` as a Path.

    Raises:
        ConfigError: If ``image_size`` is not a positive multiple of 16.
        InputError: If ``folder`` exists, is not empty and holds no saved pipeline.
    """
    folder = Path(folder)
    if (folder / _MODEL_INDEX).is_file():
        return folder
    _check_image_size(image_size)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(
            f"{folder} exists and is not an empty directory, but holds no {_MODEL_INDEX}; "
            "remove it or pick another folder for the tiny pipeline"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.building-{uuid.uuid4().hex}"
    try:
        pipeline = build_tiny_pipeline(seed=seed, image_size=image_size)
        pipeline.save_pretrained(staging, safe_serialization=True)
        tokenizer_dir = staging / "tokenizer"
        if (
            not (tokenizer_dir / "vocab.json").is_file()
            or not (tokenizer_dir / "merges.txt").is_file()
        ):
            tokenizer_files(tokenizer_dir)
        try:
            # rename() replaces an empty directory atomically and fails on a non-empty one.
            os.rename(staging, folder)
        except OSError:
            if (folder / _MODEL_INDEX).is_file():  # another builder won the race
                return folder
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
