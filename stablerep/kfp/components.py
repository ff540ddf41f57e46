"""The pipeline's components, made per image by :func:`make_components`.

Each component is a lightweight Python component: KFP copies the function's source into the
step's command, so every import is inside the body, and the body makes one call into
:mod:`stablerep.kfp.steps`. The image (``base_image``) has the package and kfp installed, so
nothing is pip-installed when a step starts (``install_kfp_package=False``).

Steps that need no GPU run on the CPU image (validate, captions, stage_model,
images_manifest, the training job's launcher); generation, training in the step's own pod
and evaluation on the CUDA image. The validate component's inputs are the pipeline's
parameters: its source is generated from :data:`stablerep.kfp.params.PARAMS`.
"""

import linecache
from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from stablerep.kfp.params import PARAMS


class Components(NamedTuple):
    """The component objects of one CPU image and one CUDA image."""

    validate: Any
    captions: Any
    stage_model: Any
    generate_shards: Any
    images_manifest: Any
    train: Any  # training in the step's pod (train_backend=local): CUDA image
    train_launcher: Any  # creates and follows the PyTorchJob/TrainJob: CPU image
    evaluate: Any


def make_components(cpu_image: str, cuda_image: str) -> Components:
    """The pipeline's components with their base images.

    Args:
        cpu_image: the image of the steps that need no GPU.
        cuda_image: the image of generation, in-pod training and evaluation.
    """
    def on(image: str, fn: Callable) -> Any:
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    return Components(
        validate=on(cpu_image, validate_function()), captions=on(cpu_image, captions),
        stage_model=on(cpu_image, stage_model),
        generate_shards=on(cuda_image, generate_shards),
        images_manifest=on(cpu_image, images_manifest), train=on(cuda_image, train),
        train_launcher=on(cpu_image, train_launcher), evaluate=on(cuda_image, evaluate))


# ---------------------------------------------------------------------------- validate

_VALIDATE_FILE = "<stablerep.kfp.components: validate>"
_VALIDATE_BODY = '''
    Returns:
        The resolved config (JSON): recipe < parameters < overrides, the one config every
        later step runs.
    """
    params = dict(locals())
    from stablerep.kfp.steps import validate_step

    return validate_step(params)
'''


def validate_source() -> str:
    """The validate component's source: one typed argument per parameter, described by its
    help in the docstring (which KFP reads for the inputs' descriptions)."""
    args = "".join(f"    {p.name}: {p.type.__name__},\n" for p in PARAMS)
    docs = "".join(f"        {p.name}: {' '.join(p.help.split())}\n" for p in PARAMS)
    return (f"def validate(\n{args}) -> str:\n"
            '    """Check every parameter: each stage\'s resolved config, the backend and its '
            "job.\n\n    Args:\n" + docs + _VALIDATE_BODY)


def validate_function() -> Callable:
    """The validate component's function, compiled from :func:`validate_source`.

    Its source is registered with :mod:`linecache` under a name of its own, so that
    ``inspect.getsource`` (what KFP copies into the step's command) finds it.
    """
    source = validate_source()
    lines = source.splitlines(keepends=True)
    linecache.cache[_VALIDATE_FILE] = (len(source), None, lines, _VALIDATE_FILE)
    scope: dict[str, Any] = {"__name__": __name__}
    exec(compile(source, _VALIDATE_FILE, "exec"), scope)  # noqa: S102 - our own text
    return scope["validate"]


# ---------------------------------------------------------------------------- stages


def captions(config: str, workers: int, captions: Output[Dataset]) -> list:
    """The caption stage.

    Args:
        config: the resolved config (the validate step's output).
        workers: generation tasks.
        captions: metadata of the captions (URI, manifest, count, shards).

    Returns:
        The worker indices the generation loop fans out over (workers items, not shards).
    """
    from stablerep.kfp.steps import captions_step

    return captions_step(config, workers=workers, captions=captions)


def stage_model(config: str) -> str:
    """Copy the text-to-image model once into the run; every generation task loads it there.

    Args:
        config: the resolved config (the validate step's output).

    Returns:
        The run-level folder of the model.
    """
    from stablerep.kfp.steps import model_step

    return model_step(config)


def generate_shards(data_root: str, recipe: str, overrides: list, images_per_caption: int,
                    guidance_scale: float, scheduler: str, inference_steps: int, model: str,
                    worker: int, workers: int, shards: Output[Dataset]):
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
        shards: metadata of the worker's shards (URI, images, rate).
    """
    params = dict(locals())
    from stablerep.kfp.steps import generate_step

    generate_step(params, shards=params.pop("shards"), worker=params.pop("worker"),
                  workers=params.pop("workers"))


def images_manifest(config: str, captions: Input[Dataset], images: Output[Dataset]):
    """Write the images manifest once every generation task is done (the fan-in).

    Args:
        config: the resolved config (the validate step's output).
        captions: the captions the images were generated from.
        images: metadata of the images (manifest URI, shards, samples).
    """
    from stablerep.kfp.steps import manifest_step

    manifest_step(config, captions=captions, images=images)


def train(config: str, recipe: str, train_backend: str, nodes: int,
          gpus_per_node: int, node_selector: dict, tolerations: list, image: str,
          cluster_recipe: str, service_account: str, queue_name: str, priority_class: str,
          run_id: str, task_name: str, images: Input[Dataset], checkpoint: Output[Model],
          metrics: Output[Metrics]):
    """Training in this pod: one process per GPU (torchrun), or one process without GPUs.

    Args:
        config: the resolved config (the validate step's output).
        recipe: built-in recipe name or recipe URI (read again by the processes, under config).
        train_backend: local.
        nodes: training nodes (cluster backends only).
        gpus_per_node: GPUs of this pod.
        node_selector: node selector (cluster backends only).
        tolerations: tolerations (cluster backends only).
        image: image of a job's pods (cluster backends only).
        cluster_recipe: cluster recipe URI (read and checked; cluster backends use it).
        service_account: service account of a job's pods (cluster backends only).
        queue_name: Kueue LocalQueue of a job (cluster backends only).
        priority_class: PriorityClass of a job's pods (cluster backends only).
        run_id: the pipeline run id.
        task_name: the pipeline task name.
        images: the images trained on (the images manifest step's output).
        checkpoint: the trained model (checkpoint, backbone, metrics URIs).
        metrics: final loss, images/s, steps.
    """
    inputs = dict(locals())
    from stablerep.kfp.steps import train_component

    train_component(inputs)


def train_launcher(config: str, recipe: str, train_backend: str, nodes: int,
                   gpus_per_node: int, node_selector: dict, tolerations: list, image: str,
                   cluster_recipe: str, service_account: str, queue_name: str,
                   priority_class: str, run_id: str, task_name: str, images: Input[Dataset],
                   checkpoint: Output[Model], metrics: Output[Metrics]):
    """Training as a PyTorchJob/TrainJob that this step creates, follows and cleans up.

    Args:
        config: the resolved config (the validate step's output).
        recipe: built-in recipe name or recipe URI (read again by the job's pods, under config).
        train_backend: pytorchjob or trainjob.
        nodes: training nodes.
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
        images: the images trained on (the images manifest step's output).
        checkpoint: the trained model (checkpoint, backbone, metrics URIs).
        metrics: final loss, images/s, steps.
    """
    inputs = dict(locals())
    from stablerep.kfp.steps import train_component

    train_component(inputs)


def evaluate(config: str, checkpoint: Input[Model], metrics: Output[Metrics],
             report_html: Output[HTML], report_md: Output[Markdown], results: Output[Dataset]):
    """Evaluation of the trained backbone and the baseline, with the report.

    Args:
        config: the resolved config (the validate step's output).
        checkpoint: the model evaluated (the train step's output).
        metrics: probe top-1, few-shot mean and CI, kNN per data set, and the baseline's.
        report_html: the report page.
        report_md: the report as a Markdown table.
        results: metadata of the eval output (metrics and report URIs).
    """
    from stablerep.kfp.steps import eval_step

    eval_step(config, checkpoint=checkpoint, metrics=metrics, report_html=report_html,
              report_md=report_md, results=results)
