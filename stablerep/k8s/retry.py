"""The launcher's retrying call layer: the API server's trouble is waited out, not obeyed.

A training job outlives many API hiccups: an apiserver restart answers 5xx, a busy one 429
(with ``Retry-After``), a load balancer drops connections, a slow etcd times requests out.
None of these says anything about the job, so :class:`Retrier` retries them with capped
exponential backoff (honouring ``Retry-After``) and never turns them into a verdict on the
job. Only when the API stays unreachable past a bound (``api_unreachable_s``: the first
failure of an unbroken run of failures to now) does it give up with :class:`ApiUnreachable`,
which the launcher answers by exiting *without* touching the job, so the step's retry
attaches to it. Any success ends the run of failures.

Everything else (403, 404, 409, 422: answers about the request itself) passes through.
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from stablerep.errors import StablerepError

#: HTTP statuses that say "the server is in trouble, ask again" rather than "no".
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class ApiUnreachable(StablerepError):  # noqa: N818 (a condition, not a bug)
    """The API server kept failing for longer than the configured bound."""


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is the API's own trouble (retry) rather than an answer (raise)."""
    import urllib3
    from kubernetes.client.rest import ApiException

    if isinstance(e, ApiException):
        return e.status in TRANSIENT_STATUS or not e.status or e.status >= 500
    return isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, socket.timeout,
                          TimeoutError, http.client.HTTPException))


def describe(e: BaseException) -> str:
    """One line for an API failure: ``HTTP 503 ServiceUnavailable`` or the exception's name."""
    status = getattr(e, "status", None)
    if status:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:160].rstrip(": ")


def retry_after(e: BaseException) -> float | None:
    """Seconds a 429/503 asks the client to wait (``Retry-After``), else None."""
    headers = getattr(e, "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def take_over_retries(api_client: Any) -> None:
    """Make :class:`Retrier` the client's only retry layer (urllib3 retries 3 times itself).

    Otherwise a 429's ``Retry-After`` would be slept through unseen, a refused connection
    retried without backoff, and the time counted against ``api_unreachable_s`` would not be
    the time the API was really down.
    """
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pool is not None and hasattr(pool, "connection_pool_kw"):
        pool.connection_pool_kw["retries"] = False
        pool.clear()  # pools made before this keep their own setting


class Retrier:
    """Retries transient API failures; raises :class:`ApiUnreachable` past the bound.

    Thread-safe (one run of failures, whichever thread meets it).

    Args:
        unreachable_s: longest unbroken run of failures before giving up.
        backoff_s: the first wait; doubled after each failure of a run.
        backoff_max_s: the longest wait (a ``Retry-After`` above it is capped too).
        say: where a retry is reported (one line each).
    """

    def __init__(self, unreachable_s: float, backoff_s: float, backoff_max_s: float,
                 say: Callable[[str], None] | None = None):
        self.unreachable_s = unreachable_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic time of the run's first failure
        self._attempt = 0

    def ok(self) -> None:
        """A call succeeded: the run of failures (if any) is over."""
        with self._lock:
            self._since, self._attempt = None, 0

    def failed(self, e: BaseException, what: str) -> None:
        """Account one transient failure of ``what``: wait, or raise ApiUnreachable."""
        now = time.monotonic()
        with self._lock:
            self._since = self._since if self._since is not None else now
            down = now - self._since
            attempt, self._attempt = self._attempt, self._attempt + 1
        if down > self.unreachable_s:
            raise ApiUnreachable(f"the Kubernetes API failed every call for {down:.0f}s "
                                 f"(api_unreachable_s={self.unreachable_s:g}); last: "
                                 f"{describe(e)} on {what}")
        asked = retry_after(e)
        wait = min(self.backoff_max_s, asked if asked is not None
                   else self.backoff_s * 2 ** min(attempt, 30))
        hint = f" (Retry-After {asked:g}s)" if asked is not None else ""
        self.say(f"launch: API trouble on {what}: {describe(e)}; retrying in {wait:.1f}s"
                 f"{hint}")
        time.sleep(wait)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried while it fails transiently."""
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (classified right below)
                if not is_transient(e):
                    raise
                self.failed(e, what)
                continue
            self.ok()
            return result
