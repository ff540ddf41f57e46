"""The experiment's bookkeeping (stablerep.repro): equal budgets per arm, run folders that
change with the settings, the summary statistics and table, the held-out image folder, and
the one-line errors for bad experiment settings. The experiment itself runs in
tests/integration/test_repro.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stablerep import repro
from stablerep.config import REPRO_ARMS, Config, from_dict, load_config
from stablerep.errors import ConfigError


def _cfg(*overrides: str, data_root: str = "/tmp/r") -> Config:
    return load_config("repro", list(overrides), require=("repro",), data_root=data_root)


def test_every_arm_sees_the_same_images_per_step() -> None:
    cfg = _cfg()
    assert repro.ARMS["random"].method == ""  # never trained: the evaluation's baseline
    with pytest.raises(ValueError, match="random is not trained"):
        repro.arm_config(cfg, repro.ARMS["random"], 0, baseline=False, test_folder="")
    for name in REPRO_ARMS[1:]:
        arm = repro.ARMS[name]
        run = repro.arm_config(cfg, arm, 0, baseline=False, test_folder="")
        assert run.train.captions_per_batch * run.train.crops_per_caption == 128, name
        assert run.train.max_steps == cfg.train.max_steps
        assert run.train.images_per_caption == arm.images_per_caption
    k8 = repro.arm_config(cfg, repro.ARMS["stablerep_k8"], 0, baseline=False, test_folder="")
    assert (k8.train.method, k8.train.images_per_caption, k8.train.captions_per_batch) == (
        "stablerep", 8, 16)
    simclr = repro.arm_config(cfg, repro.ARMS["simclr"], 0, baseline=False, test_folder="")
    assert (simclr.train.method, simclr.train.captions_per_batch) == ("simclr", 64)


def test_run_folders_follow_arm_seed_and_settings() -> None:
    cfg = _cfg()
    arm = repro.ARMS["stablerep_k4"]
    a = repro.arm_config(cfg, arm, 0, baseline=False, test_folder="/t")
    assert a.train.out.startswith("/tmp/r/repro/runs/stablerep_k4-s0-")
    assert a.eval.checkpoint == a.train.out and a.eval.out.endswith("/eval")
    assert a.eval.datasets == ["sklearn:digits", "imagefolder:/t"] and a.eval.seed == 0
    assert a.train.seed == 0 and a.repro is None
    other_seed = repro.arm_config(cfg, arm, 1, baseline=False, test_folder="/t")
    longer = repro.arm_config(_cfg("train.max_steps=9"), arm, 0, baseline=False,
                              test_folder="/t")
    folders = {a.train.out, other_seed.train.out, longer.train.out}
    assert len(folders) == 3  # nothing of another setting is reused or overwritten
    assert repro.arm_config(cfg, arm, 0, baseline=False, test_folder="/t").train.out == a.train.out


def test_an_uneven_images_per_step_fails_naming_the_arm() -> None:
    cfg = _cfg("repro.images_per_step=12")
    with pytest.raises(ConfigError, match=r"repro.images_per_step: 12 images do not split into "
                                          r"captions of 8 rows \(stablerep_k8\)"):
        repro.arm_config(cfg, repro.ARMS["stablerep_k8"], 0, baseline=False, test_folder="")


@pytest.mark.parametrize(("section", "message"), [
    ({"arms": ["moco"]}, "repro.arms[0]: got 'moco', expected one of random, simclr"),
    ({"arms": []}, "repro.arms: expected at least one arm"),
    ({"arms": ["simclr", "simclr"]}, "repro.arms: each arm once"),
    ({"seeds": [0, 0]}, "repro.seeds: expected distinct seeds, got [0, 0]"),
    ({"images_per_step": 4}, "repro.images_per_step: got 4, expected a value >= 8"),
    ({"seeds": [0, -1]}, "repro.seeds[1]: got -1, expected a value >= 0"),
    ({"seeds": [2**32]}, "repro.seeds[0]: got 4294967296, expected a value <= 4294967295"),
    ({"test_seed": 2**40}, "repro.test_seed: got 1099511627776, expected a value <= "),
])
def test_bad_experiment_settings(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Config, {"repro": section})
    assert message in str(info.value)


def test_summary_is_mean_and_sample_spread() -> None:
    s = repro.summarise([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.7, 3)
    assert repro.summarise([0.4])["std"] == 0.0
    assert math.isclose(repro.summarise([1.0, 0.0])["std"], math.sqrt(0.5))


def test_summary_table_and_figures() -> None:
    summary = {"random": {"digits_probe": repro.summarise([0.8, 0.9])},
               "stablerep_k4": {"digits_probe": repro.summarise([0.95, 0.97]),
                                "digits_knn": repro.summarise([0.7])}}
    table = repro.summary_table(summary, ["random", "stablerep_k4"])
    lines = table.splitlines()
    assert lines[0] == "| arm | digits linear probe | digits kNN |"
    assert lines[2] == "| random | 85.0 ± 7.1 | - |"
    assert lines[3] == "| stablerep_k4 | 96.0 ± 1.4 | 70.0 ± 0.0 |"
    metrics = {"datasets": {"sklearn:digits": {"linear_probe": {"top1": 0.9},
                                               "knn": {"top1": 0.5}}},
               "baseline": {"datasets": {"sklearn:digits": {"linear_probe": {"top1": 0.8}}}}}
    assert repro.run_figures(metrics, baseline=False, digits="sklearn:digits", test="") == {
        "digits_probe": 0.9, "digits_knn": 0.5}
    assert repro.run_figures(metrics, baseline=True, digits="sklearn:digits", test="") == {
        "digits_probe": 0.8}
    png = repro.plot(summary, ["random", "stablerep_k4"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = repro.report_html(table, png, {"seeds": [0, 1]})
    assert "<td>96.0 ± 1.4</td>" in page and "data:image/png;base64," in page


def test_the_held_out_set_is_an_image_folder_with_every_class_in_both_splits(
        tmp_path: Path) -> None:
    from stablerep import stages

    cfg = _cfg("repro.test_captions=120", "repro.test_seed=5", data_root=str(tmp_path))
    test = repro.testset_config(cfg)
    assert test.captions.seed == 5 and test.generate.images_per_caption == 3
    assert test.captions.out == str(tmp_path / "testset" / "captions")
    stages.run_captions(test)
    stages.run_generate(test)
    folder = tmp_path / "testset" / "folder"
    counts = repro.export_image_folder(test.generate.out, str(folder))
    classes = json.loads((folder / "classes.json").read_text())
    assert counts["train"] + counts["test"] <= 360 and counts["test"] > 0
    for split in ("train", "test"):
        assert sorted(p.name for p in (folder / split).iterdir()) == sorted(classes["classes"])
    assert abs(counts["test"] / (counts["train"] + counts["test"]) - 1 / 3) < 0.1



@pytest.mark.parametrize(("overrides", "message"), [
    (["generate.images_per_caption=4"], "generate.images_per_caption: got 4, expected >= 8 "
                                        "(arm stablerep_k8 reads that many images per caption)"),
    (["captions.num_captions=20"], "captions.num_captions: got 20, expected >= 64 (arm simclr "
                                   "takes 128 images per step = 64 captions per batch)"),
    (["train.grad_accum_steps=3"], "train.grad_accum_steps: got 3, expected a divisor of arm "
                                   "simclr's 64 captions per batch"),
])
def test_a_plan_whose_batches_cannot_be_filled_fails_before_any_work(
        tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = _cfg(*overrides, data_root=str(tmp_path / "root"))
    with pytest.raises(ConfigError) as info:
        repro.run_repro(cfg)
    assert str(info.value) == message
    assert not (tmp_path / "root").exists()


RECORDED = Path(__file__).parent / "data" / "repro_runs"
"""metrics.json of three real stablerep_k4 runs (seeds 0-2, 300 steps, the baseline inside)."""


def test_results_of_recorded_runs_are_summarised_tabled_and_written(tmp_path: Path,
                                                                    capsys) -> None:
    import statistics

    cfg = _cfg("repro.arms=[random, stablerep_k4]", "repro.seeds=[0, 1, 2]",
               data_root=str(tmp_path))
    test = "imagefolder:/data/repro/testset/folder"
    runs: dict = {"random": {}, "stablerep_k4": {}}
    for seed in range(3):
        metrics = json.loads((RECORDED / f"stablerep_k4-s{seed}.json").read_text())
        for arm, baseline in (("stablerep_k4", False), ("random", True)):
            runs[arm][str(seed)] = repro.run_figures(metrics, baseline=baseline,
                                                     digits="sklearn:digits", test=test)
    assert set(runs["random"]["0"]) == {key for key, *_ in repro.METRICS}
    result = repro.write_results(cfg, runs, wall=125.0)

    out = tmp_path / "repro"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    table = (out / "results.md").read_text().strip()
    lines = table.splitlines()
    assert lines[0] == ("| arm | digits linear probe | digits 5-way 5-shot | digits kNN | "
                        "procedural test linear probe | procedural test 5-way 5-shot |")
    for row, arm in zip(lines[2:], ("random", "stablerep_k4"), strict=True):
        cells = []
        for key, *_ in repro.METRICS:
            values = [runs[arm][str(s)][key] for s in range(3)]
            stats = result["summary"][arm][key]
            assert stats["mean"] == pytest.approx(statistics.mean(values))
            assert stats["std"] == pytest.approx(statistics.stdev(values))
            assert (stats["min"], stats["max"], stats["n"]) == (min(values), max(values), 3)
            cells.append(f"{100 * statistics.mean(values):.1f} ± "
                         f"{100 * statistics.stdev(values):.1f}")
        assert row == f"| {arm} | " + " | ".join(cells) + " |"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "<li><b>wall time</b>: 2.1 min</li>" in page
    printed = capsys.readouterr().out
    assert table in printed
    assert f"repro: 2 arms x 3 seeds in 2.1 min; results in {out / 'results.json'}" in printed
