"""The components: validate (first step), captions, stage_model, generate_shards,
images_manifest, train, evaluate.

Bodies run in a fresh interpreter (KFP serialises the function source), so every import is
inside the body. The base image is :func:`stablerep.pipeline.component_image`, read when this
module is imported (``stablerep pipeline compile --image`` sets it).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Metrics, Output

from stablerep.pipeline import component_image

IMAGE = component_image()


def _component(fn):
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(fn)


@_component
def validate(
    data_root: str, recipe: str, overrides: list, caption_source: str, caption_inputs: list,
    num_captions: int, shards: int, workers: int, images_per_caption: int, guidance_scale: float,
    scheduler: str, inference_steps: int, model: str, backbone: str, method: str,
    captions_per_batch: int, epochs: float, eval_datasets: list, train_backend: str,
    nodes: int, gpus_per_node: int, node_selector: dict, tolerations: list, image: str,
    cluster_recipe: str, service_account: str, queue_name: str, priority_class: str,
) -> str:
    """Check every parameter: each stage's resolved config, the backend and its job.

    Args:
        data_root: folder URI every stage writes under.
        recipe: built-in recipe name or recipe URI.
        overrides: extra section.key=value overrides.
        caption_source: files, synthetic or procedural.
        caption_inputs: caption file URIs.
        num_captions: captions to sample (0 = all).
        shards: caption shards.
        workers: generation tasks.
        images_per_caption: images per caption.
        guidance_scale: classifier-free guidance scale.
        scheduler: diffusion scheduler.
        inference_steps: denoising steps.
        model: text-to-image model.
        backbone: timm ViT.
        method: training objective.
        captions_per_batch: captions per step.
        epochs: training epochs.
        eval_datasets: evaluation data sets.
        train_backend: pytorchjob, trainjob or local.
        nodes: training nodes.
        gpus_per_node: GPUs per node.
        node_selector: node selector of GPU pods.
        tolerations: tolerations of GPU pods.
        image: image of the training job's pods.
        cluster_recipe: cluster recipe URI of the training job's other settings.
        service_account: service account of the training job's pods.
        queue_name: Kueue LocalQueue of the training job.
        priority_class: PriorityClass of the training job's pods.

    Returns:
        The resolved config (JSON): recipe < parameters < overrides, the one config every
        later step runs.
    """
    params = dict(locals())
    from stablerep.pipeline import validate_step

    return validate_step(params)


@_component
def captions(config: str, workers: int, dataset: Output[Dataset]) -> list:
    """The caption stage.

    Args:
        config: the resolved config (the validate step's output).
        workers: generation tasks.
        dataset: metadata of the captions (URI, manifest, count, shards).

    Returns:
        The worker indices the generation loop fans out over (workers items, not shards).
    """
    from stablerep.pipeline import captions_step

    return captions_step(config, workers=workers, dataset=dataset)


@_component
def stage_model(config: str) -> str:
    """Copy the text-to-image model once into the run; every generation task loads it there.

    Args:
        config: the resolved config (the validate step's output).

    Returns:
        The run-level folder of the model.
    """
    from stablerep.pipeline import model_step

    return model_step(config)


@_component
def generate_shards(data_root: str, recipe: str, overrides: list, images_per_caption: int,
                    guidance_scale: float, scheduler: str, inference_steps: int, model: str,
                    worker: int, workers: int, dataset: Output[Dataset]):
    """Generate the shards of one worker: worker, worker + workers, ... (committed ones skipped).

    Its inputs are pipeline parameters, not the validate step's output: the local runner
    (kfp.local 2.17) gives every task output read inside a ParallelFor the loop item instead.

    Args:
        data_root: folder URI every stage writes under.
        recipe: built-in recipe name or recipe URI.
        overrides: the user's extra section.key=value overrides.
        images_per_caption: images per caption.
        guidance_scale: classifier-free guidance scale.
        scheduler: diffusion scheduler.
        inference_steps: denoising steps.
        model: text-to-image model.
        worker: this task's index.
        workers: generation tasks.
        dataset: metadata of the worker's shards (URI, images, rate).
    """
    params = dict(locals())
    from stablerep.pipeline import generate_step

    generate_step(params, dataset=params.pop("dataset"), worker=params.pop("worker"),
                  workers=params.pop("workers"))


@_component
def images_manifest(config: str, dataset: Output[Dataset]):
    """Write the images manifest once every generation task is done (the fan-in).

    Args:
        config: the resolved config (the validate step's output).
        dataset: metadata of the images (manifest URI, shards, samples).
    """
    from stablerep.pipeline import manifest_step

    manifest_step(config, dataset=dataset)


@_component
def train(config: str, recipe: str, train_backend: str, nodes: int,
          gpus_per_node: int, node_selector: dict, tolerations: list, image: str,
          cluster_recipe: str, service_account: str, queue_name: str, priority_class: str,
          run_id: str, task_name: str, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Training: torchrun in this pod (local) or a PyTorchJob/TrainJob this step launches.

    Args:
        config: the resolved config (the validate step's output).
        recipe: built-in recipe name or recipe URI (read again by a job's pods, under config).
        train_backend: pytorchjob, trainjob or local.
        nodes: training nodes (cluster backends).
        gpus_per_node: GPUs per node.
        node_selector: node selector of the job's pods.
        tolerations: tolerations of the job's pods.
        image: image of the job's pods.
        cluster_recipe: cluster recipe URI of the job's other settings.
        service_account: service account of the job's pods.
        queue_name: Kueue LocalQueue of the job.
        priority_class: PriorityClass of the job's pods.
        run_id: the pipeline run id (the job's name derives from it).
        task_name: the pipeline task name.
        dataset: metadata of the training output (checkpoint, backbone, metrics URIs).
        metrics: final loss, images/s, steps.
    """
    values = dict(locals())
    from stablerep.pipeline import train_step

    train_step(values, run_id=values.pop("run_id"), task=values.pop("task_name"),
               dataset=values.pop("dataset"), metrics=values.pop("metrics"))


@_component
def evaluate(config: str, metrics: Output[Metrics],
             report_html: Output[HTML], report_md: Output[Markdown], dataset: Output[Dataset]):
    """Evaluation of the trained backbone in data_root and the baseline, with the report.

    Args:
        config: the resolved config (the validate step's output).
        metrics: probe top-1, few-shot mean and CI, kNN per data set, and the baseline's.
        report_html: the report page.
        report_md: the report as a Markdown table.
        dataset: metadata of the eval output (metrics and report URIs).
    """
    from stablerep.pipeline import eval_step

    eval_step(config, metrics=metrics, report_html=report_html,
              report_md=report_md, dataset=dataset)
