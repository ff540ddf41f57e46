"""Following a training job's pods: the master's log across restarts, and what pods wait on.

:class:`LogFollower` copies the master pod's log to this process's stdout, one container run
after another: a container restart (``restartCount`` changes) starts a new section marked
``--- master pod P, container run N ---``; the lines of a run the stream missed (it dropped
just before the restart) are read back with ``previous=True``. A dropped or failed stream is
re-opened, skipping the lines already copied; a log is never a reason to fail the launch.

:func:`stuck_reason` and :func:`gated` classify a pod: stuck (unschedulable after admission,
image pull, crash loop: the launcher's schedule timeout applies) or waiting for a queue
(scheduling gates: not stuck).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from stablerep.k8s.retry import Retrier, is_transient

#: Container states that mean a pod will not make progress by itself.
STUCK_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
                 "CreateContainerConfigError", "CreateContainerError")


def restarts(pod: dict[str, Any]) -> int:
    """The first container's restartCount (0 before it started)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return int(statuses[0].get("restartCount") or 0) if statuses else 0


def container_state(pod: dict[str, Any]) -> str:
    """running | waiting | terminated | "" for the first container."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next(iter(statuses[0].get("state") or {}), "") if statuses else ""


def gated(pod: dict[str, Any]) -> bool:
    """Whether the pod waits on scheduling gates (a queue's admission), not on capacity."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "SchedulingGated":
            return True
    return bool((pod.get("spec") or {}).get("schedulingGates"))


def stuck_reason(pod: dict[str, Any]) -> str | None:
    """Why a pod cannot make progress (unschedulable, image pull, crash loop), else None."""
    status = pod.get("status", {})
    if status.get("phase") == "Pending" and not gated(pod):
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


class LogFollower:
    """Copies one master pod's log, run after run, until its pod ends or :meth:`stop`.

    Args:
        core: a CoreV1Api.
        retrier: the launcher's retrier (its bound is not applied here: logs never fail).
        namespace: the pod's namespace.
        pod: the pod's name.
        timeout_s: connect/read limit of the non-streaming calls.
    """

    def __init__(self, core: Any, retrier: Retrier, namespace: str, pod: str,
                 timeout_s: float):
        self.core, self.retrier, self.namespace, self.pod = core, retrier, namespace, pod
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._run: int | None = None  # restartCount of the run being copied
        self._copied = 0  # lines of that run already written
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"log-{pod}")

    def start(self) -> None:
        self.thread.start()

    def stop(self, wait_s: float) -> None:
        """Let the current stream finish (up to ``wait_s``), then stop re-opening it."""
        self._stop.set()
        self.thread.join(timeout=wait_s)

    def _write(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _loop(self) -> None:
        delay = self.retrier.backoff_s
        while True:
            try:
                pod = json.loads(self.core.read_namespaced_pod(
                    self.pod, self.namespace, _preload_content=False,
                    _request_timeout=(self.timeout_s, self.timeout_s)).data)
                ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                if self._run is None or restarts(pod) >= self._run:  # never goes back
                    self._begin_run(restarts(pod))
                    self._stream()
                delay = self.retrier.backoff_s
                if self._stop.is_set() or ended:
                    return
            except Exception as e:  # noqa: BLE001 (a log is a courtesy: never fatal)
                if getattr(e, "status", None) == 404 or self._stop.is_set():
                    return
                if is_transient(e):
                    delay = min(self.retrier.backoff_max_s, delay * 2)
            time.sleep(delay)

    def _begin_run(self, run: int) -> None:
        """Start the section of container run ``run`` (finishing the previous one first)."""
        if run == self._run:
            return
        if self._run is not None and run == self._run + 1:
            self._finish_previous()
        self._run, self._copied = run, 0
        self._write(f"--- master pod {self.pod}, container run {run + 1} ---")

    def _finish_previous(self) -> None:
        """Lines of the run that ended while no stream was open (read back as previous)."""
        text = self.core.read_namespaced_pod_log(self.pod, self.namespace, previous=True,
                                                 _request_timeout=(self.timeout_s, self.timeout_s))
        for line in str(text).splitlines()[self._copied:]:
            self._write(line)

    def _stream(self) -> None:
        """Follow the current container's log to its end, skipping lines already copied."""
        resp = self.core.read_namespaced_pod_log(self.pod, self.namespace, follow=True,
                                                 _preload_content=False,
                                                 _request_timeout=(self.timeout_s, None))
        seen, rest = 0, ""
        try:
            for raw in resp.stream(4096, decode_content=True):
                lines = (rest + raw.decode("utf-8", "replace")).split("\n")
                rest = lines.pop()
                for line in lines:
                    seen += 1
                    if seen > self._copied:
                        self._write(line)
                        self._copied = seen
        finally:
            resp.release_conn()
        if rest and seen + 1 > self._copied:
            self._write(rest)
            self._copied = seen + 1
