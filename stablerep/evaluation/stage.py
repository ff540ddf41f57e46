"""The evaluation stage: backbone + data sets -> metrics.json and a self-contained report.

For each data set: features of train and test (cached), a linear probe (C chosen on a held-out
part of train, refit on all of train), few-shot episodes on the test split, and kNN. The same
runs for a baseline backbone (random init of the same architecture by default), so the report
shows what training bought. Everything a user can get wrong is checked before the first
feature is extracted: the backbone and the baseline are loaded, and every data set is read
(splits, classes, at least one readable image per split, enough images for the probe and the
episodes), so bad input leaves nothing under ``out``. ``metrics.json`` and ``report.html``
(plus ``report.md``) are written last, atomically.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from stablerep import devices, storage
from stablerep.config import EvalConfig
from stablerep.contracts import shard_tar_name, write_eval_metrics
from stablerep.errors import InputError
from stablerep.evaluation.backbones import Backbone, load_backbone, random_like
from stablerep.evaluation.datasets import EvalData, check_names, check_readable, load_dataset
from stablerep.evaluation.features import Features, features_for

log = logging.getLogger(__name__)


def _amp(precision: str, device: str) -> torch.dtype | None:
    """bf16 autocast on a GPU unless fp32 is chosen; None = no autocast."""
    dtype = devices.resolve_dtype(precision, device, auto_cuda="bf16")
    return None if dtype == torch.float32 else dtype


def evaluate_backbone(backbone: Backbone, datasets: list[EvalData], cfg: EvalConfig, *,
                      cache_root: str, device: str) -> dict[str, Any]:
    """Metrics of one backbone on every data set (the ``datasets`` block of metrics.json)."""
    size = int(backbone.info["image_size"])  # a ViT's position grid fixes its input size
    kwargs = dict(image_size=size, batch_size=cfg.batch_size, device=device,
                  amp_dtype=_amp(cfg.precision, device), num_workers=cfg.num_workers)
    out: dict[str, Any] = {}
    for data in datasets:
        tr = features_for(backbone, data.train, cache_root=cache_root, dataset=data.name,
                          split="train", **kwargs)
        te = features_for(backbone, data.test, cache_root=cache_root, dataset=data.name,
                          split="test", **kwargs)
        result: dict[str, Any] = {"num_classes": len(data.classes), "train": len(tr.y),
                                  "test": len(te.y), "feature_dim": int(tr.x.shape[1]),
                                  "corrupt_images": tr.corrupt + te.corrupt,
                                  "split": data.split_note, "features_cached": tr.cached}
        try:
            result.update(_classify(tr, te, cfg, device))
        except InputError as e:  # a classifier's message names its arrays, not the data set
            raise InputError(f"{data.name}: {e}") from None
        out[data.name] = result
        log.info("eval: %s %s", data.name, _line(result))
    return out


def _classify(tr: Features, te: Features, cfg: EvalConfig, device: str) -> dict[str, Any]:
    """The probe, few-shot and kNN blocks of one data set's metrics."""
    from stablerep.evaluation.classifiers import few_shot, knn_accuracy, linear_probe

    result: dict[str, Any] = {}
    if cfg.probe:
        c_values = np.logspace(np.log10(cfg.probe_c_min), np.log10(cfg.probe_c_max),
                               cfg.probe_num_c)
        probe = linear_probe(tr.x, tr.y, te.x, te.y, c_values=c_values,
                             val_fraction=cfg.probe_val_fraction, seed=cfg.seed,
                             device=device, max_iter=cfg.probe_max_iter)
        result["linear_probe"] = {"top1": probe.top1, "top5": probe.top5,
                                  "best_c": probe.best_c, "val_top1": probe.val_top1,
                                  "seconds": round(probe.seconds, 3)}
    if cfg.few_shot_episodes:
        fs = few_shot(te.x, te.y, way=cfg.few_shot_way, shot=cfg.few_shot_shot,
                      query=cfg.few_shot_query, episodes=cfg.few_shot_episodes,
                      seed=cfg.seed, device=device)
        result["few_shot"] = {"way": fs.way, "shot": fs.shot, "query": fs.query,
                              "episodes": fs.episodes, "mean": fs.mean, "ci95": fs.ci95,
                              "seconds": round(fs.seconds, 3)}
    if cfg.knn_k:
        result["knn"] = {"k": cfg.knn_k, "top1": knn_accuracy(tr.x, tr.y, te.x, te.y,
                                                              k=cfg.knn_k, device=device)}
    return result


def _line(result: dict[str, Any]) -> str:
    parts = []
    if "linear_probe" in result:
        parts.append(f"probe top-1 {result['linear_probe']['top1']:.3f}")
    if "few_shot" in result:
        fs = result["few_shot"]
        parts.append(f"{fs['way']}-way {fs['shot']}-shot {fs['mean']:.3f}±{fs['ci95']:.3f}")
    if "knn" in result:
        parts.append(f"kNN {result['knn']['top1']:.3f}")
    return ", ".join(parts)


def _check_few_shot(cfg: EvalConfig, datasets: list[EvalData]) -> None:
    """K (+ queries) must fit in enough classes of every test split, before any work."""
    need = cfg.few_shot_shot + cfg.few_shot_query
    for data in datasets:
        if cfg.few_shot_episodes and len(data.classes) < cfg.few_shot_way:
            raise InputError(f"eval.few_shot_way: {cfg.few_shot_way}-way episodes need "
                             f"{cfg.few_shot_way} classes but {data.name} has "
                             f"{len(data.classes)}; lower it (or eval.few_shot_episodes=0)")
        counts = np.bincount(data.test.labels, minlength=len(data.classes))
        if cfg.few_shot_episodes and (counts >= need).sum() < cfg.few_shot_way:
            raise InputError(
                f"eval.few_shot_shot: {cfg.few_shot_shot} support + {cfg.few_shot_query} query "
                f"images per class need {need}, but only {(counts >= need).sum()} classes of "
                f"{data.name} test have that many (smallest class: {counts.min()}); "
                f"{cfg.few_shot_way}-way episodes need {cfg.few_shot_way}")


def _check_datasets(cfg: EvalConfig, datasets: list[EvalData]) -> None:
    """Readable images, classes, the probe's split and few-shot needs of every data set."""
    from stablerep.evaluation.classifiers import stratified_split

    for data in datasets:
        check_readable(data)
        present = np.unique(data.train.labels)
        if len(present) < 2:
            raise InputError(f"{data.name}: expected at least 2 classes with train images, got "
                             f"{len(present)} ({[data.classes[i] for i in present][:5]})")
        if cfg.probe and len(stratified_split(data.train.labels, cfg.probe_val_fraction,
                                              cfg.seed)[1]) == 0:
            raise InputError(f"{data.name}: eval.probe_val_fraction {cfg.probe_val_fraction} "
                             f"holds out no train image ({len(data.train)} in "
                             f"{len(present)} classes); use more train images or a larger "
                             "fraction")
    _check_few_shot(cfg, datasets)


def _check_image_size(cfg: EvalConfig, backbone: Backbone, checkpoint: str) -> None:
    trained_size = int(backbone.info["image_size"])
    if cfg.image_size is not None and cfg.image_size != trained_size:
        raise InputError(f"eval.image_size: got {cfg.image_size}, but {checkpoint} was trained "
                         f"at {trained_size} (a ViT's position grid fixes its input size); "
                         "leave it unset")


def _load_baseline(cfg: EvalConfig, backbone: Backbone) -> Backbone | None:
    """The baseline backbone (``eval.baseline``), or None for ``none``."""
    if cfg.baseline == "none":
        return None
    if cfg.baseline == "random":
        return random_like(backbone.info, seed=cfg.seed)
    return load_backbone(cfg.baseline, image_size=cfg.image_size, seed=cfg.seed)


def run_eval(cfg: EvalConfig, *, checkpoint: str, out: str, images: str = "",
             train_metrics: str = "") -> dict[str, Any]:
    """Evaluate ``checkpoint`` (and the baseline) and publish metrics + report under ``out``.

    Args:
        cfg: the validated eval config.
        checkpoint: what to evaluate (see :mod:`stablerep.evaluation.backbones`).
        out: output folder URI (metrics.json, report.html, report.md; the feature cache
            unless ``cfg.feature_cache`` is set).
        images: generated images folder for the report's sample grid ("" = none).
        train_metrics: training ``metrics.jsonl`` for the report's loss curve ("" = none).

    Raises:
        InputError / ConfigError: bad input, found before any feature is extracted (nothing
            is written under ``out``).
    """
    from stablerep import report

    start = time.perf_counter()
    check_names(cfg.datasets)
    device = devices.resolve_device(cfg.device, field="eval.device")
    backbone = load_backbone(checkpoint, image_size=cfg.image_size, seed=cfg.seed)
    _check_image_size(cfg, backbone, checkpoint)
    base = _load_baseline(cfg, backbone)
    datasets = [load_dataset(s, data_cache=cfg.data_cache, download=cfg.download,
                             seed=cfg.seed) for s in cfg.datasets]
    _check_datasets(cfg, datasets)
    loss_curve = (report.read_loss_curve(train_metrics)
                  if train_metrics and storage.exists(train_metrics) else None)
    samples = (report.read_sample_grid(images)
               if images and storage.exists(storage.join(images, shard_tar_name(0))) else None)
    # Every input is checked: from here on, features are extracted and cached.
    cache_root = cfg.feature_cache or storage.join(out, "features")
    metrics: dict[str, Any] = {
        "checkpoint": checkpoint, "model": backbone.info,
        "datasets": evaluate_backbone(backbone, datasets, cfg, cache_root=cache_root,
                                      device=device)}
    baseline = None
    if base is not None:
        baseline = {"checkpoint": base.source, "model": base.info,
                    "datasets": evaluate_backbone(base, datasets, cfg, cache_root=cache_root,
                                                  device=device)}
        metrics["baseline"] = baseline
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    html = report.render_html(metrics, baseline=baseline, loss_curve=loss_curve,
                              samples=samples)
    report.write_report(out, html, report.render_markdown(metrics, baseline=baseline))
    write_eval_metrics(out, metrics)  # last: the run is done
    return metrics
