"""Text-to-image backends behind one small interface.

A backend (:class:`stablerep.generation.work.Backend`) turns a batch of :class:`WorkItem`
(caption, image index, seed) into uint8 images (N, H, W, 3). ``diffusers`` loads any
diffusers text-to-image pipeline from a local folder, a storage URI (copied once to the local
cache) or a hub id; ``tiny`` builds a randomly
initialised Stable Diffusion pipeline offline (``stablerep.generation.tiny``), saves it to a
folder and then loads it exactly like a real model, so both take the same code path.
``procedural`` renders digits and shapes from grammar captions on the CPU
(``stablerep.generation.procedural``), a fast stand-in whose learning signal is checkable.

Stable Diffusion-style pipelines (an ``encode_prompt`` that returns prompt and negative
embeddings) get the fast path: each distinct caption in a batch is encoded once and the
unconditional embedding once per run, then all images of the batch denoise in one call.
Other pipelines get the prompts as strings. Every image draws its initial noise from its own
CPU ``torch.Generator`` seeded with its own seed, so its pixels do not depend on the batch.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from stablerep import devices, storage
from stablerep.config import GenerateConfig
from stablerep.errors import InputError
from stablerep.generation.work import Backend, WorkItem

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NO_STACKTRACE = re.compile(r"\s*Please check out the root cause in the stacktrace above\.?")


def resolve_device(name: str) -> str:
    return devices.resolve_device(name, field="generate.device")


def resolve_dtype(name: str, device: str):
    """The pipeline's dtype: fp16 on a GPU and fp32 on the CPU unless chosen."""
    return devices.resolve_dtype(name, device, auto_cuda="fp16")


def check_pipeline_folder(folder: Path, label: str) -> dict[str, Any]:
    """Check that ``folder`` holds a diffusers pipeline; name what is missing if not."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"{label}: not a diffusers pipeline (no model_index.json in {folder})")
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8 or not JSON
        raise InputError(f"{label}: model_index.json is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{label}: model_index.json holds no JSON object")
    components = [k for k, v in spec.items()
                  if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    missing = [c for c in components if not (folder / c).is_dir()]
    if missing:
        raise InputError(f"{label}: not a complete diffusers pipeline; missing component "
                         f"folder(s) {', '.join(missing)} in {folder}")
    return spec


def resolve_model(model: str) -> str:
    """A local folder for ``model`` (a folder, a storage URI, or a hub id left as is)."""
    if not storage.is_local(model):
        folder = storage.cache_local(model)
        check_pipeline_folder(folder, model)
        return str(folder)
    path = storage.local_path(model)
    if path.exists():
        check_pipeline_folder(path, model)
        return str(path)
    if HUB_ID.match(model):
        return model  # downloaded by diffusers where the cluster has network
    raise InputError(f"generate.model: {model} is neither a local folder, a storage URI nor "
                     "a hub id (org/name)")


def _set_scheduler(pipe, name: str) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++")


def load_pipeline(model_path: str, *, dtype, label: str):
    """Load a diffusers pipeline from a folder or hub id (no safety checker, quiet)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    import diffusers
    from packaging.version import Version

    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns there).
    new_name = Version(diffusers.__version__).release >= (0, 42)
    kwargs: dict[str, Any] = {"dtype" if new_name else "torch_dtype": dtype}
    if Path(model_path).is_dir():
        spec = json.loads((Path(model_path) / "model_index.json").read_text())
        if "safety_checker" in spec:  # the paper's images are unfiltered
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    from_hub = not Path(model_path).is_dir()
    verbosity = diffusers_logging.get_verbosity()
    if from_hub:  # its warnings repeat what the one error line below says
        diffusers_logging.set_verbosity_error()
    try:
        return DiffusionPipeline.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as e:
        reason = _hub_error(model_path, e) if from_hub else None
        if reason is not None:
            raise InputError(f"generate.model: cannot load {label}: {reason}") from None
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        detail = _NO_STACKTRACE.sub("", detail)  # the traceback is not shown for user errors
        raise InputError(f"generate.model: cannot load {label} as a diffusers pipeline "
                         f"({detail})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__]
    return seen


def _hub_error(model_id: str, exc: BaseException) -> str | None:
    """Why the hub id ``model_id`` did not load, as a phrase; None if not a hub problem."""
    from huggingface_hub import constants, errors

    chain = _causes(exc)

    def found(*kinds: type) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if found(errors.GatedRepoError):
        return ("a gated model on the Hugging Face Hub; accept its terms there and give a "
                "token (HF_TOKEN)")
    if found(errors.RepositoryNotFoundError):
        return ("no such model on the Hugging Face Hub (or a private one: give a token, "
                "HF_TOKEN), expected a hub id (org/name), a local folder or a storage URI")
    if found(errors.RevisionNotFoundError):
        return "the Hugging Face Hub has no such revision of it"
    offline = found(errors.OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE
    if offline or found(errors.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if offline
               else "the Hugging Face Hub cannot be reached")
        return (f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                "expected a cached hub id, a local folder or a storage URI")
    if found(errors.EntryNotFoundError):
        return "not a diffusers pipeline on the Hugging Face Hub (no model_index.json)"
    return None


class DiffusersBackend:
    """Any diffusers text-to-image pipeline, batched, with per-image seeds.

    Args:
        cfg: generation settings (scheduler, steps, guidance, sizes, device, dtype ...).
        pipe: a loaded pipeline (moved to the device and configured here).
        model_id: the name recorded in each sample's metadata.
    """

    def __init__(self, cfg: GenerateConfig, pipe, model_id: str):
        import torch

        self.cfg, self.model_id = cfg, model_id
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        _set_scheduler(pipe, cfg.scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(self.device)
        if pipe.dtype != self.dtype:
            pipe = pipe.to(dtype=self.dtype)
        if self.device.startswith("cuda") and cfg.channels_last:
            for part in ("unet", "vae"):
                if hasattr(pipe, part):
                    getattr(pipe, part).to(memory_format=torch.channels_last)
        if cfg.compile and hasattr(pipe, "unet"):
            pipe.unet = torch.compile(pipe.unet, fullgraph=False)
        self.pipe = pipe
        self.fast_path = type(pipe).__name__ == "StableDiffusionPipeline"
        self._negative = None  # (1, L, D) unconditional embedding, cached

    @classmethod
    def load(cls, cfg: GenerateConfig, model_path: str, model_id: str | None = None
             ) -> DiffusersBackend:
        """Load the pipeline at ``model_path`` (folder or hub id) and wrap it."""
        label = model_id or cfg.model
        dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
        return cls(cfg, load_pipeline(model_path, dtype=dtype, label=label), label)

    def _embed(self, prompts: list[str]):
        """Text embeddings (len(prompts), L, D), no guidance duplication."""
        import torch

        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds

    def generate(self, items: list[WorkItem]) -> np.ndarray:
        import torch

        cfg = self.cfg
        generators = [torch.Generator("cpu").manual_seed(it.seed) for it in items]
        common = dict(height=cfg.height, width=cfg.width,
                      num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, generator=generators,
                      output_type="np")
        if "eta" in _call_params(self.pipe):
            common["eta"] = cfg.eta
        with torch.inference_mode():
            if self.fast_path:
                unique = list(dict.fromkeys(it.caption for it in items))
                embeds = self._embed(unique)  # (u, L, D)
                index = torch.tensor([unique.index(it.caption) for it in items],
                                     device=embeds.device)
                if self._negative is None:
                    self._negative = self._embed([cfg.negative_prompt])  # (1, L, D)
                out = self.pipe(prompt_embeds=embeds[index],
                                negative_prompt_embeds=self._negative.expand(len(items), -1, -1),
                                **common)
            else:
                out = self.pipe(prompt=[it.caption for it in items],
                                negative_prompt=[cfg.negative_prompt] * len(items), **common)
        images = out.images  # (N, H, W, 3) float in [0, 1]
        return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)


_PARAMS: dict[type, set[str]] = {}


def _call_params(pipe) -> set[str]:
    import inspect

    kind = type(pipe)
    if kind not in _PARAMS:
        _PARAMS[kind] = set(inspect.signature(kind.__call__).parameters)
    return _PARAMS[kind]


def tiny_model_folder(cfg: GenerateConfig) -> Path:
    """Where the tiny backend's pipeline lives (built once, then reused)."""
    from stablerep.generation.tiny import save_tiny_pipeline

    root = Path(cfg.tiny_cache) if cfg.tiny_cache else storage.cache_dir() / "models"
    return save_tiny_pipeline(root / "tiny-sd", seed=0)


def create_backend(cfg: GenerateConfig, model_path: str = "") -> Backend:
    """The backend named by ``cfg.backend``, loaded and ready to draw.

    Args:
        cfg: the generation config.
        model_path: a local folder with the run's copy of the model
            (:func:`stablerep.generation.models.staged_model_path`) to load instead of
            ``cfg.model`` / the tiny pipeline; "" = the model itself.
    """
    if model_path and cfg.backend != "procedural":
        from stablerep.generation.models import model_id

        return DiffusersBackend.load(cfg, model_path, model_id=model_id(cfg))
    if cfg.backend == "procedural":
        from stablerep.generation.procedural import ProceduralBackend

        return ProceduralBackend(cfg)
    if cfg.backend == "tiny":
        folder = tiny_model_folder(cfg)
        return DiffusersBackend.load(cfg, str(folder), model_id="stablerep/tiny-sd")
    return DiffusersBackend.load(cfg, resolve_model(cfg.model))
