"""The fsspec client libraries (gcsfs, s3fs/botocore) as :mod:`stablerep.storage` uses them.

storage.py retries in one layer; here the clients' own retries are switched off
(botocore ``total_max_attempts=1``, s3fs ``retries=1``, gcsfs's request methods without their
retry decorator) and their failures are classified: :func:`is_transient` says whether
retrying may succeed, from the HTTP status anywhere in the cause chain, the errno, or a
transport failure that got no answer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

__all__ = ["GCS_RETRIED_METHODS", "HttpStatusError", "client_single_try", "http_status",
           "is_transient", "single_try_gcs_class", "storage_options"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- client options


def storage_options(proto: str) -> dict[str, Any]:
    """Options derived from the environment alone (never from configs)."""
    options: dict[str, Any] = {}
    if proto in ("gs", "gcs", "s3", "s3a"):
        # Other processes (pods, ranks, stages) write and delete objects under the same
        # prefixes; a cached listing would make exists/list/read answer from a stale view.
        options["use_listings_cache"] = False
    if proto in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
        # gcsfs reads the emulator endpoint itself; an emulator needs no credentials.
        options["token"] = "anon"
    if proto in ("s3", "s3a"):
        # with_retries is the one retry layer: botocore tries each request once.
        options["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    return options


def client_single_try(proto: str, fs: fsspec.AbstractFileSystem) -> None:
    """Turn off a filesystem's own retry loop (s3fs; gcsfs is handled by its class)."""
    if proto in ("s3", "s3a") and getattr(fs, "retries", 1) != 1:
        fs.retries = 1  # s3fs's _error_wrapper: one call, no sleep-and-retry


_GCS_CLASSES: dict[type, type] = {}
GCS_RETRIED_METHODS = ("_request", "_get_file_request", "_get_file_concurrent")
"""gcsfs's request methods under its retry decorator (private names; gcsfs is pinned below
its next release in pyproject.toml, and tests/unit/test_storage.py checks they are there)."""


def _single_try(raw: Callable[..., Any]) -> Callable[..., Any]:
    """gcsfs's undecorated request method ``raw``, giving back the HTTP status of 403 and 502
    answers (gcsfs raises a bare ``OSError`` and requests' ``ProxyError`` for them)."""
    import requests.exceptions

    async def call(self, *args, **kwargs):
        try:
            return await raw(self, *args, **kwargs)
        except requests.exceptions.ProxyError as e:  # gcsfs: HTTP 502
            raise HttpStatusError(502, f"Bad Gateway: {e}") from e
        except OSError as e:
            if type(e) is OSError and e.errno is None:  # gcsfs: HTTP 403
                raise HttpStatusError(403, str(e).splitlines()[0]) from e
            raise
    call.__name__ = raw.__name__
    call.single_try = True  # marks it for the tests
    return call


def single_try_gcs_class(base: type) -> type:
    """``base`` (gcsfs's filesystem) with its request methods undecorated: one try each.

    gcsfs wraps its HTTP requests in a fixed retry decorator (6 tries, 1..32 s apart) that
    no option turns off; a subclass of the class that defines them decorated calls the
    undecorated methods instead. When ``base`` is a further subclass (gcsfs's
    ``ExtendedGcsFileSystem``, whose own ``_get_file_request`` calls ``super()``'s), the
    single-try class is placed right under ``base`` in the MRO, so those ``super()`` calls
    reach it too.
    """
    if base in _GCS_CLASSES:
        return _GCS_CLASSES[base]
    core = next((c for c in base.__mro__
                 if hasattr(vars(c).get("_request"), "__wrapped__")), None)
    if core is None:
        log.warning("%s.%s has no undecorated _request: gcsfs's own retries stay on under "
                    "stablerep's", base.__module__, base.__name__)
        _GCS_CLASSES[base] = base
        return base
    namespace = {m: _single_try(vars(core)[m].__wrapped__) for m in GCS_RETRIED_METHODS
                 if hasattr(vars(core).get(m), "__wrapped__")}
    single = type(f"SingleTry{core.__name__}", (core,), namespace)
    sub = single if base is core else type(f"SingleTry{base.__name__}", (base, single), {})
    sub._cache = base._cache  # one instance cache: clear_instance_cache() on gcsfs clears ours
    _GCS_CLASSES[base] = sub
    return sub


class HttpStatusError(OSError):
    """An HTTP error answer whose status a client library did not keep (see above)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- failures

_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                               errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                               errno.ENETUNREACH, errno.ENETDOWN})


def _own_http_status(exc: BaseException) -> int | None:
    for attr in ("status", "code", "status_code"):  # gcsfs HttpError.code, aiohttp .status
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        if isinstance(meta.get("HTTPStatusCode"), int):
            return meta["HTTPStatusCode"]
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its explicit causes (``raise ... from``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc``, also when a client library wrapped it.

    s3fs turns botocore's ``ClientError`` into a bare ``OSError`` (e.g. ``EBUSY`` for 503)
    and keeps the original as ``__cause__``; the status is found there.
    """
    for current in _causes(exc):
        status = _own_http_status(current)
        if status is not None:
            return status
    return None


def _no_response_types() -> tuple[type[BaseException], ...]:
    """Transport failures before any HTTP status arrived (connection lost, refused, timed out).

    The standard library's own kinds plus the base classes aiohttp and botocore raise them
    under; none of these carries a status or (always) an errno.
    """
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    with contextlib.suppress(ImportError):
        from botocore import exceptions as boto

        kinds += [boto.ConnectionError, boto.HTTPClientError]
    return tuple(kinds)


def _never_transient_types() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [FileNotFoundError, PermissionError, IsADirectoryError,
                                         NotADirectoryError, FileExistsError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds.append(aiohttp.ClientSSLError)  # a bad certificate stays bad
    return tuple(kinds)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed.

    By HTTP status when one is known anywhere in the cause chain (5xx, 408 and 429 are
    transient; every other status is not); otherwise by errno (connection reset, refused,
    aborted, timed out, broken pipe, unreachable) or a transport failure that got no response
    at all. Anything else -- a missing object, denied access, a bad request -- is permanent.
    """
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    for current in _causes(exc):
        if isinstance(current, _never_transient_types()):
            return False
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(current, _no_response_types()):
            return True
    return False
