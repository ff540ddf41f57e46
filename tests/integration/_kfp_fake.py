"""A loopback fake of the part of the KFP v2beta1 REST API that kfp.Client and `kfp` use.

Healthz, experiments (list by filter, create), pipeline upload, runs (create, get). Every
request is recorded (method, path, query, JSON body) so a test can assert what was sent.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class KfpState:
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)  # display name -> id
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[str, str] = field(default_factory=dict)  # display name -> id
    versions: dict[str, dict[str, str]] = field(default_factory=dict)  # pipeline id -> name -> id

    def posted(self, path: str) -> list[Any]:
        """Bodies of the POST requests to ``API + path``."""
        return [r.body for r in self.requests if r.method == "POST" and r.path == API + path]


def _handler(state: KfpState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Recorded:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("latin-1")
            rec = Recorded(self.command, url.path, parse_qs(url.query), body)
            state.requests.append(rec)
            return rec

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            rec = self._record()
            if rec.path == f"{API}/healthz":
                return self._answer(200, {})
            if rec.path == f"{API}/experiments":
                wanted = "".join(rec.query.get("filter", []))
                hits = [{"experiment_id": i, "display_name": n}
                        for n, i in state.experiments.items() if json.dumps(n) in wanted
                        or f'"{n}"' in wanted]
                return self._answer(200, {"experiments": hits} if hits else {})
            if rec.path == f"{API}/pipelines":
                wanted = "".join(rec.query.get("filter", []))
                hits = [{"pipeline_id": i, "display_name": n}
                        for n, i in state.pipelines.items() if f'"{n}"' in wanted]
                return self._answer(200, {"pipelines": hits} if hits else {})
            if rec.path.startswith(f"{API}/pipelines/") and rec.path.endswith("/versions"):
                pid = rec.path.split("/")[-2]
                wanted = "".join(rec.query.get("filter", []))
                hits = [{"pipeline_id": pid, "pipeline_version_id": i, "display_name": n}
                        for n, i in state.versions.get(pid, {}).items() if f'"{n}"' in wanted]
                return self._answer(200, {"pipeline_versions": hits} if hits else {})
            if rec.path.startswith(f"{API}/runs/"):
                run = state.runs.get(rec.path.rsplit("/", 1)[1])
                return self._answer(200, run) if run else self._answer(404, {"error": "no run"})
            return self._answer(404, {"error": f"not served: {rec.path}"})

        def do_POST(self) -> None:  # noqa: N802
            rec = self._record()
            if rec.path == f"{API}/experiments":
                exp_id = state.experiments.setdefault(rec.body["display_name"], str(uuid.uuid4()))
                return self._answer(200, {"experiment_id": exp_id,
                                          "display_name": rec.body["display_name"]})
            if rec.path == f"{API}/runs":
                run_id = str(uuid.uuid4())
                state.runs[run_id] = {"run_id": run_id, "state": "PENDING",
                                      "display_name": rec.body.get("display_name", ""),
                                      "experiment_id": rec.body.get("experiment_id", ""),
                                      "created_at": "2026-01-01T00:00:00Z"}
                return self._answer(200, state.runs[run_id])
            if rec.path == f"{API}/pipelines/upload":
                name = "".join(rec.query.get("name", []))
                pid = state.pipelines.setdefault(name, str(uuid.uuid4()))
                state.versions.setdefault(pid, {})[name] = str(uuid.uuid4())
                return self._answer(200, {"pipeline_id": pid, "display_name": name})
            if rec.path == f"{API}/pipelines/upload_version":
                name = "".join(rec.query.get("name", []))
                pid = "".join(rec.query.get("pipelineid", []))
                vid = state.versions.setdefault(pid, {}).setdefault(name, str(uuid.uuid4()))
                return self._answer(200, {"pipeline_id": pid, "pipeline_version_id": vid,
                                          "display_name": name})
            return self._answer(404, {"error": f"not served: {rec.path}"})

    return Handler


@contextlib.contextmanager
def kfp_server() -> Iterator[tuple[str, KfpState]]:
    """Serve the fake on a free loopback port; yields (endpoint URL, recorded state)."""
    state = KfpState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
