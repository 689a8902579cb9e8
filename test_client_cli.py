"""Clients, CLI, event stream, metrics and CORS of fabrica.py (SPEC §2.1, §6.1, §6.7, §6.8, §7).

Classes follow fabrica.py's section order (REST API: event stream, metrics,
CORS -> HTTP server -> Clients -> CLI) so a failure points to a banner. The
servers are real ``python fabrica.py serve APP`` subprocesses on port 0,
serving a small app file written into tmp_path; the stream-cleanup test runs
``ThreadedWSGIServer`` in-process so it can count the bus's taps. SSE is read
from raw sockets (chunked decoding by hand) so the wire format itself is
checked. Every wait polls a condition or blocks on a socket/queue with a
timeout; there are no bare sleeps.

Stdlib + pytest (+ prometheus_client and PyYAML where noted).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

import fabrica

ROOT = Path(__file__).resolve().parent
FABRICA_PY = ROOT / "fabrica.py"
ORIGIN = "http://ui.example"

APP_SOURCE = '''\
import dataclasses

import fabrica


@dataclasses.dataclass
class GadgetSpec:
    size: int
    color: str = "red"


app = fabrica.Fabrica(ring_size={ring_size})
app.register("Widget", history=True)
app.register("Gadget", spec=GadgetSpec)
app.rest.keepalive = {keepalive}
'''


###############################################################################
# Helpers
###############################################################################

def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(interval)


def write_app(directory: Path, *, ring_size: int = 10000, keepalive: float = 0.2, name: str = "widgets_app") -> Path:
    path = Path(directory) / f"{name}.py"
    path.write_text(APP_SOURCE.format(ring_size=ring_size, keepalive=keepalive))
    return path


class Server:
    """``python fabrica.py serve APP`` as a subprocess on port 0 (or a given port); the port is read from its log."""

    def __init__(self, app_file, data_dir, *args: str):
        self.app_file = None if app_file is None else str(app_file)
        self.data_dir = str(data_dir)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []

    def start(self, port: int = 0, timeout: float = 10.0) -> Server:
        self.lines, self.port = [], None
        found = threading.Event()
        cmd = [sys.executable, str(FABRICA_PY), "serve", *([self.app_file] if self.app_file else []),
               "--data-dir", self.data_dir, "--port", str(port), "--no-fsync", *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace", env=env)

        def pump(stream):
            for line in stream:
                self.lines.append(line)
                match = re.search(r"listening on http://\S+?:(\d+)", line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    found.set()
            found.set()     # EOF: the process is gone
        threading.Thread(target=pump, args=(self.proc.stderr,), daemon=True).start()
        found.wait(timeout)
        if self.port is None:
            self.kill()
            pytest.fail(f"server did not start within {timeout}s:\n{self.log()}")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def request(self, method, path, body=None, headers=None, timeout: float = 5.0):
        """One request on a fresh connection: (status, headers, JSON or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = dict(headers or {})
            if body is not None:
                body = json.dumps(body).encode()
                headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=headers)
            res = conn.getresponse()
            data = res.read()
            return res.status, res.headers, (json.loads(data) if data else None)
        finally:
            conn.close()

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def servers():
    """``servers(app_file, data_dir, *args)`` starts a server; every one still running is killed at teardown."""
    started: list[Server] = []

    def start(app_file, data_dir, *args, port: int = 0):
        server = Server(app_file, data_dir, *args).start(port)
        started.append(server)
        return server
    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(tmp_path, servers):
    """A real server for the standard app file (keep-alive comments every 0.2 s)."""
    return servers(write_app(tmp_path), tmp_path / "data")


class SSE:
    """A raw-socket ``GET /events``: status line, headers, then the (chunked) SSE body frame by frame."""

    def __init__(self, port: int, query: str = "", headers: dict | None = None, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        lines = [f"GET /events{query} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.raw = b""          # bytes received, not yet decoded
        self.text = ""          # decoded body, not yet split into frames
        head = self._until(b"\r\n\r\n", time.monotonic() + timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()

    def _recv(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from the event stream in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the event stream")
        self.raw += data

    def _until(self, marker: bytes, deadline) -> bytes:
        while marker not in self.raw:
            self._recv(deadline)
        out, self.raw = self.raw.split(marker, 1)
        return out

    def _exact(self, n: int, deadline) -> bytes:
        while len(self.raw) < n:
            self._recv(deadline)
        out, self.raw = self.raw[:n], self.raw[n:]
        return out

    def json_body(self, timeout: float = 5.0):
        """The body of a non-streaming answer (an error), as JSON."""
        deadline = time.monotonic() + timeout
        if self.chunked:
            parts = []
            while True:
                size = int(self._until(b"\r\n", deadline).split(b";")[0], 16)
                if size == 0:
                    break
                parts.append(self._exact(size, deadline))
                self._exact(2, deadline)
            return json.loads(b"".join(parts))
        return json.loads(self._exact(int(self.headers["content-length"]), deadline))

    def _piece(self, deadline):
        if self.chunked:
            size = int(self._until(b"\r\n", deadline).split(b";")[0], 16)
            if size == 0:
                raise EOFError("the event stream ended (last chunk)")
            data = self._exact(size, deadline)
            self._exact(2, deadline)
        else:
            if not self.raw:
                self._recv(deadline)
            data, self.raw = self.raw, b""
        self.text += data.decode("utf-8")

    def frame(self, timeout: float = 5.0) -> dict:
        """The next frame: {"id", "event", "data"} fields, or {"comment": text} for a comment-only block."""
        deadline = time.monotonic() + timeout
        while "\n\n" not in self.text:
            self._piece(deadline)
        block, self.text = self.text.split("\n\n", 1)
        fields, comments = {}, []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            else:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        if not fields:
            return {"comment": "\n".join(comments)}
        if "data" in fields:
            fields["json"] = json.loads(fields["data"])
        return fields

    def events(self, n: int, timeout: float = 5.0) -> list[dict]:
        """The next ``n`` event frames, skipping comments."""
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            frame = self.frame(max(0.01, deadline - time.monotonic()))
            if "comment" not in frame:
                out.append(frame)
        return out

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def streams():
    opened: list[SSE] = []

    def open_stream(*args, **kwargs) -> SSE:
        stream = SSE(*args, **kwargs)
        opened.append(stream)
        return stream
    yield open_stream
    for stream in opened:
        stream.close()


def call(app, method: str, path: str, body=None, headers=None):
    """One in-process request through ``app.wsgi``: (status, headers with lower-case names, raw body)."""
    environ: dict = {}
    setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    raw = b"" if body is None else json.dumps(body).encode()
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                    "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw))})
    if body is not None:
        environ["CONTENT_TYPE"] = "application/json"
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status[:3])
        seen["headers"] = {}
        for k, v in response_headers:
            seen["headers"].setdefault(k.lower(), []).append(v)

    result = app.wsgi(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return seen["status"], {k: ", ".join(v) for k, v in seen["headers"].items()}, data


def cors_headers(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


###############################################################################
# REST API: event stream (SPEC §6.8)
###############################################################################

def widget_events(frames):
    return [(f["id"], f["event"]) for f in frames]


class TestEventStream:
    def test_headers_frames_and_filters(self, server, streams):
        everything = streams(server.port)
        by_type = streams(server.port, "?type=io.fabrica.widget.*")
        by_kind = streams(server.port, "?kind=Widget")
        for stream in (everything, by_type, by_kind):
            assert stream.status == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers.get("cache-control") == "no-cache"
        client = fabrica.Client(server.url)
        client.create("Gadget", name="g1", spec={"size": 1})                                  # rv 1
        w1 = client.create("Widget", name="w1")                                               # rv 2
        client.update_status("Widget", "w1", {"conditions": [{"type": "Ready", "status": "True"}]})  # 3, 3.1

        frames = everything.events(4)
        assert widget_events(frames) == [("1", "io.fabrica.gadget.created"), ("2", "io.fabrica.widget.created"),
                                         ("3", "io.fabrica.widget.updated"), ("3.1", "io.fabrica.condition.ready")]
        for frame in frames:
            event = frame["json"]       # data: is the CloudEvent itself
            assert event["specversion"] == "1.0" and event["type"] == frame["event"]
            assert event["resourceversion"] == frame["id"].split(".")[0]
            assert set(frame) == {"id", "event", "data", "json"}
        created = frames[1]["json"]
        assert created["data"]["resource"]["metadata"]["uid"] == w1.uid and created["subject"] == w1.uid
        cond = frames[3]["json"]
        assert cond["data"]["conditionType"] == "Ready" and cond["data"]["status"] == "True"
        assert cond["data"]["resourceUID"] == w1.uid

        client.create("Widget", name="w2")                                                    # rv 4
        # in-order delivery: a filtered stream's next frame after 3 being 4 proves 1 and 3.1 were skipped
        assert widget_events(by_type.events(3)) == [("2", "io.fabrica.widget.created"),
                                                    ("3", "io.fabrica.widget.updated"),
                                                    ("4", "io.fabrica.widget.created")]
        assert [f["id"] for f in by_kind.events(4)] == ["2", "3", "3.1", "4"]

    def test_resume_after_an_id_exactly(self, server, streams):
        client = fabrica.Client(server.url)
        client.create("Widget", name="w1")                                                         # 1
        client.update_status("Widget", "w1", {"conditions": [{"type": "Ready", "status": "True"}]})  # 2, 2.1
        client.patch("Widget", "w1", {"size": 1})                                                  # 3
        client.update_status("Widget", "w1", {"conditions": [{"type": "Ready", "status": "False"},
                                                             {"type": "Synced", "status": "True"}]})  # 4, 4.1, 4.2
        client.create("Widget", name="w2")                                                         # 5
        positions = ["1", "2", "2.1", "3", "4", "4.1", "4.2", "5"]
        resumed = []
        for i, since in enumerate(positions):
            how = {"headers": {"Last-Event-ID": since}} if i % 2 == 0 else {"query": f"?since={since}"}
            stream = streams(server.port, how.get("query", ""), how.get("headers"))
            assert stream.status == 200, stream.json_body()
            expected = positions[i + 1:]
            assert [f["id"] for f in stream.events(len(expected))] == expected, since
            resumed.append(stream)
        live = client.create("Widget", name="w3")
        rv = live["metadata"]["resourceVersion"]
        for stream in resumed:      # then live, with no duplicate of the backlog in between
            assert [f["id"] for f in stream.events(1)] == [rv]

    def test_resume_while_writes_race_the_connect(self, server, streams):
        client = fabrica.Client(server.url)
        first = client.create("Widget", name="w0")["metadata"]["resourceVersion"]
        done = threading.Event()
        last = {}

        def writer():
            with fabrica.Client(server.url) as c:
                for i in range(1, 60):
                    last["rv"] = c.create("Widget", name=f"w{i}")["metadata"]["resourceVersion"]
            done.set()
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        assert wait_until(lambda: "rv" in last, 5)
        stream = streams(server.port, headers={"Last-Event-ID": first})
        assert done.wait(20), "the writer did not finish"
        ids = [int(f["id"]) for f in stream.events(int(last["rv"]) - int(first), timeout=10)]
        assert ids == list(range(int(first) + 1, int(last["rv"]) + 1)), "a gap or a duplicate"

    def test_gone_bad_ids_and_keepalive(self, tmp_path, servers, streams):
        server = servers(write_app(tmp_path, ring_size=5), tmp_path / "data")
        client = fabrica.Client(server.url)
        for i in range(8):
            client.create("Widget", name=f"w{i}")            # rv 1..8; the ring keeps 4..8
        stream = streams(server.port, "?since=3")
        assert stream.status == 200
        assert [f["id"] for f in stream.events(5)] == ["4", "5", "6", "7", "8"]
        for how in ({"query": "?since=2"}, {"headers": {"Last-Event-ID": "1"}}, {"query": "?since=0"}):
            gone = streams(server.port, how.get("query", ""), how.get("headers"))
            assert gone.status == 410, how
            assert gone.headers["content-type"].startswith("application/json")
            body = gone.json_body()
            assert body["code"] == 410 and body["error"], body
        for bad in ("abc", "1.x", "-1", "1.2.3", ".1", "1.-1"):
            stream = streams(server.port, headers={"Last-Event-ID": bad})
            assert stream.status == 400, bad
            assert stream.json_body()["code"] == 400
        for bad in ("1e3", "%D9%A3", "0x10"):       # %D9%A3 is an Arabic-Indic digit: isdigit(), not ASCII
            stream = streams(server.port, f"?since={bad}")
            assert stream.status == 400, bad

        quiet = streams(server.port)
        comments = [quiet.frame(3), quiet.frame(3), quiet.frame(3)]     # open, then keep-alives every 0.2 s
        assert all("comment" in f for f in comments), comments
        assert any("keep-alive" in f["comment"] for f in comments[1:]), comments

    def test_ids_from_before_this_process_are_gone(self, tmp_path, servers, streams):
        app_file, data = write_app(tmp_path), tmp_path / "data"
        server = servers(app_file, data)
        client = fabrica.Client(server.url)
        for i in range(3):
            client.create("Widget", name=f"w{i}")
        assert server.stop() == 0, server.log()
        server = servers(app_file, data)
        for since in ("1", "2", "0"):
            stream = streams(server.port, headers={"Last-Event-ID": since})
            assert stream.status == 410, since
            assert stream.json_body()["code"] == 410
        stream = streams(server.port)       # without an id: starts with the next event
        rv = fabrica.Client(server.url).create("Widget", name="w9")["metadata"]["resourceVersion"]
        assert [f["id"] for f in stream.events(1)] == [rv]

    def test_fifty_streams_do_not_starve_requests(self, server, streams):
        opened = [streams(server.port, "?type=io.fabrica.widget.created") for _ in range(50)]
        for stream in opened:
            assert stream.status == 200
            assert "comment" in stream.frame(5)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for i in range(10):
                for method, path, body in (("POST", "/widgets", {"name": f"w{i}"}), ("GET", f"/widgets/w{i}", None),
                                           ("GET", "/widgets", None)):
                    started = time.monotonic()
                    conn.request(method, path, None if body is None else json.dumps(body).encode(),
                                 {"Content-Type": "application/json"} if body else {})
                    res = conn.getresponse()
                    res.read()
                    elapsed = time.monotonic() - started
                    assert res.status in (200, 201), (method, path, res.status)
                    assert elapsed < 1.0, f"{method} {path} took {elapsed:.2f}s with 50 open streams"
        finally:
            conn.close()
        for stream in opened:       # every stream is live and got every event
            assert [f["id"] for f in stream.events(10)] == [str(i) for i in range(1, 11)]


###############################################################################
# REST API: metrics (SPEC §6.1)
###############################################################################

FAMILIES = ["fabrica_http_requests_total", "fabrica_http_request_duration_seconds", "fabrica_store_writes_total",
            "fabrica_events_published_total", "fabrica_queue_depth", "fabrica_reconcile_total",
            "fabrica_reconcile_duration_seconds", "fabrica_objects", "fabrica_objects_not_ready"]


class TestMetrics:
    def scrape(self, app) -> dict:
        parser = pytest.importorskip("prometheus_client.parser")
        status, headers, body = call(app, "GET", "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        families = {}
        for family in parser.text_string_to_metric_families(body.decode()):
            families[family.name] = family
            if family.type == "counter":    # the parser drops a counter's _total suffix
                families[family.name + "_total"] = family
        return families

    @staticmethod
    def value(families, family, sample, **labels) -> float:
        return sum(s.value for s in families[family].samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    def test_families_and_counters_move(self, tmp_path):
        pytest.importorskip("prometheus_client")
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            obj.status["phase"] = "Ready"
            obj.set_condition("Ready", True, reason="Done")
        app.register("Gadget")
        with app:
            before = self.scrape(app)
            for name in FAMILIES:
                assert name in before, f"/metrics has no family {name}"
            assert before["fabrica_queue_depth"].type == "gauge"
            assert before["fabrica_reconcile_duration_seconds"].type == "histogram"
            assert before["fabrica_http_request_duration_seconds"].type == "histogram"

            status, _, _ = call(app, "POST", "/widgets", {"name": "w1"})
            assert status == 201
            status, _, _ = call(app, "POST", "/gadgets", {"name": "g1"})
            assert status == 201
            assert app.wait_idle(5)
            assert wait_until(lambda: app.client.get("Widget", "w1").status.get("phase") == "Ready", 5)
            after = self.scrape(app)

        def delta(family, sample, **labels):
            return self.value(after, family, sample, **labels) - self.value(before, family, sample, **labels)
        assert delta("fabrica_http_requests_total", "fabrica_http_requests_total",
                     route="/widgets", method="POST", code="201") == 1
        assert delta("fabrica_http_request_duration_seconds", "fabrica_http_request_duration_seconds_count",
                     route="/widgets", method="POST") == 1
        assert delta("fabrica_store_writes_total", "fabrica_store_writes_total") >= 3    # 2 creates + a status
        assert delta("fabrica_events_published_total", "fabrica_events_published_total") >= 3
        assert delta("fabrica_reconcile_total", "fabrica_reconcile_total", kind="Widget") >= 1
        assert delta("fabrica_reconcile_duration_seconds", "fabrica_reconcile_duration_seconds_count",
                     kind="Widget") >= 1
        assert self.value(after, "fabrica_queue_depth", "fabrica_queue_depth", kind="Widget") == 0
        assert self.value(after, "fabrica_objects", "fabrica_objects", kind="Widget") == 1
        assert self.value(after, "fabrica_objects", "fabrica_objects", kind="Gadget") == 1
        assert self.value(after, "fabrica_objects_not_ready", "fabrica_objects_not_ready", kind="Widget") == 0
        # Gadget has no controller: nothing ever makes it Ready, so it is not counted (issue 14)
        assert not any(s.labels.get("kind") == "Gadget" for s in after["fabrica_objects_not_ready"].samples)


###############################################################################
# REST API: CORS (SPEC §6.7)
###############################################################################

class TestCORS:
    @pytest.fixture
    def make(self, tmp_path):
        apps = []

        def make(**options):
            app = fabrica.Fabrica(data_dir=str(tmp_path / f"data{len(apps)}"), durable=False, **options)
            app.register("Widget")
            app.start()
            apps.append(app)
            app.client.create("Widget", name="w1")
            return app
        yield make
        for app in apps:
            app.stop()

    def test_off_by_default(self, make):
        app = make()
        status, headers, _ = call(app, "GET", "/widgets", headers={"Origin": ORIGIN})
        assert status == 200 and not cors_headers(headers), headers
        status, headers, body = call(app, "OPTIONS", "/widgets", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "PUT"})
        assert status == 405, body
        assert not cors_headers(headers), headers
        assert headers.get("allow") and json.loads(body)["code"] == 405

    def test_allowed_origin_only(self, make):
        app = make(cors=ORIGIN)
        for method, path in (("GET", "/widgets"), ("GET", "/widgets/w1"), ("GET", "/health")):
            status, headers, _ = call(app, method, path, headers={"Origin": ORIGIN})
            assert status == 200
            assert headers.get("access-control-allow-origin") == ORIGIN, (path, headers)
            assert "Origin" in headers.get("vary", ""), headers
        status, headers, _ = call(app, "GET", "/widgets", headers={"Origin": "http://evil.example"})
        assert status == 200 and not cors_headers(headers), headers
        status, headers, _ = call(app, "GET", "/widgets")
        assert status == 200 and not cors_headers(headers), headers

    def test_preflight(self, make):
        app = make(cors=ORIGIN, token="s3cret")
        for path in ("/widgets", "/widgets/w1", "/widgets/w1/status"):
            status, headers, _ = call(app, "OPTIONS", path, headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "authorization, content-type, if-match"})
            assert status == 204, (path, headers)        # no token needed for a preflight
            assert headers.get("access-control-allow-origin") == ORIGIN
            methods = {m.strip() for m in headers["access-control-allow-methods"].split(",")}
            assert {"GET", "POST", "PUT", "PATCH", "DELETE"} <= methods, methods
            allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
            assert {"authorization", "content-type", "if-match"} <= allowed, allowed
        status, headers, _ = call(app, "OPTIONS", "/widgets", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in headers
        status, _, _ = call(app, "GET", "/widgets", headers={"Origin": ORIGIN})
        assert status == 401            # the token still guards the real request
        status, headers, _ = call(app, "GET", "/widgets", headers={"Origin": ORIGIN,
                                                                   "Authorization": "Bearer s3cret"})
        assert status == 200 and headers.get("access-control-allow-origin") == ORIGIN
        assert "etag" in headers["access-control-expose-headers"].lower()
        for path, auth in (("/widgets/nope", "Bearer s3cret"), ("/widgets", "Bearer wrong")):
            status, headers, _ = call(app, "GET", path, headers={"Origin": ORIGIN, "Authorization": auth})
            assert status in (404, 401)     # a browser script can read the error too
            assert headers.get("access-control-allow-origin") == ORIGIN, (path, headers)

    def test_serve_cors_flag(self, tmp_path, servers, streams):
        server = servers(write_app(tmp_path), tmp_path / "data", "--cors", ORIGIN)
        status, headers, _ = server.request("GET", "/widgets", headers={"Origin": ORIGIN})
        assert status == 200 and headers.get("Access-Control-Allow-Origin") == ORIGIN
        status, headers, _ = server.request("OPTIONS", "/widgets", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers.get("Access-Control-Allow-Origin") == ORIGIN
        stream = streams(server.port, headers={"Origin": ORIGIN})       # a cross-origin EventSource
        assert stream.status == 200 and stream.headers.get("access-control-allow-origin") == ORIGIN


###############################################################################
# HTTP server: streams and their connections
###############################################################################

class TestStreamCleanup:
    """In-process server, so the bus's taps and the server's connections can be counted."""

    def test_disconnected_clients_free_their_taps(self, tmp_path, streams):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget")
        app.start()
        httpd = fabrica.ThreadedWSGIServer(("127.0.0.1", 0), app.wsgi)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()

        def taps():
            return [s for s in app.bus.subscriptions if isinstance(s, fabrica.Tap)]
        try:
            opened = [streams(httpd.server_port, "?kind=Widget") for _ in range(5)]
            assert all(s.status == 200 for s in opened)
            assert wait_until(lambda: len(taps()) == 5, 3), app.bus.subscriptions
            assert httpd.open_connections() == 5
            for stream in opened:
                stream.close()
            started = time.monotonic()
            assert wait_until(lambda: not taps(), 3), f"{len(taps())} tap(s) left after the clients went away"
            assert wait_until(lambda: httpd.open_connections() == 0, 3), httpd.open_connections()
            assert time.monotonic() - started <= 3
            app.client.create("Widget", name="after")       # publishing still works with nobody listening
        finally:
            httpd.stop(5)
            thread.join(5)
            app.stop()


###############################################################################
# Clients (SPEC §2.1): one scenario, app.client and fabrica.Client alike
###############################################################################

VOLATILE = {"uid", "createdAt", "updatedAt", "resourceUID"}
UID = r"[a-z]+-[0-9a-f]{8}"


def normalise(value):
    """JSON with per-run values (uids, times) masked, so two runs can be compared."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in VOLATILE or (key == "name" and isinstance(item, str) and re.fullmatch(UID, item)):
                out[key] = "<uid>" if isinstance(item, str) and item else item
            elif key == "deletionTimestamp":
                out[key] = item is not None
            else:
                out[key] = normalise(item)
        return out
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def raises(fn, cls):
    """Call ``fn``; it must raise exactly ``cls``. Returns (class name, status, details)."""
    with pytest.raises(fabrica.FabricaError) as info:
        fn()
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    return type(err).__name__, err.status, err.details


def names(items):
    return [o["metadata"]["name"] for o in items]


def scenario(client) -> list:
    """The shared client scenario; asserts the contract and returns a transcript to compare."""
    log = []

    def rec(label, value):
        if isinstance(value, dict):
            assert isinstance(value, fabrica.Resource) or "versionId" in value, (label, type(value))
        log.append((label, normalise(value)))
        return value

    w1 = rec("create w1", client.create("Widget", name="w1", spec={"size": 1}, labels={"env": "prod", "tier": "web"}))
    assert w1.name == "w1" and w1.kind == "Widget" and re.fullmatch(r"widget-[0-9a-f]{8}", w1.uid)
    assert w1.generation == 1 and w1.spec == {"size": 1} and w1.labels == {"env": "prod", "tier": "web"}
    rec("create w2", client.create("Widget", name="w2", labels={"env": "dev"}))
    rec("create w3", client.create("Widget", name="w3", labels={"env": "prod", "tier": "db"}))
    g1 = rec("create g1", client.create("Gadget", name="g1", spec={"size": 2}))
    assert g1.spec == {"size": 2, "color": "red"}, "dataclass defaults are filled in"
    unnamed = rec("create unnamed", client.create("Gadget", spec={"size": 3}))
    assert unnamed.name == unnamed.uid

    assert rec("get by uid", client.get("Widget", w1.uid)) == w1
    assert rec("get by name", client.get("widgets", "w1")) == w1
    assert names(rec("list", client.list("WIDGET"))) == ["w1", "w2", "w3"]
    assert names(rec("list env=prod", client.list("Widget", selector="env=prod"))) == ["w1", "w3"]
    assert names(client.list("Widget", selector="env=prod,tier!=db")) == ["w1"]
    assert names(client.list("Widget", selector="env in (dev,test)")) == ["w2"]
    assert names(rec("list limit", client.list("Widget", limit=2))) == ["w1", "w2"]

    stale = client.get("Widget", "w1")
    fresh = rec("merge patch", client.patch("Widget", "w1", {"size": 2, "color": "blue"}))
    assert fresh.generation == 2 and fresh.spec == {"size": 2, "color": "blue"}
    stale["spec"]["size"] = 99
    name, status, _ = raises(lambda: client.update(stale), fabrica.PreconditionFailedError)
    assert status == 412 and issubclass(fabrica.PreconditionFailedError, fabrica.ConflictError)
    log.append(("stale update", name, status))
    assert client.get("Widget", "w1").spec["size"] == 2, "a stale update must not write"
    fresh["spec"] = {"size": 3}
    fresh["metadata"]["labels"] = {"env": "prod"}
    updated = rec("update", client.update(fresh))
    assert updated.generation == 3 and updated.spec == {"size": 3} and updated.labels == {"env": "prod"}
    assert int(updated["metadata"]["resourceVersion"]) > int(fresh["metadata"]["resourceVersion"])

    patched = rec("json patch", client.patch("Widget", w1.uid, [{"op": "add", "path": "/parts", "value": ["a"]}],
                                             type="json"))
    assert patched.spec == {"size": 3, "parts": ["a"]}
    patched = rec("shorthand patch", client.patch("Widget", "w1", {"dims.w": 4, "parts": None}, type="shorthand"))
    assert patched.spec == {"size": 3, "dims": {"w": 4}} and patched.generation == 5

    status_obj = rec("update_status", client.update_status("Widget", "w1", {"phase": "Ready", "count": 1}))
    assert status_obj.generation == 5 and status_obj.status["phase"] == "Ready"
    assert status_obj.status["version"] == "5", "history kinds keep status.version across status writes"
    status_obj = rec("patch_status", client.patch_status("Widget", "w1", {"phase": "Done"}))
    assert status_obj.status["phase"] == "Done" and status_obj.status["count"] == 1
    status_obj = rec("patch_status shorthand", client.patch_status("Widget", "w1", {"count": None},
                                                                   type="shorthand"))
    assert "count" not in status_obj.status and status_obj.generation == 5

    versions = rec("versions", client.versions("Widget", "w1"))
    assert [v["versionId"] for v in versions] == ["1", "2", "3", "4", "5"]
    assert rec("get_version", client.get_version("Widget", "w1", "2"))["spec"] == {"size": 2, "color": "blue"}
    restored = rec("restore", client.restore_version("Widget", "w1", "2"))
    assert restored.spec == {"size": 2, "color": "blue"} and restored.generation == 6
    client.delete_version("Widget", "w1", "1")
    assert [v["versionId"] for v in client.versions("Widget", "w1")] == ["2", "3", "4", "5", "6"]
    log.append(("get deleted version", raises(lambda: client.get_version("Widget", "w1", "1"), fabrica.NotFoundError)))

    assert client.delete("Widget", "w2") is None
    log.append(("get deleted", raises(lambda: client.get("Widget", "w2"), fabrica.NotFoundError)))
    held = client.create("Widget", name="w4", finalizers=["example.com/hold"])
    pending = rec("delete pending", client.delete("Widget", "w4"))
    assert isinstance(pending, fabrica.Resource) and pending["metadata"]["deletionTimestamp"]
    assert pending["metadata"]["finalizers"] == ["example.com/hold"] and pending.uid == held.uid
    again = rec("delete pending again", client.delete("Widget", "w4"))
    assert again["metadata"]["deletionTimestamp"] == pending["metadata"]["deletionTimestamp"]
    assert client.get("Widget", "w4")["metadata"]["deletionTimestamp"]
    release = client.get("Widget", "w4")
    release["metadata"]["finalizers"] = []
    client.update(release)          # the last finalizer gone: the object goes
    log.append(("released", raises(lambda: client.get("Widget", "w4"), fabrica.NotFoundError)))
    client.create("Widget", name="w5", finalizers=["example.com/hold"])
    assert client.delete("Widget", "w5", force=True) is None
    log.append(("forced", raises(lambda: client.get("Widget", "w5"), fabrica.NotFoundError)))

    log.append(("not found", raises(lambda: client.get("Widget", "w9"), fabrica.NotFoundError)))
    log.append(("unknown kind", raises(lambda: client.list("Nope"), fabrica.NotFoundError)[:2]))
    log.append(("patch missing", raises(lambda: client.patch("Widget", "w9", {"a": 1}), fabrica.NotFoundError)))
    log.append(("delete missing", raises(lambda: client.delete("Widget", "w9"), fabrica.NotFoundError)))
    name, status, details = raises(lambda: client.create("Gadget", name="g2", spec={"size": "big", "extra": 1}),
                                   fabrica.ValidationError)
    assert status == 422 and {d["field"] for d in details} >= {"spec.size", "spec.extra"}, details
    log.append(("invalid spec", name, status, sorted(d["field"] for d in details)))
    name, status, details = raises(lambda: client.patch("Gadget", "g1", {"size": "x"}), fabrica.ValidationError)
    assert status == 422 and [d["field"] for d in details] == ["spec.size"], details
    assert client.get("Gadget", "g1").spec == {"size": 2, "color": "red"}
    log.append(("invalid patch", name, status))
    name, status, details = raises(lambda: client.create("Widget", name="Bad_Name"), fabrica.ValidationError)
    assert [d["field"] for d in details] == ["metadata.name"]
    log.append(("invalid name", name, status))
    name, status, details = raises(lambda: client.create("Widget", name="w1"), fabrica.ConflictError)
    assert status == 409
    log.append(("duplicate", name, status))
    return log


class TestClients:
    def test_same_scenario_in_process_and_over_http(self, tmp_path, servers):
        app_file = write_app(tmp_path)
        app = fabrica.load_app(str(app_file))
        app.configure_store(data_dir=str(tmp_path / "local"), durable=False)
        with app:
            local = scenario(app.client)
        server = servers(app_file, tmp_path / "remote")
        with fabrica.Client(server.url) as client:
            remote = scenario(client)
        assert len(local) == len(remote)
        for a, b in zip(local, remote):
            assert a == b, f"app.client and Client differ at {a[0]!r}"

    def test_patch_errors_same_class(self, tmp_path, servers):
        app_file = write_app(tmp_path)
        app = fabrica.load_app(str(app_file))
        app.configure_store(data_dir=str(tmp_path / "local"), durable=False)
        server = servers(app_file, tmp_path / "remote")
        errors = {}
        with app, fabrica.Client(server.url) as remote:
            for where, client in (("local", app.client), ("http", remote)):
                client.create("Widget", name="w1", spec={"size": 1})
                for case, patch in (("malformed", [{"op": "move", "path": "/a"}]),
                                    ("failed test", [{"op": "test", "path": "/size", "value": 99}])):
                    with pytest.raises(fabrica.ValidationError) as info:
                        client.patch("Widget", "w1", patch, type="json")
                    assert info.value.status == 422
                    errors[where, case] = type(info.value).__name__
        assert errors["local", "malformed"] == errors["http", "malformed"], errors
        assert errors["local", "failed test"] == errors["http", "failed test"], errors

    def test_list_follows_continue(self, server, monkeypatch):
        client = fabrica.Client(server.url)
        for i in range(30):
            client.create("Widget", name=f"w{i:02d}", labels={"half": "ab"[i % 2]})
        status, headers, page = server.request("GET", "/widgets?limit=7")
        assert status == 200 and len(page) == 7 and headers["X-Continue"] and headers["X-Total-Count"] == "30"

        paths = []
        request = client.request

        def small_pages(method, path, *args, **kwargs):
            if method == "GET" and path.startswith("/widgets?"):
                if small_pages.rewrite:     # the server pages at 7 instead of the client's page size
                    path = re.sub(r"limit=\d+", "limit=7", path) if "limit=" in path else path + "&limit=7"
                paths.append(path)
            return request(method, path, *args, **kwargs)
        small_pages.rewrite = True
        monkeypatch.setattr(client, "request", small_pages)
        assert names(client.list("Widget")) == [f"w{i:02d}" for i in range(30)]
        assert len(paths) == 5 and all("continue=" in p for p in paths[1:]), paths
        paths.clear()
        assert names(client.list("Widget", selector="half=a")) == [f"w{i:02d}" for i in range(0, 30, 2)]
        assert len(paths) == 3 and all("labelSelector=half%3Da" in p for p in paths), paths
        paths.clear()
        small_pages.rewrite = False
        assert names(client.list("Widget", limit=4)) == ["w00", "w01", "w02", "w03"]
        assert len(paths) == 1, "an explicit limit is one page"

    def test_unreachable_server(self):
        client = fabrica.Client("http://127.0.0.1:1", timeout=5)
        with pytest.raises(fabrica.ConnectionFailedError) as info:
            client.get("Widget", "w1")
        assert isinstance(info.value, fabrica.FabricaError) and "127.0.0.1:1" in str(info.value)


class Proxy:
    """A TCP proxy to the server whose connections the test can cut (a dropped watch) or refuse (paused)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.paused = False
        self.heads: list[bytearray] = []        # the first bytes each client sent (its request head)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()           # guards _pairs and heads
        self._closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.paused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            head = bytearray()
            with self._lock:
                self._pairs.append((client, upstream))
                self.heads.append(head)
            threading.Thread(target=self._pump, args=(client, upstream, head), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src, dst, head):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if head is not None and len(head) < 8192:
                    head += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self):
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self):
        self._closed.set()
        self.cut()
        self.listener.close()


class Watcher:
    """Runs ``Client.watch`` in a thread; events (or the exception that ended it) arrive on a queue."""

    def __init__(self, iterator):
        self.items: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self.thread.start()

    def _run(self, iterator):
        try:
            for event in iterator:
                self.items.put(event)
                if self.stopping.is_set():
                    break
        except BaseException as exc:    # handed to the test thread
            self.items.put(exc)

    def take(self, n: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            try:
                item = self.items.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {len(out)} of {n} events arrived within {timeout}s") from None
            if isinstance(item, BaseException):
                raise item
            out.append(item)
        return out

    def error(self, timeout: float = 5.0) -> BaseException:
        try:
            item = self.items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the watch did not fail within {timeout}s") from None
        assert isinstance(item, BaseException), f"an event instead of an error: {item.get('type')}"
        return item


def positions(events) -> list[str]:
    return [e["sequence"] if "sequence" in e else e["resourceversion"] for e in events]


class TestWatch:
    def test_watch_from_now(self, server):
        client = fabrica.Client(server.url)
        watcher = Watcher(client.watch("io.fabrica.widget.*"))
        n = 0

        def connected():       # the watch starts with the next event: write until one arrives
            nonlocal n
            client.create("Widget", name=f"probe{n}")
            n += 1
            return not watcher.items.empty()
        assert wait_until(connected, 10, interval=0.05), "the watch never received an event"
        first = watcher.take(1)[0]
        assert first["type"] == "io.fabrica.widget.created" and first["specversion"] == "1.0"
        watcher.take(n - 1 - int(first["data"]["resourceName"][5:]))        # the probes after the first seen
        client.create("Gadget", name="g1", spec={"size": 1})            # filtered out by the pattern
        w = client.create("Widget", name="w1")
        client.patch("Widget", "w1", {"a": 1})
        got = watcher.take(2)
        assert [(e["type"], e["data"]["resourceName"]) for e in got] == [
            ("io.fabrica.widget.created", "w1"), ("io.fabrica.widget.patched", "w1")]
        assert got[0]["data"]["resource"]["metadata"]["uid"] == w.uid
        watcher.stopping.set()
        client.create("Widget", name="last")

    def test_resume_with_since_in_a_fresh_iterator(self, server):
        client = fabrica.Client(server.url)
        base = client.create("Widget", name="base")["metadata"]["resourceVersion"]
        for i in range(6):
            client.create("Widget", name=f"w{i}")
        first = Watcher(client.watch("**", since=base, reconnect=False))
        three = first.take(3)
        assert positions(three) == [str(int(base) + i) for i in (1, 2, 3)]
        first.stopping.set()
        second = Watcher(client.watch("**", since=three[-1]["sequence"], reconnect=False))
        assert positions(second.take(3)) == [str(int(base) + i) for i in (4, 5, 6)]
        client.update_status("Widget", "w0", {"conditions": [{"type": "Ready", "status": "True"}]})
        rv = client.create("Widget", name="w9")["metadata"]["resourceVersion"]
        got = second.take(3)
        cond = got[1]["sequence"]
        assert re.fullmatch(r"\d+\.1", cond) and got[1]["type"] == "io.fabrica.condition.ready"
        assert positions(got)[2] == rv
        third = Watcher(client.watch("**", since=cond, reconnect=False))    # resume from a "<rv>.<n>" id
        assert positions(third.take(1)) == [rv]
        for watcher in (second, third):
            watcher.stopping.set()
        client.create("Widget", name="last")

    def test_reconnects_after_a_dropped_connection(self, server):
        proxy = Proxy(server.port)
        try:
            client = fabrica.Client(server.url)
            base = client.create("Widget", name="base")["metadata"]["resourceVersion"]
            watcher = Watcher(fabrica.Client(f"http://127.0.0.1:{proxy.port}").watch("**", since=base))
            for i in range(3):
                client.create("Widget", name=f"w{i}")
            seen = watcher.take(3)
            proxy.cut()                             # the connection drops mid-stream
            for i in range(3, 6):
                client.create("Widget", name=f"w{i}")
            seen += watcher.take(3)
            assert positions(seen) == [str(int(base) + i) for i in range(1, 7)], "a gap or a duplicate"
            assert len(proxy.heads) >= 2, "the watch did not reconnect"
            resumed = bytes(proxy.heads[1]).decode("latin-1")
            assert re.search(rf"(?im)^last-event-id: {seen[2]['sequence']}\r$", resumed), resumed
            watcher.stopping.set()
            client.create("Widget", name="last")
        finally:
            proxy.close()

    def test_resume_across_a_restart_is_gone(self, tmp_path, servers):
        app_file, data = write_app(tmp_path), tmp_path / "data"
        first = servers(app_file, data)
        proxy = Proxy(first.port)
        try:
            client = fabrica.Client(first.url)
            base = client.create("Widget", name="base")["metadata"]["resourceVersion"]
            watcher = Watcher(fabrica.Client(f"http://127.0.0.1:{proxy.port}").watch("**", since=base))
            client.create("Widget", name="w1")
            seen = watcher.take(1)
            proxy.paused = True                     # the watcher is cut off ...
            proxy.cut()
            client.create("Widget", name="w2")      # ... misses this one ...
            first.proc.send_signal(signal.SIGKILL)  # ... and the server dies
            first.proc.wait(5)
            second = servers(app_file, data)
            proxy.upstream_port = second.port
            proxy.paused = False
            err = watcher.error(10)
            assert type(err) is fabrica.GoneError and err.status == 410, repr(err)
            assert positions(seen) == [str(int(base) + 1)]

            fresh = fabrica.Client(second.url)
            with pytest.raises(fabrica.GoneError):
                next(fresh.watch("**", since=seen[0]["sequence"], reconnect=False))
            assert {o["metadata"]["name"] for o in fresh.list("Widget")} == {"base", "w1", "w2"}
        finally:
            proxy.close()


###############################################################################
# CLI (SPEC §7)
###############################################################################

def run_cli(*args, server: str | None = None, env: dict | None = None, stdin: str | None = None,
            timeout: float = 20.0) -> subprocess.CompletedProcess:
    """``python fabrica.py [--server URL] ARGS``, stdout piped; never a traceback."""
    cmd = [sys.executable, str(FABRICA_PY), *(["--server", server] if server else []), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
    full_env.update(env or {})
    result = subprocess.run(cmd, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="class")
def cli_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    server = Server(write_app(tmp, name="cli_app"), tmp / "data").start()
    yield server
    server.kill()


class TestCLI:
    @pytest.fixture(autouse=True)
    def _bind(self, cli_server):
        self.server = cli_server

    def cli(self, *args, ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = run_cli(*args, server=self.server.url, **kwargs)
        if ok:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def js(self, *args, **kwargs):
        return json.loads(self.cli(*args, **kwargs).stdout)

    def test_kinds_and_formats(self):
        kinds = self.js("kinds")        # piped: JSON by default
        assert {k["kind"]: k["plural"] for k in kinds} == {"Widget": "widgets", "Gadget": "gadgets"}
        table = self.cli("-o", "table", "kinds").stdout.splitlines()
        assert table[0].split() == ["KIND", "PLURAL", "PREFIX", "CONTROLLER", "HISTORY"]
        assert any(line.split()[:2] == ["Widget", "widgets"] for line in table[1:])
        yaml = pytest.importorskip("yaml")
        assert yaml.safe_load(self.cli("-o", "yaml", "kinds").stdout) == kinds

    def test_create_list_get(self, tmp_path):
        # every object of this test carries suite=c, so the class's shared server may hold others
        w1 = self.js("widget", "create", "--spec", '{"name": "c1", "labels": {"env": "prod", "suite": "c"}, "size": 1}')
        assert w1["metadata"]["name"] == "c1" and w1["spec"] == {"size": 1} and w1["metadata"]["labels"] == {
            "env": "prod", "suite": "c"}
        body = tmp_path / "c2.json"
        body.write_text('{"metadata": {"name": "c2", "labels": {"env": "dev", "suite": "c"}}, "spec": {"size": 2}}')
        assert self.js("widgets", "create", "-f", str(body))["spec"] == {"size": 2}
        made = self.js("WIDGET", "create", stdin='{"name": "c3", "labels": {"suite": "c"}, "size": 3}')
        assert made["metadata"]["name"] == "c3" and made["spec"] == {"size": 3}
        bad = self.cli("widget", "create", "--spec", "{bad", ok=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--spec" in bad.stderr

        names_out = {k: self.cli("-o", "name", k, "list", "-l", "suite=c").stdout
                     for k in ("Widget", "widgets", "WIDGET", "widget")}
        assert set(names_out.values()) == {"widget/c1\nwidget/c2\nwidget/c3\n"}, names_out
        listed = self.js("widget", "list", "-l", "suite=c")      # piped: JSON by default
        assert [o["metadata"]["name"] for o in listed] == ["c1", "c2", "c3"]
        assert self.cli("-o", "name", "widget", "list", "-l", "env=prod").stdout == "widget/c1\n"
        assert self.cli("-o", "name", "widget", "list", "-l", "env").stdout == "widget/c1\nwidget/c2\n"
        assert self.cli("-o", "name", "widget", "list", "-l", "suite=c", "--limit", "2").stdout == \
            "widget/c1\nwidget/c2\n"
        assert self.js("widget", "get", "c1") == self.js("widget", "get", w1["metadata"]["uid"])
        assert self.cli("widget", "get", "c1", "-o", "name").stdout == "widget/c1\n"    # flags anywhere

        table = self.cli("-o", "table", "widget", "list", "-l", "suite=c").stdout.rstrip("\n").split("\n")
        assert table[0].split() == ["NAME", "UID", "READY", "AGE"]
        starts = [table[0].index(col) for col in ("NAME", "UID", "READY", "AGE")]
        for line, obj in zip(table[1:], listed):
            fields = line.split()
            assert fields[:3] == [obj["metadata"]["name"], obj["metadata"]["uid"], "-"], line
            assert re.fullmatch(r"\d+[smhd]", fields[3]), line
            assert [line.index(f, s) for f, s in zip(fields, starts)] == starts, f"columns not aligned:\n{table}"
        self.cli("widget", "status", "c2", "--spec", '{"conditions": [{"type": "Ready", "status": "True"}]}')
        table = self.cli("-o", "table", "widget", "list", "-l", "suite=c").stdout.splitlines()
        assert [line.split()[2] for line in table[1:]] == ["-", "True", "-"]
        self.cli("widget", "status", "c3", "--set", "phase=Ready")
        table = self.cli("-o", "table", "widget", "list", "-l", "suite=c").stdout.splitlines()
        assert table[0].split() == ["NAME", "UID", "PHASE", "AGE"]
        assert [line.split()[2] for line in table[1:]] == ["-", "-", "Ready"]
        assert self.cli("-o", "table", "gadget", "list", "-l", "suite=none").stdout.strip() == "No resources found."

    def test_update_and_patch(self):
        self.cli("widget", "create", "--spec", '{"name": "p1", "size": 1, "keep": true}')
        assert self.js("widget", "update", "p1", "--spec", '{"size": 9}')["spec"] == {"size": 9}
        assert self.js("widget", "patch", "p1", "--spec", '{"color": "blue"}')["spec"] == {"size": 9,
                                                                                          "color": "blue"}
        obj = self.js("widget", "patch", "p1", "--json-patch", '[{"op": "remove", "path": "/color"}]')
        assert obj["spec"] == {"size": 9}
        obj = self.js("widget", "patch", "p1", "--set", "a.b=1", "--set", "s=text", "--set", "t=true",
                      "--set", "l=[1,2]", "--set", 'q="9"')
        assert obj["spec"] == {"size": 9, "a": {"b": 1}, "s": "text", "t": True, "l": [1, 2], "q": "9"}
        obj = self.js("widget", "patch", "p1", "--unset", "a", "--unset", "l")
        assert obj["spec"] == {"size": 9, "s": "text", "t": True, "q": "9"} and obj["metadata"]["generation"] == 6
        for args in (["widget", "patch", "p1"], ["widget", "patch", "p1", "--spec", "{}", "--set", "a=1"],
                     ["widget", "patch", "p1", "--json-patch", "[oops"]):
            result = self.cli(*args, ok=False)
            assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        result = self.cli("widget", "patch", "p1", "--json-patch", '[{"op": "test", "path": "/size", "value": 1}]',
                          ok=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1

    def test_status(self):
        self.cli("widget", "create", "--spec", '{"name": "s1"}')
        assert self.js("widget", "status", "s1") == {"version": "1"}
        obj = self.js("widget", "status", "s1", "--set", "phase=Ready", "--set", "count=2")
        assert obj["status"] == {"version": "1", "phase": "Ready", "count": 2} and obj["metadata"]["generation"] == 1
        obj = self.js("widget", "status", "s1", "--spec", '{"phase": "Off"}')
        assert obj["status"]["phase"] == "Off" and "count" not in obj["status"]
        assert self.js("-o", "table", "widget", "status", "s1")["phase"] == "Off"
        assert self.js("widget", "status", "s1", "--unset", "phase")["status"] == {"version": "1"}

    def test_versions(self):
        self.cli("widget", "create", "--spec", '{"name": "v1", "size": 1}')
        self.cli("widget", "patch", "v1", "--set", "size=2")
        versions = self.js("widget", "versions", "v1")
        assert [(v["versionId"], v["spec"]) for v in versions] == [("1", {"size": 1}), ("2", {"size": 2})]
        table = self.cli("-o", "table", "widget", "versions", "v1").stdout.splitlines()
        assert table[0].split() == ["VERSION", "CREATED", "NAME"] and [r.split()[0] for r in table[1:]] == ["1", "2"]
        assert self.js("widget", "versions", "v1", "get", "1")["spec"] == {"size": 1}
        restored = self.js("widget", "versions", "v1", "restore", "1")
        assert restored["spec"] == {"size": 1} and restored["metadata"]["generation"] == 3
        self.cli("widget", "versions", "v1", "delete", "1")
        assert [v["versionId"] for v in self.js("widget", "versions", "v1")] == ["2", "3"]
        missing = self.cli("widget", "versions", "v1", "get", "1", ok=False)
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1
        assert self.cli("widget", "versions", "v1", "get", ok=False).returncode == 2
        assert self.cli("gadget", "create", "--spec", '{"name": "gv", "size": 1}').returncode == 0
        assert self.cli("gadget", "versions", "gv", ok=False).returncode == 1     # no history for Gadget

    def test_delete(self):
        self.cli("widget", "create", "--spec", '{"name": "d1"}')
        assert self.cli("widget", "delete", "d1").returncode == 0
        assert self.cli("widget", "get", "d1", ok=False).returncode == 1
        self.cli("widget", "create", "--spec", '{"metadata": {"name": "d2", "finalizers": ["example.com/hold"]}}')
        pending = self.js("widget", "delete", "d2")         # a 202 is success too
        assert pending["metadata"]["deletionTimestamp"] and pending["metadata"]["finalizers"] == ["example.com/hold"]
        text = self.cli("-o", "table", "widget", "delete", "d2").stdout
        assert "example.com/hold" in text
        assert self.js("widget", "get", "d2")["metadata"]["deletionTimestamp"]
        self.cli("widget", "delete", "d2", "--force")
        assert self.cli("widget", "get", "d2", ok=False).returncode == 1

    def test_delete_json_names_the_uid(self):
        uid = self.js("widget", "create", "--spec", '{"name": "d3"}')["metadata"]["uid"]
        assert self.js("widget", "delete", "d3")["uid"] == uid

    def test_watch_and_events(self):
        watch = subprocess.Popen([sys.executable, str(FABRICA_PY), "--server", self.server.url, "-o", "table",
                                  "widget", "watch"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        events = subprocess.Popen([sys.executable, str(FABRICA_PY), "--server", self.server.url,
                                   "events", "--type", "io.fabrica.gadget.*"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.cli("widget", "create", "--spec", '{"name": "wref"}')
        one = subprocess.Popen([sys.executable, str(FABRICA_PY), "--server", self.server.url, "-o", "table",
                                "widget", "watch", "wref"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        lines: dict[str, queue.Queue] = {"watch": queue.Queue(), "events": queue.Queue(), "one": queue.Queue()}
        for name, proc in (("watch", watch), ("events", events), ("one", one)):
            threading.Thread(target=lambda p=proc, q=lines[name]: [q.put(line) for line in p.stdout],
                             daemon=True).start()
        client = fabrica.Client(self.server.url)
        try:
            n = 0

            def both_connected():       # the streams start with the next event: write until both print
                nonlocal n
                client.create("Gadget", name=f"wg{n}", spec={"size": n})
                client.create("Widget", name=f"ww{n}")
                client.patch("Widget", "wref", {"n": n})
                n += 1
                return all(not q.empty() for q in lines.values())
            assert wait_until(both_connected, 15, interval=0.1), (watch.poll(), events.poll())
            line = lines["watch"].get(timeout=5)
            assert re.fullmatch(r"io\.fabrica\.widget\.(created|patched)\s+(ww\d+|wref)\s+rv=\d+\n", line), line
            text = ""
            decoder = json.JSONDecoder()
            while True:             # piped: one JSON document per event (possibly over several lines)
                text += lines["events"].get(timeout=5)
                try:
                    event, _ = decoder.raw_decode(text.strip())
                    break
                except ValueError:
                    continue
            assert event["type"] == "io.fabrica.gadget.created" and event["specversion"] == "1.0"
            line = lines["one"].get(timeout=5)      # watch REF: only that object's events
            assert re.fullmatch(r"io\.fabrica\.widget\.patched\s+wref\s+rv=\d+\n", line), line
            client.create("Widget", name="other")
            client.patch("Widget", "wref", {"n": "last"})
            while True:
                line = lines["one"].get(timeout=5)
                assert " wref " in line, line
                rv = client.get("Widget", "wref")["metadata"]["resourceVersion"]
                if line.rstrip().endswith(f"rv={rv}"):
                    break
        finally:
            for proc in (watch, events, one):
                proc.kill()
                proc.wait(5)
        for proc in (watch, events, one):
            assert "Traceback" not in proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()

    def test_errors(self):
        missing = self.cli("widget", "get", "w9", ok=False)
        assert missing.returncode == 1 and missing.stdout == ""
        assert missing.stderr.count("\n") == 1 and re.search(r'"w9" not found', missing.stderr), missing.stderr
        assert self.cli("widget", "frob", ok=False).returncode == 2
        assert self.cli("widget", ok=False).returncode == 2
        assert self.cli("-o", "xml", "widget", "list", ok=False).returncode == 2
        unknown = self.cli("nope", "list", ok=False)      # neither a command nor a kind (issue 14): usage
        assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
        assert unknown.stderr.startswith("fabrica: unknown command 'nope'")
        refused = run_cli("widget", "list", server="http://127.0.0.1:1")
        assert refused.returncode == 3 and refused.stdout == ""
        assert refused.stderr == ("fabrica: cannot connect to http://127.0.0.1:1: is the server running? "
                                  "(python fabrica.py serve; FABRICA_SERVER or --server URL points elsewhere)\n")
        via_env = run_cli("-o", "name", "widget", "list", env={"FABRICA_SERVER": self.server.url})
        assert via_env.returncode == 0 and via_env.stdout.startswith("widget/"), via_env.stderr
        refused = run_cli("kinds", env={"FABRICA_SERVER": "http://127.0.0.1:1"})
        assert refused.returncode == 3 and "http://127.0.0.1:1" in refused.stderr

    def test_global_flags_without_a_command(self):
        result = subprocess.run([sys.executable, str(FABRICA_PY), "--server", self.server.url],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr

    def test_create_dash_reads_stdin(self):
        result = self.cli("widget", "create", "-", stdin='{"name": "dash"}', ok=False)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["metadata"]["name"] == "dash"

    def test_yaml_objects(self):
        yaml = pytest.importorskip("yaml")
        self.cli("widget", "create", "--spec", '{"name": "y1", "size": 1}')
        obj = yaml.safe_load(self.cli("-o", "yaml", "widget", "get", "y1", ok=False).stdout)
        assert obj == self.js("widget", "get", "y1")
        items = yaml.safe_load(self.cli("-o", "yaml", "widget", "list", ok=False).stdout)
        assert items == self.js("widget", "list")


class TestCLIToken:
    def test_token(self, tmp_path, servers):
        server = servers(write_app(tmp_path), tmp_path / "data", "--token", "s3cret")
        denied = run_cli("widget", "list", server=server.url)
        assert denied.returncode == 1 and denied.stderr.count("\n") == 1, denied.stderr
        assert "token" in denied.stderr.lower()
        wrong = run_cli("--token", "nope", "kinds", server=server.url)
        assert wrong.returncode == 1
        ok = run_cli("--token", "s3cret", "widget", "create", "--spec", '{"name": "t1"}', server=server.url)
        assert ok.returncode == 0, ok.stderr
        via_env = run_cli("-o", "name", "widget", "list", server=server.url, env={"FABRICA_TOKEN": "s3cret"})
        assert via_env.returncode == 0 and via_env.stdout == "widget/t1\n", via_env.stderr
        assert fabrica.Client(server.url, token="s3cret").get("Widget", "t1").name == "t1"
        with pytest.raises(fabrica.UnauthorizedError) as info:
            fabrica.Client(server.url).get("Widget", "t1")
        assert info.value.status == 401
