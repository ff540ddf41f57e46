"""User-facing error types and the exit statuses every command ends with.

Every error a user can cause (bad input, a missing file, a wrong config value) is raised as a
:class:`StablerepError` subclass with a one-line message that names the input and what was
expected. The CLI prints that line and exits with :data:`EXIT_USER_ERROR`; anything else is a
bug and keeps its traceback (:data:`EXIT_BUG`). A run stopped by something outside it (a lost
peer) raises a :class:`RetryableError`, which exits with a status of 128 or more: Kubeflow's
``restartPolicy: ExitCode`` and the Jobs' failure policies restart those and fail on 1-127.

The table (the README's "Exit codes" repeats it):

=====  ==========================================================  ==========
 code   meaning                                                      retried
=====  ==========================================================  ==========
 0      success                                                      -
 1      internal bug: traceback, then ``error: internal error: ...``  no
 2      bad input or config: one ``error: ...`` line                  no
 130    interrupted (Ctrl-C, SIGINT)                                 yes
 137    killed by SIGKILL (out of memory, or a stop past the grace)   yes
 138    a peer process was lost (died, hung past the timeout)         yes
 143    stopped by SIGTERM (preempted, evicted, the job deleted)      yes
=====  ==========================================================  ==========

130, 137 and 143 are the shell's 128 + signal number. 138 (128 + SIGUSR1, a signal nothing
sends these processes) is the status the Kubeflow Training Operator reserved for "a
user-defined retryable error": its releases that retry only 130, 137, 138 and 143 restart a
lost peer too, as do the later ones that retry every status of 128 or more.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_KILLED = 137  # 128 + SIGKILL: the OOM killer, or a kill after the grace period
EXIT_TERMINATED = 143  # 128 + SIGTERM: preemption, eviction, deletion
EXIT_PEER_LOST = 138  # 128 + SIGUSR1: the code Kubeflow reserves for "retry me"
#: Statuses at or above this are retried by Kubeflow's ``restartPolicy: ExitCode``.
FIRST_RETRYABLE = 128


def is_retryable(status: int) -> bool:
    """Whether a process exit status means "restart and resume" (128-255) rather than a
    failure a restart cannot fix (1-127)."""
    return FIRST_RETRYABLE <= status <= 255


class StablerepError(Exception):
    """An error caused by input the user can fix; its message is one line."""

    exit_code = EXIT_USER_ERROR


class ConfigError(StablerepError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class InputError(StablerepError, ValueError):
    """An input (file, column, data set) is missing, empty or malformed."""


class RetryableError(Exception):
    """The run stopped for a reason outside it; restarting the job resumes it from the last
    checkpoint. Its message is one line; the CLI exits with :attr:`exit_code` (>= 128)."""

    exit_code = EXIT_PEER_LOST


class PeerLostError(RetryableError):
    """A peer process died, or stopped responding past the collective timeout."""

    exit_code = EXIT_PEER_LOST
