"""The config sections: one dataclass per stage and the root :class:`Config`.

Every field has a default and a comment; ``__post_init__`` validates what the types alone do
not say (ranges, combinations of fields) and names the offending field. A field with a fixed
set of values is typed as a ``Literal``: pydantic checks it when :mod:`stablerep.config.load`
builds a section from a mapping (with types and unknown fields), and :func:`choices` reads the
set back, so the command line offers exactly what the config accepts.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from stablerep.devices import check_device
from stablerep.errors import ConfigError
from stablerep.procedural_grammar import INKS, SIZES, TEXTURES, TONES, WEIGHTS

# The fixed sets of values of config fields; each tuple below is read from its Literal.
CaptionSource = Literal["synthetic", "files", "procedural"]
CaptionFormat = Literal["auto", "cc3m", "cc12m", "tsv", "csv", "jsonl", "parquet", "txt", "redcaps"]
Compression = Literal["infer", "none", "gzip", "zstd", "bz2", "xz"]
GenerateBackend = Literal["diffusers", "tiny", "procedural"]
Scheduler = Literal["ddim", "dpmsolver++", "default"]
ImageFormat = Literal["jpg", "webp", "png"]
GenerateDtype = Literal["auto", "fp32", "fp16", "bf16"]
Method = Literal["stablerep", "stablerep_plus", "simclr", "clip"]
Augmentation = Literal["stablerep", "weak", "none"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
EvalPrecision = Literal["auto", "fp32", "bf16"]

CAPTION_SOURCES: tuple[str, ...] = typing.get_args(CaptionSource)
CAPTION_FORMATS: tuple[str, ...] = typing.get_args(CaptionFormat)
COMPRESSIONS: tuple[str, ...] = typing.get_args(Compression)
BACKENDS: tuple[str, ...] = typing.get_args(GenerateBackend)
SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
IMAGE_FORMATS: tuple[str, ...] = typing.get_args(ImageFormat)
GENERATE_DTYPES: tuple[str, ...] = typing.get_args(GenerateDtype)
METHODS: tuple[str, ...] = typing.get_args(Method)
AUGMENTATIONS: tuple[str, ...] = typing.get_args(Augmentation)
TRAIN_PRECISIONS: tuple[str, ...] = typing.get_args(TrainPrecision)
EVAL_PRECISIONS: tuple[str, ...] = typing.get_args(EvalPrecision)


def _check_range(name: str, value: float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: got {value!r}, expected a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"{name}: got {value!r}, expected a value {bound}")
    if high is not None and value > high:
        raise ConfigError(f"{name}: got {value!r}, expected a value <= {high}")


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values the ``Literal``-typed field ``name`` of the config dataclass ``cls`` takes.

    Args:
        cls: a config dataclass, e.g. :class:`TrainConfig`.
        name: one of its fields, e.g. ``"method"``.
    """
    tp = typing.get_type_hints(cls).get(name)
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal-typed field")
    return typing.get_args(tp)


# ---------------------------------------------------------------------------- captions


@dataclass
class ConceptSource:
    """One weighted list of concepts for synthetic captions."""

    name: str = "imagenet1k"  # label stored in the `source` column as synthetic:<name>
    uri: str = "builtin:imagenet1k"  # builtin:imagenet1k, or a text file (one concept a line)
    weight: float = 1.0  # relative sampling weight among concept sources

    def __post_init__(self) -> None:
        if not self.name or not str(self.name).strip():
            raise ConfigError("captions.synthetic.concepts[].name: expected a non-empty name")
        if not self.uri:
            raise ConfigError(f"captions.synthetic.concepts[{self.name}].uri: expected a URI")
        _check_range(f"captions.synthetic.concepts[{self.name}].weight", self.weight, low=0,
                     low_open=True)


@dataclass
class SyntheticCaptionsConfig:
    """Concept x template (x background) captions, SynCLR-style, deterministic under a seed."""

    concepts: list[ConceptSource] = field(default_factory=lambda: [ConceptSource()])
    templates_uri: str = "builtin"  # builtin, or a text file of templates with {concept}/{a_concept}
    backgrounds_uri: str = "builtin"  # builtin, or a text file of background phrases
    background_prob: float = 0.5  # chance that a caption gets a background phrase
    num_rows: int | None = None  # candidates to draw; default num_captions * oversample
    oversample: float = 1.25  # candidates per wanted caption (duplicates are dropped later)

    def __post_init__(self) -> None:
        if not self.concepts:
            raise ConfigError("captions.synthetic.concepts: expected at least one concept source")
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ConfigError(f"captions.synthetic.concepts: names must be unique, got {names}")
        _check_range("captions.synthetic.background_prob", self.background_prob, low=0, high=1)
        if self.num_rows is not None:
            _check_range("captions.synthetic.num_rows", self.num_rows, low=1)
        _check_range("captions.synthetic.oversample", self.oversample, low=1)


ALL_INKS: tuple[str, ...] = tuple(dict.fromkeys(INKS["light"] + INKS["dark"]))
"""Every ink colour of the procedural grammar, light-background inks first."""

Typeface = Literal["handwritten", "sans-serif", "serif", "monospace"]
# the grammar's vocabularies as Literals (a Literal of a tuple is the Literal of its items)
Weight = Literal[WEIGHTS]
Ink = Literal[ALL_INKS]
Texture = Literal[TEXTURES]
Tone = Literal[TONES]
Size = Literal[SIZES]


@dataclass
class ProceduralCaptionsConfig:
    """Captions in the procedural grammar (stablerep.captions.procedural): digit or shape + style."""

    shapes: bool = True  # classes 0-9 plus circle, square, triangle, cross (else digits only)
    typefaces: list[Typeface] = field(
        default_factory=lambda: ["handwritten", "sans-serif", "serif", "monospace"])  # digits
    italic_prob: float = 0.25  # chance that a digit caption says italic
    style_prob: float = 1.0  # chance that a caption names weight, ink, background and size (else each image draws them)
    weights: list[Weight] = field(default_factory=lambda: list(WEIGHTS))  # stroke weights captions name
    inks: list[Ink] = field(default_factory=lambda: list(ALL_INKS))  # ink colours (each tone keeps those it allows)
    textures: list[Texture] = field(default_factory=lambda: list(TEXTURES))  # background textures
    tones: list[Tone] = field(default_factory=lambda: list(TONES))  # background tones
    sizes: list[Size] = field(default_factory=lambda: list(SIZES))  # size words
    num_rows: int | None = None  # candidates to draw; default num_captions * oversample
    oversample: float = 1.25  # candidates per wanted caption (duplicates are dropped later)

    def __post_init__(self) -> None:
        if not self.typefaces:
            raise ConfigError("captions.procedural.typefaces: expected at least one typeface")
        _check_range("captions.procedural.italic_prob", self.italic_prob, low=0, high=1)
        _check_range("captions.procedural.style_prob", self.style_prob, low=0, high=1)
        for name in ("weights", "inks", "textures", "tones", "sizes"):
            if not getattr(self, name):
                raise ConfigError(f"captions.procedural.{name}: expected at least one value")
        for tone in self.tones:
            if not set(self.inks) & set(INKS[tone]):
                raise ConfigError(f"captions.procedural.inks: none of {self.inks} is allowed on "
                                  f"a {tone} background; add one of {', '.join(INKS[tone])}")
        if self.num_rows is not None:
            _check_range("captions.procedural.num_rows", self.num_rows, low=1)
        _check_range("captions.procedural.oversample", self.oversample, low=1)


@dataclass
class CaptionsConfig:
    """The caption stage: read or synthesise, clean, dedupe, sample N, split into shards."""

    source: CaptionSource = "synthetic"  # where captions come from
    inputs: list[str] = field(default_factory=list)  # files source: URIs, globs or folders
    format: CaptionFormat = "auto"  # file layout; auto = from the suffix (and a sniff for .tsv)
    column: str = "caption"  # csv/tsv/parquet column or jsonl/redcaps field holding the caption
    compression: Compression = "infer"  # infer (from .gz/.zst/...), none, gzip, zstd, bz2, xz
    out: str = ""  # output folder URI; default <data_root>/captions
    num_captions: int | None = None  # captions to sample; None = all (files source)
    allow_fewer: bool = False  # accept fewer than num_captions when the source has fewer
    seed: int = 0  # sampling seed; same seed + same input = same output bytes
    num_shards: int = 1  # number of part-*.parquet files (near-equal sizes)
    min_chars: int = 5  # captions shorter than this (after cleaning) are dropped
    max_chars: int = 1000  # captions longer than this are dropped
    dedupe: bool = True  # drop exact duplicates of the normalised text
    spill_rows: int = 500_000  # rows held in memory before spilling to local scratch
    work_dir: str = ""  # local scratch folder; default a temporary folder
    overwrite: bool = False  # replace captions made with another config under `out`
    synthetic: SyntheticCaptionsConfig = field(default_factory=SyntheticCaptionsConfig)
    procedural: ProceduralCaptionsConfig = field(default_factory=ProceduralCaptionsConfig)

    def __post_init__(self) -> None:
        if self.source == "files" and not self.inputs:
            raise ConfigError("captions.inputs: the files source needs at least one input URI")
        if self.source in ("synthetic", "procedural") and self.num_captions is None:
            raise ConfigError(f"captions.num_captions: the {self.source} source needs a count")
        if self.num_captions is not None:
            _check_range("captions.num_captions", self.num_captions, low=1)
        _check_range("captions.num_shards", self.num_shards, low=1)
        _check_range("captions.min_chars", self.min_chars, low=0)
        _check_range("captions.max_chars", self.max_chars, low=max(self.min_chars, 1))
        _check_range("captions.spill_rows", self.spill_rows, low=1000)
        if not self.column:
            raise ConfigError("captions.column: expected a column or field name")


# ---------------------------------------------------------------------------- generation

@dataclass
class GenerateConfig:
    """Sharded text-to-image generation: m images per caption into WebDataset shards."""

    captions: str = ""  # captions folder URI; default <data_root>/captions
    out: str = ""  # output folder URI; default <data_root>/images
    backend: GenerateBackend = "diffusers"  # tiny: random-weight SD; procedural: digits
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id, local folder or URI
    images_per_caption: int = 10  # m: images drawn per caption (the paper: 10)
    guidance_scale: float = 2.0  # classifier-free guidance w (the paper: 2 for StableRep)
    num_inference_steps: int = 50  # denoising steps (the paper: DDIM 50)
    scheduler: Scheduler = "ddim"  # ddim (the paper), dpmsolver++ (multistep), default (the model's)
    eta: float = 0.0  # DDIM eta (0 = deterministic DDIM)
    negative_prompt: str = ""  # unconditional prompt for guidance (the paper: empty)
    height: int = 512  # generation height in pixels (multiple of 8)
    width: int = 512  # generation width in pixels (multiple of 8)
    stored_size: int = 256  # stored image size (shorter side resized to it; 0 = as generated)
    image_format: ImageFormat = "jpg"  # jpg, webp or png
    jpeg_quality: int = 95  # JPEG / WebP quality
    seed: int = 0  # global seed; image j of caption c uses hash(seed, caption_id, j)
    batch_size: int = 16  # images per denoising call (captions x images, flattened)
    shard: int | None = None  # captions shard to process; None with all_shards = every shard
    all_shards: bool = False  # process every shard (skipping finished ones) in one process
    shard_from_env: bool = False  # take the shard from JOB_COMPLETION_INDEX (Indexed Job)
    device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:1 ...
    dtype: GenerateDtype = "auto"  # auto (fp16 on cuda, fp32 on cpu), fp32, fp16, bf16
    compile: bool = False  # torch.compile the UNet (pays off for long runs)
    channels_last: bool = True  # channels_last memory format for UNet and VAE on cuda
    encode_workers: int = 4  # threads resizing/encoding images beside the GPU
    max_failures: int = 0  # captions allowed to fail per shard; -1 = any number
    tiny_cache: str = ""  # tiny backend: where the random pipeline is saved (default cache)
    model_store: str = ""  # the run's model copies (pipeline); default <data_root>/models
    overwrite: bool = False  # replace shards made with another config under `out`

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("generate.model: expected a hub id, a local folder or a URI")
        _check_range("generate.images_per_caption", self.images_per_caption, low=1)
        _check_range("generate.guidance_scale", self.guidance_scale, low=0)
        _check_range("generate.num_inference_steps", self.num_inference_steps, low=1)
        _check_range("generate.eta", self.eta, low=0, high=1)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ConfigError(f"generate.{name}: got {value}, expected a positive multiple "
                                  "of 8 (the VAE downsamples by 8)")
        _check_range("generate.stored_size", self.stored_size, low=0)
        _check_range("generate.jpeg_quality", self.jpeg_quality, low=1, high=100)
        _check_range("generate.batch_size", self.batch_size, low=1)
        if self.shard is not None:
            _check_range("generate.shard", self.shard, low=0)
        modes = sum([self.shard is not None, self.all_shards, self.shard_from_env])
        if modes > 1:
            raise ConfigError("generate.shard / all_shards / shard_from_env: choose one of them")
        check_device(self.device, field="generate.device")
        _check_range("generate.encode_workers", self.encode_workers, low=1)
        _check_range("generate.max_failures", self.max_failures, low=-1)


# ---------------------------------------------------------------------------- training

#: The largest seed numpy and torch accept (seeds are 32-bit).
SEED_MAX = 2**32 - 1

#: ViT arguments that must be positive integers for timm to build a model.
_VIT_INT_KWARGS = ("depth", "embed_dim", "num_heads", "patch_size")


def _check_vit_shape(model: str, image_size: int, kwargs: dict[str, Any]) -> None:
    """Refuse model kwargs that cannot build a ViT (checked without building it).

    Args:
        model: the timm name (its ``patch<N>`` part is the patch size unless overridden).
        image_size: the training resolution.
        kwargs: ``train.model_kwargs``.
    """
    for key in _VIT_INT_KWARGS:
        value = kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"train.model_kwargs.{key}: got {value!r}, expected a positive "
                              "integer")
    found = re.search(r"patch(\d+)", model)
    patch = kwargs.get("patch_size", int(found.group(1)) if found else None)
    if patch is not None and (image_size < patch or image_size % patch):
        raise ConfigError(f"train.image_size: got {image_size}, expected a multiple of the "
                          f"patch size {patch} (and >= it)")
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise ConfigError(f"train.model_kwargs.num_heads: got {heads}, expected a divisor of "
                          f"train.model_kwargs.embed_dim {dim}")


@dataclass
class TrainConfig:
    """StableRep training: n captions x k images per step, multi-positive contrastive loss."""

    data: list[str] = field(default_factory=list)  # images folders; default [<data_root>/images]
    out: str = ""  # checkpoints, metrics, TensorBoard; default <data_root>/train
    method: Method = "stablerep"  # stablerep, stablerep_plus, simclr or clip
    model: str = "vit_base_patch16_224"  # timm ViT name (vit_tiny/small/base/large_patch16_*)
    image_size: int = 224  # training resolution (small values for CPU runs)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm ViT arguments, e.g. {patch_size: 4, depth: 6}
    head_hidden_dim: int = 4096  # projection MLP hidden width
    head_out_dim: int = 256  # projection output dimension
    embed_dim: int = 512  # image-text embedding dimension (stablerep_plus, clip)
    text_width: int = 512  # text transformer width (open_clip)
    text_layers: int = 12  # text transformer depth
    text_heads: int = 8  # text transformer heads
    text_context: int = 77  # text context length (tokens)
    images_per_caption: int = 6  # k images used per caption per step (the paper: 6 of 10)
    captions_per_batch: int = 1376  # n captions per optimizer step, over all ranks
    temperature: float = 0.1  # multi-positive loss temperature (SynCLR: 0.08)
    clip_loss_weight: float = 1.0  # weight of the CLIP loss, itself (L_i2t + L_t2i) / 2
    augmentation: Augmentation = "stablerep"  # stablerep (the paper's), weak, or none
    downsample_prob: float = 0.0  # chance of a 64/128px down-and-up resize (paper: 0.05)
    epochs: float = 15.0  # passes over the captions (the paper's 1x schedule on CC12M: 15)
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup_epochs: float = 0.5  # linear warmup length in epochs
    warmup_steps: int | None = None  # warmup length in steps; overrides warmup_epochs
    base_lr: float = 2e-4  # lr = base_lr * images per step / 512 (2e-4 -> 3.2e-3 at 8256)
    weight_decay: float = 0.1  # AdamW weight decay (none on biases, norms, 1-d params)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2
    grad_accum_steps: int = 1  # micro-batches per optimizer step (loss within each)
    precision: TrainPrecision = "auto"  # auto (bf16 on cuda, fp32 on cpu), fp32, bf16, fp16
    compile: bool = False  # torch.compile the model
    sync_bn: bool = True  # SyncBatchNorm in the projection head when distributed
    num_workers: int = 4  # data loader processes per rank
    shuffle_buffer: int = 256  # captions held for shuffling per worker
    cache_mb: float = 0.0  # keep shards read once in memory up to this size per worker (small data sets)
    max_sample_errors: int = 10  # corrupt samples tolerated per shard before failing
    verify_shards: bool = True  # check each shard's sha256 against its json before reading
    seed: int = 0  # seed for init, data order and augmentation
    log_every: int = 10  # steps between metric lines
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # most recent checkpoints kept
    resume: bool = True  # continue from <out>/latest.json when it exists
    device: str = "auto"  # auto (cuda when present), cpu, cuda (rank i uses GPU i of its node)
    dist_timeout_s: float = 600.0  # collective timeout: a dead peer fails the job after it
    tensorboard: bool = True  # write TensorBoard event files under <out>/tb
    knn_every: int = 0  # steps between kNN checks of the backbone (0 = never)
    knn_dataset: str = "sklearn:digits"  # data set of the kNN check (eval.datasets names)

    def __post_init__(self) -> None:
        self._check_backbone()
        for name in ("head_hidden_dim", "head_out_dim", "embed_dim", "text_width", "text_layers",
                     "text_heads", "text_context", "captions_per_batch", "grad_accum_steps",
                     "log_every", "checkpoint_every", "keep_checkpoints", "shuffle_buffer"):
            _check_range(f"train.{name}", getattr(self, name), low=1)
        _check_range("train.images_per_caption", self.images_per_caption, low=1)
        if self.method == "stablerep" and self.images_per_caption < 2:
            raise ConfigError("train.images_per_caption: stablerep needs at least 2 images per "
                              "caption (they are each other's positives); use method simclr for "
                              "one image per caption")
        if self.text_width % self.text_heads:
            raise ConfigError(f"train.text_heads: {self.text_heads} does not divide "
                              f"train.text_width {self.text_width}")
        _check_range("train.temperature", self.temperature, low=0, low_open=True)
        _check_range("train.clip_loss_weight", self.clip_loss_weight, low=0)
        _check_range("train.downsample_prob", self.downsample_prob, low=0, high=1)
        _check_range("train.epochs", self.epochs, low=0, low_open=True)
        if self.max_steps is not None:
            _check_range("train.max_steps", self.max_steps, low=1)
        _check_range("train.warmup_epochs", self.warmup_epochs, low=0)
        if self.warmup_steps is not None:
            _check_range("train.warmup_steps", self.warmup_steps, low=0)
        _check_range("train.base_lr", self.base_lr, low=0, low_open=True)
        _check_range("train.weight_decay", self.weight_decay, low=0)
        _check_range("train.beta1", self.beta1, low=0, high=0.999999)
        _check_range("train.beta2", self.beta2, low=0, high=0.999999)
        check_device(self.device, field="train.device", indexed=False)
        _check_range("train.num_workers", self.num_workers, low=0)
        _check_range("train.max_sample_errors", self.max_sample_errors, low=0)
        _check_range("train.cache_mb", self.cache_mb, low=0)
        _check_range("train.dist_timeout_s", self.dist_timeout_s, low=1)
        _check_range("train.knn_every", self.knn_every, low=0)

    def _check_backbone(self) -> None:
        """The timm name, resolution and ``model_kwargs`` can build a ViT without a head."""
        if not self.model.startswith(("vit_", "deit")):
            raise ConfigError(f"train.model: got {self.model!r}, expected a timm ViT name such "
                              "as vit_small_patch16_224 or vit_base_patch16_224")
        _check_range("train.image_size", self.image_size, low=8)
        for key, value in self.model_kwargs.items():
            if key in ("img_size", "num_classes", "global_pool", "pretrained"):
                raise ConfigError(f"train.model_kwargs.{key}: set by stablerep itself "
                                  "(image_size; the backbone has no classifier); remove it")
            if isinstance(value, (dict, list)) or value is None:
                raise ConfigError(f"train.model_kwargs.{key}: got {value!r}, expected a "
                                  "number, a string or true/false")
        _check_vit_shape(self.model, self.image_size, self.model_kwargs)

    @property
    def uses_text(self) -> bool:
        return self.method in ("stablerep_plus", "clip")

    @property
    def crops_per_caption(self) -> int:
        """Rows per caption in a batch: k images, 2 crops of one image (simclr), 1 (clip)."""
        return {"simclr": 2, "clip": 1}.get(self.method, self.images_per_caption)

    @property
    def images_read_per_caption(self) -> int:
        """Distinct stored images needed per caption."""
        return self.images_per_caption if self.method.startswith("stablerep") else 1


# ---------------------------------------------------------------------------- evaluation


@dataclass
class EvalConfig:
    """Frozen-feature evaluation: linear probe, few-shot, kNN, and an HTML report."""

    checkpoint: str = ""  # train folder, ckpt-*.pt, backbone.pt, or timm:<name>; default <data_root>/train
    datasets: list[str] = field(default_factory=lambda: ["sklearn:digits"])  # see README
    out: str = ""  # metrics.json, report.html, feature cache; default <data_root>/eval
    baseline: str = "random"  # random (same architecture, random init), none, or a checkpoint
    image_size: int | None = None  # input size; default the backbone's training size
    batch_size: int = 256  # images per forward pass
    num_workers: int = 2  # image decoding processes
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1 ...
    precision: EvalPrecision = "auto"  # auto (bf16 on cuda, fp32 on cpu), fp32, bf16
    feature_cache: str = ""  # feature cache URI; default <out>/features
    data_cache: str = ""  # local folder for torchvision data sets; default the stablerep cache
    download: bool = False  # let torchvision download missing data sets (needs network)
    probe: bool = True  # run the linear probe
    probe_num_c: int = 45  # inverse-regularisation values swept (log-spaced)
    probe_c_min: float = 1e-6  # smallest C
    probe_c_max: float = 1e5  # largest C
    probe_val_fraction: float = 0.1  # part of train held out to choose C (DINOv2: 10%)
    probe_max_iter: int = 1000  # most L-BFGS iterations per probe fit (DINOv2: 1000)
    few_shot_way: int = 5  # classes per episode
    few_shot_shot: int = 5  # support images per class
    few_shot_query: int = 15  # query images per class
    few_shot_episodes: int = 600  # episodes (0 = skip few-shot)
    knn_k: int = 20  # neighbours for the kNN metric (0 = skip)
    seed: int = 0  # seed for splits, episodes and the random baseline
    images: str = ""  # images folder for the sample grid; default <data_root>/images if present
    train_metrics: str = ""  # metrics.jsonl for the loss curve; default beside the checkpoint

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("eval.datasets: expected at least one data set")
        if self.image_size is not None:
            _check_range("eval.image_size", self.image_size, low=8)
        for name in ("batch_size", "probe_num_c", "probe_max_iter", "few_shot_way",
                     "few_shot_shot"):
            _check_range(f"eval.{name}", getattr(self, name), low=1)
        for name in ("num_workers", "few_shot_query", "few_shot_episodes", "knn_k"):
            _check_range(f"eval.{name}", getattr(self, name), low=0)
        if self.few_shot_episodes and self.few_shot_way < 2:
            raise ConfigError(f"eval.few_shot_way: got {self.few_shot_way}, expected >= 2")
        check_device(self.device, field="eval.device")
        _check_range("eval.probe_c_min", self.probe_c_min, low=0, low_open=True)
        _check_range("eval.probe_c_max", self.probe_c_max, low=self.probe_c_min)
        _check_range("eval.probe_val_fraction", self.probe_val_fraction, low=0.01, high=0.9)


# ---------------------------------------------------------------------------- experiment

ReproArm = Literal["random", "simclr", "stablerep_k2", "stablerep_k4", "stablerep_k8",
                   "stablerep_plus_k4", "clip"]
REPRO_ARMS: tuple[str, ...] = typing.get_args(ReproArm)


@dataclass
class ReproConfig:
    """The miniature replication (``stablerep repro``): each arm x seed on the same images.

    Every arm trains ``train.max_steps`` steps of ``images_per_step`` images (equal images
    seen); ``random`` is the untrained backbone. Each backbone is evaluated on ``eval.datasets``
    plus a held-out procedural test set drawn from captions the training set never had.
    """

    out: str = ""  # results.json, results.md, results.png, report.html; default <data_root>/repro
    arms: list[ReproArm] = field(default_factory=lambda: [
        "random", "simclr", "stablerep_k2", "stablerep_k4", "stablerep_k8"])  # what to compare
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training (and init) seeds
    images_per_step: int = 128  # images per optimizer step for every arm (n captions x k)
    test_captions: int = 500  # held-out procedural test set: captions (0 = none)
    test_images_per_caption: int = 3  # its images per caption (all in the split of their caption)
    test_seed: int = 1000  # its caption and image seed (the captions' settings are the training set's)

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("repro.arms: expected at least one arm, e.g. [random, stablerep_k4]")
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"repro.arms: each arm once, got {self.arms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"repro.seeds: expected distinct seeds, got {self.seeds}")
        for i, seed in enumerate(self.seeds):
            _check_range(f"repro.seeds[{i}]", seed, low=0, high=SEED_MAX)
        _check_range("repro.test_seed", self.test_seed, low=0, high=SEED_MAX)
        _check_range("repro.images_per_step", self.images_per_step, low=8)
        _check_range("repro.test_captions", self.test_captions, low=0)
        _check_range("repro.test_images_per_caption", self.test_images_per_caption, low=1)


# ---------------------------------------------------------------------------- root


@dataclass
class Config:
    """The whole recipe: where data lives and one section per stage."""

    data_root: str = "./data"  # folder URI under which every stage writes (local, gs://, s3://)
    captions: CaptionsConfig | None = None  # caption stage
    generate: GenerateConfig | None = None  # generation stage
    train: TrainConfig | None = None  # training stage
    eval: EvalConfig | None = None  # evaluation stage
    repro: ReproConfig | None = None  # the miniature replication (stablerep repro)
