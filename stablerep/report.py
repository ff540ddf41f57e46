"""The evaluation report: one self-contained HTML page (and a Markdown table) from eval metrics.

The HTML is meant to be shown as a Kubeflow HTML artifact, so it depends on nothing outside
itself: CSS is inline, plots are PNGs (matplotlib, Agg canvas) embedded as ``data:`` URIs,
sample images are embedded the same way, and a Content-Security-Policy forbids loading
anything else. All text that comes from data (data set names, checkpoint URIs, captions) is
HTML-escaped.

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

import base64
import contextlib
import html
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

from stablerep import storage
from stablerep.contracts import (
    IMAGE_EXTS,
    KEY_PATTERN,
    REPORT_HTML,
    REPORT_MD,
    shard_tar_name,
    split_member,
)

log = logging.getLogger(__name__)

PAPER_MODEL = "StableRep ViT-B/16 (paper)"

PAPER_RESULTS: dict[str, dict[str, float]] = {
    # Fine-grained linear probes (SynCLR table, StableRep ViT-B/16 trained on CC12M synthetic).
    "torchvision:FGVCAircraft": {PAPER_MODEL: 59.2},
    "torchvision:StanfordCars": {PAPER_MODEL: 83.5},
    "torchvision:DTD": {PAPER_MODEL: 80.1},
    "torchvision:Flowers102": {PAPER_MODEL: 97.3},
    "torchvision:OxfordIIITPet": {PAPER_MODEL: 88.3},
    "torchvision:SUN397": {PAPER_MODEL: 74.3},
    "torchvision:Caltech101": {PAPER_MODEL: 94.7},
    "torchvision:Food101": {PAPER_MODEL: 85.1},
    "torchvision:VOC2007": {PAPER_MODEL: 87.9},
    # ImageNet linear probe (StableRep 1x schedule on CC12M synthetic; 73.7 with BN).
    "torchvision:ImageNet": {"StableRep 1x CC12M ViT-B/16 (paper)": 72.8},
}
"""Published linear-probe top-1 (percent) keyed by the data set name the eval stage uses."""

PAPER_ALIASES: dict[str, str] = {
    "imagenet": "torchvision:ImageNet",
    "torchvision:Cars": "torchvision:StanfordCars",
    "torchvision:Pets": "torchvision:OxfordIIITPet",
    "torchvision:Flowers": "torchvision:Flowers102",
    "torchvision:VOC": "torchvision:VOC2007",
}
"""Other spellings of the data sets in :data:`PAPER_RESULTS`."""

PAPER_NOTE = (
    "Published numbers are linear-probe top-1 of a ViT-B/16 trained at paper scale (about 10M "
    "CC12M captions x 10 generated images, 224 px, 15 epochs; fine-grained numbers from the "
    "SynCLR table, ImageNet from the StableRep paper with an SGD probe). They are a reference "
    "point, not a target for a small model trained on a small synthetic set."
)

MISSING = "\u2014"  # em dash


def paper_results(dataset: str) -> dict[str, float]:
    """Published numbers for ``dataset`` (exact name, an alias, or a case-insensitive match)."""
    if dataset in PAPER_RESULTS:
        return PAPER_RESULTS[dataset]
    lowered = {k.lower(): k for k in PAPER_RESULTS}
    for key in (dataset, PAPER_ALIASES.get(dataset, "")):
        if key.lower() in lowered:
            return PAPER_RESULTS[lowered[key.lower()]]
    for alias, target in PAPER_ALIASES.items():
        if alias.lower() == dataset.lower():
            return PAPER_RESULTS[target]
    return {}


# ---------------------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    """A finite float, or None for anything missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _pct(value: Any) -> str:
    v = _num(value)
    return MISSING if v is None else f"{100 * v:.1f}"


def _delta(value: Any, base: Any) -> str:
    v, b = _num(value), _num(base)
    if v is None or b is None:
        return MISSING
    return f"{100 * (v - b):+.1f}"


def _count(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return MISSING if value is None else str(value)
    return f"{value:,}"


def _get(d: dict | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


METRICS = (
    # key, label, path to the value, path to the +- (or None)
    ("top1", "Linear probe top-1", ("linear_probe", "top1"), None),
    ("top5", "Linear probe top-5", ("linear_probe", "top5"), None),
    ("few", "Few-shot", ("few_shot", "mean"), ("few_shot", "ci95")),
    ("knn", "kNN top-1", ("knn", "top1"), None),
)


def _metric_text(result: dict | None, path: Sequence[str], ci_path: Sequence[str] | None) -> str:
    text = _pct(_get(result, *path))
    if ci_path and text != MISSING and _num(_get(result, *ci_path)) is not None:
        text += f" \u00b1 {_pct(_get(result, *ci_path))}"
    return text


def _dataset_names(metrics: dict, baseline: dict | None) -> list[str]:
    names = list((metrics.get("datasets") or {}).keys())
    for name in (_get(baseline, "datasets") or {}):
        if name not in names:
            names.append(name)
    return names


def _few_shot_label(metrics: dict, baseline: dict | None) -> str:
    for doc in (metrics, baseline):
        for result in (_get(doc, "datasets") or {}).values():
            fs = _get(result, "few_shot")
            if isinstance(fs, dict) and "way" in fs and "shot" in fs:
                return f"Few-shot {fs['way']}-way {fs['shot']}-shot"
    return "Few-shot"


def _resolve_baseline(metrics: dict, baseline: dict | None) -> dict | None:
    """The given baseline, else the one the eval stage stores inside metrics.json."""
    if baseline is None and isinstance(metrics.get("baseline"), dict):
        return metrics["baseline"]
    return baseline


# ---------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> str:
    """The figure as a base64 PNG (Agg canvas; no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _short(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


CKPT_COLOR, BASE_COLOR, PAPER_COLOR = "#2563eb", "#9ca3af", "#111827"


def _bar_plot(names: list[str], series: list[tuple[str, str, list, list | None]], *,
              xlabel: str, title: str, paper: list[float | None] | None = None,
              chance: float | None = None) -> str:
    """Horizontal grouped bars, one group per data set; ``series``: (label, colour, values, err)."""
    n, k = len(names), len(series)
    fig, ax = _figure(5.8, 1.0 + 0.45 * n * max(k, 1) + 0.3)
    height = 0.8 / max(k, 1)
    for i, (label, color, values, errs) in enumerate(series):
        ys = [row + (i - (k - 1) / 2) * height for row in range(n)]
        vals = [100 * v if v is not None else 0.0 for v in values]
        xerr = None
        if errs is not None:
            xerr = [100 * e if e is not None else 0.0 for e in errs]
        bars = ax.barh(ys, vals, height=height * 0.95, color=color, label=label, xerr=xerr,
                       capsize=3, error_kw={"elinewidth": 1, "ecolor": "#374151"})
        for bar, v, e in zip(bars, values, xerr or [0.0] * n, strict=True):
            text = f"{100 * v:.1f}" if v is not None else "n/a"
            ax.text(min(bar.get_width() + e, 100) + 1.5, bar.get_y() + bar.get_height() / 2,
                    text, va="center", fontsize=8, color="#374151")
    if paper and any(p is not None for p in paper):
        px = [p for p in paper if p is not None]
        py = [row for row, p in enumerate(paper) if p is not None]
        ax.scatter(px, py, marker="D", color=PAPER_COLOR, zorder=5, s=28,
                   label="ViT-B/16 paper")
    if chance is not None:
        ax.axvline(100 * chance, color="#6b7280", linestyle="--", linewidth=1,
                   label=f"chance ({100 * chance:.0f}%)")
    ax.set_yticks(range(n))
    ax.set_yticklabels([_short(x) for x in names], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _png(fig)


def _linear_plot(names: list[str], metrics: dict, baseline: dict | None) -> str | None:
    rows = [n for n in names if _num(_get(metrics, "datasets", n, "linear_probe", "top1"))
            is not None or _num(_get(baseline, "datasets", n, "linear_probe", "top1"))
            is not None]
    if not rows:
        return None
    series = [("checkpoint", CKPT_COLOR,
               [_num(_get(metrics, "datasets", n, "linear_probe", "top1")) for n in rows], None)]
    if baseline is not None:
        series.append(("baseline", BASE_COLOR,
                       [_num(_get(baseline, "datasets", n, "linear_probe", "top1"))
                        for n in rows], None))
    paper = [next(iter(paper_results(n).values()), None) for n in rows]
    return _bar_plot(rows, series, xlabel="top-1 accuracy (%)", title="Linear probe top-1",
                     paper=paper)


def _few_shot_plot(names: list[str], metrics: dict, baseline: dict | None,
                   title: str) -> str | None:
    rows = [n for n in names if _num(_get(metrics, "datasets", n, "few_shot", "mean"))
            is not None or _num(_get(baseline, "datasets", n, "few_shot", "mean")) is not None]
    if not rows:
        return None
    series = []
    for label, color, doc in (("checkpoint", CKPT_COLOR, metrics),
                              ("baseline", BASE_COLOR, baseline)):
        if doc is None:
            continue
        series.append((label, color,
                       [_num(_get(doc, "datasets", n, "few_shot", "mean")) for n in rows],
                       [_num(_get(doc, "datasets", n, "few_shot", "ci95")) for n in rows]))
    ways = {_get(doc, "datasets", n, "few_shot", "way") for doc in (metrics, baseline)
            if doc is not None for n in rows} - {None}
    way = next(iter(ways)) if len(ways) == 1 else None
    chance = 1 / way if isinstance(way, int) and way > 0 else None
    return _bar_plot(rows, series, xlabel="mean episode accuracy (%), error bar: 95% CI",
                     title=f"{title} accuracy", chance=chance)


def _loss_plot(curve: list[tuple[int, float]]) -> str | None:
    points = [(s, v) for s, v in curve if _num(v) is not None]
    if not points:
        return None
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    fig, ax = _figure(5.8, 3.4)
    smooth = len(points) >= 20
    ax.plot(steps, losses, color=CKPT_COLOR, alpha=0.35 if smooth else 1.0, linewidth=1,
            marker="o" if len(points) < 20 else None, markersize=3, label="loss")
    if smooth:
        alpha, ema, out = 2 / (1 + max(len(points) // 20, 2)), losses[0], []
        for v in losses:
            ema = alpha * v + (1 - alpha) * ema
            out.append(ema)
        ax.plot(steps, out, color=CKPT_COLOR, linewidth=2, label="smoothed (EMA)")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss", fontsize=11)
    ax.grid(alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------- images

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
THUMBNAIL_PX = 256


def _mime(data: bytes) -> str | None:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_data_uri(data: bytes, *, max_px: int = THUMBNAIL_PX) -> str | None:
    """A ``data:`` URI for an encoded image, downscaled (JPEG) when larger than ``max_px``.

    Small JPEG/PNG/WebP/GIF images are embedded byte for byte; an image that cannot be
    decoded yields ``None``.
    """
    from PIL import Image, UnidentifiedImageError

    mime = _mime(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mime is not None and max(im.size) <= max_px:
                return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
            im.load()
            im.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            if im.mode in ("RGBA", "LA", "P"):
                im.convert("RGBA").save(buf, format="PNG")
                mime = "image/png"
            else:
                im.convert("RGB").save(buf, format="JPEG", quality=85)
                mime = "image/jpeg"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# ---------------------------------------------------------------------------- HTML

CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #111827; background: #fff; margin: 24px; max-width: 1240px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; }
.meta dt { color: #6b7280; }
.meta dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
           word-break: break-all; }
table.results { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.results th, table.results td { border: 1px solid #e5e7eb; padding: 4px 8px; }
table.results th { background: #f3f4f6; font-weight: 600; text-align: center; }
table.results td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.results td.name { text-align: left; font-family: ui-monospace, Menlo, monospace;
                        white-space: normal; overflow-wrap: anywhere; min-width: 200px;
                        max-width: 280px; }
table.results tbody tr:nth-child(even) { background: #fafafa; }
td.base { color: #6b7280; }
td.pos { color: #047857; font-weight: 600; }
td.neg { color: #b91c1c; font-weight: 600; }
td.paper { color: #374151; }
.note { color: #4b5563; font-size: 12px; max-width: 900px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots img { max-width: 100%; height: auto; border: 1px solid #e5e7eb; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr));
           gap: 14px; }
.sample { border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px; margin: 0; }
.sample .imgs { display: grid; grid-template-columns: repeat(2, 1fr); gap: 4px; }
.sample img { width: 100%; aspect-ratio: 1 / 1; object-fit: cover; background: #f3f4f6; }
.sample figcaption { font-size: 12px; margin-top: 6px; color: #374151;
                     overflow-wrap: anywhere; }
.broken { display: flex; align-items: center; justify-content: center; aspect-ratio: 1 / 1;
          background: #fee2e2; color: #991b1b; font-size: 11px; }
footer { margin-top: 32px; color: #9ca3af; font-size: 12px; }
"""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'none'; base-uri 'none'; form-action 'none'")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _delta_class(text: str) -> str:
    if text.startswith("+") and text.strip("+0.") != "":
        return "pos"
    if text.startswith("-") and text.strip("-0.") != "":
        return "neg"
    return ""


def _model_text(model: Any) -> str:
    if not isinstance(model, dict):
        return str(model) if model else MISSING
    parts = []
    for key, label in (("timm_model", ""), ("image_size", "image size "),
                       ("feature_dim", "feature dim ")):
        if model.get(key) is not None:
            parts.append(f"{label}{model[key]}")
    extra = [f"{k} {v}" for k, v in model.items()
             if k not in ("timm_model", "image_size", "feature_dim")
             and isinstance(v, (str, int, float))]
    kwargs = model.get("model_kwargs")
    if isinstance(kwargs, dict) and kwargs:  # e.g. patch_size 4, depth 4
        extra.insert(0, ", ".join(f"{k} {v}" for k, v in kwargs.items()))
    return ", ".join(parts + extra) or MISSING


def _table_html(names: list[str], metrics: dict, baseline: dict | None, few_label: str) -> str:
    has_base = baseline is not None
    has_paper = any(paper_results(n) for n in names)
    sub = ["ckpt", "baseline", "\u0394 pp"] if has_base else []
    labels = {"few": few_label}
    head1 = ['<th rowspan="2">Data set</th>']
    for key, label, _, _ in METRICS:
        label = labels.get(key, label)
        if has_base:
            head1.append(f'<th colspan="3">{_e(label)}</th>')
        else:
            head1.append(f'<th rowspan="2">{_e(label)}</th>')
    if has_paper:
        head1.append('<th rowspan="2">Paper top-1<sup>*</sup></th>')
    for label in ("Classes", "Train", "Test", "Corrupt images"):
        head1.append(f'<th rowspan="2">{label}</th>')
    head2 = "".join(f"<th>{_e(s)}</th>" for _ in METRICS for s in sub)
    rows = []
    for name in names:
        result = _get(metrics, "datasets", name)
        base = _get(baseline, "datasets", name)
        cells = [f'<td class="name">{_e(name)}</td>']
        for _key, _label, path, ci in METRICS:
            cells.append(f"<td>{_e(_metric_text(result, path, ci))}</td>")
            if has_base:
                cells.append(f'<td class="base">{_e(_metric_text(base, path, ci))}</td>')
                d = _delta(_get(result, *path), _get(base, *path))
                cells.append(f'<td class="{_delta_class(d)}">{_e(d)}</td>')
        if has_paper:
            paper = paper_results(name)
            text = "; ".join(f"{v:.1f}" for v in paper.values()) if paper else MISSING
            title = "; ".join(paper) if paper else ""
            cells.append(f'<td class="paper" title="{_e(title)}">{_e(text)}</td>')
        info = result if isinstance(result, dict) else (base if isinstance(base, dict) else {})
        for key in ("num_classes", "train", "test", "corrupt_images"):
            cells.append(f"<td>{_e(_count(info.get(key)))}</td>")
        rows.append(f'<tr class="ds" data-dataset="{_e(name)}">{"".join(cells)}</tr>')
    head = f"<tr>{''.join(head1)}</tr>" + (f"<tr>{head2}</tr>" if has_base else "")
    return (f'<table class="results"><thead>{head}</thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _paper_html(names: list[str], metrics: dict) -> str:
    rows = []
    for name in names:
        for model, value in paper_results(name).items():
            ours = _pct(_get(metrics, "datasets", name, "linear_probe", "top1"))
            rows.append(f'<tr class="paper-row"><td class="name">{_e(name)}</td>'
                        f"<td>{_e(ours)}</td><td>{value:.1f}</td>"
                        f'<td class="name">{_e(model)}</td></tr>')
    if not rows:
        return ""
    return ('<h2>Published results</h2><table class="results"><thead><tr><th>Data set</th>'
            "<th>This run, linear top-1</th><th>Paper top-1</th><th>Paper model</th></tr>"
            f'</thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="note"><sup>*</sup> {_e(PAPER_NOTE)}</p>')


def _samples_html(samples: list[tuple[str, list[bytes]]]) -> str:
    cards = []
    for caption, images in samples:
        cells = []
        for data in images:
            uri = image_data_uri(data)
            if uri is None:
                cells.append('<div class="broken">undecodable image</div>')
            else:
                cells.append(f'<img src="{uri}" alt="{_e(caption)}" loading="eager">')
        cards.append(f'<figure class="sample"><div class="imgs">{"".join(cells)}</div>'
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    return (f"<h2>Generated samples</h2><p class=\"note\">{len(samples)} captions, the first "
            f"images of each from the first shard.</p>"
            f'<div class="samples">{"".join(cards)}</div>')


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
    baseline = _resolve_baseline(metrics, baseline)
    names = _dataset_names(metrics, baseline)
    few_label = _few_shot_label(metrics, baseline)

    meta = [("Checkpoint", metrics.get("checkpoint") or MISSING),
            ("Model", _model_text(metrics.get("model")))]
    if baseline is not None:
        meta.append(("Baseline", baseline.get("checkpoint") or "(unnamed)"))
        if baseline.get("model") and baseline.get("model") != metrics.get("model"):
            meta.append(("Baseline model", _model_text(baseline.get("model"))))
    seconds = _num(metrics.get("seconds"))
    if seconds is not None:
        meta.append(("Evaluation time", f"{seconds:.1f} s"))
    meta_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta)

    parts = [f"<h1>{_e(title)}</h1>", f'<dl class="meta">{meta_html}</dl>',
             "<h2>Results</h2>"]
    if names:
        parts.append(_table_html(names, metrics, baseline, few_label))
        notes = ["Accuracies in percent; few-shot: mean over episodes \u00b1 95% confidence "
                 "interval."]
        if baseline is not None:
            notes.append("\u0394 pp: checkpoint minus baseline, in percentage points.")
        parts.append(f'<p class="note">{_e(" ".join(notes))}</p>')
    else:
        parts.append('<p class="note">No data set was evaluated.</p>')
    parts.append(_paper_html(names, metrics))

    plots = [(_few_shot_plot(names, metrics, baseline, few_label), f"{few_label} accuracy"),
             (_linear_plot(names, metrics, baseline), "Linear probe top-1")]
    plots = [(p, alt) for p, alt in plots if p]
    if plots:
        parts.append("<h2>Plots</h2><div class=\"plots\">" + "".join(
            f'<img class="plot" src="data:image/png;base64,{p}" alt="{_e(alt)}">'
            for p, alt in plots) + "</div>")
    if loss_curve:
        png = _loss_plot(loss_curve)
        if png:
            last_step, last_loss = loss_curve[-1]
            parts.append(
                '<h2>Training loss</h2><div class="plots">'
                f'<img class="plot" src="data:image/png;base64,{png}" alt="training loss">'
                f'</div><p class="note">{len(loss_curve)} points; last: step '
                f"{_e(last_step)}, loss {_e(f'{last_loss:.4f}')}.</p>")
    if samples:
        parts.append(_samples_html(samples))
    parts.append("<footer>stablerep evaluation report</footer>")

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


# ---------------------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(metrics: dict, *, baseline: dict | None = None) -> str:
    """The results table in Markdown (for terminals and READMEs); same columns as the HTML.

    With a baseline each accuracy cell reads ``checkpoint / baseline (delta pp)``.
    """
    baseline = _resolve_baseline(metrics, baseline)
    names = _dataset_names(metrics, baseline)
    few_label = _few_shot_label(metrics, baseline)
    has_paper = any(paper_results(n) for n in names)
    lines = ["# stablerep evaluation", "",
             f"- checkpoint: `{metrics.get('checkpoint') or MISSING}`",
             f"- model: {_md(_model_text(metrics.get('model')))}"]
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
    for name in names:
        result = _get(metrics, "datasets", name)
        base = _get(baseline, "datasets", name)
        cells = [_md(name)]
        for _key, _label, path, ci in METRICS:
            text = _metric_text(result, path, ci)
            if baseline is not None:
                text += (f" / {_metric_text(base, path, ci)} "
                         f"({_delta(_get(result, *path), _get(base, *path))})")
            cells.append(_md(text))
        if has_paper:
            paper = paper_results(name)
            cells.append("; ".join(f"{v:.1f}" for v in paper.values()) if paper else MISSING)
        info = result if isinstance(result, dict) else (base if isinstance(base, dict) else {})
        cells += [_md(_count(info.get(k)))
                  for k in ("num_classes", "train", "test", "corrupt_images")]
        lines.append("| " + " | ".join(cells) + " |")
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


def read_loss_curve(metrics_jsonl_uri: str) -> list[tuple[int, float]]:
    """``(step, loss)`` from a training run's ``metrics.jsonl``, sorted by step.

    Lines without a numeric ``step`` and ``loss`` (or not JSON) are skipped; when a step
    appears more than once (a resumed run) the last line wins. Non-finite losses are kept
    (the plot leaves them out).
    """
    by_step: dict[int, float] = {}
    skipped = 0
    for line in storage.read_text(metrics_jsonl_uri).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict) and "loss" not in record and "knn_top1" in record:
            continue  # a kNN check line, not a training step
        step, loss = _get(record, "step"), _get(record, "loss")
        if (isinstance(step, bool) or not isinstance(step, (int, float))
                or isinstance(loss, bool) or not isinstance(loss, (int, float))):
            skipped += 1
            continue
        by_step[int(step)] = float(loss)
    if skipped:
        log.warning("%s: skipped %d lines without a step and loss", metrics_jsonl_uri, skipped)
    return sorted(by_step.items())


def _group(key: str) -> tuple[str, int]:
    """(caption group, j) of a sample key; a key outside the contract is its own group."""
    base = key.rsplit("/", 1)[-1]
    m = KEY_PATTERN.fullmatch(base)
    if m:
        return str(int(m["caption_id"])), int(m["j"])
    return key, 0


def _iter_members(stream: Any) -> Iterable[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield member.name, f.read()


def read_sample_grid(images_uri: str, *, captions: int = 6,
                     per_caption: int = 4) -> list[tuple[str, list[bytes]]]:
    """The first ``captions`` captions of ``<images>/shard-000000.tar`` with up to
    ``per_caption`` of their images each, as ``(caption, [encoded image, ...])``.

    Samples are keyed ``{caption_id:012d}_{j:03d}`` with ``.jpg``/``.webp``/``.png``, ``.txt``
    and ``.json`` members; they are grouped by caption id and ordered by ``j``. The tar is read
    as a stream and reading stops once the requested captions are complete, so only the start
    of a large shard is downloaded. A shard that ends early (truncated) yields what was read.
    """
    uri = storage.join(images_uri, shard_tar_name(0))
    order: list[str] = []
    texts: dict[str, str] = {}
    json_texts: dict[str, str] = {}
    images: dict[str, dict[int, bytes]] = {}
    if captions <= 0 or per_caption <= 0:
        return []
    with storage.open_read(uri) as stream:
        try:
            for member_name, data in _iter_members(stream):
                key, ext = split_member(member_name)
                group, j = _group(key)
                if group not in images:
                    if len(order) == captions:
                        break  # members are in key order: the wanted captions are complete
                    order.append(group)
                    images[group] = {}
                if ext in IMAGE_EXTS:
                    images[group].setdefault(j, data)
                elif ext == "txt":
                    texts.setdefault(group, data.decode("utf-8", errors="replace").strip())
                elif ext == "json":
                    with contextlib.suppress(ValueError, AttributeError):
                        caption = json.loads(data).get("caption")
                        if isinstance(caption, str):
                            json_texts.setdefault(group, caption.strip())
        except tarfile.TarError as e:
            log.warning("%s: stopped reading samples: %s", uri, e)
    out = []
    for group in order:
        imgs = [images[group][j] for j in sorted(images[group])][:per_caption]
        if imgs:
            text = texts.get(group) or json_texts.get(group) or f"caption {group}"
            out.append((text, imgs))
    return out

