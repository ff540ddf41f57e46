"""The CPUs this process may use, and torch's thread pools and loader workers sized to them.

torch sizes its intra-op pool from the host's core count. In a container whose CPU limit is
below the node's cores, or beside another busy process, that many spinning threads (plus the
data loader's worker processes) oversubscribe the cores and a step can run an order of
magnitude slower. :func:`usable_cpus` counts what the process may really use: its CPU
affinity (``os.sched_getaffinity``), capped by the cgroup CPU quota (v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), shared among the ranks of this node
(``LOCAL_WORLD_SIZE``). :func:`size_threads` gives torch that many threads less the loader
workers (at least 1) and caps the workers so they leave one CPU to the main process; every
stage calls it once at its start and it logs its choice once. Training keeps its configured
workers (they cut the data streams, so their number is part of the data order). An explicit ``OMP_NUM_THREADS``
wins over the computed thread count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("stablerep")

CGROUP_ROOT = Path("/sys/fs/cgroup")

_logged: set[tuple[str, int, int, int]] = set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: str | Path = CGROUP_ROOT) -> float | None:
    """The cgroup CPU limit in CPUs (e.g. 1.5), or None when there is none or none is readable.

    Reads cgroup v2 ``<root>/cpu.max`` (``"max 100000"`` = no limit, ``"200000 100000"`` = 2
    CPUs) and else cgroup v1 ``<root>/cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (also
    directly under ``root``; a quota of -1 = no limit).

    Args:
        root: the cgroup file system's mount point (a folder of fake files in tests).
    """
    root = Path(root)
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) >= 1 and parts[0] != "max":
            return _ratio(parts[0], parts[1] if len(parts) > 1 else "100000")
        return None
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = (_read(folder / f"cpu.cfs_{n}_us") for n in ("quota", "period"))
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    """quota / period as CPUs; None for a negative (unlimited) or unparsable quota."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cpus(*, cgroup_root: str | Path = CGROUP_ROOT, affinity: int | None = None,
                local_ranks: int | None = None) -> int:
    """Whole CPUs this process may use: affinity, capped by the cgroup quota, per local rank.

    A fractional quota rounds up (1.5 CPUs -> 2 threads keep 1.5 CPUs busy); the result is at
    least 1.

    Args:
        cgroup_root: the cgroup mount point (see :func:`cgroup_quota`).
        affinity: CPUs in the affinity mask; None = this process's.
        local_ranks: processes of this job on this node sharing the CPUs; None = the
            ``LOCAL_WORLD_SIZE`` that torchrun sets (1 without it).
    """
    cpus = affinity_cpus() if affinity is None else affinity
    quota = cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    if local_ranks is None:
        try:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_ranks = 1
    return max(1, cpus // max(local_ranks, 1))


@dataclass(frozen=True)
class ThreadPlan:
    """What :func:`size_threads` chose.

    Args:
        cpus: usable CPUs (:func:`usable_cpus`).
        intra_op: torch's intra-op threads.
        inter_op: torch's inter-op threads.
        workers: data loader worker processes (the configured number, capped).
    """

    cpus: int
    intra_op: int
    inter_op: int
    workers: int


def plan_threads(cpus: int, workers: int = 0, *, cap_workers: bool = True,
                 omp_env: str | None = None) -> ThreadPlan:
    """Thread counts for ``cpus`` usable CPUs and ``workers`` configured loader workers.

    With ``cap_workers`` the workers are capped at ``cpus - 1`` (one CPU stays with the main
    process; none on one CPU). torch gets the CPUs the workers leave, at least 1
    (``omp_env``, an explicit ``OMP_NUM_THREADS``, wins); inter-op threads are at most 2 (the
    stages run one op graph at a time).

    Args:
        cpus: usable CPUs (>= 1).
        workers: configured loader worker processes (>= 0).
        cap_workers: cap the workers (False where their number defines the data order, as
            in training, whose streams are cut per worker).
        omp_env: the value of ``OMP_NUM_THREADS`` if set.
    """
    if cap_workers:
        workers = min(workers, max(cpus - 1, 0))
    intra = max(1, cpus - workers)
    if omp_env and omp_env.strip().isdigit() and int(omp_env) > 0:
        intra = int(omp_env)
    return ThreadPlan(cpus=cpus, intra_op=intra, inter_op=min(2, intra), workers=workers)


def size_threads(stage: str, workers: int = 0, *, cap_workers: bool = True,
                 cgroup_root: str | Path = CGROUP_ROOT) -> ThreadPlan:
    """Sizes torch's thread pools to the usable CPUs; returns the plan (loader workers too).

    Sets intra-op threads every call; inter-op threads only before torch has started any
    parallel work (torch refuses later). Logs the choice once per distinct plan.

    Args:
        stage: the stage's name for the log line (train, eval, generate).
        workers: the configured loader worker processes of the stage.
        cap_workers: cap them (see :func:`plan_threads`); uncapped, a warning says when they
            leave torch a single CPU or less.
        cgroup_root: the cgroup mount point (tests pass a folder of fake files).
    """
    import torch

    plan = plan_threads(usable_cpus(cgroup_root=cgroup_root), workers, cap_workers=cap_workers,
                        omp_env=os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(plan.intra_op)
    with contextlib.suppress(RuntimeError):  # set before, or parallel work ran: keep torch's
        torch.set_num_interop_threads(plan.inter_op)
    key = (stage, plan.cpus, plan.intra_op, plan.workers)
    if key not in _logged:
        _logged.add(key)
        capped = f" (configured {workers})" if plan.workers != workers else ""
        log.info("%s: %d usable CPUs -> %d torch threads, %d loader workers%s", stage,
                 plan.cpus, plan.intra_op, plan.workers, capped)
        if plan.workers >= plan.cpus:
            log.warning("%s: %d loader workers on %d usable CPUs oversubscribe them; fewer "
                        "workers would run faster", stage, plan.workers, plan.cpus)
    return plan
