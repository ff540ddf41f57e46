"""Typed configuration: one dataclass per stage, YAML recipes, dotted overrides, a dump.

A recipe is a YAML mapping whose top-level keys are the fields of :class:`Config`
(``data_root`` and one section per stage)::

    data_root: gs://my-bucket/stablerep
    captions:
      source: files
      inputs: [gs://my-bucket/raw/cc3m/*.tsv]
      num_captions: 1000000

Command lines override any field with ``--set captions.num_captions=1000`` (the value is read
as YAML, so ``[a, b]``, ``true`` and ``null`` work). The sections and their checks are in
:mod:`stablerep.config.sections`; reading, overriding, validating (pydantic) and dumping are
in :mod:`stablerep.config.load`. The resolved config is written beside a stage's outputs
(:func:`dump_yaml`).
"""

from stablerep.config.load import (
    RECIPES_DIR,
    apply_overrides,
    apply_values,
    builtin_recipes,
    dump_yaml,
    fingerprint,
    from_dict,
    is_recipe_name,
    load_config,
    load_yaml,
    parse_override,
    resolve_recipe,
    to_dict,
)
from stablerep.config.sections import (
    ALL_INKS,
    AUGMENTATIONS,
    BACKENDS,
    CAPTION_FORMATS,
    CAPTION_SOURCES,
    COMPRESSIONS,
    EVAL_PRECISIONS,
    GENERATE_DTYPES,
    IMAGE_FORMATS,
    METHODS,
    REPRO_ARMS,
    SCHEDULERS,
    SEED_MAX,
    TRAIN_PRECISIONS,
    Augmentation,
    CaptionFormat,
    CaptionsConfig,
    CaptionSource,
    Compression,
    ConceptSource,
    Config,
    EvalConfig,
    EvalPrecision,
    GenerateBackend,
    GenerateConfig,
    GenerateDtype,
    ImageFormat,
    Method,
    ProceduralCaptionsConfig,
    ReproArm,
    ReproConfig,
    Scheduler,
    SyntheticCaptionsConfig,
    TrainConfig,
    TrainPrecision,
    Typeface,
    choices,
)

__all__ = [
    "ALL_INKS",
    "apply_overrides",
    "apply_values",
    "Augmentation",
    "AUGMENTATIONS",
    "BACKENDS",
    "builtin_recipes",
    "CAPTION_FORMATS",
    "CAPTION_SOURCES",
    "CaptionFormat",
    "CaptionsConfig",
    "CaptionSource",
    "choices",
    "Compression",
    "COMPRESSIONS",
    "ConceptSource",
    "Config",
    "dump_yaml",
    "EVAL_PRECISIONS",
    "EvalConfig",
    "EvalPrecision",
    "fingerprint",
    "from_dict",
    "GENERATE_DTYPES",
    "GenerateBackend",
    "GenerateConfig",
    "GenerateDtype",
    "IMAGE_FORMATS",
    "ImageFormat",
    "is_recipe_name",
    "load_config",
    "load_yaml",
    "Method",
    "METHODS",
    "parse_override",
    "ProceduralCaptionsConfig",
    "RECIPES_DIR",
    "REPRO_ARMS",
    "ReproArm",
    "ReproConfig",
    "resolve_recipe",
    "Scheduler",
    "SCHEDULERS",
    "SEED_MAX",
    "SyntheticCaptionsConfig",
    "to_dict",
    "TRAIN_PRECISIONS",
    "TrainConfig",
    "TrainPrecision",
    "Typeface",
]
