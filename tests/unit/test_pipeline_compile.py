"""The compiled pipeline: checked-in forms equal a fresh compile; parameters, defaults,
descriptions, images and Kubernetes settings are what stablerep.kfp.params.PARAMS and the
issue say; the repository's pipelines/ and components/ faces work as a user runs them."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.kfp import params as parameters
from stablerep.kfp import validation
from stablerep.kfp.compile import PIPELINE_K8S, PIPELINE_YAML, compile_pipeline
from stablerep.kfp.components import make_components
from stablerep.kfp.pipeline import build_pipeline

ROOT = Path(__file__).resolve().parents[2]
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN",
             list: "LIST", dict: "STRUCT"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("compile")
    yaml_path, k8s_path = out / "p.yaml", out / "k8s.yaml"
    compile_pipeline(yaml_path, kubernetes=k8s_path)  # the default images: what is checked in
    return yaml_path.read_text(), k8s_path.read_text()


def test_checked_in_yaml_equals_a_fresh_compile(fresh):
    assert PIPELINE_YAML.read_text() == fresh[0], (
        "pipelines/stablerep_pipeline.yaml differs from a fresh compile: run `make compile` "
        "and commit")


def test_checked_in_kubernetes_form_equals_a_fresh_compile(fresh):
    assert PIPELINE_K8S.read_text() == fresh[1], (
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
    assert list(compiled) == sorted(parameters.PARAM_NAMES)
    for p in parameters.PARAMS:
        entry = compiled[p.name]
        assert entry["parameterType"] == KFP_TYPES[p.type], p.name
        assert entry["defaultValue"] == p.default, p.name
        assert entry["description"] == p.help, p.name


def test_pipeline_signature_is_the_parameter_table():
    fn = build_pipeline()
    sig = inspect.signature(fn.pipeline_func)
    assert list(sig.parameters) == list(parameters.PARAM_NAMES)
    for p in parameters.PARAMS:
        assert sig.parameters[p.name].annotation is p.type, p.name


def test_validate_component_takes_the_parameter_table():
    validate = make_components(CPU_IMAGE, CUDA_IMAGE).validate
    inputs = validate.component_spec.inputs
    assert list(inputs) == list(parameters.PARAM_NAMES)
    kinds = {str: "String", int: "Integer", float: "Float", bool: "Boolean", list: "List",
             dict: "Dict"}
    for p in parameters.PARAMS:
        assert inputs[p.name].type == kinds[p.type], p.name
        assert inputs[p.name].description == p.help, p.name  # what the UI shows
    assert validate.component_spec.outputs["Output"].type == "String"  # the resolved config


def test_readme_parameter_table_is_the_parameter_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Kubeflow Pipelines", 1)[1]
    assert parameters.param_table() in section, (
        "README's pipeline parameter table differs from stablerep.kfp.params.PARAMS; paste "
        "stablerep.kfp.params.param_table() over it")


def test_defaults_are_the_cc12m_recipe():
    from_recipe = parameters.recipe_params("cc12m")
    for p in parameters.PARAMS:
        if p.field and p.field != "data_root" or p.name == "recipe":
            assert from_recipe[p.name] == p.default, p.name


#: The executors that need no GPU (the CPU image) and those that do (the CUDA image).
CPU_STEPS = {"exec-validate", "exec-captions", "exec-stage-model", "exec-images-manifest",
             "exec-train-launcher"}
CUDA_STEPS = {"exec-generate-shards", "exec-train", "exec-evaluate", "exec-evaluate-2"}


def _images(text: str) -> dict[str, str]:
    executors = _docs(text)[0]["deploymentSpec"]["executors"]
    return {name: e["container"]["image"] for name, e in executors.items()}


def test_steps_without_gpus_run_on_the_cpu_image(fresh):
    images = _images(fresh[0])
    assert set(images) == CPU_STEPS | CUDA_STEPS
    assert {n: i for n, i in images.items() if i == CPU_IMAGE}.keys() == CPU_STEPS
    assert {n: i for n, i in images.items() if i == CUDA_IMAGE}.keys() == CUDA_STEPS


def test_images_are_set_at_compile_time(tmp_path):
    out = tmp_path / "p.yaml"
    cpu, cuda = "registry.example.com/me/stablerep:dev-cpu", "registry.example.com/me/sr:dev"
    compile_pipeline(out, cpu_image=cpu, cuda_image=cuda)
    images = _images(out.read_text())
    assert {n for n, i in images.items() if i == cpu} == CPU_STEPS
    assert {n for n, i in images.items() if i == cuda} == CUDA_STEPS
    spec, _ = _docs(out.read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == cuda
    assert "kfp==" not in out.read_text()  # install_kfp_package=False: nothing pip-installed
    assert "pip install" not in out.read_text()


def test_compile_image_option_sets_both_images(tmp_path):
    out = tmp_path / "p.yaml"
    image = "registry.example.com/me/stablerep:dev"
    run = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "compile", "--out",
                          str(out), "--kubernetes", "", "--image", image],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(_images(out.read_text()).values()) == {image}


def test_lineage_runs_from_captions_to_the_report(fresh):
    """Each step takes the artifact of the step whose output it reads."""
    tasks = _tasks(_docs(fresh[0])[0])
    assert tasks["images-manifest"]["inputs"]["artifacts"]["captions"][
        "taskOutputArtifact"] == {"outputArtifactKey": "captions", "producerTask": "captions"}
    for train, evaluate in (("train", "evaluate"), ("train-launcher", "evaluate-2")):
        assert tasks[train]["inputs"]["artifacts"]["images"] == {
            "componentInputArtifact": "pipelinechannel--images-manifest-images"}
        assert tasks[evaluate]["inputs"]["artifacts"]["checkpoint"]["taskOutputArtifact"] == {
            "outputArtifactKey": "checkpoint", "producerTask": train}
    spec, _ = _docs(fresh[0])
    assert spec["components"]["comp-train"]["outputDefinitions"]["artifacts"]["checkpoint"][
        "artifactType"]["schemaTitle"] == "system.Model"


def test_kfp_dsl_compile_of_the_pipeline_file_as_pasted(fresh, tmp_path):
    """README's `kfp dsl compile --py pipelines/stablerep_pipeline.py ...`, from the
    repository root; only the package under test is put on the path (it is not installed)."""
    source = (ROOT / "pipelines" / "stablerep_pipeline.py").read_text()
    assert "sys.path" not in source and "environ" not in source and "sys.modules" not in source
    kfp_cli = Path(sys.executable).with_name("kfp")
    out = tmp_path / "x.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([str(kfp_cli), "dsl", "compile", "--py",
                          "pipelines/stablerep_pipeline.py", "--output", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _docs(out.read_text()) == _docs(fresh[0])  # the header's map order aside


def test_components_package_exposes_the_default_components():
    code = ("import components, json; print(json.dumps({n: getattr(components, n)"
            ".component_spec.implementation.container.image for n in components.__all__}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    assert json.loads(run.stdout) == {
        "captions": CPU_IMAGE, "evaluate": CUDA_IMAGE, "generate_shards": CUDA_IMAGE,
        "images_manifest": CPU_IMAGE, "stage_model": CPU_IMAGE, "train": CUDA_IMAGE,
        "train_launcher": CPU_IMAGE, "validate": CPU_IMAGE}


def test_kubernetes_settings_compiled_in(fresh):
    spec, platform = _docs(fresh[0])
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        assert res["cpuRequest"] and res["cpuLimit"] and res["memoryRequest"], name
        assert platform[name]["securityContext"]["runAsNonRoot"] is True, name
        assert int(platform[name]["activeDeadlineSeconds"]) > 0, name
    for name in ("exec-generate-shards", "exec-train", "exec-evaluate", "exec-evaluate-2"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceType"] == \
            "nvidia.com/gpu", name
        assert platform[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm", name
        assert platform[name]["emptyDirMounts"][0]["medium"] == "Memory", name
    tasks = {**spec["root"]["dag"]["tasks"]}
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    assert tasks["generate-shards"]["retryPolicy"]["maxRetryCount"] == 3
    # an evicted launcher's retry attaches to the job it left running
    assert tasks["train-launcher"]["retryPolicy"]["maxRetryCount"] == 3
    for name in ("generate-shards", "images-manifest", "train", "train-launcher", "evaluate",
                 "evaluate-2"):
        assert tasks[name]["cachingOptions"] == {}, name  # caching off
    assert tasks["captions"]["cachingOptions"]["enableCache"] is True
    launcher = platform["exec-train-launcher"]
    assert {e["name"]: e["fieldPath"] for e in launcher["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid"}
    assert "accelerator" not in executors["exec-train-launcher"]["container"]["resources"]


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
    assert loop["iteratorPolicy"]["parallelismLimit"] == parameters.DEFAULT_PARALLELISM
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
    from stablerep.kfp.steps import captions_step
    from stablerep.stages import CaptionsResult

    made = CaptionsResult(uri="u", manifest="m", count=10_000_000, num_shards=8192)
    monkeypatch.setattr("stablerep.stages.run_captions", lambda cfg: made)

    class Artifact:
        path, metadata = str(tmp_path / "meta.json"), {}

    config = validation.resolved(validation.build_config("cc12m", [],
                                                         {"data_root": str(tmp_path)}))
    items = captions_step(config, workers=64, captions=Artifact())
    print(f"shards=8192 workers=64: {len(items)} generation tasks")
    assert items == list(range(64))
    assert "generate-shards" not in spec["root"]["dag"]["tasks"]  # only inside the loop
    tasks = _tasks(spec)
    assert sorted(loop["dependentTasks"]) == ["captions", "stage-model"]  # model copied first
    assert set(tasks["images-manifest"]["dependentTasks"]) >= {"for-loop-1"}
    assert "images-manifest" in spec["root"]["dag"]["tasks"]["condition-branches-2"][
        "dependentTasks"]  # training starts after the manifest is written


def test_compile_to_standard_output_writes_no_file(tmp_path):
    """`stablerep pipeline compile --out -` (what a user runs in the image, whose root is
    read-only): the YAML on stdout, equal to the checked-in one; no file, the note on stderr."""
    run = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "compile", "--out",
                          "-"], capture_output=True, text=True, timeout=300, check=False,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == PIPELINE_YAML.read_text()
    assert run.stderr.strip().splitlines() == [
        "pipeline: wrote the pipeline YAML to standard output"]
    assert list(tmp_path.iterdir()) == []
    refused = subprocess.run([sys.executable, "-m", "stablerep.cli", "pipeline", "compile",
                              "--out", "-", "--kubernetes", "-"], capture_output=True, text=True,
                             timeout=300, check=False, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == "error: --kubernetes: got '-'; only --out can go to standard output\n"


def test_an_installed_package_submits_this_version_s_pipeline(tmp_path, monkeypatch):
    """Outside a checkout (the images) submit has no checked-in YAML: it compiles this
    version's pipeline into a temporary file for the run, and removes it after."""
    from click.testing import CliRunner

    from stablerep import pipeline_cli
    from stablerep.kfp import compile as compile_mod
    from stablerep.kfp import submit as submit_mod

    seen = {}

    def create_run(host, experiment, values, *, package, **_):
        seen["package"] = Path(package)
        seen["text"] = Path(package).read_text()
        return "run-1", "http://kfp/#/runs/details/run-1"

    monkeypatch.setattr(compile_mod, "IN_CHECKOUT", False)
    monkeypatch.setattr(submit_mod, "submit", create_run)
    result = CliRunner().invoke(pipeline_cli.pipeline, ["submit", "--host", "http://kfp",
                                                        "--experiment", "e"])
    assert result.exit_code == 0, result.output
    assert seen["text"] == PIPELINE_YAML.read_text()  # the default images: the release's
    assert not seen["package"].exists()
