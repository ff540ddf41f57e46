"""The pipeline: validate -> captions + stage_model -> generate (ParallelFor over workers) ->
images_manifest -> train -> evaluate, built by :func:`build_pipeline` for a pair of images.

The pipeline function's signature (names, types, defaults) and its docstring (the
descriptions the Kubeflow UI shows) are generated from :data:`stablerep.kfp.params.PARAMS`.

The loop has ``workers`` items (a parameter, at most ``shards``), not one per shard: task w
draws shards w, w + workers, ... with one model load, from the run's copy of the model that
stage_model made. The shards meet again through data_root, not through KFP: the manifest
step waits for every generation task, reads each shard record once and writes
``images/manifest.json``, which training reads.

Training is split by backend (``dsl.If``/``dsl.Else``): in the step's own pod on the CUDA
image (``local``), or a launcher on the CPU image that creates a PyTorchJob/TrainJob. Each
branch has its own evaluate step reading that branch's model: kfp.local 2.17 cannot resolve
a ``dsl.OneOf`` over artifacts ("Expected 1 artifact in ArtifactSelectorSpec"), and the
evaluate step takes the model as its input so that the lineage runs to the report.
"""

from __future__ import annotations

import inspect
from typing import Any

from stablerep.errors import ConfigError
from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.k8s.rules import INT32_MAX
from stablerep.kfp.params import DEFAULT_PARALLELISM, PARAMS, PIPELINE_NAME, defaults

HOUR = 3600
RUN_AS = 1000  # the images' non-root user
DESCRIPTION = ("StableRep: synthetic captions -> Stable Diffusion images -> multi-positive "
               "contrastive training -> frozen-feature evaluation.")


def _resources(task: Any, cpu: str, memory: str, *, timeout_s: int, shm: str = "") -> Any:
    """Requests = limits, a timeout, a non-root security context, /dev/shm when loaders run."""
    from kfp import kubernetes

    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory)
    task.set_memory_limit(memory)
    kubernetes.set_timeout(task, timeout_s)
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS,
                                    run_as_non_root=True)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=shm)
    return task


def _gpus(task: Any, count: Any, params: dict[str, Any]) -> Any:
    """GPUs and where they are: the node selector and tolerations parameters (JSON)."""
    from kfp import kubernetes

    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(count)
    kubernetes.add_node_selector_json(task, params["node_selector"])
    kubernetes.add_toleration_json(task, params["tolerations"])
    return task


def signature(cuda_image: str) -> inspect.Signature:
    """The pipeline function's signature: one keyword per parameter, typed, with its default.

    Args:
        cuda_image: the ``image`` parameter's default (the training job's pods).
    """
    values = {**defaults(), "image": cuda_image}
    return inspect.Signature([
        inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[p.name],
                          annotation=p.type) for p in PARAMS])


def docstring() -> str:
    """The pipeline's description and each parameter's, as KFP reads them (Google style)."""
    return DESCRIPTION + "\n\nArgs:\n" + "".join(f"    {p.name}: {p.help}\n" for p in PARAMS)


def build_pipeline(*, cpu_image: str = CPU_IMAGE, cuda_image: str = CUDA_IMAGE,
                   parallelism: int = DEFAULT_PARALLELISM) -> Any:
    """The pipeline (a KFP GraphComponent) whose steps run on the given images.

    Args:
        cpu_image: the image of the steps that need no GPU.
        cuda_image: the image of generation, in-pod training and evaluation; also the
            default of the ``image`` parameter (the training job's pods).
        parallelism: generation tasks at a time (KFP fixes it at compile time).
    """
    from kfp import dsl

    from stablerep.kfp.components import make_components

    if not isinstance(parallelism, int) or not 1 <= parallelism <= INT32_MAX:
        raise ConfigError(f"--parallelism: got {parallelism}, expected 1 to {INT32_MAX}")
    parts = make_components(cpu_image, cuda_image)
    sig = signature(cuda_image)

    def stablerep_pipeline(*args: Any, **kwargs: Any) -> None:
        bound = sig.bind(*args, **kwargs)  # KFP passes one channel per parameter, in order
        bound.apply_defaults()
        _steps(parts, dict(bound.arguments), parallelism)

    stablerep_pipeline.__signature__ = sig  # type: ignore[attr-defined]
    stablerep_pipeline.__annotations__ = {p.name: p.type for p in PARAMS}
    stablerep_pipeline.__doc__ = docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(stablerep_pipeline)


def _steps(parts: Any, params: dict[str, Any], parallelism: int) -> None:
    """The pipeline's body: its tasks, given the parameters' channels."""
    checked = parts.validate(**params).set_display_name("validate parameters")
    _resources(checked, "1", "2Gi", timeout_s=HOUR).set_caching_options(False)
    config = checked.output  # the one resolved config every later step runs

    caps = parts.captions(config=config, workers=params["workers"])
    _resources(caps.set_display_name("captions"), "8", "32Gi", timeout_s=12 * HOUR)
    weights = parts.stage_model(config=config).set_display_name("copy the model into the run")
    _resources(weights, "4", "32Gi", timeout_s=6 * HOUR)
    generated = _generation(parts, params, caps, weights, parallelism)

    images = parts.images_manifest(config=config, captions=caps.outputs["captions"])
    images.after(generated).set_display_name("images manifest")
    _resources(images, "2", "8Gi", timeout_s=2 * HOUR).set_caching_options(False)
    _training(parts, params, config, images)


def _generation(parts: Any, params: dict[str, Any], caps: Any, weights: Any,
                parallelism: int) -> Any:
    """The loop of generation tasks, one per worker index the captions step returns."""
    from kfp import dsl

    names = ("data_root", "recipe", "overrides", "images_per_caption", "guidance_scale",
             "scheduler", "inference_steps", "model", "workers")
    with dsl.ParallelFor(caps.outputs["Output"], parallelism=parallelism,
                         name="workers") as worker:
        gen = parts.generate_shards(**{k: params[k] for k in names}, worker=worker)
        gen.after(weights).set_display_name("generate shards")
        _resources(gen, "8", "64Gi", timeout_s=14 * 24 * HOUR, shm="8Gi")
        _gpus(gen, 1, params)
        gen.set_caching_options(False).set_retry(num_retries=3, backoff_duration="60s")
    return gen


def _training(parts: Any, params: dict[str, Any], config: Any, images: Any) -> None:
    """Train (in this pod, or a job launched from a CPU pod), then evaluate that model."""
    from kfp import dsl, kubernetes

    names = ("recipe", "train_backend", "nodes", "gpus_per_node", "node_selector",
             "tolerations", "image", "cluster_recipe", "service_account", "queue_name",
             "priority_class")
    inputs = dict({k: params[k] for k in names}, config=config,
                  images=images.outputs["images"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                  task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER)
    with dsl.If(params["train_backend"] == "local", name="train-here"):
        in_pod = parts.train(**inputs).set_display_name("train (local)")
        _resources(in_pod, "32", "256Gi", timeout_s=14 * 24 * HOUR, shm="64Gi")
        _gpus(in_pod, params["gpus_per_node"], params).set_caching_options(False)
        _evaluate(parts, params, config, in_pod)
    with dsl.Else(name="train-on-cluster"):
        launcher = parts.train_launcher(**inputs).set_display_name("train (job launcher)")
        _resources(launcher, "1", "2Gi", timeout_s=14 * 24 * HOUR)
        kubernetes.use_field_path_as_env(launcher, "POD_NAME", "metadata.name")
        kubernetes.use_field_path_as_env(launcher, "POD_UID", "metadata.uid")
        # An evicted or preempted launcher pod leaves its job running (the job is owned by
        # the run's Workflow): the retry attaches to it and follows it to the end.
        launcher.set_caching_options(False).set_retry(num_retries=3, backoff_duration="30s")
        _evaluate(parts, params, config, launcher)


def _evaluate(parts: Any, params: dict[str, Any], config: Any, trained: Any) -> Any:
    """The evaluate step of the model ``trained`` wrote."""
    ev = parts.evaluate(config=config, checkpoint=trained.outputs["checkpoint"])
    _resources(ev.set_display_name("evaluate"), "8", "64Gi", timeout_s=24 * HOUR, shm="16Gi")
    _gpus(ev, 1, params).set_caching_options(False)
    return ev
