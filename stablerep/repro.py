"""The miniature replication of the paper's claims: one command, the real stage code, one table.

``stablerep repro`` (recipe ``repro``) runs, under ``<data_root>``:

1. the caption and generation stages once (``captions/``, ``images/``: procedural captions,
   several images per caption), and once more for a held-out test set (``testset/``): new
   images, exported as an image folder split 2/3 train, 1/3 test by caption;
2. for every arm x seed, the training stage (``repro/runs/<arm>-s<seed>-<fp>/train``) with
   the same ``train.max_steps`` x ``repro.images_per_step`` images seen, then the evaluation
   stage on ``eval.datasets`` plus the test set; the ``random`` arm is the evaluation's own
   random-init baseline of the same architecture, seeded like the trained arms;
3. ``results.json`` (every figure of every run and the means and spreads), ``results.md``,
   ``results.png`` (a bar per arm, one panel per metric) and ``report.html`` under
   ``repro.out``.

The arms (:data:`stablerep.config.REPRO_ARMS`): ``random``; ``simclr`` (one image per caption,
two crops); ``stablerep_k2/k4/k8`` (k images of a caption are each other's positives);
``stablerep_plus_k4`` (k = 4 plus the image-text loss); ``clip`` (image-text loss only). The
number of captions per step is ``images_per_step / rows per caption``, so every arm sees the
same number of images per step. Each run's folder name carries a fingerprint of its resolved
config: rerunning with the same settings reuses finished runs (a run is finished when its
``eval/metrics.json`` exists), and changed settings get new folders, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from stablerep import stages, storage
from stablerep.config import Config, ReproConfig, fingerprint, to_dict
from stablerep.contracts import EVAL_METRICS, REPORT_HTML
from stablerep.errors import ConfigError, InputError

log = logging.getLogger(__name__)

REPRO_DIR = "repro"
TESTSET_DIR = "testset"
TESTSET_FOLDER = "folder"  # the image folder the evaluation reads
TESTSET_DONE = "classes.json"  # written last: the test set is complete

# (metric key in results, data set key, metric path in metrics.json, label)
METRICS: tuple[tuple[str, str, tuple[str, str], str], ...] = (
    ("digits_probe", "digits", ("linear_probe", "top1"), "digits linear probe"),
    ("digits_few_shot", "digits", ("few_shot", "mean"), "digits 5-way 5-shot"),
    ("digits_knn", "digits", ("knn", "top1"), "digits kNN"),
    ("test_probe", "test", ("linear_probe", "top1"), "procedural test linear probe"),
    ("test_few_shot", "test", ("few_shot", "mean"), "procedural test 5-way 5-shot"),
)


@dataclass(frozen=True)
class Arm:
    """One method setting of the experiment."""

    name: str
    method: str  # train.method ("" = no training: the random-init baseline)
    images_per_caption: int  # train.images_per_caption (k)


ARMS: dict[str, Arm] = {
    "random": Arm("random", "", 1),
    "simclr": Arm("simclr", "simclr", 1),
    "stablerep_k2": Arm("stablerep_k2", "stablerep", 2),
    "stablerep_k4": Arm("stablerep_k4", "stablerep", 4),
    "stablerep_k8": Arm("stablerep_k8", "stablerep", 8),
    "stablerep_plus_k4": Arm("stablerep_plus_k4", "stablerep_plus", 4),
    "clip": Arm("clip", "clip", 1),
}


# ---------------------------------------------------------------------------- configs


def _sections(cfg: Config) -> ReproConfig:
    for name in ("captions", "generate", "train", "eval"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"{name}: the repro recipe needs a {name} section (see the "
                              "built-in recipe: stablerep train --config repro --print-config)")
    return cfg.repro or ReproConfig()


def repro_dir(cfg: Config) -> str:
    """Where the results go (``repro.out`` or ``<data_root>/repro``)."""
    rc = cfg.repro or ReproConfig()
    return rc.out or storage.join(cfg.data_root, REPRO_DIR)


def testset_config(cfg: Config) -> Config:
    """The caption + generation config of the held-out procedural test set."""
    rc = _sections(cfg)
    root = storage.join(cfg.data_root, TESTSET_DIR)
    captions = dataclasses.replace(
        cfg.captions, source="procedural", num_captions=rc.test_captions, seed=rc.test_seed,
        num_shards=1, out=storage.join(root, "captions"), allow_fewer=False)
    generate = dataclasses.replace(
        cfg.generate, captions=captions.out, out=storage.join(root, "images"),
        images_per_caption=rc.test_images_per_caption, seed=rc.test_seed, shard=None, all_shards=True,
        shard_from_env=False)
    return dataclasses.replace(cfg, captions=captions, generate=generate)


def arm_config(cfg: Config, arm: Arm, seed: int, *, baseline: bool, test_folder: str
               ) -> Config:
    """The train + eval config of one trained run (``arm`` at ``seed``), folders included."""
    rc = _sections(cfg)
    if not arm.method:
        raise ValueError(f"{arm.name} is not trained: it is the evaluation's baseline")
    images = stages.generate_inputs(cfg)[1]
    train = dataclasses.replace(cfg.train, method=arm.method,
                                images_per_caption=arm.images_per_caption)
    rows = train.crops_per_caption  # k, 2 crops for simclr, 1 for clip
    if rc.images_per_step % rows:
        raise ConfigError(f"repro.images_per_step: {rc.images_per_step} images do not split "
                          f"into captions of {rows} rows ({arm.name})")
    train = dataclasses.replace(train, captions_per_batch=rc.images_per_step // rows, seed=seed,
                                data=[images], out="")
    datasets = list(cfg.eval.datasets)
    if test_folder:
        datasets.append(f"imagefolder:{test_folder}")
    evaluate = dataclasses.replace(cfg.eval, datasets=datasets, seed=seed, out="",
                                   baseline="random" if baseline else "none", images=images)
    run = dataclasses.replace(cfg, train=train, eval=evaluate, repro=None)
    key = fingerprint({"train": to_dict(train), "eval": to_dict(evaluate)})[:8]
    folder = storage.join(repro_dir(cfg), "runs", f"{arm.name}-s{seed}-{key}")
    train = dataclasses.replace(train, out=storage.join(folder, "train"))
    evaluate = dataclasses.replace(evaluate, checkpoint=train.out,
                                   out=storage.join(folder, "eval"))
    return dataclasses.replace(run, train=train, eval=evaluate)


def check_plan(cfg: Config, trained: list[str]) -> None:
    """Every trained arm's config, and that its batch can be filled from the data made.

    Args:
        cfg: the resolved repro config.
        trained: the arms that train (all but ``random``).

    Raises:
        ConfigError: naming the setting, before anything is drawn or trained.
    """
    rc = _sections(cfg)
    have_images, have_captions = cfg.generate.images_per_caption, cfg.captions.num_captions
    for name in trained:
        run = arm_config(cfg, ARMS[name], rc.seeds[0], baseline=False, test_folder="").train
        if run.images_read_per_caption > have_images:
            raise ConfigError(f"generate.images_per_caption: got {have_images}, expected >= "
                              f"{run.images_read_per_caption} (arm {name} reads that many "
                              "images per caption)")
        if have_captions is not None and run.captions_per_batch > have_captions:
            raise ConfigError(f"captions.num_captions: got {have_captions}, expected >= "
                              f"{run.captions_per_batch} (arm {name} takes "
                              f"{rc.images_per_step} images per step = "
                              f"{run.captions_per_batch} captions per batch)")
        if run.captions_per_batch % run.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps: got {run.grad_accum_steps}, expected "
                              f"a divisor of arm {name}'s {run.captions_per_batch} captions "
                              "per batch")


# ---------------------------------------------------------------------------- data


def make_data(cfg: Config) -> tuple[str, str]:
    """Captions + images for training, and the held-out test set; (images, test folder).

    Every step reuses what a previous run with the same settings finished.
    """
    rc = _sections(cfg)
    if cfg.generate.backend != "procedural" and rc.test_captions:
        raise ConfigError("repro.test_captions: the held-out test set is drawn by the "
                          f"procedural backend, but generate.backend is "
                          f"{cfg.generate.backend!r}; set repro.test_captions=0")
    captions = stages.run_captions(cfg)
    print(f"repro: {captions.count:,} training captions in {captions.uri}", flush=True)
    made = stages.run_generate(dataclasses.replace(cfg, generate=dataclasses.replace(
        cfg.generate, shard=None, all_shards=True, shard_from_env=False)))
    print(f"repro: training images in {made.uri} ({made.images:,} drawn now, "
          f"{made.shards_skipped} shard(s) already done)", flush=True)
    if not rc.test_captions:
        return made.uri, ""
    test = testset_config(cfg)
    folder = storage.join(cfg.data_root, TESTSET_DIR, TESTSET_FOLDER)
    if not storage.exists(storage.join(folder, TESTSET_DONE)):
        stages.run_captions(test)
        stages.run_generate(test)
        export_image_folder(test.generate.out, folder)
    print(f"repro: held-out test set in {folder}", flush=True)
    return made.uri, folder


def export_image_folder(images: str, folder: str) -> dict[str, int]:
    """Write a procedural images folder as ``train|test/<class>/<caption id>_<j>.png``.

    Captions whose id is a multiple of 3 go to ``test`` (a third), the rest to ``train``;
    a class lands in both splits or in neither (each split must hold every class). The
    class list (``classes.json``) is written last, marking the folder complete.

    Returns:
        Images per split.
    """
    from stablerep.data.shards import discover, iter_caption_groups
    from stablerep.procedural_grammar import CLASS_NAMES, procedural_label

    by_class: dict[str, list[tuple[int, int, bytes]]] = {}
    for ref in discover([images]):
        for group in iter_caption_groups(ref.uri, sha256=ref.sha256):
            name = CLASS_NAMES[procedural_label(group.caption)]
            by_class.setdefault(name, []).extend(
                (group.caption_id, j, data) for j, data in enumerate(group.images))
    counts = {"train": 0, "test": 0}
    kept = []
    for name, items in sorted(by_class.items()):
        splits = {"test": [i for i in items if i[0] % 3 == 0],
                  "train": [i for i in items if i[0] % 3]}
        if not splits["test"] or not splits["train"]:
            continue
        kept.append(name)
        for split, chosen in splits.items():
            for caption_id, j, data in chosen:
                storage.write_bytes(storage.join(folder, split, name,
                                                 f"{caption_id:08d}_{j:03d}.png"), _as_png(data))
                counts[split] += 1
    if not kept:
        raise InputError(f"{images}: too few test captions for a train/test split per class; "
                         "raise repro.test_captions")
    storage.write_json(storage.join(folder, TESTSET_DONE), {"classes": kept, **counts})
    return counts


def _as_png(data: bytes) -> bytes:
    """The image re-encoded as PNG (lossless, whatever the shard stored)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()


# ---------------------------------------------------------------------------- runs


def _pick(scores: dict, path: tuple[str, str]) -> float | None:
    value = scores.get(path[0], {}).get(path[1])
    return float(value) if value is not None else None


def run_figures(metrics: dict, *, baseline: bool, digits: str, test: str) -> dict[str, float]:
    """The table's figures of one evaluation (of its baseline when ``baseline``)."""
    source = metrics.get("baseline", {}) if baseline else metrics
    names = {"digits": digits, "test": test}
    out = {}
    for key, data, path, _ in METRICS:
        scores = source.get("datasets", {}).get(names[data])
        if scores is not None and _pick(scores, path) is not None:
            out[key] = _pick(scores, path)
    return out


def run_arm(cfg: Config, arm: Arm, seed: int, test_folder: str, *, baseline: bool
            ) -> tuple[dict, float]:
    """Train (unless finished) and evaluate one run; (its metrics.json, seconds spent)."""
    run = arm_config(cfg, arm, seed, baseline=baseline, test_folder=test_folder)
    metrics_uri = storage.join(run.eval.out, EVAL_METRICS)
    if storage.exists(metrics_uri):
        return storage.read_json(metrics_uri, expect=dict), 0.0
    start = time.perf_counter()
    stages.run_training(run)
    result = stages.run_eval(run)
    return result.metrics, time.perf_counter() - start


# ---------------------------------------------------------------------------- summary


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min, max and count of one figure over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def summary_table(results: dict[str, dict[str, dict[str, float]]], arms: list[str]) -> str:
    """A Markdown table: one row per arm, mean +- std (over seeds, in %) per metric."""
    keys = [m for m in METRICS if any(m[0] in results.get(a, {}) for a in arms)]
    head = "| arm | " + " | ".join(label for _, _, _, label in keys) + " |"
    lines = [head, "|" + " --- |" * (len(keys) + 1)]
    for arm in arms:
        cells = []
        for key, *_ in keys:
            s = results.get(arm, {}).get(key)
            cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, float]]], arms: list[str]) -> bytes:
    """results.png: one panel per metric, a bar per arm (mean), error bars (std)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    keys = [m for m in METRICS if any(m[0] in results.get(a, {}) for a in arms)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, _, _, label) in zip(axes[0], keys, strict=True):
        shown = [a for a in arms if key in results.get(a, {})]
        means = [100 * results[a][key]["mean"] for a in shown]
        stds = [100 * results[a][key]["std"] for a in shown]
        ax.bar(range(len(shown)), means, yerr=stds, capsize=3,
               color=["#999999" if a == "random" else "#4472c4" for a in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("%")
        low = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set_ylim(max(0.0, low - 5), min(100.0, max(means) + max(stds) + 5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def report_html(table: str, png: bytes, setup: dict[str, Any]) -> str:
    """A self-contained HTML page: the setup, the table and the plot."""
    import base64
    import html

    rows = table.splitlines()
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in cells[2:])
    items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                    for k, v in setup.items())
    image = base64.b64encode(png).decode()
    return ("<!doctype html><html><head><meta charset='utf-8'><title>stablerep repro</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:72em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
            "text-align:right}td:first-child,th:first-child{text-align:left}</style></head>"
            "<body><h1>StableRep miniature replication</h1>"
            "<p>Mean ± standard deviation over seeds, in %.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p><img alt='results by arm' src='data:image/png;base64,{image}'></p>"
            f"<h2>Setup</h2><ul>{items}</ul></body></html>")


# ---------------------------------------------------------------------------- entry


def run_repro(cfg: Config) -> dict[str, Any]:
    """Run the whole experiment (see the module docstring); returns results.json's content.

    Raises:
        ConfigError / InputError: bad settings, before any run.
    """
    rc = _sections(cfg)
    stages.check_outputs(("repro.out" if rc.out else "data_root", repro_dir(cfg)))
    trained = [a for a in rc.arms if a != "random"]
    if not trained:
        raise ConfigError("repro.arms: the random arm is the baseline of a trained arm; "
                          "add at least one trained arm")
    check_plan(cfg, trained)
    start = time.perf_counter()
    _, test_folder = make_data(cfg)
    runs = run_all(cfg, trained, test_folder, start=start)
    return write_results(cfg, runs, wall=time.perf_counter() - start)


def run_all(cfg: Config, trained: list[str], test_folder: str, *, start: float
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Every trained arm x seed (and the random arm beside the first); figures by arm, seed.

    Args:
        cfg: the resolved repro config.
        trained: the arms that train, in table order.
        test_folder: the held-out image folder ("" = none).
        start: ``time.perf_counter()`` at the experiment's start, for the per-run rate.
    """
    rc = _sections(cfg)
    digits = cfg.eval.datasets[0]
    test = f"imagefolder:{test_folder}" if test_folder else ""
    runs: dict[str, dict[str, dict[str, float]]] = {a: {} for a in rc.arms}
    total, done = len(trained) * len(rc.seeds), 0
    for seed in rc.seeds:
        for i, name in enumerate(trained):
            baseline = i == 0 and "random" in rc.arms
            metrics, seconds = run_arm(cfg, ARMS[name], seed, test_folder, baseline=baseline)
            done += 1
            runs[name][str(seed)] = run_figures(metrics, baseline=False, digits=digits, test=test)
            if baseline:
                runs["random"][str(seed)] = run_figures(metrics, baseline=True, digits=digits,
                                                        test=test)
            elapsed = time.perf_counter() - start
            print(f"repro: [{done}/{total}] {name} seed {seed}: "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in runs[name][str(seed)].items())
                  + (f" ({seconds:.0f} s)" if seconds else " (finished before)")
                  + f"; {elapsed / done:.0f} s per run", flush=True)
    return runs


def write_results(cfg: Config, runs: dict[str, dict[str, dict[str, float]]], *, wall: float
                  ) -> dict[str, Any]:
    """Summarise the runs over seeds and write results.json/.md/.png and report.html.

    Args:
        cfg: the resolved repro config (its arms order the table).
        runs: figures by arm, then seed (as a string), then metric key (:data:`METRICS`).
        wall: the experiment's seconds, data included.

    Returns:
        results.json's content.
    """
    rc = _sections(cfg)
    out = repro_dir(cfg)
    summary = {arm: {key: summarise([r[key] for r in by_seed.values() if key in r])
                     for key, *_ in METRICS if any(key in r for r in by_seed.values())}
               for arm, by_seed in runs.items()}
    setup = _setup(cfg, rc, wall)
    table = summary_table(summary, rc.arms)
    result = {"setup": setup, "metrics": {k: label for k, _, _, label in METRICS},
              "summary": summary, "runs": runs, "wall_s": round(wall, 1)}
    png = plot(summary, rc.arms)
    storage.write_json(storage.join(out, "results.json"), result)
    storage.write_text(storage.join(out, "results.md"), table + "\n")
    storage.write_bytes(storage.join(out, "results.png"), png)
    storage.write_text(storage.join(out, REPORT_HTML), report_html(table, png, setup))
    print(table, flush=True)
    print(f"repro: {len(rc.arms)} arms x {len(rc.seeds)} seeds in {wall / 60:.1f} min; "
          f"results in {storage.join(out, 'results.json')}, report "
          f"{storage.join(out, REPORT_HTML)}", flush=True)
    return result


def _setup(cfg: Config, rc: ReproConfig, wall: float) -> dict[str, Any]:
    tc, gc = cfg.train, cfg.generate
    return {
        "captions": f"{cfg.captions.num_captions} {cfg.captions.source} captions",
        "images": f"{gc.images_per_caption} per caption, {gc.width}x{gc.height}, {gc.backend}",
        "backbone": f"{tc.model} {json.dumps(tc.model_kwargs, sort_keys=True)} at "
                    f"{tc.image_size} px",
        "budget": f"{tc.max_steps} steps x {rc.images_per_step} images = "
                  f"{(tc.max_steps or 0) * rc.images_per_step:,} images seen per arm",
        "augmentation": tc.augmentation, "seeds": rc.seeds, "arms": rc.arms,
        "held-out test": f"{rc.test_captions} captions drawn with seed {rc.test_seed}, "
                         f"{rc.test_images_per_caption} new images each, split 2/3 train 1/3 "
                         "test by caption" if rc.test_captions else "none",
        "wall time": f"{wall / 60:.1f} min",
    }
