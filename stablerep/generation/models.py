"""The run's copy of the text-to-image model: fetched once, then loaded by every worker.

:func:`stage_model` copies the model named by ``generate.model`` (a hub id, a local folder or
a storage URI; for the tiny backend, the random pipeline it builds) into one run-level
folder, by default ``<data_root>/models/<slug>`` (``generate.model_store`` chooses another
root, e.g. a volume every GPU node mounts). Its files go first and ``stablerep-model.json``
(source, file names and sizes) last, so a folder with that record is complete. Generation
workers then load from there (:func:`staged_model_path`): no worker needs the Hub, and the
source is read once per run, not once per task.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from stablerep import storage
from stablerep.config import GenerateConfig
from stablerep.errors import ConfigError, InputError

log = logging.getLogger(__name__)

MODELS_DIR = "models"
MODEL_RECORD = "stablerep-model.json"
MODEL_RECORD_KIND = "stablerep.model"
TINY_ID = "stablerep/tiny-sd"
"""The model id the tiny backend records in each sample."""


def needs_model(cfg: GenerateConfig) -> bool:
    """Whether the backend loads a diffusers pipeline (the procedural one draws without)."""
    return cfg.backend != "procedural"


def model_id(cfg: GenerateConfig) -> str:
    """The name of the model the backend draws with (recorded in every sample)."""
    return TINY_ID if cfg.backend == "tiny" else cfg.model


def model_slug(cfg: GenerateConfig) -> str:
    """A folder name for the model: readable, and distinct per source (hash suffix)."""
    name = model_id(cfg)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name.rstrip("/").rsplit("/", 1)[-1])[:48]
    digest = hashlib.sha256(f"{cfg.backend}:{name}".encode()).hexdigest()[:10]
    return f"{readable.strip('-.') or 'model'}-{digest}"


def model_location(cfg: GenerateConfig, data_root: str) -> str:
    """The run-level folder of the model: ``<model_store or data_root/models>/<slug>``."""
    root = cfg.model_store or storage.join(data_root, MODELS_DIR)
    return storage.join(root, model_slug(cfg))


def check_model_source(cfg: GenerateConfig) -> None:
    """A model folder or URI must hold ``model_index.json`` (one request; hub ids pass).

    Raises:
        ConfigError: naming ``generate.model``.
    """
    from stablerep.generation.backends import HUB_ID

    model = cfg.model
    if cfg.backend != "diffusers":
        return
    if storage.is_local(model) and not storage.local_path(model).exists() \
            and HUB_ID.match(model):
        return  # a hub id: the stage_model step downloads it
    if not storage.exists(storage.join(model, "model_index.json")):
        raise ConfigError(f"generate.model: got {model!r}, expected a hub id or a folder "
                          "holding a diffusers pipeline (no model_index.json there)")


def _source_folder(cfg: GenerateConfig) -> Path:
    """A local folder holding the source model (downloaded from the Hub when a hub id)."""
    from stablerep.generation.backends import (
        HUB_ID,
        check_pipeline_folder,
        tiny_model_folder,
    )

    if cfg.backend == "tiny":
        return tiny_model_folder(cfg)
    model = cfg.model
    if not storage.is_local(model):
        try:
            folder = storage.cache_local(model)
        except storage.StorageNotFound:
            raise InputError(f"generate.model: {model}: no such folder") from None
    elif storage.local_path(model).exists():
        folder = storage.local_path(model)
    elif HUB_ID.match(model):
        from diffusers import DiffusionPipeline

        folder = Path(DiffusionPipeline.download(model))  # the files from_pretrained reads
    else:
        raise InputError(f"generate.model: {model} is neither a local folder, a storage URI "
                         "nor a hub id (org/name)")
    check_pipeline_folder(folder, f"generate.model {model}")
    return folder


def _record(location: str) -> dict[str, Any] | None:
    uri = storage.join(location, MODEL_RECORD)
    if not storage.exists(uri):
        return None
    return storage.read_json(uri, expect=dict,
                             what="the model record that the pipeline's model step writes")


def stage_model(cfg: GenerateConfig, data_root: str) -> str:
    """Copy the model once into its run-level folder; returns that folder's URI.

    A folder that already holds the record of the same source is kept as it is.

    Args:
        cfg: the generation config (backend, model, model_store).
        data_root: the run's folder (the default model store is ``<data_root>/models``).

    Raises:
        InputError: the source is not a diffusers pipeline (no model_index.json), or missing.
    """
    location = model_location(cfg, data_root)
    record = _record(location)
    if record is not None and record.get("source") == model_id(cfg):
        return location
    folder = _source_folder(cfg)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))  # no hub .cache/
    for path in files:
        rel = path.relative_to(folder).as_posix()
        with path.open("rb") as src, storage.atomic_write(storage.join(location, rel)) as w:
            shutil.copyfileobj(src, w.file, 1 << 22)
    storage.write_json(storage.join(location, MODEL_RECORD), {
        "kind": MODEL_RECORD_KIND, "version": 1, "source": model_id(cfg),
        "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}})
    log.info("model: %s copied to %s (%d files)", model_id(cfg), location, len(files))
    return location


def staged_model_path(cfg: GenerateConfig, data_root: str) -> str:
    """A local folder with the run's copy of the model (downloaded from the store if remote).

    Raises:
        InputError: the run-level copy is missing (the model step did not run), is of
            another model, or is not a diffusers pipeline (no model_index.json).
    """
    from stablerep.generation.backends import check_pipeline_folder

    location = model_location(cfg, data_root)
    record = _record(location)
    if record is None:
        raise InputError(f"{storage.join(location, MODEL_RECORD)}: missing; the run's copy of "
                         f"the model is made by the pipeline's model step (stage_model) first")
    if record.get("source") != model_id(cfg):
        raise InputError(f"{location}: holds {record.get('source')!r}, not "
                         f"{model_id(cfg)!r} (generate.model)")
    folder = storage.cache_local(location)
    check_pipeline_folder(folder, location)
    return str(folder)
