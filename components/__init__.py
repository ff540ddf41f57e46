"""Kubeflow Pipelines components of stablerep, on the project's default images.

The component objects :func:`stablerep.kfp.components.make_components` makes for
``stablerep.k8s.config.CPU_IMAGE`` and ``CUDA_IMAGE``; load one into your own pipeline with
``from components import captions`` (from the repository root), or call ``make_components``
for other images.
"""

from stablerep.k8s.config import CPU_IMAGE, CUDA_IMAGE
from stablerep.kfp.components import make_components

(validate, captions, stage_model, generate_shards, images_manifest, train, train_launcher,
 evaluate) = make_components(CPU_IMAGE, CUDA_IMAGE)

__all__ = ["captions", "evaluate", "generate_shards", "images_manifest", "stage_model", "train",
           "train_launcher", "validate"]
