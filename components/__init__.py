"""Kubeflow Pipelines components of stablerep: one lightweight component per stage.

Each body imports ``stablerep`` and makes one library call (:mod:`stablerep.pipeline`,
:mod:`stablerep.stages`); the image (``base_image``) has the package installed, so nothing
is pip-installed when a step starts. Outputs are small artifacts only: Dataset metadata that
points at the data_root URIs, Metrics, and the report as HTML and Markdown.
"""

from components.stages import (
    captions,
    evaluate,
    generate_shards,
    images_manifest,
    stage_model,
    train,
    validate,
)

__all__ = ["captions", "evaluate", "generate_shards", "images_manifest", "stage_model", "train",
           "validate"]
