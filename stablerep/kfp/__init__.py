"""The Kubeflow Pipelines layer of stablerep: the pipeline, its components and its commands.

- :mod:`~stablerep.kfp.params`: the pipeline's parameters (:data:`~stablerep.kfp.params.PARAMS`)
  and their checks;
- :mod:`~stablerep.kfp.validation`: what the first step checks, and the config every later
  step runs;
- :mod:`~stablerep.kfp.steps`: the bodies the components call inside their containers;
- :mod:`~stablerep.kfp.components`: the components, made per image
  (:func:`~stablerep.kfp.components.make_components`);
- :mod:`~stablerep.kfp.pipeline`: the pipeline (:func:`~stablerep.kfp.pipeline.build_pipeline`);
- :mod:`~stablerep.kfp.compile`, :mod:`~stablerep.kfp.submit`, :mod:`~stablerep.kfp.local`
  (with :mod:`~stablerep.kfp.containers`): what ``stablerep pipeline compile|submit|run-local``
  call.

Importing this package imports nothing of ``kfp``; the modules that build components do.
"""
