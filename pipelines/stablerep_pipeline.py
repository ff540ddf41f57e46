"""The stablerep pipeline: validate -> captions + stage_model -> generate (ParallelFor over
workers) -> images_manifest -> train -> evaluate.

Compile it with ``make compile`` (``stablerep pipeline compile``); run it in the Kubeflow UI,
with ``kfp run create``, ``stablerep pipeline submit``, or on this machine with
``stablerep pipeline run-local``. The parameters, their defaults (the paper's CC12M recipe)
and descriptions come from :data:`stablerep.pipeline.PARAMS`.

The loop has ``workers`` items (a parameter, at most ``shards``), not one per shard: task w
draws shards w, w + workers, ... with one model load, from the run's copy of the model that
stage_model made. The shards meet again through data_root, not through KFP: the manifest
step waits for every generation task, reads each shard record once and writes
``images/manifest.json``, which training reads.
"""

import os

from kfp import dsl, kubernetes

from components import (
    captions,
    evaluate,
    generate_shards,
    images_manifest,
    stage_model,
    train,
    validate,
)
from stablerep.pipeline import (
    DEFAULT_PARALLELISM,
    PARAMS,
    PIPELINE_NAME,
    component_image,
    defaults,
)

# The training job's pods default to the image the components were compiled against.
D = {**defaults(), "image": component_image()}
PARALLELISM = int(os.environ.get("STABLEREP_PARALLELISM") or DEFAULT_PARALLELISM)
HOUR = 3600
RUN_AS = 1000  # the images' non-root user


def _resources(task: dsl.PipelineTask, cpu: str, memory: str, *, timeout_s: int,
               shm: str = "") -> dsl.PipelineTask:
    """Requests = limits, a timeout, a non-root security context, /dev/shm when loaders run."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory)
    task.set_memory_limit(memory)
    kubernetes.set_timeout(task, timeout_s)
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS,
                                    run_as_non_root=True)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=shm)
    return task


def _gpus(task: dsl.PipelineTask, count, node_selector, tolerations) -> dsl.PipelineTask:
    """GPUs and where they are: the node selector and tolerations parameters (JSON)."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    return task


def stablerep_pipeline(
    data_root: str = D["data_root"],
    recipe: str = D["recipe"],
    overrides: list = D["overrides"],
    caption_source: str = D["caption_source"],
    caption_inputs: list = D["caption_inputs"],
    num_captions: int = D["num_captions"],
    shards: int = D["shards"],
    workers: int = D["workers"],
    images_per_caption: int = D["images_per_caption"],
    guidance_scale: float = D["guidance_scale"],
    scheduler: str = D["scheduler"],
    inference_steps: int = D["inference_steps"],
    model: str = D["model"],
    backbone: str = D["backbone"],
    method: str = D["method"],
    captions_per_batch: int = D["captions_per_batch"],
    epochs: float = D["epochs"],
    eval_datasets: list = D["eval_datasets"],
    train_backend: str = D["train_backend"],
    nodes: int = D["nodes"],
    gpus_per_node: int = D["gpus_per_node"],
    node_selector: dict = D["node_selector"],
    tolerations: list = D["tolerations"],
    image: str = D["image"],
    cluster_recipe: str = D["cluster_recipe"],
    service_account: str = D["service_account"],
    queue_name: str = D["queue_name"],
    priority_class: str = D["priority_class"],
):
    params = dict(locals())
    check = validate(**params).set_display_name("validate parameters")
    _resources(check, "1", "2Gi", timeout_s=HOUR).set_caching_options(False)
    common = dict(config=check.output)  # the one resolved config every later step runs

    caps = captions(**common, workers=workers).set_display_name("captions")
    _resources(caps, "8", "32Gi", timeout_s=12 * HOUR)
    weights = stage_model(**common).set_display_name("copy the model into the run")
    _resources(weights, "4", "32Gi", timeout_s=6 * HOUR)

    with dsl.ParallelFor(caps.outputs["Output"], parallelism=PARALLELISM,
                         name="workers") as worker:
        gen = generate_shards(data_root=data_root, recipe=recipe, overrides=overrides,
                              images_per_caption=images_per_caption,
                              guidance_scale=guidance_scale, scheduler=scheduler,
                              inference_steps=inference_steps, model=model, worker=worker,
                              workers=workers).after(weights)
        gen.set_display_name("generate shards")
        _resources(gen, "8", "64Gi", timeout_s=14 * 24 * HOUR, shm="8Gi")
        _gpus(gen, 1, node_selector, tolerations)
        gen.set_caching_options(False).set_retry(num_retries=3, backoff_duration="60s")

    done = images_manifest(**common).after(gen).set_display_name("images manifest")
    _resources(done, "2", "8Gi", timeout_s=2 * HOUR)
    done.set_caching_options(False)

    job = dict(train_backend=train_backend, nodes=nodes, gpus_per_node=gpus_per_node,
               node_selector=node_selector, tolerations=tolerations, image=image,
               cluster_recipe=cluster_recipe, service_account=service_account,
               queue_name=queue_name, priority_class=priority_class,
               run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, task_name=dsl.PIPELINE_TASK_NAME_PLACEHOLDER)
    with dsl.If(train_backend == "local", name="train-here"):
        here = train(**common, recipe=recipe, **job).after(done).set_display_name("train (local)")
        _resources(here, "32", "256Gi", timeout_s=14 * 24 * HOUR, shm="64Gi")
        _gpus(here, gpus_per_node, node_selector, tolerations)
        here.set_caching_options(False)
    with dsl.Else(name="train-on-cluster"):
        launcher = train(**common, recipe=recipe, **job).after(done).set_display_name("train (job launcher)")
        _resources(launcher, "1", "2Gi", timeout_s=14 * 24 * HOUR)
        kubernetes.use_field_path_as_env(launcher, "POD_NAME", "metadata.name")
        kubernetes.use_field_path_as_env(launcher, "POD_UID", "metadata.uid")
        # An evicted or preempted launcher pod leaves its job running (the job is owned by
        # the run's Workflow): the retry attaches to it and follows it to the end.
        launcher.set_caching_options(False).set_retry(num_retries=3, backoff_duration="30s")

    ev = evaluate(**common).after(here, launcher).set_display_name("evaluate")
    _resources(ev, "8", "64Gi", timeout_s=24 * HOUR, shm="16Gi")
    _gpus(ev, 1, node_selector, tolerations)
    ev.set_caching_options(False)


stablerep_pipeline.__doc__ = (
    "StableRep: synthetic captions -> Stable Diffusion images -> multi-positive contrastive "
    "training -> frozen-feature evaluation.\n\nArgs:\n"
    + "".join(f"    {p.name}: {p.help}\n" for p in PARAMS))
stablerep_pipeline = dsl.pipeline(name=PIPELINE_NAME)(stablerep_pipeline)
