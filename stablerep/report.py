"""The evaluation report: one self-contained HTML page (and a Markdown table) from eval metrics.

The HTML is meant to be shown as a Kubeflow HTML artifact, so it depends on nothing outside
itself: CSS is inline, plots are PNGs (:mod:`stablerep.report_plots`) embedded as ``data:``
URIs, sample images are embedded the same way, and a Content-Security-Policy forbids loading
anything else. The page is rendered from the jinja2 template ``templates/report.html.j2``
with autoescaping on: all text that comes from data (data set names, checkpoint URIs,
captions) is HTML-escaped. What the report shows is computed in :mod:`stablerep.report_data`.

``metrics`` is what the eval stage writes as ``eval/metrics.json``::

    {"checkpoint": ..., "model": {"timm_model": ..., "image_size": ..., "feature_dim": ...},
     "datasets": {"<name>": {"num_classes": ..., "train": ..., "test": ..., "feature_dim": ...,
                             "linear_probe": {"top1": ..., "top5": ..., ...},
                             "few_shot": {"way": ..., "shot": ..., "mean": ..., "ci95": ...},
                             "knn": {"k": ..., "top1": ...}, "corrupt_images": ...}},
     "seconds": ...}

``baseline`` has the same shape. Accuracies are fractions; they are shown as percentages with
one decimal, and differences as percentage points ("pp").
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jinja2

from stablerep import storage
from stablerep.contracts import REPORT_HTML, REPORT_MD
from stablerep.report_data import (
    METRICS,
    MISSING,
    PAPER_ALIASES,
    PAPER_MODEL,
    PAPER_NOTE,
    PAPER_RESULTS,
    THUMBNAIL_PX,
    count,
    dataset_names,
    delta,
    few_shot_label,
    get,
    image_data_uri,
    metric_text,
    model_text,
    num,
    paper_results,
    pct,
    read_loss_curve,
    read_sample_grid,
    resolve_baseline,
)
from stablerep.report_plots import few_shot_plot, linear_plot, loss_plot

__all__ = ["MISSING", "PAPER_ALIASES", "PAPER_MODEL", "PAPER_NOTE", "PAPER_RESULTS",
           "THUMBNAIL_PX", "image_data_uri", "paper_results", "read_loss_curve",
           "read_sample_grid", "render_html", "render_markdown", "write_report"]

log = logging.getLogger(__name__)

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'none'; base-uri 'none'; form-action 'none'")
COUNTS = (("num_classes", "Classes"), ("train", "Train"), ("test", "Test"),
          ("corrupt_images", "Corrupt images"))


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("stablerep", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


# ---------------------------------------------------------------------------- HTML


def _delta_class(text: str) -> str:
    if text.startswith("+") and text.strip("+0.") != "":
        return "pos"
    if text.startswith("-") and text.strip("-0.") != "":
        return "neg"
    return ""


def _cell(text: str, css: str = "", title: str = "") -> dict[str, str]:
    return {"text": text, "css": css, "title": title}


def _row(name: str, metrics: dict, baseline: dict | None, has_paper: bool) -> dict[str, Any]:
    """One results row: ``{"name", "cells": [{"text", "css", "title"}, ...]}``."""
    result, base = get(metrics, "datasets", name), get(baseline, "datasets", name)
    cells = []
    for _key, _label, path, ci in METRICS:
        cells.append(_cell(metric_text(result, path, ci)))
        if baseline is not None:
            d = delta(get(result, *path), get(base, *path))
            cells += [_cell(metric_text(base, path, ci), "base"), _cell(d, _delta_class(d))]
    if has_paper:
        paper = paper_results(name)
        text = "; ".join(f"{v:.1f}" for v in paper.values()) if paper else MISSING
        cells.append(_cell(text, "paper", "; ".join(paper)))
    info = result if isinstance(result, dict) else (base if isinstance(base, dict) else {})
    cells += [_cell(count(info.get(key))) for key, _ in COUNTS]
    return {"name": name, "cells": cells}


def _table(names: list[str], metrics: dict, baseline: dict | None,
           few_label: str) -> dict[str, Any] | None:
    """The results table's header flags, rows and note; None without data sets."""
    if not names:
        return None
    has_paper = any(paper_results(n) for n in names)
    note = "Accuracies in percent; few-shot: mean over episodes \u00b1 95% confidence interval."
    if baseline is not None:
        note += " \u0394 pp: checkpoint minus baseline, in percentage points."
    return {"has_base": baseline is not None, "has_paper": has_paper,
            "metric_labels": [few_label if key == "few" else label
                              for key, label, _, _ in METRICS],
            "count_labels": [label for _, label in COUNTS],
            "rows": [_row(n, metrics, baseline, has_paper) for n in names], "note": note}


def _meta(metrics: dict, baseline: dict | None) -> list[tuple[str, str]]:
    meta = [("Checkpoint", metrics.get("checkpoint") or MISSING),
            ("Model", model_text(metrics.get("model")))]
    if baseline is not None:
        meta.append(("Baseline", baseline.get("checkpoint") or "(unnamed)"))
        if baseline.get("model") and baseline.get("model") != metrics.get("model"):
            meta.append(("Baseline model", model_text(baseline.get("model"))))
    seconds = num(metrics.get("seconds"))
    if seconds is not None:
        meta.append(("Evaluation time", f"{seconds:.1f} s"))
    return meta


def _loss(curve: list[tuple[int, float]] | None) -> dict[str, Any] | None:
    png = loss_plot(curve) if curve else None
    if png is None:
        return None
    last_step, last_loss = curve[-1]
    return {"png": png, "points": len(curve), "last_step": last_step,
            "last_loss": f"{last_loss:.4f}"}


def render_html(metrics: dict, *, baseline: dict | None = None,
                loss_curve: list[tuple[int, float]] | None = None,
                samples: list[tuple[str, list[bytes]]] | None = None,
                title: str = "stablerep evaluation") -> str:
    """The whole report as one self-contained HTML page.

    Args:
        metrics: the eval stage's metrics (see the module docstring).
        baseline: the same for the baseline backbone; ``None`` uses ``metrics["baseline"]``
            when present, else the report has no baseline columns.
        loss_curve: ``(step, loss)`` of the training run (:func:`read_loss_curve`).
        samples: ``(caption, [encoded image, ...])`` (:func:`read_sample_grid`).
        title: the page title.
    """
    baseline = resolve_baseline(metrics, baseline)
    names = dataset_names(metrics, baseline)
    few_label = few_shot_label(metrics, baseline)
    plots = [(few_shot_plot(names, metrics, baseline, few_label), f"{few_label} accuracy"),
             (linear_plot(names, metrics, baseline), "Linear probe top-1")]
    paper_rows = [{"name": name, "ours": pct(get(metrics, "datasets", name, "linear_probe",
                                                 "top1")),
                   "paper": f"{value:.1f}", "model": model}
                  for name in names for model, value in paper_results(name).items()]
    return _environment().get_template("report.html.j2").render(
        csp=CSP, title=title, meta=_meta(metrics, baseline),
        table=_table(names, metrics, baseline, few_label), paper_rows=paper_rows,
        paper_note=PAPER_NOTE, plots=[(png, alt) for png, alt in plots if png],
        loss=_loss(loss_curve),
        samples=[(caption, [image_data_uri(data) for data in images])
                 for caption, images in samples or []])


# ---------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_row(name: str, metrics: dict, baseline: dict | None, has_paper: bool) -> str:
    result, base = get(metrics, "datasets", name), get(baseline, "datasets", name)
    cells = [_md(name)]
    for _key, _label, path, ci in METRICS:
        text = metric_text(result, path, ci)
        if baseline is not None:
            text += (f" / {metric_text(base, path, ci)} "
                     f"({delta(get(result, *path), get(base, *path))})")
        cells.append(_md(text))
    if has_paper:
        paper = paper_results(name)
        cells.append("; ".join(f"{v:.1f}" for v in paper.values()) if paper else MISSING)
    info = result if isinstance(result, dict) else (base if isinstance(base, dict) else {})
    cells += [_md(count(info.get(key))) for key, _ in COUNTS]
    return "| " + " | ".join(cells) + " |"


def render_markdown(metrics: dict, *, baseline: dict | None = None) -> str:
    """The results table in Markdown (for terminals and READMEs); same columns as the HTML.

    With a baseline each accuracy cell reads ``checkpoint / baseline (delta pp)``.
    """
    baseline = resolve_baseline(metrics, baseline)
    names = dataset_names(metrics, baseline)
    few_label = few_shot_label(metrics, baseline)
    has_paper = any(paper_results(n) for n in names)
    lines = ["# stablerep evaluation", "",
             f"- checkpoint: `{metrics.get('checkpoint') or MISSING}`",
             f"- model: {_md(model_text(metrics.get('model')))}"]
    if baseline is not None:
        lines.append(f"- baseline: `{baseline.get('checkpoint') or '(unnamed)'}`")
    lines.append("")
    if not names:
        return "\n".join([*lines, "No data set was evaluated.", ""])
    header = ["Data set"] + [few_label if k == "few" else label for k, label, _, _ in METRICS]
    if has_paper:
        header.append("Paper top-1*")
    header += ["Classes", "Train", "Test", "Corrupt"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in header[1:]) + " |")
    lines += [_md_row(name, metrics, baseline, has_paper) for name in names]
    lines.append("")
    note = "Accuracies in percent; few-shot: mean \u00b1 95% CI."
    if baseline is not None:
        note += " Cells: checkpoint / baseline (checkpoint minus baseline, percentage points)."
    lines.append(note)
    if has_paper:
        lines += ["", f"\\* {PAPER_NOTE}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- I/O


def write_report(out_uri: str, html: str, markdown: str | None = None) -> str:
    """Publish ``<out>/report.html`` (and ``report.md``) atomically; returns the HTML's URI."""
    if markdown is not None:
        storage.write_text(storage.join(out_uri, REPORT_MD), markdown)
    uri = storage.join(out_uri, REPORT_HTML)
    storage.write_text(uri, html)
    log.info("report: %s", uri)
    return uri
