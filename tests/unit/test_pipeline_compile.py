"""The compiled pipeline: checked-in forms equal a fresh compile; parameters, defaults,
descriptions and Kubernetes settings are what stablerep.pipeline.PARAMS and the issue say."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from stablerep import pipeline as lib
from stablerep.k8s.config import CUDA_IMAGE

ROOT = Path(__file__).resolve().parents[2]
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN",
             list: "LIST", dict: "STRUCT"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("compile")
    yaml_path, k8s_path = out / "p.yaml", out / "k8s.yaml"
    # the default image, whatever $STABLEREP_IMAGE says: that is what is checked in
    lib.compile_pipeline(yaml_path, kubernetes=k8s_path, image=CUDA_IMAGE)
    return yaml_path.read_text(), k8s_path.read_text()


def test_checked_in_yaml_equals_a_fresh_compile(fresh):
    assert lib.PIPELINE_YAML.read_text() == fresh[0], (
        "pipelines/stablerep_pipeline.yaml differs from a fresh compile: run `make compile` "
        "and commit")


def test_checked_in_kubernetes_form_equals_a_fresh_compile(fresh):
    assert lib.PIPELINE_K8S.read_text() == fresh[1], (
        "k8s/pipeline/stablerep-pipeline.yaml differs from a fresh compile: run `make compile` "
        "and commit")


def test_kubernetes_form_is_pipeline_and_version(fresh):
    docs = [d for d in yaml.safe_load_all(fresh[1]) if d]
    assert [(d["apiVersion"], d["kind"]) for d in docs] == [
        ("pipelines.kubeflow.org/v2beta1", "Pipeline"),
        ("pipelines.kubeflow.org/v2beta1", "PipelineVersion")]
    assert docs[1]["spec"]["pipelineName"] == docs[0]["metadata"]["name"]


def _docs(text: str) -> tuple[dict, dict]:
    spec, platform = [d for d in yaml.safe_load_all(text) if d]
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_parameters_types_defaults_and_descriptions(fresh):
    spec, _ = _docs(fresh[0])
    compiled = spec["root"]["inputDefinitions"]["parameters"]
    assert list(compiled) == sorted(lib.PARAM_NAMES)
    for p in lib.PARAMS:
        entry = compiled[p.name]
        assert entry["parameterType"] == KFP_TYPES[p.type], p.name
        assert entry["defaultValue"] == p.default, p.name
        assert entry["description"] == p.help, p.name


def test_pipeline_signature_is_the_parameter_table():
    fn = lib.load_pipeline()
    sig = inspect.signature(fn.pipeline_func)
    assert list(sig.parameters) == list(lib.PARAM_NAMES)
    for p in lib.PARAMS:
        assert sig.parameters[p.name].annotation is p.type, p.name


def test_validate_component_takes_the_parameter_table():
    from components import validate

    inputs = validate.component_spec.inputs
    assert list(inputs) == list(lib.PARAM_NAMES)
    kinds = {str: "String", int: "Integer", float: "Float", bool: "Boolean", list: "List",
             dict: "Dict"}
    for p in lib.PARAMS:
        assert inputs[p.name].type == kinds[p.type], p.name
    assert validate.component_spec.outputs["Output"].type == "String"  # the resolved config


def test_readme_parameter_table_is_the_parameter_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Kubeflow Pipelines", 1)[1]
    assert lib.param_table() in section, (
        "README's pipeline parameter table differs from stablerep.pipeline.PARAMS; paste "
        "stablerep.pipeline.param_table() over it")


def test_defaults_are_the_cc12m_recipe():
    from_recipe = lib.recipe_params("cc12m")
    for p in lib.PARAMS:
        if p.field and p.field != "data_root" or p.name == "recipe":
            assert from_recipe[p.name] == p.default, p.name


def test_image_is_set_at_compile_time(tmp_path):
    out = tmp_path / "p.yaml"
    lib.compile_pipeline(out, image="registry.example.com/me/stablerep:dev")
    spec, _ = _docs(out.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/me/stablerep:dev"}
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == \
        "registry.example.com/me/stablerep:dev"  # the training job's pods too
    assert "kfp==" not in out.read_text()  # install_kfp_package=False: nothing pip-installed
    assert "pip install" not in out.read_text()


def test_kubernetes_settings_compiled_in(fresh):
    spec, platform = _docs(fresh[0])
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        assert res["cpuRequest"] and res["cpuLimit"] and res["memoryRequest"], name
        assert platform[name]["securityContext"]["runAsNonRoot"] is True, name
        assert int(platform[name]["activeDeadlineSeconds"]) > 0, name
    for name in ("exec-generate-shards", "exec-train", "exec-evaluate"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceType"] == \
            "nvidia.com/gpu", name
        assert platform[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm", name
        assert platform[name]["emptyDirMounts"][0]["medium"] == "Memory", name
    tasks = {**spec["root"]["dag"]["tasks"]}
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    assert tasks["generate-shards"]["retryPolicy"]["maxRetryCount"] == 3
    # an evicted launcher's retry attaches to the job it left running
    assert tasks["train-2"]["retryPolicy"]["maxRetryCount"] == 3
    for name in ("generate-shards", "images-manifest", "train", "train-2", "evaluate"):
        assert tasks[name]["cachingOptions"] == {}, name  # caching off
    assert tasks["captions"]["cachingOptions"]["enableCache"] is True
    launcher = platform["exec-train-2"]
    assert {e["name"]: e["fieldPath"] for e in launcher["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid"}
    assert "accelerator" not in executors["exec-train-2"]["container"]["resources"]


def _tasks(spec: dict) -> dict:
    tasks = {**spec["root"]["dag"]["tasks"]}
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_generation_fans_out_over_workers_not_shards(fresh, tmp_path, monkeypatch):
    """The paper's 8192 shards at 64 workers: the loop iterates the captions step's output,
    which holds one item per worker, so a run creates 64 generation tasks, not 8192."""
    spec, _ = _docs(fresh[0])
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["taskInfo"]["name"] == "workers"
    assert loop["iteratorPolicy"]["parallelismLimit"] == lib.DEFAULT_PARALLELISM
    assert loop["parameterIterator"]["items"] == {"inputParameter":
                                                  "pipelinechannel--captions-Output"}
    assert loop["inputs"]["parameters"]["pipelinechannel--captions-Output"][
        "taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "captions"}
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["generate-shards"]  # one task per loop item
    gen = body["generate-shards"]["inputs"]["parameters"]
    assert gen["worker"] == {"componentInputParameter":
                             "pipelinechannel--captions-Output-loop-item"}
    assert spec["root"]["inputDefinitions"]["parameters"]["shards"]["defaultValue"] == 8192
    assert spec["root"]["inputDefinitions"]["parameters"]["workers"]["defaultValue"] == 64
    # what the captions step returns for those parameters: the loop's items
    from stablerep.pipeline import captions_step
    from stablerep.stages import CaptionsResult

    made = CaptionsResult(uri="u", manifest="m", count=10_000_000, num_shards=8192)
    monkeypatch.setattr("stablerep.stages.run_captions", lambda cfg: made)

    class Artifact:
        path, metadata = str(tmp_path / "meta.json"), {}

    config = lib.resolved(lib.build_config("cc12m", [], {"data_root": str(tmp_path)}))
    items = captions_step(config, workers=64, dataset=Artifact())
    print(f"shards=8192 workers=64: {len(items)} generation tasks")
    assert items == list(range(64))
    assert "generate-shards" not in spec["root"]["dag"]["tasks"]  # only inside the loop
    tasks = _tasks(spec)
    assert sorted(loop["dependentTasks"]) == ["captions", "stage-model"]  # model copied first
    assert set(tasks["images-manifest"]["dependentTasks"]) >= {"for-loop-1"}
    assert "images-manifest" in spec["root"]["dag"]["tasks"]["condition-branches-2"][
        "dependentTasks"]  # training starts after the manifest is written
