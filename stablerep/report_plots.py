"""The evaluation report's plots: matplotlib figures (Agg canvas, no pyplot) as base64 PNGs.

Linear-probe and few-shot accuracies as grouped horizontal bars (checkpoint, baseline, the
paper's number as a marker, chance as a line) and the training loss curve.
"""

from __future__ import annotations

import base64
import io

from stablerep.report_data import get, num, paper_results


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


def bar_figure(names: list[str], series: list[tuple[str, str, list, list | None]], *,
               xlabel: str, title: str, paper: list[float | None] | None = None,
               chance: float | None = None):
    """Horizontal grouped bars, one group per data set; ``series``: (label, colour, values, err).

    The legend sits in a row between the title and the axes, where it covers no bar, value
    label or marker.
    """
    n, k = len(names), len(series)
    fig, ax = _figure(5.8, 1.0 + 0.45 * n * max(k, 1) + 0.3 + 0.3)
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
    ax.set_title(title, fontsize=11, pad=22)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    handles = ax.get_legend_handles_labels()[0]
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=max(len(handles), 1),
              fontsize=8, frameon=False, borderaxespad=0.2)
    return fig


def linear_plot(names: list[str], metrics: dict, baseline: dict | None) -> str | None:
    rows = [n for n in names if num(get(metrics, "datasets", n, "linear_probe", "top1"))
            is not None or num(get(baseline, "datasets", n, "linear_probe", "top1"))
            is not None]
    if not rows:
        return None
    series = [("checkpoint", CKPT_COLOR,
               [num(get(metrics, "datasets", n, "linear_probe", "top1")) for n in rows], None)]
    if baseline is not None:
        series.append(("baseline", BASE_COLOR,
                       [num(get(baseline, "datasets", n, "linear_probe", "top1"))
                        for n in rows], None))
    paper = [next(iter(paper_results(n).values()), None) for n in rows]
    return _png(bar_figure(rows, series, xlabel="top-1 accuracy (%)",
                           title="Linear probe top-1", paper=paper))


def few_shot_plot(names: list[str], metrics: dict, baseline: dict | None,
                   title: str) -> str | None:
    rows = [n for n in names if num(get(metrics, "datasets", n, "few_shot", "mean"))
            is not None or num(get(baseline, "datasets", n, "few_shot", "mean")) is not None]
    if not rows:
        return None
    series = []
    for label, color, doc in (("checkpoint", CKPT_COLOR, metrics),
                              ("baseline", BASE_COLOR, baseline)):
        if doc is None:
            continue
        series.append((label, color,
                       [num(get(doc, "datasets", n, "few_shot", "mean")) for n in rows],
                       [num(get(doc, "datasets", n, "few_shot", "ci95")) for n in rows]))
    ways = {get(doc, "datasets", n, "few_shot", "way") for doc in (metrics, baseline)
            if doc is not None for n in rows} - {None}
    way = next(iter(ways)) if len(ways) == 1 else None
    chance = 1 / way if isinstance(way, int) and way > 0 else None
    return _png(bar_figure(rows, series,
                           xlabel="mean episode accuracy (%), error bar: 95% CI",
                           title=f"{title} accuracy", chance=chance))


def loss_plot(curve: list[tuple[int, float]]) -> str | None:
    points = [(s, v) for s, v in curve if num(v) is not None]
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
