"""train.model_kwargs: timm ViT arguments beyond the name (a 4-pixel patch for 16 px images,
a shallower or narrower ViT) reach the model, are recorded in every checkpoint and export, and
rebuild the same architecture for evaluation and for its random-init baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stablerep.config import Config, TrainConfig, from_dict
from stablerep.errors import ConfigError, InputError
from stablerep.evaluation.backbones import load_backbone, random_like
from stablerep.models import create_backbone, create_model
from stablerep.training.checkpoint import check_compatible, export_backbone
from stablerep.training.trainer import model_info

SMALL = {"patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="vit_tiny_patch16_224", image_size=16, model_kwargs=dict(SMALL),
                       head_hidden_dim=32, head_out_dim=16, **kw)


def test_the_kwargs_shape_the_vit() -> None:
    model = create_model(_cfg())
    assert model.feature_dim == 64 and len(model.backbone.blocks) == 2
    assert model.backbone.patch_embed.num_patches == 16  # (16 / 4) ** 2 tokens
    out = model(torch.randn(3, 3, 16, 16))
    assert out["features"].shape == (3, 64) and out["z"].shape == (3, 16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"img_size": 32}, "train.model_kwargs.img_size: set by stablerep itself"),
    ({"num_classes": 5}, "train.model_kwargs.num_classes: set by stablerep itself"),
    ({"depth": [1, 2]}, "train.model_kwargs.depth: got [1, 2], expected a number"),
    ({"patch_size": None}, "train.model_kwargs.patch_size: got None, expected a number"),
])
def test_bad_kwargs_fail_naming_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Config, {"train": {"model_kwargs": kwargs}})


def test_kwargs_timm_refuses_fail_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"^train.model: cannot build vit_tiny_patch16_224 at "
                                          r"image_size 16 with \{'no_such_arg': 1\}"):
        create_backbone("vit_tiny_patch16_224", 16, {"no_such_arg": 1})


def test_a_checkpoint_of_other_kwargs_is_not_resumed() -> None:
    info = model_info(_cfg(), 64)
    assert info["model_kwargs"] == SMALL
    check_compatible(dict(info), info, "run")
    older = {k: v for k, v in model_info(TrainConfig(), 768).items() if k != "model_kwargs"}
    check_compatible(older, model_info(TrainConfig(), 768), "run")  # written before the field
    with pytest.raises(InputError, match=r"model_kwargs: checkpoint \{'patch_size': 4"):
        check_compatible(info, {**info, "model_kwargs": {**SMALL, "depth": 3}}, "run")


def test_an_export_rebuilds_the_same_vit_and_its_random_baseline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(_cfg())
    info = model_info(_cfg(), model.feature_dim)
    export_backbone(str(tmp_path), model.backbone.state_dict(), info)
    loaded = load_backbone(str(tmp_path))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.backbone.eval()(x))
    base = random_like(loaded.info, seed=0)
    assert len(base.model.blocks) == 2 and base.info["model_kwargs"] == SMALL
    plain = random_like({"timm_model": "vit_tiny_patch16_224", "image_size": 16}, seed=0)
    assert base.key != plain.key  # the feature cache keeps the two apart
    assert "depth2" in base.key and "patch_size4" in base.key
