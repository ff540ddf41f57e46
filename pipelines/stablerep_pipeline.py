"""The stablerep pipeline on the project's default images, for ``kfp dsl compile``:

    kfp dsl compile --py pipelines/stablerep_pipeline.py --output stablerep_pipeline.yaml

The pipeline is :func:`stablerep.kfp.pipeline.build_pipeline` (the installed package);
``stablerep pipeline compile`` compiles the same function, also for other images.
"""

from stablerep.kfp.pipeline import build_pipeline

stablerep_pipeline = build_pipeline()
