"""The usable-CPU count (affinity, cgroup v1/v2 quota, local ranks) and the thread plan."""

from __future__ import annotations

import logging

import pytest
import torch

from stablerep import cpus


def _v2(tmp_path, text: str):
    (tmp_path / "cpu.max").write_text(text + "\n")
    return tmp_path


def _v1(tmp_path, quota: str, period: str = "100000"):
    folder = tmp_path / "cpu"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    return tmp_path


@pytest.mark.parametrize(("text", "quota"), [("max 100000", None), ("200000 100000", 2.0),
                                             ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_v2_quota(tmp_path, text, quota):
    assert cpus.cgroup_quota(_v2(tmp_path, text)) == quota


@pytest.mark.parametrize(("quota", "period", "cpus_"), [("-1", "100000", None),
                                                        ("300000", "100000", 3.0),
                                                        ("25000", "50000", 0.5)])
def test_cgroup_v1_quota(tmp_path, quota, period, cpus_):
    assert cpus.cgroup_quota(_v1(tmp_path, quota, period)) == cpus_


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cpus.cgroup_quota(tmp_path) is None
    assert cpus.cgroup_quota(tmp_path / "absent") is None


def test_garbage_quota_is_no_limit(tmp_path):
    assert cpus.cgroup_quota(_v2(tmp_path, "lots 100000")) is None


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path):
    root = _v2(tmp_path, "200000 100000")
    assert cpus.usable_cpus(cgroup_root=root, affinity=64, local_ranks=1) == 2
    assert cpus.usable_cpus(cgroup_root=root, affinity=1, local_ranks=1) == 1


def test_fractional_quota_rounds_up_and_never_below_one(tmp_path):
    assert cpus.usable_cpus(cgroup_root=_v2(tmp_path, "150000 100000"), affinity=8,
                            local_ranks=1) == 2
    assert cpus.usable_cpus(cgroup_root=tmp_path, affinity=2, local_ranks=8) == 1


def test_local_ranks_share_the_cpus(tmp_path, monkeypatch):
    root = _v2(tmp_path, "1600000 100000")  # 16 CPUs
    assert cpus.usable_cpus(cgroup_root=root, affinity=32, local_ranks=4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpus.usable_cpus(cgroup_root=root, affinity=32) == 2


def test_this_process_has_at_least_one_usable_cpu():
    assert 1 <= cpus.usable_cpus() <= cpus.affinity_cpus()


@pytest.mark.parametrize(("n", "workers", "cap", "plan"), [
    (8, 2, True, (8, 6, 2, 2)),    # threads = CPUs - workers
    (2, 4, True, (2, 1, 1, 1)),    # workers capped to leave one CPU
    (1, 4, True, (1, 1, 1, 0)),    # one CPU: no workers, one thread
    (2, 4, False, (2, 1, 1, 4)),   # training keeps its workers; torch still gets one thread
    (16, 0, True, (16, 16, 2, 0)),
])
def test_plan_threads(n, workers, cap, plan):
    got = cpus.plan_threads(n, workers, cap_workers=cap)
    assert (got.cpus, got.intra_op, got.inter_op, got.workers) == plan


def test_omp_num_threads_wins():
    assert cpus.plan_threads(8, 2, omp_env="3").intra_op == 3
    assert cpus.plan_threads(8, 2, omp_env="junk").intra_op == 6


def test_size_threads_sets_torch_and_logs_once(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 6)
    root = _v2(tmp_path, "300000 100000")  # 3 CPUs
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="stablerep"):
            plan = cpus.size_threads("unit-test", 4, cgroup_root=root)
            cpus.size_threads("unit-test", 4, cgroup_root=root)
        assert (plan.cpus, plan.workers, plan.intra_op) == (3, 2, 1)
        assert torch.get_num_threads() == 1
        lines = [r.getMessage() for r in caplog.records if "unit-test" in r.getMessage()]
        assert lines == ["unit-test: 3 usable CPUs -> 1 torch threads, 2 loader workers "
                         "(configured 4)"]
    finally:
        torch.set_num_threads(before)


def test_uncapped_workers_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="stablerep"):
            plan = cpus.size_threads("unit-warn", 4, cap_workers=False, cgroup_root=tmp_path)
        assert plan.workers == 4
        assert any("oversubscribe" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING)
    finally:
        torch.set_num_threads(before)


def test_eval_stage_runs_with_the_sized_workers(tmp_path, monkeypatch):
    from stablerep import stages
    from stablerep.config import load_config
    from stablerep.evaluation import stage

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 3)
    monkeypatch.setattr(cpus, "cgroup_quota", lambda root: None)
    seen = {}

    def evaluate(ec, **kwargs):
        seen["workers"] = ec.num_workers
        raise RuntimeError("stop here")

    monkeypatch.setattr(stage, "run_eval", evaluate)
    cfg = load_config("demo", [f"data_root={tmp_path}", "eval.num_workers=8"])
    before = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            stages.run_eval(cfg)
    finally:
        torch.set_num_threads(before)
    assert seen["workers"] == 2  # 8 configured, 3 CPUs: one stays with the main process
