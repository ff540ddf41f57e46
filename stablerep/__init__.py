"""stablerep: visual representation learning from synthetic images (StableRep), as a pipeline.

The library holds all logic; the CLI (`stablerep`), the Kubeflow components and the pipeline
are thin wrappers over it. Stages: captions -> generate -> train -> eval.
"""

__version__ = "0.1.0"
