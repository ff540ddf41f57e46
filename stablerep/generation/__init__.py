"""Image generation: text-to-image pipelines that turn captions into synthetic images.

Submodules import torch/diffusers lazily on use; importing this package is cheap.
:mod:`stablerep.generation.tiny` builds a tiny, randomly initialised Stable Diffusion pipeline
offline (same component classes as Stable Diffusion v1.5) for tests and CPU runs;
:mod:`stablerep.generation.models` copies the model once into a run for every worker to load;
:mod:`stablerep.generation.runner` draws shards (all, one, or a pipeline worker's share).
"""
