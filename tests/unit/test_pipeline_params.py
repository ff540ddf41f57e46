"""Pipeline parameters: names, types and values are checked (naming the parameter) before
anything runs; the parameters become dotted overrides between the recipe and `overrides`."""

from __future__ import annotations

import pytest

from stablerep.config import load_config
from stablerep.errors import ConfigError
from stablerep.kfp import params as parameters
from stablerep.kfp import steps, validation

DEMO = {"recipe": "demo_sd", "data_root": "/tmp/x", "train_backend": "local"}


@pytest.fixture(autouse=True)
def _eval_sets(paper_eval_sets):
    """Every test here validates with the paper's evaluation sets in the cache (conftest)."""


def _demo(**extra):
    return {**parameters.recipe_params("demo_sd"), **DEMO, **extra}


def test_cc12m_defaults_validate_on_a_cluster():
    cfg = validation.check_run({}, local=False)
    assert cfg.captions.num_shards == 8192 and cfg.captions.num_captions is None
    assert cfg.train.model == "vit_base_patch16_224"
    assert cfg.data_root == "gs://YOUR_BUCKET/stablerep/cc12m"


def test_parameters_sit_between_recipe_and_overrides():
    cfg = validation.check_run(_demo(inference_steps=3, images_per_caption=3,
                             overrides=["generate.num_inference_steps=2"]))
    assert cfg.generate.num_inference_steps == 2  # overrides win
    assert cfg.generate.images_per_caption == 3  # the parameter wins over the recipe
    assert cfg.generate.backend == "tiny"  # not a parameter: the recipe's
    # the later steps run the validate step's one resolved config, as it was
    assert validation.stage_config(validation.resolved(cfg)) == cfg


def test_recipe_params_read_back_the_recipe():
    values = parameters.recipe_params("demo_sd")
    assert values["images_per_caption"] == 4 and values["backbone"] == "vit_tiny_patch16_224"
    assert values["num_captions"] == 48 and values["shards"] == 4


@pytest.mark.parametrize("params, message", [
    ({"nosuch": 1}, "parameter 'nosuch': the pipeline has no such parameter; its parameters: "
                    "data_root, recipe, overrides, caption_source"),
    ({"shards": "8"}, "parameter shards: got '8', expected an integer"),
    ({"shards": True}, "parameter shards: got True, expected an integer"),
    ({"guidance_scale": -1.0}, "parameter guidance_scale: got -1.0, expected a value >= 0"),
    ({"method": "byol"}, "parameter method: got 'byol', expected one of stablerep, "
                         "stablerep_plus, simclr, clip"),
    ({"train_backend": "slurm"}, "parameter train_backend: got 'slurm', expected one of "
                                 "pytorchjob, trainjob, local"),
    ({"node_selector": {"pool": 1}}, "parameter node_selector: pool: got 1, expected a string"),
    ({"tolerations": [{"bad": 1}]}, "parameter tolerations[0]: got {'bad': 1}, expected a "
                                    "mapping of key, operator, value, effect"),
    ({"overrides": ["train.epochs"]}, "parameter overrides[0]: got 'train.epochs', expected "
                                      "section.key=value"),
    ({"backbone": "resnet50"}, "parameter backbone (train.model: got 'resnet50', expected a "
                               "timm ViT name"),
    ({"caption_inputs": []}, "parameter caption_inputs (captions.inputs: the files source "
                             "needs at least one input URI)"),
    ({"images_per_caption": 2}, "parameter images_per_caption: got 2, but "
                                "train.images_per_caption reads 6 per caption"),
    ({"recipe": "nosuch"}, "recipe 'nosuch': not a built-in recipe; expected one of cc12m,"),
    ({"image": "docker.io/stablerep/stablerep:0.1.0-cpu"},
     "parameter image: 'docker.io/stablerep/stablerep:0.1.0-cpu' is the CPU-only image but 8 "
     "GPU(s) per pod are requested"),
    ({"nodes": 0}, "parameter nodes: got 0, expected a value >= 1"),
])
def test_bad_parameter_named(params, message, tmp_path):
    params = {"data_root": str(tmp_path / "root"), **params}
    with pytest.raises(ConfigError) as e:
        validation.check_run(params, local=False)
    assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "root").exists()  # nothing written


def test_cluster_backend_refused_in_a_local_run():
    with pytest.raises(ConfigError, match="local runs .* need train_backend=local"):
        validation.check_run(_demo(train_backend="pytorchjob"), local=True)
    validation.check_run(_demo(train_backend="local"), local=True)


def test_zero_captions_means_all():
    assert validation.param_values({"num_captions": 0}) == {"captions.num_captions": None}
    assert validation.param_values({"num_captions": 12}) == {"captions.num_captions": 12}


def test_parse_param_reads_json_else_string():
    assert parameters.parse_param("shards=16") == ("shards", 16)
    assert parameters.parse_param('node_selector={"a": "b"}') == ("node_selector", {"a": "b"})
    assert parameters.parse_param("data_root=gs://b/x") == ("data_root", "gs://b/x")
    with pytest.raises(ConfigError, match="expected name=value"):
        parameters.parse_param("shards")


def test_eval_metric_values_flatten_metrics_json():
    metrics = {"datasets": {"d": {"linear_probe": {"top1": 0.5}, "few_shot": {"mean": 0.4,
                                                                               "ci95": 0.1},
                                  "knn": {"top1": 0.3}}},
               "baseline": {"datasets": {"d": {"linear_probe": {"top1": 0.2}}}}}
    assert steps.eval_metric_values(metrics) == {
        "d/probe_top1": 0.5, "d/few_shot_mean": 0.4, "d/few_shot_ci95": 0.1, "d/knn_top1": 0.3,
        "baseline/d/probe_top1": 0.2}


def test_a_jobs_command_line_carries_the_resolved_config_whole():
    cfg = validation.check_run(_demo(images_per_caption=3, overrides=["train.base_lr=2e-4"]))
    job = validation.cluster_config(parameters.check_params(_demo(images_per_caption=3)), cfg=cfg)
    assert job.overrides == validation.config_sets(cfg)
    # what a job's pods (stablerep train --config RECIPE --set ...) build from it
    again = load_config(job.recipe, job.overrides, require=("train",))
    assert again == cfg and again.generate.images_per_caption == 3
    assert again.train.base_lr == 2e-4


def test_cli_param_option_takes_every_parameter_and_only_those() -> None:
    """`--param` of `stablerep pipeline submit|run-local` names the table's parameters."""
    import json

    from stablerep.pipeline_cli import _PARAM_HELP, _params

    for p in parameters.PARAMS:
        assert p.name in _PARAM_HELP, p.name
        assert _params(None, (), (f"{p.name}={json.dumps(p.default)}",)) == {p.name: p.default}
    with pytest.raises(ConfigError, match="parameter 'shard': the pipeline has no such"):
        _params(None, (), ("shard=3",))
    # the options that set parameters by their own names: --recipe, --set, --data-root
    given = _params("demo", ("train.max_steps=2",), (), data_root="/tmp/d")
    assert set(given) <= set(parameters.PARAM_NAMES)
    assert given["overrides"] == ["train.max_steps=2"] and given["data_root"] == "/tmp/d"
