"""`python -m stablerep.train_launch TORCHRUN-ARGS` = torchrun, exiting with its children's status.

torchrun (torch 2.14) exits with status 1 whenever a child fails, whatever the child's own
status was (measured: a child exiting 2, 1, 130 or 143, or killed by SIGKILL or SIGTERM, all
give 1). Kubeflow's ``restartPolicy: ExitCode`` reads only the container's status, so behind
plain torchrun a bad config (2) and a lost peer (138) would look the same. This entry point
runs torchrun's launcher in this process with the same arguments and exits with the most
telling of the children's statuses (:func:`job_exit_code`); when the launcher itself is
stopped by a signal (the pod is preempted or deleted: SIGTERM) it exits with 128 + that
signal. Example, as the training pods run it::

    python -m stablerep.train_launch --nnodes 2 --nproc-per-node 8 -m stablerep.train \\
        --config configs/cc12m.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from stablerep.errors import EXIT_BUG, EXIT_TERMINATED, FIRST_RETRYABLE, is_retryable


def child_status(exitcode: int) -> int:
    """A child's exit status as a shell reports it: a death by signal N is 128 + N.

    Args:
        exitcode: torchrun's record of it (negative: killed by that signal).
    """
    return FIRST_RETRYABLE - exitcode if exitcode < 0 else exitcode


def job_exit_code(failures: Mapping[int, Any]) -> int:
    """The status that tells best why the children failed.

    A status a restart cannot fix (1-127: a bug, bad input) wins over a retryable one (128-255)
    whatever rank had it: a rank that hit a bug makes its peers fail too (they lose it, or
    torchrun stops them with SIGTERM), and only the bug says what happened. Among those of a
    kind the earliest failure wins (torchrun's root cause), then the lowest rank; a SIGTERM
    (143) counts last among the retryable ones, as torchrun sends it to the children still
    running once one has failed.

    Args:
        failures: global rank -> a failure with ``exitcode`` (negative for a signal) and
            ``timestamp`` (seconds), as in ``ChildFailedError.failures``.
    """
    if not failures:
        return EXIT_BUG

    def order(item: tuple[int, Any]) -> tuple[int, int, int, int]:
        rank, failure = item
        status = child_status(failure.exitcode)
        return (is_retryable(status), status == EXIT_TERMINATED, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    status = child_status(failure.exitcode)
    return status if 0 < status <= 255 else EXIT_BUG


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun's launcher with ``argv`` (torchrun's own arguments); returns the status.

    Args:
        argv: torchrun's command line without the program name (default: ``sys.argv[1:]``).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        status = job_exit_code(e.failures)
        summary = ", ".join(f"rank {r}: {child_status(f.exitcode)}"
                            for r, f in sorted(e.failures.items()))
        print(f"train_launch: the training processes failed ({summary}); exit status {status}",
              file=sys.stderr, flush=True)
        return status
    except SignalException as e:
        status = FIRST_RETRYABLE + int(e.sigval)
        print(f"train_launch: stopped by signal {int(e.sigval)}; exit status {status}",
              file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
