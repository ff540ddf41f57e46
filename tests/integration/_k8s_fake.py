"""A small stateful Kubernetes API server on loopback, for the launcher's tests.

It speaks the part of the API the launcher uses, over real HTTP, to the real kubernetes
client: custom objects (create, get, list, watch from a resourceVersion, merge-patch, delete)
for the groups it serves (the training jobs, and Argo's ``workflows``), pods (get, list by
label selector), pod logs (tail, ``previous``, and follow until the container exits: one log
per container run, ``restartCount`` being the run) and events (list by involved object).
Every change bumps a global resourceVersion and is kept as a watch event;
:meth:`FakeKube.expire_watches` answers the next watches with ``410 Gone``, as a real server
does once the watch's resourceVersion has been compacted away. A group it does not serve
answers the plain-text ``404 page not found`` of a real API server; a (verb, resource) in
``forbidden`` answers 403.

Deleting an object deletes the objects whose ownerReferences name its uid, recursively, as
the garbage collector does (in the background). With :attr:`FakeKube.kueue` set, a job
created with Kueue's queue label starts suspended, as Kueue's webhook does, until
:meth:`admit`. :meth:`inject` queues faults per (verb, resource): an HTTP status (500, 429
with ``Retry-After``), a dropped connection, a slow answer; :attr:`outage` answers every
request with 503.

Tests play the operator by calling :meth:`set_status`, :meth:`put_pod`, :meth:`append_log`
and :meth:`add_event`; :attr:`requests` records every (verb, resource) the client used.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

WATCH_CAP_S = 5.0  # longest a watch stays open, whatever the client asks
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_SUSPEND = {"pytorchjobs": ("runPolicy",), "trainjobs": ()}  # where spec.*.suspend lives

_CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/"
                     r"(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$")
_CORE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<plural>pods|events)"
                   r"(?:/(?P<name>[^/]+)(?P<log>/log)?)?$")


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    """The server's state and the operator's controls. See the module docstring."""

    def __init__(self, served: set[tuple[str, str, str]], namespaces: set[str]):
        self.served = set(served)  # (group, version, plural)
        self.namespaces = set(namespaces)
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) answered with 403
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name)
        self.logs: dict[tuple[str, str, int], list[str]] = {}  # (ns, pod, run) -> lines
        self.logs_done: set[tuple[str, str, int]] = set()  # container runs that exited
        self.events: list[dict[str, Any]] = []
        self.history: list[tuple[int, str, str, str, dict[str, Any]]] = []
        self.expire = 0  # the next this-many watch requests get 410 Gone
        self.rv = 0
        self.requests: list[tuple[str, str]] = []
        self.queries: list[tuple[str, str, dict[str, str]]] = []  # (verb, resource, query)
        self.faults: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        self.outage = False  # every request answers 503
        self.kueue = False  # jobs with the queue label are created suspended
        self.stopping = False
        self.on_create: list[Any] = []  # callbacks(plural, ns, obj) after a create
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ serving

    def start(self) -> str:
        state = self

        class Handler(_Handler):
            kube = state

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ state changes

    def _bump(self, kind: str, plural: str, ns: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, kind, plural, ns, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, plural: str, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            obj = copy.deepcopy(obj)
            obj["metadata"].update(namespace=ns, uid=str(uuid.uuid4()),
                                   creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
            if self.kueue and plural in _SUSPEND and QUEUE_LABEL in obj["metadata"].get(
                    "labels", {}):
                self._spec_parent(plural, obj)["suspend"] = True
            self.objects[(plural, ns, obj["metadata"]["name"])] = obj
            self._bump("ADDED", plural, ns, obj)
            created = copy.deepcopy(obj)
        for callback in self.on_create:
            callback(plural, ns, created)
        return created

    def set_status(self, plural: str, ns: str, name: str, *conditions: tuple[str, str, str]
                   ) -> None:
        """Append conditions (type, reason, message), all status True, as an operator does."""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return
            status = obj.setdefault("status", {})
            status.setdefault("conditions", []).extend(
                {"type": t, "status": "True", "reason": r, "message": m}
                for t, r, m in conditions)
            self._bump("MODIFIED", plural, ns, obj)

    @staticmethod
    def _spec_parent(plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        node = obj.setdefault("spec", {})
        for key in _SUSPEND[plural]:
            node = node.setdefault(key, {})
        return node

    def admit(self, plural: str, ns: str, name: str) -> None:
        """Kueue admits the job: its suspend flag turns false."""
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is not None:
                self._spec_parent(plural, obj)["suspend"] = False
                self._bump("MODIFIED", plural, ns, obj)

    def patch(self, plural: str, ns: str, name: str, body: dict[str, Any]
              ) -> dict[str, Any] | None:
        """A JSON merge patch (RFC 7386): maps merge, None removes, anything else replaces."""
        def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
            for key, value in patch.items():
                if value is None:
                    target.pop(key, None)
                elif isinstance(value, dict) and isinstance(target.get(key), dict):
                    merge(target[key], value)
                else:
                    target[key] = copy.deepcopy(value)

        with self.cond:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return None
            merge(obj, body)
            self._bump("MODIFIED", plural, ns, obj)
            return copy.deepcopy(obj)

    def delete(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        """Delete an object, then (as the garbage collector) every object it owns."""
        with self.cond:
            obj = self.objects.pop((plural, ns, name), None)
            if obj is None:
                return None
            self._bump("DELETED", plural, ns, obj)
            uid = obj["metadata"].get("uid")
            owned = [key for key, o in self.objects.items() if key[1] == ns and uid and any(
                r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]
        for key in owned:
            self.delete(*key)
        return obj

    def inject(self, verb: str, resource: str, *faults: tuple[Any, ...]) -> None:
        """Answer the next requests of (verb, resource) with these faults, one each:
        ``("status", code)``, ``("status", 429, retry_after_s)``, ``("drop",)``,
        ``("slow", seconds)`` (answer late), ``("late", seconds)`` (do the work, then answer
        late)."""
        with self.cond:
            self.faults.setdefault((verb, resource), []).extend(faults)

    def take_fault(self, verb: str, resource: str) -> tuple[Any, ...] | None:
        with self.cond:
            queue = self.faults.get((verb, resource))
            return queue.pop(0) if queue else None

    def put_pod(self, ns: str, name: str, labels: dict[str, str], status: dict[str, Any],
                owners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        with self.cond:
            old = self.objects.get(("pods", ns, name))
            uid = old["metadata"]["uid"] if old else str(uuid.uuid4())
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": uid},
                   "status": status}
            if owners:
                pod["metadata"]["ownerReferences"] = owners
            self.objects[("pods", ns, name)] = pod
            self._bump("MODIFIED", "pods", ns, pod)
            return copy.deepcopy(pod)

    def run_of(self, ns: str, pod: str) -> int:
        """The pod's current container run: its first container's restartCount."""
        obj = self.objects.get(("pods", ns, pod)) or {}
        statuses = obj.get("status", {}).get("containerStatuses") or [{}]
        return int(statuses[0].get("restartCount") or 0)

    def append_log(self, ns: str, pod: str, *lines: str, done: bool = False,
                   run: int | None = None) -> None:
        """Log lines of a container run (default: the current one); done = it exited."""
        with self.cond:
            run = self.run_of(ns, pod) if run is None else run
            self.logs.setdefault((ns, pod, run), []).extend(lines)
            if done:
                self.logs_done.add((ns, pod, run))
            self.cond.notify_all()

    def add_event(self, ns: str, involved: str, type_: str, reason: str, message: str) -> None:
        with self.cond:
            self.events.append({"metadata": {"name": f"{involved}.{len(self.events)}",
                                             "namespace": ns},
                                "involvedObject": {"name": involved}, "type": type_,
                                "reason": reason, "message": message})

    def expire_watches(self, count: int = 1) -> None:
        """The next ``count`` watch requests get ``410 Gone`` (their version was compacted)."""
        with self.cond:
            self.expire += count

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj else None

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the fake API server never reached the expected state")
                self.cond.wait(min(left, 0.2))


class _Handler(BaseHTTPRequestHandler):
    kube: FakeKube
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ replies

    def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        time.sleep(getattr(self, "late", 0))
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str, **details: Any) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": message, "reason": reason, "details": details,
                          "code": code})

    def _start_stream(self, content_type: str) -> None:
        """A chunked answer, as a real API server streams a watch or a log follow."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def _streamed(self, content_type: str, body: Any, *args: Any) -> None:
        """Run ``body(*args)`` as a chunked stream, ending it however the body returns."""
        self._start_stream(content_type)
        try:
            body(*args)
        finally:
            self.wfile.write(b"0\r\n\r\n")

    # ------------------------------------------------------------------ routing

    def _route(self, method: str) -> None:
        try:
            self._dispatch(method)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            self.close_connection = True

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = json.loads(self.rfile.read(length)) if length else {}
        url = urlparse(self.path)
        query = self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = _CUSTOM.match(url.path)
        if m and (m["group"], m["version"], m["plural"]) in self.kube.served:
            return self._custom(method, m["plural"], m["ns"], m["name"], query)
        m = _CORE.match(url.path)
        if m:
            resource = "pods/log" if m["log"] else m["plural"]
            return self._core(method, resource, m["ns"], m["name"], query)
        self._send(404, b"404 page not found", "text/plain")

    def _verb(self, method: str, name: str | None, query: dict[str, str]) -> str:
        if method == "GET":
            if name:
                return "get"
            return "watch" if query.get("watch", "").lower() in ("true", "1") else "list"
        return {"POST": "create", "DELETE": "delete", "PATCH": "patch",
                "PUT": "update"}[method]

    def _allowed(self, verb: str, resource: str, ns: str) -> bool:
        self.kube.requests.append((verb, resource))
        self.kube.queries.append((verb, resource, dict(self.query)))
        if self.kube.outage:
            self._status(503, "ServiceUnavailable", "the server is currently unable to handle "
                         "the request")
            return False
        fault = self.kube.take_fault(verb, resource)
        if fault is not None:
            return self._fault(fault)
        if (verb, resource) in self.kube.forbidden:
            self._status(403, "Forbidden", f'{resource} is forbidden: User '
                         f'"system:serviceaccount:{ns}:default" cannot {verb} resource '
                         f'"{resource}" in the namespace "{ns}"')
            return False
        return True

    def _fault(self, fault: tuple[Any, ...]) -> bool:
        """Play one injected fault; True when the request then goes on (a slow answer)."""
        if fault[0] == "slow":
            time.sleep(fault[1])
            return True
        if fault[0] == "late":  # do the work, then answer too late (a timed-out create)
            self.late = fault[1]
            return True
        if fault[0] == "drop":  # close the connection without an answer
            self.close_connection = True
            return False
        code = fault[1]
        data = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": f"injected fault {code}", "code": code}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if len(fault) > 2:
            self.send_header("Retry-After", str(fault[2]))
        self.end_headers()
        self.wfile.write(data)
        return False

    def _custom(self, method: str, plural: str, ns: str, name: str | None,
                query: dict[str, str]) -> None:
        verb = self._verb(method, name, query)
        if not self._allowed(verb, plural, ns):
            return
        if verb == "create":
            body = self.body
            if ns not in self.kube.namespaces:
                return self._status(404, "NotFound", f'namespaces "{ns}" not found',
                                    name=ns, kind="namespaces")
            if self.kube.get(plural, ns, body["metadata"]["name"]):
                return self._status(409, "AlreadyExists", f'{plural} "{body["metadata"]["name"]}"'
                                    " already exists")
            return self._send(201, self.kube.create(plural, ns, body))
        if verb == "get":
            obj = self.kube.get(plural, ns, name)
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found',
                                    name=name, kind=plural)
            return self._send(200, obj)
        if verb == "patch":
            obj = self.kube.patch(plural, ns, name, self.body)
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return self._send(200, obj)
        if verb == "delete":
            obj = self.kube.delete(plural, ns, name)
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            return self._send(200, obj)
        if verb == "watch":
            return self._streamed("application/json", self._watch, plural, ns, query)
        items = self._select(plural, ns, query)
        self._send(200, {"apiVersion": "v1", "kind": "List", "items": items,
                         "metadata": {"resourceVersion": str(self.kube.rv)}})

    def _select(self, plural: str, ns: str, query: dict[str, str]) -> list[dict[str, Any]]:
        field = query.get("fieldSelector", "")
        labels = query.get("labelSelector", "")
        with self.kube.cond:
            out = []
            for (p, n, name), obj in sorted(self.kube.objects.items()):
                if p != plural or n != ns:
                    continue
                if field.startswith("metadata.name=") and name != field.split("=", 1)[1]:
                    continue
                if not _matches(obj["metadata"].get("labels", {}), labels):
                    continue
                out.append(copy.deepcopy(obj))
            return out

    def _watch(self, plural: str, ns: str, query: dict[str, str]) -> None:
        kube = self.kube
        field = query.get("fieldSelector", "")
        wanted = field.split("=", 1)[1] if field.startswith("metadata.name=") else None
        timeout = min(float(query.get("timeoutSeconds", WATCH_CAP_S)), WATCH_CAP_S)
        since = query.get("resourceVersion")
        with kube.cond:
            if kube.expire:
                kube.expire -= 1
                gone = {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since}"}}
                self._chunk((json.dumps(gone) + "\n").encode())
                return
            last = int(since) if since else kube.rv
            if not since:  # a watch without a version starts with the current objects
                for obj in self._select(plural, ns, query):
                    self._chunk((json.dumps({"type": "ADDED", "object": obj}) + "\n")
                                .encode())
        deadline = time.monotonic() + timeout
        while True:
            with kube.cond:
                events = [(rv, k, o) for rv, k, p, n, o in kube.history
                          if rv > last and p == plural and n == ns
                          and (wanted is None or o["metadata"]["name"] == wanted)]
                if not events:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    kube.cond.wait(min(left, 0.2))
                    continue
            for rv, kind, obj in events:
                self._chunk((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                last = rv
            self.wfile.flush()

    def _core(self, method: str, resource: str, ns: str, name: str | None,
              query: dict[str, str]) -> None:
        verb = self._verb(method, name if resource != "pods/log" else None, query)
        if resource == "pods/log":
            verb = "get"
        if not self._allowed(verb, resource, ns):
            return
        if resource == "events":
            field = query.get("fieldSelector", "")
            involved = field.split("=", 1)[1] if "=" in field else None
            items = [e for e in self.kube.events if e["metadata"]["namespace"] == ns
                     and (involved is None or e["involvedObject"]["name"] == involved)]
            return self._send(200, {"kind": "EventList", "apiVersion": "v1", "items": items,
                                    "metadata": {"resourceVersion": str(self.kube.rv)}})
        if resource == "pods" and name:
            pod = self.kube.get("pods", ns, name)
            if pod is None:
                return self._status(404, "NotFound", f'pods "{name}" not found',
                                    name=name, kind="pods")
            return self._send(200, pod)
        if resource == "pods":
            return self._send(200, {"kind": "PodList", "apiVersion": "v1",
                                    "items": self._select("pods", ns, query),
                                    "metadata": {"resourceVersion": str(self.kube.rv)}})
        return self._log(ns, name, query)

    def _log(self, ns: str, pod: str | None, query: dict[str, str]) -> None:
        kube = self.kube
        if kube.get("pods", ns, pod or "") is None:
            return self._status(404, "NotFound", f'pods "{pod}" not found')
        run = kube.run_of(ns, pod)
        if query.get("previous", "").lower() in ("true", "1"):
            run -= 1
            if run < 0:
                return self._status(400, "BadRequest", f'previous terminated container in pod '
                                    f'"{pod}" not found')
        if query.get("follow", "").lower() not in ("true", "1"):
            lines = kube.logs.get((ns, pod, run), [])
            tail = int(query["tailLines"]) if "tailLines" in query else len(lines)
            text = "".join(f"{line}\n" for line in lines[len(lines) - tail:])
            return self._send(200, text.encode(), "text/plain")
        self._streamed("text/plain", self._follow_log, ns, pod, run)

    def _follow_log(self, ns: str, pod: str, run: int) -> None:
        """Stream one container run's log until it exits (or the server stops)."""
        kube = self.kube
        sent = 0
        while not kube.stopping:
            with kube.cond:
                lines = kube.logs.get((ns, pod, run), [])
                new, done = lines[sent:], (ns, pod, run) in kube.logs_done
                if not new and not done:
                    kube.cond.wait(0.2)
                    continue
            self._chunk("".join(f"{line}\n" for line in new).encode())
            sent += len(new)
            if done:
                return

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")
