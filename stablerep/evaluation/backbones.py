"""Loading the backbone to evaluate: a stablerep run, a checkpoint, an export, or timm.

Accepted ``eval.checkpoint`` forms:

- a training output folder (uses ``latest.json``'s checkpoint, or ``backbone.pt`` +
  ``backbone.json`` when there is no checkpoint);
- a ``ckpt-*.pt`` file; a ``backbone.pt`` (with its ``backbone.json`` beside it);
- ``timm:<name>`` (random init, e.g. ``timm:vit_small_patch16_224``) or
  ``timm-pretrained:<name>`` (weights from the hub, where there is network).

Every backbone is a timm ViT returning the CLS feature after the final norm. Its ``key``
identifies the weights for the feature cache (a checkpoint's sha256, or the timm name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stablerep import storage
from stablerep.contracts import BACKBONE, BACKBONE_JSON, read_latest
from stablerep.errors import ConfigError, InputError
from stablerep.models import create_backbone, timm_name
from stablerep.torchfiles import read_torch


@dataclass
class Backbone:
    """A frozen feature extractor and what it is."""

    model: nn.Module
    info: dict[str, Any]  # timm_model, image_size, feature_dim (+ step, method ...)
    key: str  # identifies the weights (cache key)
    source: str  # what the user named


def _from_state(state: dict[str, torch.Tensor], info: dict[str, Any], key: str, source: str
                ) -> Backbone:
    if not isinstance(info, dict) or not all(k in info for k in ("timm_model", "image_size")):
        raise InputError(f"{source}: its model info names no timm_model and image_size")
    try:
        model = create_backbone(info["timm_model"], int(info["image_size"]),
                                info.get("model_kwargs"))
    except ConfigError as e:  # its message names train.model; name the file instead
        raise InputError(f"{source}: {str(e).removeprefix('train.model: ')}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: weights of another size or model
        raise InputError(f"{source}: the weights do not fit {info['timm_model']} at "
                         f"image_size {info['image_size']} ({str(e).splitlines()[-1].strip()})"
                         ) from None
    if missing or unexpected:
        raise InputError(f"{source}: the weights do not fit {info['timm_model']} (missing "
                         f"{len(missing)} keys, e.g. {missing[:2]}; unexpected {unexpected[:2]})")
    return Backbone(model.eval(), info, key, source)


def _load_torch(uri: str) -> tuple[Any, str]:
    obj, digest = read_torch(uri, what="stablerep checkpoint or timm backbone")
    return obj, digest[:16]


def _from_checkpoint(uri: str, source: str) -> Backbone:
    obj, digest = _load_torch(uri)
    if not isinstance(obj, dict) or "model_info" not in obj or "model" not in obj:
        raise InputError(f"{uri}: not a stablerep checkpoint (no model / model_info)")
    state = {k.removeprefix("backbone."): v for k, v in obj["model"].items()
             if k.startswith("backbone.")}
    info = {**obj["model_info"], "step": obj.get("step")}
    return _from_state(state, info, f"ckpt-{digest}", source)


def _from_export(uri: str, source: str) -> Backbone:
    info_uri = storage.join(uri.rsplit("/", 1)[0], BACKBONE_JSON)
    if not storage.exists(info_uri):
        raise InputError(f"{uri}: no backbone.json beside it (it names the timm model)")
    info = storage.read_json(info_uri)
    state, digest = _load_torch(uri)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise InputError(f"{uri}: not a timm state dict")
    return _from_state(state, info, f"backbone-{digest}", source)


def random_like(info: dict[str, Any], *, seed: int = 0) -> Backbone:
    """A randomly initialised backbone of the same architecture (the default baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(info["timm_model"], int(info["image_size"]),
                                info.get("model_kwargs"))
    info = {k: info[k] for k in ("timm_model", "image_size", "model_kwargs", "feature_dim")
            if k in info}
    return Backbone(model.eval(), {**info, "init": "random"},
                    f"random-{info['timm_model']}-{info['image_size']}{_kwargs_key(info)}-s{seed}",
                    "random init")


def _kwargs_key(info: dict[str, Any]) -> str:
    """The model_kwargs part of a random backbone's cache key ("" when there are none)."""
    kwargs = info.get("model_kwargs") or {}
    return "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))


def load_backbone(spec: str, *, image_size: int | None = None, seed: int = 0) -> Backbone:
    """The backbone named by ``spec`` (see the module docstring)."""
    if spec.startswith(("timm:", "timm-pretrained:")):
        kind, name = spec.split(":", 1)
        import timm

        size = image_size or 224
        pretrained = kind == "timm-pretrained"
        try:
            with torch.random.fork_rng(devices=[]):  # random init reproducible from `seed`
                torch.manual_seed(seed)
                model = timm.create_model(timm_name(name), pretrained=pretrained,
                                          num_classes=0, global_pool="token", img_size=size)
        except Exception as e:  # noqa: BLE001 - unknown name, no network ...
            raise InputError(f"{spec}: cannot create this timm backbone ({e})") from None
        info = {"timm_model": timm_name(name), "image_size": size,
                "feature_dim": model.num_features}
        # random init: the same weights as random_like(info, seed=seed), so the same key
        key = (f"timm-{timm_name(name)}-{size}-pre" if pretrained
               else f"random-{timm_name(name)}-{size}-s{seed}")
        return Backbone(model.eval(), info, key, spec)
    uri = spec.rstrip("/")
    latest = read_latest(uri)  # weights_only loading below: a pickled callable is refused
    if latest is not None:
        return _from_checkpoint(latest, spec)
    if storage.exists(storage.join(uri, BACKBONE)):
        return _from_export(storage.join(uri, BACKBONE), spec)
    if not storage.exists(uri):
        raise InputError(f"{spec}: no such checkpoint, backbone or training folder")
    if storage.is_dir(uri):
        raise InputError(f"{spec}: a folder with neither latest.json (a training folder) nor "
                         "backbone.pt (an export)")
    if uri.endswith(BACKBONE):
        return _from_export(uri, spec)
    return _from_checkpoint(uri, spec)
