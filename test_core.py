"""Core guarantees of fabrica.py: resource model, stores, recovery, I/O faults, locks, HTTP hardening.

Classes follow fabrica.py's section order (Resources, Stores, REST API, HTTP
server, CLI) so a failure points to a banner. In-process REST tests call
``app.wsgi`` directly; the crash, lock, concurrency and bad-input tests run
``python fabrica.py serve`` as a real subprocess on port 0. Every wait polls
a condition with a timeout; the only bare sleep is the randomised delay
before a SIGKILL.

Stdlib + pytest + hypothesis only.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import http.client
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fabrica

ROOT = Path(__file__).resolve().parent
FABRICA_PY = ROOT / "fabrica.py"
MIB = 1 << 20
ENVELOPE_KEYS = ["apiVersion", "kind", "schemaVersion", "metadata", "spec", "status"]
METADATA_KEYS = ["name", "uid", "labels", "annotations", "createdAt", "updatedAt", "generation",
                 "resourceVersion", "finalizers", "ownerReferences", "deletionTimestamp"]
RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


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


def call(app, method: str, path: str, body=None, headers=None, ctype: str | None = "application/json"):
    """One in-process request through ``app.wsgi``: (status, headers with lower-case names, JSON or None).

    ``body`` may be bytes (sent as is), str (UTF-8) or anything JSON-serialisable.
    """
    environ: dict = {}
    setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    if body is None:
        raw = b""
    elif isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode("utf-8")
    else:
        raw = json.dumps(body).encode("utf-8")
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                    "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw))})
    if ctype is not None and body is not None:
        environ["CONTENT_TYPE"] = ctype
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status[:3])
        seen["headers"] = {k.lower(): v for k, v in response_headers}

    result = app.wsgi(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    assert b"Traceback" not in data, data
    return seen["status"], seen["headers"], (json.loads(data) if data else None)


def assert_error(status, body, expected):
    """An error answer: the exact status and a JSON body with a string ``error`` and ``code``."""
    assert status == expected, body
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert body.get("code") == expected, body


def data_files(data_dir, pattern="*.json"):
    return sorted(p for p in Path(data_dir).rglob(pattern) if ".fabrica" not in p.parts)


def temp_files(data_dir):
    return sorted(p for p in Path(data_dir).rglob(".tmp-*"))


def make_app(data_dir, **options) -> fabrica.Fabrica:
    app = fabrica.Fabrica(data_dir=str(data_dir), **options)
    app.register("Rack")
    app.register("Chassis", prefix="ch")
    return app


@pytest.fixture
def app(tmp_path):
    application = make_app(tmp_path / "data")
    with application:
        yield application


class EventLog:
    """Collects every event of an app; ``barrier()`` proves all earlier events were delivered."""

    def __init__(self, app):
        self.app = app
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.sub = app.subscribe("io.fabrica.**", self._on_event)

    def _on_event(self, event):
        with self._lock:
            self.events.append(event)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.events)

    def barrier(self, kind="Rack"):
        """Write a marker object and wait for its event: every event published before it has arrived."""
        marker = self.app.client.create(kind, spec={"marker": True})
        rv = marker["metadata"]["resourceVersion"]
        assert wait_until(lambda: any(e["resourceversion"] == rv for e in self.snapshot()), 5), \
            "the marker event never arrived"
        self.app.client.delete(kind, marker.uid)
        return rv

    def for_uid(self, uid) -> list[dict]:
        """The resource events (not condition events) of one object, in delivery order."""
        return [e for e in self.snapshot() if e.get("resourceuid") == uid and "action" in e]


class Server:
    """``python fabrica.py serve`` as a subprocess on port 0; the port is read from its log."""

    def __init__(self, data_dir, *args: str):
        self.data_dir = str(data_dir)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.port = None
        self.lines: list[str] = []

    def start(self, timeout: float = 10.0) -> Server:
        self.lines = []
        self.port = None
        found = threading.Event()
        cmd = [sys.executable, str(FABRICA_PY), "serve", "--data-dir", self.data_dir, "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")

        def pump(stream, lines):
            for line in stream:
                lines.append(line)
                match = re.search(r"listening on http://\S+?:(\d+)", line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    found.set()
            found.set()     # EOF: the process is gone
        threading.Thread(target=pump, args=(self.proc.stderr, self.lines), daemon=True).start()
        found.wait(timeout)
        if self.port is None:
            self.kill()
            pytest.fail(f"server did not start within {timeout}s:\n{self.log()}")
        return self

    def log(self) -> str:
        return "".join(self.lines)

    def connection(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout: float = 5.0):
        """One request on a fresh connection: (status, headers, JSON or None)."""
        conn = self.connection(timeout)
        try:
            return http_call(conn, method, path, body, headers)
        finally:
            conn.close()

    def signal(self, signum):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def http_call(conn, method, path, body=None, headers=None):
    """A request on an http.client connection (kept open): (status, headers, JSON or None)."""
    headers = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=headers)
    res = conn.getresponse()
    data = res.read()
    assert b"Traceback" not in data, data
    return res.status, res.headers, (json.loads(data) if data else None)


@pytest.fixture
def servers():
    """Start servers with ``servers(data_dir, *args)``; every one still running is killed at teardown."""
    started: list[Server] = []

    def start(data_dir, *args):
        server = Server(data_dir, *args).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.kill()


def raw_request(port: int, data: bytes, *, method: str = "GET", timeout: float = 5.0):
    """Send raw bytes on a new socket and parse one response: (status, headers, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        res = http.client.HTTPResponse(sock, method=method)
        res.begin()
        return res.status, res.headers, res.read()


def build_request(port, method, path, body: bytes | None = None, headers=None, *,
                  ctype: str | None = "application/json", host: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    if body is not None:
        if ctype is not None:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


###############################################################################
# Resources
###############################################################################

class TestResourceModel:
    def test_envelope_key_order_and_times(self, app):
        status, headers, obj = call(app, "POST", "/racks", {"name": "rack-01", "labels": {"env": "prod"},
                                                            "location": "dc1"})
        assert status == 201, obj
        for got in (obj, call(app, "GET", "/racks/rack-01")[2], app.client.get("Rack", "rack-01")):
            assert list(got) == ENVELOPE_KEYS
            assert list(got["metadata"]) == METADATA_KEYS
            meta = got["metadata"]
            assert RFC3339_Z.fullmatch(meta["createdAt"]) and RFC3339_Z.fullmatch(meta["updatedAt"])
            assert meta["generation"] == 1 and meta["deletionTimestamp"] is None
            assert isinstance(meta["resourceVersion"], str) and meta["resourceVersion"].isdigit()
            assert got["apiVersion"] == "v1" and got["kind"] == "Rack" and got["schemaVersion"] == "v1"
            assert got["spec"] == {"location": "dc1"} and got["status"] == {}
            assert meta["labels"] == {"env": "prod"}

    def test_uid_format_and_name_defaults_to_uid(self, app):
        seen = set()
        for _ in range(20):
            status, _, obj = call(app, "POST", "/racks", {"size": 1})
            assert status == 201, obj
            uid = obj["metadata"]["uid"]
            assert re.fullmatch(r"rack-[0-9a-f]{8}", uid), uid
            assert obj["metadata"]["name"] == uid
            seen.add(uid)
        assert len(seen) == 20
        status, _, obj = call(app, "POST", "/chassis", {"name": "c1"})
        assert status == 201, obj
        assert re.fullmatch(r"ch-[0-9a-f]{8}", obj["metadata"]["uid"])

    def test_names_are_unique_per_kind(self, app):
        assert call(app, "POST", "/racks", {"name": "dup"})[0] == 201
        status, _, body = call(app, "POST", "/racks", {"name": "dup", "other": True})
        assert_error(status, body, 409)
        status, _, body = call(app, "POST", "/racks", {"metadata": {"name": "dup"}, "spec": {}})
        assert_error(status, body, 409)
        assert len(call(app, "GET", "/racks")[2]) == 1
        assert call(app, "POST", "/chassis", {"name": "dup"})[0] == 201     # another kind: fine

    def test_generation_bumps_only_on_spec_changes(self, app):
        obj = call(app, "POST", "/racks", {"name": "g", "a": 1})[2]
        assert obj["metadata"]["generation"] == 1
        rv = int(obj["metadata"]["resourceVersion"])

        status, _, obj = call(app, "PUT", "/racks/g", {"labels": {"x": "y"}, "a": 1})
        assert status == 200 and obj["metadata"]["generation"] == 1, obj
        assert int(obj["metadata"]["resourceVersion"]) > rv and obj["metadata"]["labels"] == {"x": "y"}
        rv = int(obj["metadata"]["resourceVersion"])

        status, _, obj = call(app, "PUT", "/racks/g/status", {"phase": "Ready"})
        assert status == 200 and obj["metadata"]["generation"] == 1, obj
        assert obj["status"] == {"phase": "Ready"} and int(obj["metadata"]["resourceVersion"]) > rv

        status, _, obj = call(app, "PUT", "/racks/g", {"a": 2})
        assert status == 200 and obj["metadata"]["generation"] == 2, obj
        assert obj["status"] == {"phase": "Ready"}      # a spec write keeps the status

        status, _, obj = call(app, "PATCH", "/racks/g", {"b": 3}, ctype="application/merge-patch+json")
        assert status == 200 and obj["metadata"]["generation"] == 3 and obj["spec"] == {"a": 2, "b": 3}, obj

        body = {"metadata": {"annotations": {"n": "v"}}, "spec": {"a": 2, "b": 3}}
        status, _, obj = call(app, "PUT", "/racks/g", body)
        assert status == 200 and obj["metadata"]["generation"] == 3 and obj["metadata"]["annotations"] == {"n": "v"}

    def test_resource_version_strictly_increases_store_wide(self, app):
        rvs = []

        def rv_of(answer):
            status, _, obj = answer
            assert status in (200, 201), obj
            rvs.append(int(obj["metadata"]["resourceVersion"]))
        rv_of(call(app, "POST", "/racks", {"name": "a"}))
        rv_of(call(app, "POST", "/chassis", {"name": "a"}))
        rv_of(call(app, "PUT", "/racks/a", {"x": 1}))
        rv_of(call(app, "PUT", "/chassis/a/status", {"phase": "x"}))
        rv_of(call(app, "PATCH", "/racks/a", {"y": 2}))
        rv_of(call(app, "PUT", "/racks/a", {"metadata": {"labels": {"k": "v"}}}))
        status, _, body = call(app, "DELETE", "/chassis/a")
        assert status == 200 and body["uid"].startswith("ch-"), body
        rvs.append(app.store.resource_version)
        rv_of(call(app, "POST", "/chassis", {"name": "a"}))
        assert all(b > a for a, b in zip(rvs, rvs[1:])), rvs
        assert app.store.resource_version == rvs[-1]

    def test_resource_version_never_reused_across_delete_and_restart(self, tmp_path):
        data = tmp_path / "data"
        first = make_app(data)
        with first:
            old = call(first, "POST", "/racks", {"name": "x", "v": 1})[2]
            old_etag = '"' + old["metadata"]["resourceVersion"] + '"'
            assert call(first, "DELETE", "/racks/x")[0] == 200
            highest = first.store.resource_version
            assert highest > int(old["metadata"]["resourceVersion"])
        second = make_app(data)
        with second:
            assert call(second, "GET", "/racks/x")[0] == 404
            status, headers, new = call(second, "POST", "/racks", {"name": "x", "v": 2})
            assert status == 201, new
            assert int(new["metadata"]["resourceVersion"]) > highest
            assert headers["etag"] != old_etag
            # ABA: the pre-delete ETag must not match the re-created object
            status, _, body = call(second, "PUT", "/racks/x", {"v": 3}, headers={"If-Match": old_etag})
            assert_error(status, body, 412)

    def test_server_managed_fields_in_a_body_are_ignored(self, app):
        forged = {"uid": "rack-deadbeef", "createdAt": "2000-01-01T00:00:00Z", "updatedAt": "2000-01-01T00:00:00Z",
                  "generation": 42, "resourceVersion": "999999", "deletionTimestamp": "2000-01-01T00:00:00Z"}
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "m", **forged}, "spec": {"a": 1}})
        assert status == 201, obj
        meta = obj["metadata"]
        assert meta["uid"] != "rack-deadbeef" and re.fullmatch(r"rack-[0-9a-f]{8}", meta["uid"])
        assert meta["createdAt"] != forged["createdAt"] and meta["updatedAt"] != forged["updatedAt"]
        assert meta["generation"] == 1 and meta["deletionTimestamp"] is None
        assert meta["resourceVersion"] != "999999"
        current = dict(meta)

        forged.pop("resourceVersion")       # a stale one is a 409, tested in TestConcurrencyHeaders
        status, _, obj = call(app, "PUT", "/racks/m", {"metadata": {"name": "m", **forged}, "spec": {"a": 2}})
        assert status == 200, obj
        meta = obj["metadata"]
        assert meta["uid"] == current["uid"] and meta["createdAt"] == current["createdAt"]
        assert meta["generation"] == 2 and meta["deletionTimestamp"] is None
        assert meta["updatedAt"] != forged["updatedAt"]
        assert app.client.get("Rack", "m")["metadata"] == meta
        assert call(app, "GET", f"/racks/{current['uid']}")[0] == 200
        assert call(app, "GET", "/racks/rack-deadbeef")[0] == 404

    def test_noop_put_answers_200_same_rv_and_publishes_nothing(self, app):
        log = EventLog(app)
        obj = call(app, "POST", "/racks", {"name": "n", "labels": {"a": "b"}, "x": 1})[2]
        rv, uid = obj["metadata"]["resourceVersion"], obj["metadata"]["uid"]
        log.barrier()
        before = len(log.for_uid(uid))
        path = Path(app.store.data_dir) / "racks" / f"{uid}.json"
        stamp = (path.stat().st_ino, path.stat().st_mtime_ns)
        for body in ({"x": 1}, {"labels": {"a": "b"}, "x": 1}, {"metadata": {"labels": {"a": "b"}}, "spec": {"x": 1}}):
            status, headers, same = call(app, "PUT", "/racks/n", body)
            assert status == 200, same
            assert same["metadata"]["resourceVersion"] == rv and headers["etag"] == f'"{rv}"'
            assert same == obj
        status, _, same = call(app, "PUT", "/racks/n/status", {})
        assert status == 200 and same["metadata"]["resourceVersion"] == rv
        log.barrier()
        assert len(log.for_uid(uid)) == before, "a no-op write published an event"
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, "a no-op write touched the file"
        assert app.client.get("Rack", "n")["metadata"]["resourceVersion"] == rv

    def test_flat_and_envelope_bodies(self, app):
        status, _, body = call(app, "POST", "/racks", {"metadata": {"name": "e"}, "spec": {}, "extra": 1})
        assert_error(status, body, 422)
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "e", "labels": {"a": "1", "b": "2"}},
                                                      "spec": {"s": 1}, "status": {"phase": "Forged"}})
        assert status == 201 and obj["status"] == {} and obj["spec"] == {"s": 1}, obj
        # a flat body's status is neither a spec field nor a status write (SPEC §6.2): 422, nothing stored
        status, _, body = call(app, "POST", "/racks", {"name": "f", "status": {"phase": "Forged"}, "s": 1})
        assert_error(status, body, 422)
        assert [d["field"] for d in body["details"]] == ["status"] and "/status" in body["error"]
        assert call(app, "GET", "/racks/f")[0] == 404

        # flat PUT merges labels
        status, _, obj = call(app, "PUT", "/racks/e", {"labels": {"c": "3"}, "s": 1})
        assert status == 200 and obj["metadata"]["labels"] == {"a": "1", "b": "2", "c": "3"}, obj
        # envelope PUT replaces them (that is how a label is removed); status is ignored
        status, _, obj = call(app, "PUT", "/racks/e", {"metadata": {"labels": {"a": "1"}}, "spec": {"s": 2},
                                                       "status": {"phase": "Forged"}})
        assert status == 200 and obj["metadata"]["labels"] == {"a": "1"} and obj["status"] == {}, obj
        assert obj["spec"] == {"s": 2}
        status, _, body = call(app, "PUT", "/racks/e", {"spec": {"s": 3}, "bogus": True})
        assert_error(status, body, 422)
        assert app.client.get("Rack", "e")["spec"] == {"s": 2}
        # apiVersion/kind must match the URL
        status, _, body = call(app, "POST", "/racks", {"kind": "Chassis", "metadata": {"name": "k"}, "spec": {}})
        assert_error(status, body, 422)
        assert call(app, "POST", "/racks", {"apiVersion": "v1", "kind": "Rack", "metadata": {"name": "k"},
                                            "spec": {}})[0] == 201

    def test_location_and_etag_on_201(self, app):
        status, headers, obj = call(app, "POST", "/racks", {"name": "loc"})
        assert status == 201
        assert headers["etag"] == '"' + obj["metadata"]["resourceVersion"] + '"'
        location = headers["location"]
        assert location.endswith(f"/racks/{obj['metadata']['uid']}"), location
        status, headers, again = call(app, "GET", location[location.index("/racks/"):])
        assert status == 200 and again == obj and headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'

    def test_ref_is_a_uid_or_a_name(self, app):
        obj = call(app, "POST", "/racks", {"name": "byname", "v": 1})[2]
        uid = obj["metadata"]["uid"]
        for ref in (uid, "byname"):
            status, _, got = call(app, "GET", f"/racks/{ref}")
            assert status == 200 and got["metadata"]["uid"] == uid
            status, headers, got = call(app, "GET", f"/racks/{ref}/status")
            assert status == 200 and got == {} and headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert call(app, "PUT", f"/racks/{uid}", {"v": 2})[2]["spec"] == {"v": 2}
        assert call(app, "PUT", "/racks/byname", {"v": 3})[2]["spec"] == {"v": 3}
        assert app.client.get("Rack", uid)["spec"] == {"v": 3} == app.client.get("Rack", "byname")["spec"]
        # a uid-shaped name is still a name
        status, _, other = call(app, "POST", "/racks", {"name": "rack-0000abcd"})
        assert status == 201 and other["metadata"]["uid"] != "rack-0000abcd", other
        assert call(app, "GET", "/racks/rack-0000abcd")[2]["metadata"]["uid"] == other["metadata"]["uid"]
        assert call(app, "DELETE", "/racks/byname")[0] == 200
        assert call(app, "GET", f"/racks/{uid}")[0] == 404
        assert call(app, "GET", "/racks/byname")[0] == 404

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=st.one_of(
        st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True),
        st.text(alphabet="aZ09-._/é\n %", max_size=12),
        st.integers(min_value=250, max_value=256).map(lambda n: "a" * n)))
    def test_create_accepts_exactly_dns1123_names(self, app, name):
        status, _, body = call(app, "POST", "/racks", {"metadata": {"name": name}, "spec": {}})
        if len(name) <= 253 and NAME_RE.fullmatch(name):
            assert status == 201, body
            assert body["metadata"]["name"] == name
            assert call(app, "DELETE", f"/racks/{body['metadata']['uid']}")[0] == 200
        else:
            assert_error(status, body, 422)


###############################################################################
# Stores
###############################################################################

class _StoreMaker:
    """``maker()`` opens a store (again, on the same dir, for file stores) with kinds Rack and Chassis."""

    def __init__(self, kind: str, data_dir: Path):
        self.kind, self.data_dir = kind, data_dir
        self.opened: list = []

    def __call__(self):
        self.close()
        if self.kind == "memory":
            if self.opened:
                pytest.fail("a memory store cannot be reopened")
            store = fabrica.MemoryStore()
        else:
            store = fabrica.FileStore(str(self.data_dir), durable=self.kind == "file")
        store.open({"Rack": "racks", "Chassis": "chassis"})
        self.opened.append(store)
        return store

    def close(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=["file", "file-nofsync", "memory"])
def store_factory(request, tmp_path):
    maker = _StoreMaker(request.param, tmp_path / "store")
    yield maker
    maker.close()


@pytest.fixture(params=["file", "file-nofsync"])
def file_store_factory(request, tmp_path):
    maker = _StoreMaker(request.param, tmp_path / "store")
    yield maker
    maker.close()


def new(kind, name, uid, **spec):
    return fabrica.new_object(kind, name, uid, spec=dict(spec))


class StoreConformance:
    """The store interface, run over every store (collected as TestStoreConformance)."""

    def test_create_get_find_resolve(self, store_factory):
        store = store_factory()
        created = store.create(new("Rack", "r1", "rack-00000001", a=1))
        rv = created["metadata"]["resourceVersion"]
        assert isinstance(rv, str) and int(rv) >= 1
        assert store.resource_version == int(rv)
        assert store.get("Rack", "rack-00000001")["spec"] == {"a": 1}
        assert store.find("Rack", "r1")["metadata"]["uid"] == "rack-00000001"
        assert store.resolve("Rack", "rack-00000001")["metadata"]["name"] == "r1"
        assert store.resolve("Rack", "r1")["metadata"]["uid"] == "rack-00000001"
        assert store.get("Rack", "r1") is None and store.find("Rack", "rack-00000001") is None
        assert store.get("Chassis", "rack-00000001") is None and store.resolve("Chassis", "r1") is None
        assert store.resolve("Rack", "nope") is None

    def test_create_conflicts_on_name_and_uid(self, store_factory):
        store = store_factory()
        store.create(new("Rack", "r1", "rack-00000001"))
        with pytest.raises(fabrica.ConflictError):
            store.create(new("Rack", "r1", "rack-00000002"))
        with pytest.raises(fabrica.ConflictError):
            store.create(new("Rack", "r2", "rack-00000001"))
        store.create(new("Chassis", "r1", "chassis-00000001"))      # names are per kind
        assert [o["metadata"]["name"] for o in store.list("Rack")] == ["r1"]

    def test_replace_with_expected_rv(self, store_factory):
        store = store_factory()
        first = copy.deepcopy(store.create(new("Rack", "r1", "rack-00000001", v=1)))
        rv1 = first["metadata"]["resourceVersion"]
        second = copy.deepcopy(first)
        second["spec"] = {"v": 2}
        stored = store.replace(second, rv1)
        rv2 = stored["metadata"]["resourceVersion"]
        assert int(rv2) > int(rv1) and store.get("Rack", "rack-00000001")["spec"] == {"v": 2}
        stale = copy.deepcopy(first)
        stale["spec"] = {"v": 3}
        with pytest.raises(fabrica.StaleError):
            store.replace(stale, rv1)
        assert issubclass(fabrica.StaleError, fabrica.ConflictError)
        assert store.get("Rack", "rack-00000001")["spec"] == {"v": 2}
        assert store.resource_version == int(rv2)
        ghost = new("Rack", "ghost", "rack-0000000f")
        with pytest.raises(fabrica.NotFoundError):
            store.replace(ghost, "1")

    def test_delete_with_expected_rv(self, store_factory):
        store = store_factory()
        obj = store.create(new("Rack", "r1", "rack-00000001"))
        rv = obj["metadata"]["resourceVersion"]
        with pytest.raises(fabrica.StaleError):
            store.delete("Rack", "rack-00000001", str(int(rv) + 100))
        assert store.get("Rack", "rack-00000001") is not None
        tomb = store.delete("Rack", "rack-00000001", rv)
        assert int(tomb["metadata"]["resourceVersion"]) > int(rv)
        assert store.resource_version == int(tomb["metadata"]["resourceVersion"])
        assert store.get("Rack", "rack-00000001") is None and store.find("Rack", "r1") is None
        with pytest.raises(fabrica.NotFoundError):
            store.delete("Rack", "rack-00000001")
        store.create(new("Rack", "r1", "rack-00000002"))        # the name is free again
        assert store.find("Rack", "r1")["metadata"]["uid"] == "rack-00000002"

    def test_list_sorted_by_name_and_rv_monotonic(self, store_factory):
        store = store_factory()
        names = ["m", "a", "z.z", "b-1", "0", "b"]
        rvs = []
        for i, name in enumerate(names):
            rvs.append(int(store.create(new("Rack", name, f"rack-{i:08x}"))["metadata"]["resourceVersion"]))
            rvs.append(int(store.create(new("Chassis", name, f"chassis-{i:08x}"))["metadata"]["resourceVersion"]))
        for kind in ("Rack", "Chassis"):
            assert [o["metadata"]["name"] for o in store.list(kind)] == sorted(names)
        victim = copy.deepcopy(store.find("Rack", "m"))
        victim["status"] = {"phase": "x"}
        rvs.append(int(store.replace(victim, victim["metadata"]["resourceVersion"])["metadata"]["resourceVersion"]))
        rvs.append(int(store.delete("Chassis", "chassis-00000000")["metadata"]["resourceVersion"]))
        assert all(b > a for a, b in zip(rvs, rvs[1:])), rvs
        assert store.resource_version == rvs[-1]

    # -- file stores only -------------------------------------------------------
    def test_file_layout_is_one_pretty_json_per_resource(self, file_store_factory):
        store = file_store_factory()
        store.create(new("Rack", "r1", "rack-00000001", a={"b": [1, 2]}))
        store.create(new("Chassis", "c1", "chassis-00000001"))
        path = file_store_factory.data_dir / "racks" / "rack-00000001.json"
        text = path.read_text("utf-8")
        assert text.startswith("{\n  "), text[:40]          # pretty-printed (indented)
        doc = json.loads(text)
        assert doc == store.get("Rack", "rack-00000001")
        assert list(doc) == ENVELOPE_KEYS and list(doc["metadata"]) == METADATA_KEYS
        assert (file_store_factory.data_dir / "chassis" / "chassis-00000001.json").is_file()
        assert [p.name for p in data_files(file_store_factory.data_dir)] == \
            ["chassis-00000001.json", "rack-00000001.json"]
        assert not temp_files(file_store_factory.data_dir)

    def test_reopen_loads_the_same_objects(self, file_store_factory):
        store = file_store_factory()
        for i in range(5):
            store.create(new("Rack", f"r{i}", f"rack-{i:08x}", i=i))
        replaced = copy.deepcopy(store.find("Rack", "r2"))
        replaced["spec"] = {"i": 22}
        store.replace(replaced, replaced["metadata"]["resourceVersion"])
        store.delete("Rack", "rack-00000004")
        before = {o["metadata"]["uid"]: copy.deepcopy(o) for o in store.list("Rack")}
        rv = store.resource_version
        again = file_store_factory()
        assert {o["metadata"]["uid"]: o for o in again.list("Rack")} == before
        assert again.resource_version >= rv
        created = again.create(new("Rack", "r4", "rack-00000009"))
        assert int(created["metadata"]["resourceVersion"]) > rv


TestStoreConformance = StoreConformance    # pytest collects Test* names only


class TestStartupRecovery:
    """a3: temp files are removed; unusable files are quarantined (never deleted) and reported."""

    def test_recovery_corpus(self, tmp_path):
        data = tmp_path / "data"
        seed = make_app(data)
        with seed:
            good = call(seed, "POST", "/racks", {"name": "good", "v": 1})[2]
        racks = data / "racks"
        good_path = racks / f"{good['metadata']['uid']}.json"
        good_bytes = good_path.read_bytes()
        bad = {
            "rack-00000001.json": b"",                                  # zero bytes
            "rack-00000002.json": good_bytes[: len(good_bytes) // 2],  # truncated
            "rack-00000003.json": good_bytes,                           # name != metadata.uid
        }
        for name, content in bad.items():
            (racks / name).write_bytes(content)
        temp = racks / ".tmp-0123456789ab.part"
        temp.write_bytes(good_bytes[:10])

        app = make_app(data)
        with app:
            assert not temp.exists(), "a leftover temp file was not removed"
            for name in bad:
                assert not (racks / name).exists(), f"{name} is still in the data dir"
            quarantine = data / ".fabrica" / "quarantine"
            moved = sorted(p.read_bytes() for p in quarantine.rglob("*") if p.is_file())
            assert moved == sorted(bad.values()), "a bad file was deleted or altered instead of quarantined"

            status, _, got = call(app, "GET", "/racks/good")
            assert status == 200 and got == good
            assert [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]] == ["good"]
            assert good_path.read_bytes() == good_bytes

            status, _, health = call(app, "GET", "/health")
            assert status == 200 and health["status"] == "degraded", health
            listed = json.dumps(health["quarantined"])
            assert len(health["quarantined"]) == 3, health
            for name in bad:
                assert name in listed, (name, health["quarantined"])
            # the store keeps working after recovery
            assert call(app, "PUT", "/racks/good", {"v": 2})[0] == 200


    def test_symlink_and_wrong_kind_are_quarantined_not_followed(self, tmp_path):
        data = tmp_path / "data"
        seed = make_app(data)
        with seed:
            rack = call(seed, "POST", "/racks", {"name": "rack-a"})[2]
            chassis = call(seed, "POST", "/chassis", {"name": "ch-a"})[2]
        outside = tmp_path / "outside.json"
        outside_bytes = (data / "racks" / f"{rack['metadata']['uid']}.json").read_bytes()
        stolen = outside_bytes.replace(rack["metadata"]["uid"].encode(), b"rack-0000beef").replace(b'"rack-a"',
                                                                                                   b'"stolen"')
        outside.write_bytes(stolen)
        (data / "racks" / "rack-0000beef.json").symlink_to(outside)
        # a Chassis document in the racks directory, named after its own uid
        misplaced = data / "racks" / f"{chassis['metadata']['uid']}.json"
        misplaced.write_bytes((data / "chassis" / f"{chassis['metadata']['uid']}.json").read_bytes())

        app = make_app(data)
        with app:
            names = [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]]
            assert names == ["rack-a"], names
            assert call(app, "GET", "/racks/stolen")[0] == 404
            assert call(app, "GET", "/chassis/ch-a")[0] == 200
            assert outside.read_bytes() == stolen, "the file outside the data dir was touched"
            health = call(app, "GET", "/health")[2]
            assert health["status"] == "degraded" and len(health["quarantined"]) == 2, health
            assert not os.path.lexists(data / "racks" / "rack-0000beef.json"), "the symlink was left in place"
            assert any(os.path.islink(p) for p in (data / ".fabrica" / "quarantine").rglob("*"))
            assert not misplaced.exists()


###############################################################################
# Stores: I/O errors and the process lock
###############################################################################

class _Fault:
    """Replace ``os.<name>`` so that its ``nth`` call (and, if ``persistent``, every later one) raises."""

    def __init__(self, monkeypatch, name: str, err: int, nth: int, persistent: bool = False):
        self.real = getattr(os, name)
        self.name, self.err, self.nth, self.persistent = name, err, nth, persistent
        self.calls = 0
        self.fired = 0
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(os, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.nth or (self.persistent and self.calls > self.nth):
            self.fired += 1
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args, **kwargs)

    def remove(self):
        self.monkeypatch.setattr(os, self.name, self.real)


class TestIOErrors:
    """a4: a failed write answers 500/507, keeps the old version, publishes nothing and bumps no rv."""

    @pytest.mark.parametrize("persistent", [False, True], ids=["once", "always"])
    @pytest.mark.parametrize("first_write", [False, True], ids=["warm", "first-write-after-start"])
    @pytest.mark.parametrize("nth", [1, 2, 3, 4])
    @pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
    @pytest.mark.parametrize("target", ["fsync", "replace"])
    def test_fault_during_put(self, tmp_path, monkeypatch, target, err, nth, first_write, persistent):
        data = tmp_path / "data"
        app = make_app(data)
        app.start()
        try:
            old = call(app, "POST", "/racks", {"name": "r", "v": 1})[2]
            call(app, "POST", "/racks", {"name": "other"})
            if first_write:     # the write also has to reserve resourceVersions on disk
                app.stop()
                app = make_app(data)
                app.start()
            log = EventLog(app)
            uid = old["metadata"]["uid"]
            path = data / "racks" / f"{uid}.json"
            old_bytes = path.read_bytes()
            rv_before = app.store.resource_version

            fault = _Fault(monkeypatch, target, err, nth, persistent)
            status, headers, body = call(app, "PUT", "/racks/r", {"v": 2})
            fault.remove()

            if not fault.fired:
                assert status == 200, body
                assert body["spec"] == {"v": 2}
            else:
                assert_error(status, body, 507 if err == errno.ENOSPC else 500)
                assert "Traceback" not in body["error"]
                status, _, current = call(app, "GET", "/racks/r")
                assert status == 200 and current == old, "GET does not return the previous version"
                assert app.store.resource_version == rv_before, "a failed write moved resourceVersion"
                # also when the undo cannot be made durable: the file shows what GET serves
                assert path.read_bytes() == old_bytes, "the file does not hold the previous version"
            assert not temp_files(data), temp_files(data)

            # the fault is gone: the next write succeeds without a restart
            status, _, body = call(app, "PUT", "/racks/r", {"v": 3})
            assert status == 200, body
            assert call(app, "GET", "/racks/r")[2]["spec"] == {"v": 3}
            assert json.loads(path.read_bytes())["spec"] == {"v": 3}
            assert int(body["metadata"]["resourceVersion"]) > rv_before
            log.barrier()
            specs = [e["data"]["resource"]["spec"] for e in log.for_uid(uid)]
            assert specs == ([{"v": 3}] if fault.fired else [{"v": 2}, {"v": 3}]), specs
            assert not temp_files(data)
        finally:
            app.stop()

    def test_every_fault_point_of_a_put_is_covered(self, tmp_path, monkeypatch):
        """The loop above must reach past the last fallible call of a PUT (else it proves nothing)."""
        app = make_app(tmp_path / "data")
        with app:
            call(app, "POST", "/racks", {"name": "r"})
            counts = {}
            for name in ("fsync", "replace"):
                fault = _Fault(monkeypatch, name, errno.EIO, nth=10 ** 9)
                assert call(app, "PUT", "/racks/r", {"n": name})[0] == 200
                fault.remove()
                counts[name] = fault.calls
        # the N = 1..4 loop above must reach every fallible call of a PUT
        assert 2 <= counts["fsync"] <= 4, counts         # at least the temp file and its directory
        assert 1 <= counts["replace"] <= 4, counts

    @pytest.mark.parametrize("nth", [1, 2, 3])
    @pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
    def test_fsync_fault_during_create_and_delete(self, tmp_path, monkeypatch, err, nth):
        data = tmp_path / "data"
        app = make_app(data)
        with app:
            victim = call(app, "POST", "/racks", {"name": "victim"})[2]
            log = EventLog(app)
            rv_before = app.store.resource_version
            expected = 507 if err == errno.ENOSPC else 500

            fault = _Fault(monkeypatch, "fsync", err, nth)
            status, _, body = call(app, "POST", "/racks", {"name": "newborn"})
            fault.remove()
            create_failed = bool(fault.fired)
            if create_failed:
                assert_error(status, body, expected)
                assert call(app, "GET", "/racks/newborn")[0] == 404
                assert [p.name for p in data_files(data)] == [f"{victim['metadata']['uid']}.json"]
                assert app.store.resource_version == rv_before
            else:
                assert status == 201, body
                assert call(app, "DELETE", "/racks/newborn")[0] == 200
            rv_before = app.store.resource_version

            path = data / "racks" / f"{victim['metadata']['uid']}.json"
            fault = _Fault(monkeypatch, "fsync", err, nth)
            status, _, body = call(app, "DELETE", "/racks/victim")
            fault.remove()
            if fault.fired:
                assert_error(status, body, expected)
                assert call(app, "GET", "/racks/victim")[2] == victim
                assert json.loads(path.read_bytes()) == victim
                assert app.store.resource_version == rv_before
                assert call(app, "DELETE", "/racks/victim")[0] == 200
            else:
                assert status == 200, body
            assert not path.exists() and not temp_files(data)
            log.barrier()
            created = [e for e in log.snapshot() if e["data"].get("resourceName") == "newborn"]
            deleted = [e for e in log.for_uid(victim["metadata"]["uid"]) if e["action"] == "deleted"]
            assert len(deleted) == 1, deleted
            assert all(e["data"]["resource"]["metadata"]["name"] == "newborn" for e in created)
            assert len([e for e in created if e["action"] == "created"]) == (0 if create_failed else 1)


class TestStoreLock:
    """b4: one process per data dir."""

    def test_second_store_in_process_is_refused(self, tmp_path):
        first = fabrica.FileStore(str(tmp_path))
        first.open({})
        try:
            with pytest.raises(fabrica.StoreLockedError, match=rf"\b{os.getpid()}\b"):
                fabrica.FileStore(str(tmp_path)).open({})
        finally:
            first.close()
        again = fabrica.FileStore(str(tmp_path))
        again.open({})          # released on close
        again.close()

    def test_second_serve_exits_naming_the_holder(self, tmp_path, servers):
        data = tmp_path / "data"
        first = servers(data)
        assert first.request("POST", "/widgets", {"name": "w"})[0] == 201
        before = {str(p): p.read_bytes() for p in data.rglob("*") if p.is_file()}
        started = time.monotonic()
        second = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--data-dir", str(data), "--port", "0"],
                                cwd=str(ROOT), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        elapsed = time.monotonic() - started
        assert second.returncode != 0, second.stderr
        assert elapsed < 2.0, elapsed
        assert re.search(rf"\b{first.proc.pid}\b", second.stderr), second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        after = {str(p): p.read_bytes() for p in data.rglob("*") if p.is_file()}
        assert after == before, "the refused server changed files"
        status, _, health = first.request("GET", "/health")
        assert status == 200 and health["status"] == "healthy"
        assert first.request("GET", "/widgets/w")[0] == 200


###############################################################################
# REST API
###############################################################################

STALE = '"1"'       # the object's first resourceVersion; every case moves it on first


def _b2_cases():
    """(id, method, path, body, headers, expected status) for an object 'p' whose ETag is not STALE."""
    return [
        ("put-stale-if-match", "PUT", "/racks/p", {"v": 9}, {"If-Match": STALE}, 412),
        ("put-weak-current-if-match", "PUT", "/racks/p", {"v": 9}, {"If-Match": "W/{etag}"}, 412),
        ("put-if-none-match-star", "PUT", "/racks/p", {"v": 9}, {"If-None-Match": "*"}, 412),
        ("put-envelope-stale-rv", "PUT", "/racks/p", {"metadata": {"resourceVersion": "1"}, "spec": {"v": 9}},
         {}, 409),
        ("patch-stale-if-match", "PATCH", "/racks/p", {"v": 9}, {"If-Match": STALE}, 412),
        ("delete-stale-if-match", "DELETE", "/racks/p", None, {"If-Match": STALE}, 412),
        ("status-put-stale-if-match", "PUT", "/racks/p/status", {"phase": "x"}, {"If-Match": STALE}, 412),
        ("status-patch-stale-if-match", "PATCH", "/racks/p/status", {"phase": "x"}, {"If-Match": STALE}, 412),
        ("missing-object-if-match", "PUT", "/racks/absent", {"v": 9}, {"If-Match": STALE}, 404),
        ("missing-object-if-match-star", "DELETE", "/racks/absent", None, {"If-Match": "*"}, 404),
        ("post-duplicate", "POST", "/racks", {"name": "p"}, {}, 409),
        ("get-if-none-match-current", "GET", "/racks/p", None, {"If-None-Match": "{etag}"}, 304),
        ("get-if-none-match-weak-current", "GET", "/racks/p", None, {"If-None-Match": "W/{etag}"}, 304),
        ("get-if-none-match-list", "GET", "/racks/p", None, {"If-None-Match": '"0", {etag}'}, 304),
        ("get-if-none-match-stale", "GET", "/racks/p", None, {"If-None-Match": STALE}, 200),
        ("put-if-match-current", "PUT", "/racks/p", {"v": 9}, {"If-Match": "{etag}"}, 200),
        ("put-if-match-list", "PUT", "/racks/p", {"v": 9}, {"If-Match": '"0", {etag}'}, 200),
        ("put-if-match-star", "PUT", "/racks/p", {"v": 9}, {"If-Match": "*"}, 200),
        ("put-envelope-current-rv", "PUT", "/racks/p", {"metadata": {"resourceVersion": "{rv}"},
                                                        "spec": {"v": 9}}, {}, 200),
        ("delete-if-match-current", "DELETE", "/racks/p", None, {"If-Match": "{etag}"}, 200),
    ]


class TestConcurrencyHeaders:
    """b2: ETag, If-Match, If-None-Match and metadata.resourceVersion, table-driven."""

    @pytest.mark.parametrize("case", _b2_cases(), ids=[c[0] for c in _b2_cases()])
    def test_precondition(self, app, case):
        _, method, path, body, headers, expected = case
        assert call(app, "POST", "/racks", {"name": "p", "v": 0})[2]["metadata"]["resourceVersion"] == "1"
        status, h, current = call(app, "PUT", "/racks/p", {"v": 1})
        assert status == 200 and h["etag"] != STALE, current
        etag, rv = h["etag"], current["metadata"]["resourceVersion"]
        log = EventLog(app)

        def fill(value):
            if isinstance(value, str):
                return value.replace("{etag}", etag).replace("{rv}", rv)
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            return value
        status, h, answer = call(app, method, path, fill(body), fill(headers))
        if expected == 304:
            assert status == 304 and answer is None, answer
            assert h["etag"] == etag
        elif expected >= 400:
            assert_error(status, answer, expected)
            assert call(app, "GET", "/racks/p")[2] == current, "a refused request changed the object"
            log.barrier()
            assert not log.for_uid(current["metadata"]["uid"]), "a refused request published an event"
        else:
            assert status == expected, answer
            if method == "GET":
                assert answer == current and h["etag"] == etag
            elif method == "PUT":
                assert answer["spec"] == {"v": 9} and h["etag"] == f'"{answer["metadata"]["resourceVersion"]}"'
                assert int(answer["metadata"]["resourceVersion"]) > int(rv)
            else:
                assert call(app, "GET", "/racks/p")[0] == 404

    def test_etag_on_every_single_object_response(self, app):
        checks = [
            call(app, "POST", "/racks", {"name": "e"}),
            call(app, "GET", "/racks/e"),
            call(app, "PUT", "/racks/e", {"a": 1}),
            call(app, "PATCH", "/racks/e", {"b": 2}, ctype="application/merge-patch+json"),
            call(app, "PUT", "/racks/e/status", {"phase": "x"}),
            call(app, "PATCH", "/racks/e/status", {"n": 1}, ctype="application/merge-patch+json"),
        ]
        for status, headers, obj in checks:
            assert status in (200, 201), obj
            assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        status, headers, st_body = call(app, "GET", "/racks/e/status")
        assert status == 200 and st_body == {"phase": "x", "n": 1}
        assert headers["etag"] == checks[-1][1]["etag"]


def _nested(depth: int) -> bytes:
    """An object of total nesting ``depth``: {"a": [[...]]}."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def _chunked_body(total: int, chunk: int = 64 * 1024) -> bytes:
    out, left = [], total
    while left:
        n = min(chunk, left)
        out.append(b"%x\r\n" % n + b"x" * n + b"\r\n")
        left -= n
    return b"".join(out)       # no terminating chunk: the server must answer before the end


def _bad_input_cases():
    """(id, server, method, path, raw body or None, extra headers, content type, expected status)."""
    j = "application/json"
    cases = [
        ("malformed-json", "open", "POST", "/racks", b'{"a":', {}, j, 400),
        ("nan", "open", "POST", "/racks", b'{"a": NaN}', {}, j, 400),
        ("infinity", "open", "POST", "/racks", b'{"a": Infinity}', {}, j, 400),
        ("minus-infinity", "open", "POST", "/racks", b'{"a": -Infinity}', {}, j, 400),
        ("duplicate-keys", "open", "POST", "/racks", b'{"a": 1, "a": 2}', {}, j, 400),
        ("depth-64-ok", "open", "POST", "/racks", _nested(64), {}, j, 201),
        ("depth-65", "open", "POST", "/racks", _nested(65), {}, j, 400),
        ("depth-5000", "open", "POST", "/racks", _nested(5000), {}, j, 400),
        ("float-overflow", "open", "POST", "/racks", b'{"a": 1e400}', {}, j, 400),
        ("int-2-63", "open", "POST", "/racks", b'{"a": %d}' % 2 ** 63, {}, j, 400),
        ("int-minus-2-63-1", "open", "POST", "/racks", b'{"a": %d}' % (-2 ** 63 - 1), {}, j, 400),
        ("int-2-63-minus-1-ok", "open", "POST", "/racks", b'{"a": %d}' % (2 ** 63 - 1), {}, j, 201),
        ("bom", "open", "POST", "/racks", b'\xef\xbb\xbf{"a": 1}', {}, j, 400),
        ("invalid-utf8", "open", "POST", "/racks", b'{"a": "\xff\xfe"}', {}, j, 400),
        ("lone-surrogate", "open", "POST", "/racks", b'{"a": "\\ud800"}', {}, j, 400),
        ("surrogate-pair-ok", "open", "POST", "/racks", b'{"a": "\\ud83d\\ude00"}', {}, j, 201),
        ("raw-control-char", "open", "POST", "/racks", b'{"a": "x\x01y"}', {}, j, 400),
        ("top-level-array", "open", "POST", "/racks", b"[1, 2]", {}, j, 400),
        ("top-level-null", "open", "POST", "/racks", b"null", {}, j, 400),
        ("top-level-string", "open", "POST", "/racks", b'"rack"', {}, j, 400),
        ("top-level-number", "open", "POST", "/racks", b"42", {}, j, 400),
        ("put-top-level-array", "open", "PUT", "/racks/r1", b"[]", {}, j, 400),
        ("empty-body", "open", "POST", "/racks", b"", {}, j, 400),
        ("text-plain", "open", "POST", "/racks", b'{"a": 1}', {}, "text/plain", 415),
        ("json-charset-ok", "open", "POST", "/racks", b'{"a": 1}', {}, "application/json; charset=utf-8", 201),
        ("ref-dotdot", "open", "GET", "/racks/..", None, {}, None, 400),
        ("ref-dotdot-encoded", "open", "GET", "/racks/%2e%2e", None, {}, None, 400),
        ("ref-nul", "open", "GET", "/racks/a%00b", None, {}, None, 400),
        ("ref-newline", "open", "GET", "/racks/a%0a", None, {}, None, 400),
        ("ref-upper", "open", "GET", "/racks/UPPER", None, {}, None, 400),
        ("ref-non-ascii", "open", "GET", "/racks/%C3%A9", None, {}, None, 400),
        ("ref-put-dotdot", "open", "PUT", "/racks/%2e%2e", b'{"a": 1}', {}, j, 400),
        ("ref-missing-valid", "open", "GET", "/racks/no-such-rack", None, {}, None, 404),
        ("name-254", "open", "POST", "/racks", json.dumps({"name": "a" * 254}).encode(), {}, j, 422),
        ("name-253-ok", "open", "POST", "/racks", json.dumps({"name": "b" * 253}).encode(), {}, j, 201),
        ("name-double-dot", "open", "POST", "/racks", b'{"name": "a..b"}', {}, j, 422),
        ("name-trailing-newline", "open", "POST", "/racks", b'{"name": "abc\\n"}', {}, j, 422),
        ("unknown-route", "open", "GET", "/racks/r1/nope/deeper", None, {}, None, 404),
        ("wrong-method", "open", "DELETE", "/racks", None, {}, None, 405),
        ("trace", "open", "TRACE", "/racks/r1", None, {}, None, 405),
        ("host-evil", "open", "GET", "/racks", None, {"Host": "evil.example"}, None, 403),
        ("host-evil-with-port", "open", "GET", "/health", None, {"Host": "evil.example:80"}, None, 403),
        ("envelope-unknown-key", "open", "POST", "/racks", b'{"metadata": {}, "spec": {}, "bogus": 1}', {}, j, 422),
        ("spec-as-list", "open", "POST", "/racks", b'{"metadata": {}, "spec": [1]}', {}, j, 400),
        ("labels-non-string", "open", "POST", "/racks", b'{"name": "l1", "labels": {"a": 1}}', {}, j, 422),
        ("status-put-list", "open", "PUT", "/racks/r1/status", b"[1]", {}, j, 400),
        ("token-missing", "token", "GET", "/racks", None, {}, None, 401),
        ("token-wrong", "token", "GET", "/racks", None, {"Authorization": "Bearer nope"}, None, 401),
        ("token-wrong-scheme", "token", "GET", "/racks", None, {"Authorization": "Basic s3cret"}, None, 401),
        ("token-missing-with-if-match", "token", "PUT", "/racks/r1", b'{"a": 1}', {"If-Match": '"1"'}, j, 401),
        ("token-ok", "token", "GET", "/racks", None, {"Authorization": "Bearer s3cret"}, None, 200),
        ("token-health-open", "token", "GET", "/health", None, {}, None, 200),
    ]
    return cases


_FRAMING_CASES = ["content-length-negative", "content-length-over-1mib", "chunked-over-1mib"]


@pytest.fixture(scope="class")
def bad_input_servers(tmp_path_factory):
    """An open server and one with --token, each with /racks/r1, shared by the bad-input table."""
    started = {}
    try:
        for name, args in (("open", ()), ("token", ("--token", "s3cret"))):
            server = Server(tmp_path_factory.mktemp(name), *args).start()
            started[name] = server
            headers = {"Authorization": "Bearer s3cret"} if name == "token" else {}
            status, _, body = server.request("POST", "/racks", {"name": "r1"}, headers)
            assert status == 201, body
        yield started
    finally:
        for server in started.values():
            server.kill()


class TestBadInput:
    """c: every hostile request gets its exact 4xx with a JSON error body, and the server stays healthy."""

    @staticmethod
    def _check(server, status, headers, data, expected):
        assert b"Traceback" not in data, data
        assert status == expected, data
        if status not in (204, 304):
            body = json.loads(data)
            if expected >= 400:
                assert_error(status, body, expected)
            assert headers.get("Content-Type", "").startswith("application/json"), dict(headers)
        if expected == 405:
            assert "GET" in headers.get("Allow", ""), dict(headers)
        if expected == 401:
            assert headers.get("WWW-Authenticate", "").startswith("Bearer"), dict(headers)
        started = time.monotonic()
        status, _, health = server.request("GET", "/health", timeout=1.0)
        assert status == 200 and health["status"] == "healthy", health
        assert time.monotonic() - started < 1.0
        assert server.proc.poll() is None, server.log()

    @pytest.mark.parametrize("case", _bad_input_cases(), ids=[c[0] for c in _bad_input_cases()])
    def test_bad_input(self, bad_input_servers, case):
        _, which, method, path, body, headers, ctype, expected = case
        server = bad_input_servers[which]
        headers = dict(headers)
        host = headers.pop("Host", None)
        request = build_request(server.port, method, path, body, headers, ctype=ctype, host=host)
        status, res_headers, data = raw_request(server.port, request, method=method)
        self._check(server, status, res_headers, data, expected)
        assert not temp_files(server.data_dir)
        assert not list(Path(server.data_dir).glob(".fabrica/quarantine/**/*.json"))

    @pytest.mark.parametrize("case", _FRAMING_CASES)
    def test_bad_framing(self, bad_input_servers, case):
        server = bad_input_servers["open"]
        head = f"POST /racks HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        if case == "content-length-negative":
            request, expected = (head + "Content-Length: -5\r\nConnection: close\r\n\r\n").encode(), 400
        elif case == "content-length-over-1mib":
            # the server may answer on the declared size alone: send no body, then read
            request, expected = (head + f"Content-Length: {MIB + 1}\r\n\r\n").encode(), 413
        else:
            # exactly limit + 1 bytes of chunks and no terminator: the server must not wait for the rest
            request = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + _chunked_body(MIB + 1)
            expected = 413
        status, headers, data = raw_request(server.port, request, method="POST")
        self._check(server, status, headers, data, expected)
        names = [o["metadata"]["name"] for o in server.request("GET", "/racks")[2]]
        assert "r1" in names

    def test_nothing_leaks_outside_the_data_dir(self, bad_input_servers, tmp_path):
        for server in bad_input_servers.values():
            root = Path(server.data_dir).resolve()
            for path in root.rglob("*"):
                assert path.resolve().is_relative_to(root)
                assert ".." not in path.name and "\x00" not in path.name


###############################################################################
# HTTP server and CLI (real subprocesses)
###############################################################################

class TestServe:
    def test_open_server_create_restart_sigterm_keepalive(self, tmp_path, servers):
        data = tmp_path / "data"
        server = servers(data)
        conn = server.connection()
        status, headers, obj = http_call(conn, "POST", "/widgets", {"name": "w1", "size": 3})
        assert status == 201, obj
        assert obj["kind"] == "Widget" and obj["spec"] == {"size": 3} and obj["metadata"]["name"] == "w1"
        assert headers["Location"].endswith(f"/widgets/{obj['metadata']['uid']}")
        sock = conn.sock
        assert sock is not None, "the server closed a keep-alive connection"
        local = sock.getsockname()
        status, headers, again = http_call(conn, "GET", "/widgets/w1")
        assert status == 200 and again == obj
        assert conn.sock is sock and sock.getsockname() == local, "the second request used a new socket"
        assert headers.get("Connection", "").lower() != "close"
        conn.close()

        started = time.monotonic()
        assert server.stop(timeout=5) == 0, server.log()
        assert time.monotonic() - started < 5
        assert "Traceback" not in server.log(), server.log()

        server = servers(data)
        status, _, again = server.request("GET", "/widgets/w1")
        assert status == 200 and again == obj
        status, _, apis = server.request("GET", "/apis")
        assert status == 200 and "Widget" in json.dumps(apis)
        status, _, health = server.request("GET", "/health")
        assert status == 200 and health["status"] == "healthy" and "Widget" in health["kinds"]
        assert server.stop(timeout=5) == 0, server.log()


class TestKill9:
    """a1: SIGKILL during a write storm never loses an acknowledged write nor tears a file."""

    ITERATIONS = 30
    WRITERS = 4

    def test_kill9_during_write_storm(self, tmp_path, servers):
        data = tmp_path / "data"
        names = [f"w{i}" for i in range(self.WRITERS)]
        sent = dict.fromkeys(names, 0)          # highest seq sent, across iterations
        acked = dict.fromkeys(names, 0)         # highest seq answered 2xx
        seen_rvs: list[int] = []
        failures: list[str] = []
        lock = threading.Lock()
        rng = random.Random()
        total_acked = 0

        server = servers(data)
        for name in names:
            status, _, body = server.request("POST", "/widgets", {"name": name, "seq": 0})
            assert status == 201, (body, server.log())

        def writer(port, name):
            nonlocal total_acked
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            try:
                while True:
                    with lock:
                        sent[name] += 1
                        seq = sent[name]
                    try:
                        status, _, body = http_call(conn, "PUT", f"/widgets/{name}", {"seq": seq})
                    except (OSError, http.client.HTTPException, ValueError):
                        return          # the server died: this write is unknown, not acknowledged
                    if status != 200:
                        with lock:
                            failures.append(f"{name} seq {seq}: {status} {body}")
                        return
                    with lock:
                        acked[name] = max(acked[name], seq)
                        seen_rvs.append(int(body["metadata"]["resourceVersion"]))
                        total_acked += 1
            finally:
                conn.close()

        for iteration in range(self.ITERATIONS):
            rv_floor = max(seen_rvs, default=0)
            first_new = len(seen_rvs)
            threads = [threading.Thread(target=writer, args=(server.port, n), daemon=True) for n in names]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.3))          # the one deliberate sleep: a random kill point
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(5)
            for t in threads:
                t.join(10)
                assert not t.is_alive(), "a writer hung after the kill"
            assert not failures, failures
            assert all(rv > rv_floor for rv in seen_rvs[first_new:]), "a resourceVersion was reused after restart"

            for path in data_files(data):
                json.loads(path.read_bytes())           # never torn: every file parses
            server = servers(data)
            status, _, health = server.request("GET", "/health")
            assert status == 200 and health["status"] == "healthy" and not health["quarantined"], health
            assert not temp_files(data), "start-up recovery left temp files"
            status, _, items = server.request("GET", "/widgets")
            assert status == 200
            assert [o["metadata"]["name"] for o in items] == names, items   # no .tmp-* or strays via the API
            for obj in items:
                name = obj["metadata"]["name"]
                seq = obj["spec"]["seq"]
                assert acked[name] <= seq <= sent[name], (iteration, name, acked[name], seq, sent[name])
        assert total_acked >= self.ITERATIONS * self.WRITERS, f"too few acknowledged writes: {total_acked}"
        assert server.stop() == 0, server.log()


class TestConcurrentIfMatch:
    """b1: 8 threads x 100 read-modify-write increments guarded by If-Match lose no update."""

    THREADS = 8
    INCREMENTS = 100

    def test_no_lost_updates(self, tmp_path, servers):
        server = servers(tmp_path / "data")
        status, _, body = server.request("POST", "/counters", {"name": "c", "counter": 0})
        assert status == 201, body
        conflicts = []
        successes: list[tuple[int, int]] = []      # (counter written, resourceVersion)
        errors: list[str] = []
        lock = threading.Lock()

        def worker():
            conn = server.connection(timeout=10)
            try:
                for _ in range(self.INCREMENTS):
                    for _attempt in range(500):
                        status, headers, obj = http_call(conn, "GET", "/counters/c")
                        assert status == 200, obj
                        value = obj["spec"]["counter"] + 1
                        status, _, answer = http_call(conn, "PUT", "/counters/c", {"counter": value},
                                                      {"If-Match": headers["ETag"]})
                        if status == 200:
                            with lock:
                                successes.append((value, int(answer["metadata"]["resourceVersion"])))
                            break
                        if status != 412:
                            with lock:
                                errors.append(f"{status} {answer}")
                            return
                        with lock:
                            conflicts.append(1)
                    else:
                        with lock:
                            errors.append("gave up after 500 conflicts")
                        return
            except Exception as exc:        # surfaced below, not swallowed
                with lock:
                    errors.append(repr(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a worker hung"
        assert not errors, errors[:5]
        total = self.THREADS * self.INCREMENTS
        final = server.request("GET", "/counters/c")[2]
        assert final["spec"]["counter"] == total
        assert len(successes) == total
        assert sorted(v for v, _ in successes) == list(range(1, total + 1)), "two writes stored the same counter"
        rvs = [rv for _, rv in sorted(successes)]
        assert all(b > a for a, b in zip(rvs, rvs[1:])), "resourceVersions do not follow the write order"
        assert conflicts, "no 412 happened: the test did not create contention"


@pytest.fixture(scope="class")
def framing_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("framing")).start()
    yield server
    server.stop()


class TestFraming:
    """Ambiguous body framing is refused, so a body can never be read as a second request."""

    @pytest.fixture
    def server(self, framing_server):
        return framing_server

    SMUGGLED = b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
               b"Content-Length: 17\r\n\r\n{\"name\":\"smugg\"}\n"

    @pytest.mark.parametrize("framing", [
        b"Content-Length: +%d\r\n",
        b"Content-Length: %d, 5\r\n",
        b"Content-Length: %d\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: gzip\r\nContent-Length: %d\r\n",
        b"Transfer-Encoding: xchunked\r\nContent-Length: %d\r\n",
    ])
    def test_ambiguous_framing_is_400_and_nothing_is_smuggled(self, server, framing):
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (framing.replace(b"%d", str(len(
            self.SMUGGLED)).encode())) + b"\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head + self.SMUGGLED)
            res = http.client.HTTPResponse(sock, method="GET")
            res.begin()
            assert res.status == 400
            res.read()
            sock.settimeout(1.0)
            try:
                rest = sock.recv(65536)
            except (socket.timeout, ConnectionError):
                rest = b""
            assert b"HTTP/1.1 201" not in rest
        assert server.request("GET", "/widgets/smugg")[0] == 404

    def test_malformed_chunks_are_400(self, server):
        body = b"5\r\nhello" + b"XX" + b"0\r\n\r\n"      # a chunk not ended by CRLF
        head = (b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        assert raw_request(server.port, head + body, method="POST")[0] == 400
        body = b"0x5\r\n{\"a\":1}\r\n0\r\n\r\n"
        assert raw_request(server.port, head + body, method="POST")[0] == 400


class TestValuesThatAreNotJSON:
    def test_a_status_value_that_is_not_json_is_refused_and_writes_go_on(self, tmp_path):
        import datetime
        app = fabrica.Fabrica(data_dir=str(tmp_path), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            obj.status["seen"] = datetime.datetime.now() if obj.name == "bad" else "ok"
            obj.status["ratio"] = float("nan") if obj.spec.get("nan") else 1.0

        with app:
            app.client.create("Widget", name="bad")
            app.client.create("Widget", name="nan", spec={"nan": True})
            assert app.wait_idle(10)
            for name in ("bad", "nan"):
                ready = app.client.get("Widget", name).condition("Ready")
                assert ready["status"] == "False" and ready["reason"] == "ReconcileError"
                assert "not JSON" in ready["message"]
            with pytest.raises(fabrica.ValidationError):
                app.client.create("Widget", name="direct", spec={"when": datetime.date.today()})
            app.client.create("Widget", name="good")            # the store still takes writes
            assert app.wait_idle(10)
            assert app.client.get("Widget", "good").status["seen"] == "ok"
            assert not app.store._inflight and not app.store._pending
        again = fabrica.Fabrica(data_dir=str(tmp_path), durable=False)
        again.register("Widget")
        with again:
            assert again.store.quarantined == []
            assert {o.name for o in again.client.list("Widget")} == {"bad", "nan", "good"}


###############################################################################
# Stores: recovery rules every store keeps (issue 11)
###############################################################################

class _Crash(BaseException):
    """Raised at a chosen point of a write: what is on disk then is what a kill -9 there leaves."""


def _crash_at(monkeypatch, owner, name):
    """Make ``owner.name`` crash (once) when called."""
    real = getattr(owner, name)

    def crash(*args, **kwargs):
        monkeypatch.setattr(owner, name, real)
        raise _Crash(name)
    monkeypatch.setattr(owner, name, crash)


def history_app(data_dir, **options) -> fabrica.Fabrica:
    app = fabrica.Fabrica(data_dir=str(data_dir))
    app.register("Rack", history=options.pop("history", True), **options)
    return app


def history_dir(data_dir, uid=None) -> Path:
    root = Path(data_dir) / ".fabrica" / "history" / "racks"
    return root if uid is None else root / uid


HISTORY_APP = """\
import fabrica
app = fabrica.Fabrica()
app.register("Widget", history=True)
"""


class TestHistoryMatchesItsObjectAfterACrash:
    """Issue 11.2: no spec version newer than its object's generation survives a crash."""

    def test_crash_between_the_snapshot_and_the_object(self, tmp_path, monkeypatch):
        data = tmp_path / "data"
        app = history_app(data)
        with app:
            rack = app.client.create("Rack", name="r", spec={"v": 1})
            app.client.patch("Rack", "r", {"v": 2})
            _crash_at(monkeypatch, fabrica.FileStore, "_persist")      # after the snapshot, before the object
            with pytest.raises(_Crash):
                app.client.patch("Rack", "r", {"v": 3})
            _crash_at(monkeypatch, fabrica.FileStore, "_persist")      # a create: a snapshot of nothing
            with pytest.raises(_Crash):
                app.client.create("Rack", name="never", spec={"v": 1})
            doomed = app.client.create("Rack", name="doomed")
            _crash_at(monkeypatch, fabrica.FileStore, "prune_versions")    # after a delete, before its history goes
            with pytest.raises(_Crash):
                app.client.delete("Rack", "doomed")
        assert len(list(history_dir(data).iterdir())) == 3, "the crashes did not leave what a kill -9 leaves"

        again = history_app(data)
        with again:
            uid = rack.uid
            assert [v["versionId"] for v in again.client.versions("Rack", "r")] == ["1", "2"]
            assert again.client.get("Rack", "r").status["version"] == "2"
            assert call(again, "GET", "/racks/r/versions/3")[0] == 404
            assert call(again, "POST", "/racks/r/versions/3/restore")[0] == 404
            assert sorted(p.name for p in history_dir(data, uid).iterdir()) == ["1.json", "2.json"]
            assert [p.name for p in history_dir(data).iterdir()] == [uid], "history of objects that do not exist"
            assert again.store.quarantined == []
            assert doomed.uid not in {o.uid for o in again.client.list("Rack")}
            # the next spec write takes generation 3 with its own snapshot
            assert again.client.patch("Rack", "r", {"v": 4}).generation == 3
            assert again.client.get_version("Rack", "r", "3")["spec"] == {"v": 4}

    def test_history_of_a_quarantined_object_is_kept(self, tmp_path):
        data = tmp_path / "data"
        with history_app(data) as app:
            rack = app.client.create("Rack", name="r", spec={"v": 1})
        (data / "racks" / f"{rack.uid}.json").write_bytes(b"{torn")
        for _ in range(2):      # the second start finds the object in the quarantine, not in racks/
            with history_app(data) as app:
                assert app.client.list("Rack") == []
            assert [p.name for p in history_dir(data, rack.uid).iterdir()] == ["1.json"]

    def test_kill9_during_spec_writes(self, tmp_path, servers):
        """A bounded round of real kills; the crash points above make the outcome deterministic."""
        data = tmp_path / "data"
        app_file = tmp_path / "histapp.py"
        app_file.write_text(HISTORY_APP)
        names = ["h0", "h1"]
        server = servers(data, str(app_file))
        for name in names:
            assert server.request("POST", "/widgets", {"name": name, "seq": 0})[0] == 201
        rng = random.Random()

        def writer(port, name):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            try:
                for seq in itertools.count(1):
                    http_call(conn, "PUT", f"/widgets/{name}", {"seq": seq})
            except (OSError, http.client.HTTPException, ValueError):
                return          # the server died
            finally:
                conn.close()

        for _ in range(4):
            threads = [threading.Thread(target=writer, args=(server.port, n), daemon=True) for n in names]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.2))          # a random kill point
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(5)
            for t in threads:
                t.join(10)
                assert not t.is_alive(), "a writer hung after the kill"
            server = servers(data, str(app_file))
            for name in names:
                obj = server.request("GET", f"/widgets/{name}")[2]
                ids = [int(v["versionId"]) for v in server.request("GET", f"/widgets/{name}/versions")[2]]
                assert ids and max(ids) == obj["metadata"]["generation"], (name, ids, obj["metadata"])
                files = [int(p.stem) for p in (data / ".fabrica" / "history" / "widgets" /
                                               obj["metadata"]["uid"]).glob("*.json")]
                assert max(files) == obj["metadata"]["generation"], (name, sorted(files))
        assert server.stop() == 0, server.log()


class TestFailedWritesChangeNothingObservable:
    """Issue 11.3: with every fsync failing, what a GET serves is what a restart serves, and the error is true."""

    @staticmethod
    def restarted(data, app):
        app.stop()
        app = make_app(data)
        app.start()
        return app

    @pytest.mark.parametrize("nth", [1, 2])
    def test_put(self, tmp_path, monkeypatch, nth):
        data = tmp_path / "data"
        app = make_app(data).start()
        try:
            old = call(app, "POST", "/racks", {"name": "r", "v": 1})[2]
            path = data / "racks" / f"{old['metadata']['uid']}.json"
            log = EventLog(app)
            fault = _Fault(monkeypatch, "fsync", errno.EIO, nth, persistent=True)
            status, _, body = call(app, "PUT", "/racks/r", {"v": 2})
            fault.remove()
            assert fault.fired
            assert_error(status, body, 500)
            assert "the previous version is intact" in body["error"], body
            assert call(app, "GET", "/racks/r")[2] == old
            assert json.loads(path.read_bytes()) == old, "the file does not hold what GET serves"
            log.barrier()
            assert [e["action"] for e in log.for_uid(old["metadata"]["uid"])] == []
            app = self.restarted(data, app)
            assert call(app, "GET", "/racks/r")[2] == old, "a restart serves something else"
            assert not temp_files(data)
        finally:
            app.stop()

    def test_delete_then_delete_again_on_a_healthy_disk(self, tmp_path, monkeypatch):
        data = tmp_path / "data"
        app = make_app(data).start()
        try:
            victim = call(app, "POST", "/racks", {"name": "victim"})[2]
            path = data / "racks" / f"{victim['metadata']['uid']}.json"
            fault = _Fault(monkeypatch, "fsync", errno.EIO, 1, persistent=True)
            status, _, body = call(app, "DELETE", "/racks/victim")
            fault.remove()
            assert_error(status, body, 500)
            assert "it is still stored" in body["error"], body
            assert call(app, "GET", "/racks/victim")[2] == victim
            assert json.loads(path.read_bytes()) == victim, "GET serves an object whose file is gone"
            status, _, body = call(app, "DELETE", "/racks/victim")
            assert status == 200, body
            app = self.restarted(data, app)
            assert call(app, "GET", "/racks/victim")[0] == 404
        finally:
            app.stop()

    @pytest.mark.parametrize("method", ["PUT", "DELETE"])
    def test_a_change_that_cannot_be_undone_is_served_published_and_told(self, tmp_path, monkeypatch, method):
        """The disk shows the change and refuses to take it back: the index follows the disk."""
        data = tmp_path / "data"
        app = make_app(data).start()
        try:
            old = call(app, "POST", "/racks", {"name": "r", "v": 1})[2]
            uid = old["metadata"]["uid"]
            log = EventLog(app)
            # the write's own fsync and rename work; the directory fsync and everything after fail
            fsync = _Fault(monkeypatch, "fsync", errno.EIO, 1 if method == "DELETE" else 2, persistent=True)
            undo = [_Fault(monkeypatch, name, errno.EIO, 1 if method == "DELETE" else 2, persistent=True)
                    for name in ("replace", "write")]
            status, _, body = call(app, method, "/racks/r", {"v": 2} if method == "PUT" else None)
            for fault in (fsync, *undo):
                fault.remove()
            assert_error(status, body, 500)
            served = call(app, "GET", "/racks/r")
            if method == "PUT":
                assert served[0] == 200 and served[2]["spec"] == {"v": 2}, served
                assert f"resourceVersion {served[2]['metadata']['resourceVersion']} is stored now" in body["error"]
            else:
                assert served[0] == 404, served
                assert "it is deleted now" in body["error"], body
            assert "may not survive a crash" in body["error"], body
            rv = str(app.store.resource_version)
            log.barrier()
            events = log.for_uid(uid)
            assert [e["action"] for e in events] == ["updated" if method == "PUT" else "deleted"], events
            assert events[0]["resourceversion"] == rv
            app = self.restarted(data, app)
            again = call(app, "GET", "/racks/r")
            assert (again[0], again[2]) == (served[0], served[2]), "a restart serves something else"
        finally:
            app.stop()

    def test_deleting_a_spec_version(self, tmp_path, monkeypatch):
        data = tmp_path / "data"
        app = history_app(data).start()
        try:
            app.client.create("Rack", name="r", spec={"v": 1})
            app.client.patch("Rack", "r", {"v": 2})
            fault = _Fault(monkeypatch, "fsync", errno.EIO, 1, persistent=True)
            status, _, body = call(app, "DELETE", "/racks/r/versions/1")
            fault.remove()
            assert_error(status, body, 500)
            assert "is deleted, but the disk failed to confirm it" in body["error"], body
            served = [v["versionId"] for v in call(app, "GET", "/racks/r/versions")[2]]
            assert served == ["2"]
            app.stop()
            app = history_app(data).start()
            assert [v["versionId"] for v in call(app, "GET", "/racks/r/versions")[2]] == served
        finally:
            app.stop()


class TestCommittedWritesNeverAnswer5xx:
    """Issue 11.4: housekeeping after a commit is logged and left for later, never reported as a failed write."""

    def test_pruning_old_versions_fails(self, tmp_path, monkeypatch):
        app = history_app(tmp_path / "data", history=1).start()
        try:
            app.client.create("Rack", name="r", spec={"items": []})
            fault = _Fault(monkeypatch, "unlink", errno.EIO, 1, persistent=True)
            status, _, body = call(app, "PATCH", "/racks/r", [{"op": "add", "path": "/items/-", "value": 1}],
                                   ctype="application/json-patch+json")
            fault.remove()
            assert fault.fired
            assert status == 200, body
            assert body["spec"] == {"items": [1]}
            assert [v["versionId"] for v in app.client.versions("Rack", "r")] == ["1", "2"]   # left for later
            app.client.patch("Rack", "r", {"items": [1, 2]})
            assert [v["versionId"] for v in app.client.versions("Rack", "r")] == ["3"]        # retried
            assert sorted(p.name for p in history_dir(tmp_path / "data").rglob("*.json")) == ["3.json"]
        finally:
            app.stop()

    def test_publishing_fails(self, tmp_path):
        app = make_app(tmp_path / "data").start()
        try:
            call(app, "POST", "/racks", {"name": "r"})

            def broken(change, size):
                raise RuntimeError("publisher broke")
            app.store.watch(broken)
            status, _, body = call(app, "PUT", "/racks/r", {"v": 2})
            assert status == 200, body
            assert call(app, "GET", "/racks/r")[2] == body
        finally:
            app.stop()


class _FullDisk:
    """A full disk: writes that need a new block fail with ENOSPC (os.write, a new directory, and
    os.pwrite past the blocks a file already has); unlink, rename and overwriting in place still work."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.real = {name: getattr(os, name) for name in ("write", "pwrite", "mkdir")}
        for name in self.real:
            monkeypatch.setattr(os, name, getattr(self, name))

    @staticmethod
    def _full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write = mkdir = _full

    def pwrite(self, fd, data, offset):
        if offset + len(data) > os.fstat(fd).st_blocks * 512:
            self._full()
        return self.real["pwrite"](fd, data, offset)

    def remove(self):
        for name, fn in self.real.items():
            self.monkeypatch.setattr(os, name, fn)


class TestFullDisk:
    """Issue 11.6: a DELETE works on a full disk, also right after a restart; start-up works on a full disk."""

    def test_delete_right_after_a_restart(self, tmp_path, monkeypatch):
        data = tmp_path / "data"
        with make_app(data) as app:
            for name in ("a", "b"):
                call(app, "POST", "/racks", {"name": name})
            rv = app.store.resource_version
        disk = _FullDisk(monkeypatch)
        try:
            with make_app(data) as app:
                assert_error(*call(app, "POST", "/racks", {"name": "c"})[::2], 507)
                status, _, body = call(app, "DELETE", "/racks/a")
                assert status == 200, body
                assert app.store.resource_version > rv
                assert call(app, "GET", "/racks/a")[0] == 404
            with make_app(data) as app:     # and again: each start needs a new reservation
                status, _, body = call(app, "DELETE", "/racks/b")
                assert status == 200, body
                deleted_at = app.store.resource_version
        finally:
            disk.remove()
        with make_app(data) as app:         # space is back: no resourceVersion is ever handed out twice
            created = call(app, "POST", "/racks", {"name": "c"})[2]
            assert int(created["metadata"]["resourceVersion"]) > deleted_at
            assert [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]] == ["c"]

    def test_start_up_with_files_to_quarantine_and_a_crash_interrupted_cascade(self, tmp_path, monkeypatch):
        data = tmp_path / "data"
        with make_app(data) as app:
            owner = call(app, "POST", "/racks", {"name": "owner"})[2]
            child = call(app, "POST", "/chassis", {"metadata": {"name": "child", "ownerReferences": [
                {"kind": "Rack", "uid": owner["metadata"]["uid"]}]}, "spec": {}})[2]
            keep = call(app, "POST", "/racks", {"name": "keep"})[2]
        assert child["metadata"]["ownerReferences"], child
        (data / "racks" / f"{owner['metadata']['uid']}.json").unlink()      # the crash came mid-cascade
        (data / "racks" / "rack-00000001.json").write_bytes(b"{torn")
        disk = _FullDisk(monkeypatch)
        try:
            with make_app(data) as app:
                assert call(app, "GET", "/racks/keep")[2] == keep
                health = call(app, "GET", "/health")[2]
                assert [q["path"] for q in health["quarantined"]] == ["racks/rack-00000001.json"], health
                assert wait_until(lambda: call(app, "GET", "/chassis/child")[0] == 404), "the orphan stayed"
        finally:
            disk.remove()
        assert (data / "racks" / "rack-00000001.json").exists(), "a file that could not be moved was lost"
        with make_app(data) as app:         # with space, the quarantine move happens
            assert not (data / "racks" / "rack-00000001.json").exists()
            assert len(list((data / ".fabrica" / "quarantine").rglob("*.json"))) == 1

    def test_a_torn_reservation_slot_is_the_one_rewritten(self, tmp_path):
        """A crash while a slot is rewritten tears only that slot; the other one covers every rv handed out."""
        data = tmp_path / "data"
        with make_app(data) as app:
            call(app, "POST", "/racks", {"name": "a"})
            used = app.store.resource_version
        rv_file = data / ".fabrica" / "resource-version"
        raw = bytearray(rv_file.read_bytes())
        assert len(raw) == 60, raw
        slots = sorted(range(2), key=lambda i: int(raw[i * 30:i * 30 + 20]))
        raw[slots[0] * 30 + 5:slots[0] * 30 + 25] = b"9" * 20      # the older slot, half rewritten
        rv_file.write_bytes(bytes(raw))
        good = bytes(raw[slots[1] * 30:slots[1] * 30 + 30])
        with make_app(data) as app:
            created = call(app, "POST", "/racks", {"name": "b"})[2]
            assert int(created["metadata"]["resourceVersion"]) > used
        raw = rv_file.read_bytes()
        assert raw[slots[1] * 30:slots[1] * 30 + 30] == good, "the slot still in force was overwritten"
        assert int(raw[slots[0] * 30:slots[0] * 30 + 20]) > int(good[:20])


class TestMistypedMetadataIsQuarantined:
    """Issue 11.7: a file whose metadata (or the status fabrica reads) has the wrong type is quarantined."""

    CASES = {
        "owner-ref-not-object": lambda o: o["metadata"].update(ownerReferences=["x"]),
        "owner-uid-list": lambda o: o["metadata"].update(ownerReferences=[{"kind": "Rack", "uid": ["x"]}]),
        "label-value-list": lambda o: o["metadata"].update(labels={"env": ["prod"]}),
        "annotation-value-int": lambda o: o["metadata"].update(annotations={"note": 5}),
        "finalizer-int": lambda o: o["metadata"].update(finalizers=[5]),
        "generation-string": lambda o: o["metadata"].update(generation="2"),
        "created-at-int": lambda o: o["metadata"].update(createdAt=5),
        "deletion-timestamp-int": lambda o: o["metadata"].update(deletionTimestamp=5),
        # a garbled deletionTimestamp would start a deletion (and its cascade) at start-up
        "deletion-timestamp-garbage": lambda o: o["metadata"].update(deletionTimestamp="garbage"),
        "created-at-garbage": lambda o: o["metadata"].update(createdAt="yesterday"),
        "updated-at-not-a-date": lambda o: o["metadata"].update(updatedAt="2026-02-30T00:00:00Z"),
        "conditions-int": lambda o: o["status"].update(conditions=5),
        "condition-type-list": lambda o: o["status"].update(conditions=[{"type": ["Ready"], "status": "True"}]),
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_start_up_quarantines_it(self, tmp_path, case):
        data = tmp_path / "data"
        with make_app(data) as app:
            bad = call(app, "POST", "/racks", {"name": "bad"})[2]
            good = call(app, "POST", "/racks", {"name": "good"})[2]
        path = data / "racks" / f"{bad['metadata']['uid']}.json"
        self.CASES[case](bad)
        path.write_text(json.dumps(bad))
        with make_app(data) as app:
            assert [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]] == ["good"]
            assert call(app, "GET", "/racks/good")[2] == good
            health = call(app, "GET", "/health")[2]
            assert [q["path"] for q in health["quarantined"]] == [f"racks/{path.name}"], health
            assert not path.exists()
            assert call(app, "PUT", "/racks/good/status", {"seen": True})[0] == 200

    def test_a_status_write_is_checked_before_it_commits(self, tmp_path):
        with make_app(tmp_path / "data") as app:
            call(app, "POST", "/racks", {"name": "r"})
            for status in ({"conditions": 5}, {"conditions": [{"type": ["Ready"], "status": "True"}]},
                           {"conditions": [{"type": "Ready", "status": ["True"]}]}):
                code, _, body = call(app, "PUT", "/racks/r/status", status)
                assert_error(code, body, 422)
                assert body["details"][0]["field"] == "status.conditions", body
            code, _, body = call(app, "PUT", "/racks/r/status", {"conditions": [{"type": "Ready", "status": "True"}]})
            assert code == 200, body
            assert call(app, "PUT", "/racks/r/status", {"phase": "done"})[0] == 200


class TestHandEditedFiles:
    """Issue 11.8: a store file saved with a UTF-8 byte-order mark and CRLF line ends loads."""

    def test_bom_and_crlf(self, tmp_path):
        data = tmp_path / "data"
        with history_app(data) as app:
            rack = app.client.create("Rack", name="r", spec={"note": "a\nb"})
        path = data / "racks" / f"{rack.uid}.json"
        version = history_dir(data, rack.uid) / "1.json"
        for file in (path, version):
            text = file.read_text(encoding="utf-8")
            assert "\r" not in text
            file.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
        with history_app(data) as app:
            assert app.store.quarantined == []
            assert app.client.get("Rack", "r") == rack
            assert app.client.versions("Rack", "r")[0]["spec"] == {"note": "a\nb"}
            assert app.client.patch("Rack", "r", {"note": "c"}).spec == {"note": "c"}
            assert not path.read_bytes().startswith(b"\xef\xbb\xbf")
            # the REST API stays strict (SPEC §6.6)
            status, _, body = call(app, "POST", "/racks", b'\xef\xbb\xbf{"name": "x"}')
            assert_error(status, body, 400)


class TestLeftoversAreTidied:
    """Issue 11.9: temp files anywhere under the data dir go at start-up; a deleted object leaves no history folder."""

    def test_temp_files_anywhere(self, tmp_path):
        data = tmp_path / "data"
        with history_app(data) as app:
            rack = app.client.create("Rack", name="r")
        (data / "unserved").mkdir()
        leftovers = [data / ".fabrica" / ".tmp-0123456789ab.part",            # the rv reservation
                     history_dir(data, rack.uid) / ".tmp-0123456789ac.part",
                     data / "racks" / ".tmp-0123456789ad.part",
                     data / "unserved" / ".tmp-0123456789ae.part",
                     data / ".tmp-0123456789af.part"]
        for path in leftovers:
            path.write_bytes(b"partial")
        with history_app(data) as app:
            assert [p for p in leftovers if p.exists()] == []
            assert app.store.temp_removed == len(leftovers)
            assert app.client.get("Rack", "r").uid == rack.uid

    def test_deleted_objects_leave_no_history_folder(self, tmp_path):
        data = tmp_path / "data"
        with history_app(data) as app:
            for name in ("a", "b"):
                app.client.create("Rack", name=name)
                app.client.patch("Rack", name, {"v": 2})
            app.client.delete_version("Rack", "b", "1")
            app.client.delete_version("Rack", "b", "2")
            for name in ("a", "b"):
                app.client.delete("Rack", name)
            assert list(history_dir(data).iterdir()) == []


###############################################################################
# Issue 11, adversarial review: what a write stores, start-up loads; the data
# dir's odd corners neither stop a start nor lose data; bounded bus memory
###############################################################################

def _nest(levels: int, leaf=1):
    """``levels`` objects nested in one another around ``leaf``: {"a": {"a": ... leaf}}."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


class TestWhatAWriteStoresStartUpLoads:
    """Issue 11 review, F1: no write is acknowledged whose object start-up would refuse.

    SPEC §3.0: what a GET serves, a restart serves.
    """

    def test_every_write_path(self, tmp_path):
        data = tmp_path / "data"
        shorthand = "application/shorthand-patch+json"
        json_patch = "application/json-patch+json"
        served = {}
        with history_app(data) as app:
            # bodies 64 levels deep, stored one level down: accepted, and loaded again below
            accepted = [("POST", "/racks", {"name": "flat", **_nest(63)}, None),
                        ("POST", "/racks", {"name": "st"}, None),
                        ("PUT", "/racks/st/status", _nest(64), None),
                        ("POST", "/racks", {"name": "merge"}, None),
                        ("PATCH", "/racks/merge", _nest(63), None),
                        ("PATCH", "/racks/merge/status", _nest(64), None),
                        ("POST", "/racks", {"name": "sh"}, None),
                        ("POST", "/racks", {"name": "jp"}, None)]
            for method, path, body, ctype in accepted:
                status, _, got = call(app, method, path, body, ctype=ctype or "application/json")
                assert status in (200, 201), (path, got)
            # deeper than any body: refused with the limit named, before anything is stored
            refused = [("/racks/sh", {".".join(["a"] * 200): 1}, shorthand),
                       ("/racks/sh", {".".join(["a"] * 64): {"b": 1}}, shorthand),
                       ("/racks/jp", [{"op": "add", "path": "/x", "value": _nest(60)},
                                      {"op": "add", "path": "/x" + "/a" * 60, "value": _nest(60)}], json_patch),
                       ("/racks/jp", [{"op": "add", "path": "/x", "value": _nest(60)},
                                      {"op": "copy", "from": "/x", "path": "/x" + "/a" * 59}], json_patch)]
            for path, body, ctype in refused:
                status, _, err = call(app, "PATCH", path, body, ctype=ctype)
                assert_error(status, err, 422)
                assert "64" in err["error"], err
            with pytest.raises(fabrica.ValidationError, match="limit is 64 levels"):   # no body reader here
                app.client.create("Rack", name="client", spec=_nest(70))
            assert call(app, "GET", "/racks/client")[0] == 404
            for name in ("flat", "st", "merge", "sh", "jp"):
                served[name] = call(app, "GET", f"/racks/{name}")[2]
            assert app.client.versions("Rack", "merge")[-1]["spec"] == _nest(63)
        with history_app(data) as app:
            assert app.store.quarantined == []
            for name, obj in served.items():
                assert call(app, "GET", f"/racks/{name}")[2] == obj, name
            assert call(app, "GET", "/health")[2]["status"] == "healthy"

    def test_a_file_stored_deeper_by_an_older_version_still_loads(self, tmp_path):
        data = tmp_path / "data"
        with history_app(data, history=False) as app:
            rack = app.client.create("Rack", name="old")
        path = data / "racks" / f"{rack.uid}.json"
        doc = json.loads(path.read_text())
        doc["spec"] = _nest(100)          # what the shorthand or JSON Patch could store before
        path.write_text(json.dumps(doc))
        with history_app(data, history=False) as app:
            assert app.store.quarantined == []
            assert app.client.get("Rack", "old").spec == _nest(100)
            # a write that does not nest it deeper is never refused; one that does is
            status, _, got = call(app, "PUT", "/racks/old/status", {"phase": "seen"})
            assert status == 200, got
            status, _, err = call(app, "PATCH", "/racks/old", [{"op": "add", "path": "/a" * 100, "value": {}}],
                                  ctype="application/json-patch+json")
            assert_error(status, err, 422)
            served = call(app, "GET", "/racks/old")[2]
        with history_app(data, history=False) as app:
            assert call(app, "GET", "/racks/old")[2] == served

    def test_depth_counts_containers_whatever_else_the_body_holds(self, app):
        inner = b"[" * 63 + b"1" + b"]" * 63
        status, _, got = call(app, "POST", "/racks", b'{"name": "d64", "a": ' + inner + b', "b": {}}')
        assert status == 201, got
        status, _, err = call(app, "POST", "/racks", b'{"name": "d65", "a": [' + inner + b'], "b": {}}')
        assert_error(status, err, 400)


def _open_app(data_dir) -> fabrica.Fabrica:
    return fabrica.Fabrica(data_dir=str(data_dir), open=True)


def _tree(root) -> dict:
    """Every file under ``root`` and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


class TestOpenServerFoldersThatAreNotItsKinds:
    """Issue 11 review, F3: what else sits in the data dir neither stops an open server's start
    nor quarantines its data."""

    @pytest.fixture
    def seeded(self, tmp_path):
        data = tmp_path / "data"
        with _open_app(data) as app:
            assert call(app, "POST", "/widgets", {"name": "w1", "a": 1})[0] == 201
        return data

    @pytest.mark.parametrize("folder", ["old-widgets", "health", "My_Things"])
    def test_a_folder_that_is_no_plural_is_ignored(self, seeded, folder):
        (seeded / "widgets").rename(seeded / folder)
        before = _tree(seeded / folder)
        with _open_app(seeded) as app:
            assert call(app, "GET", "/apis")[2]["kinds"] == []
            health = call(app, "GET", "/health")[2]
            assert health["status"] == "degraded" and health["quarantined"] == [], health
            assert [i["path"] for i in health["ignored"]] == [f"{folder}/"], health
            assert "*" in app.store.unsure       # an owner may sit in it: nothing is collected behind it
        assert _tree(seeded / folder) == before

    def test_a_copy_of_a_kind_folder_is_ignored(self, seeded):
        shutil.copytree(seeded / "widgets", seeded / "backup")     # sorts before widgets/
        before = _tree(seeded / "backup")
        with _open_app(seeded) as app:
            assert call(app, "GET", "/widgets/w1")[2]["spec"] == {"a": 1}
            assert call(app, "PUT", "/widgets/w1", {"a": 2})[0] == 200
            health = call(app, "GET", "/health")[2]
            assert health["quarantined"] == [] and [i["path"] for i in health["ignored"]] == ["backup/"], health
            assert "another folder of kind Widget, whose folder is widgets/" in health["ignored"][0]["reason"]
        assert _tree(seeded / "backup") == before
        with _open_app(seeded) as app:
            assert call(app, "GET", "/widgets/w1")[2]["spec"] == {"a": 2}

    def test_one_other_folder_is_adopted_two_are_not(self, seeded):
        (seeded / "widgets").rename(seeded / "things")
        with _open_app(seeded) as app:
            assert call(app, "GET", "/things/w1")[2]["spec"] == {"a": 1}
            assert call(app, "GET", "/health")[2]["status"] == "healthy"
        shutil.copytree(seeded / "things", seeded / "gadgets")
        before = _tree(seeded)
        with _open_app(seeded) as app:      # which of the two is the right one cannot be told
            assert call(app, "GET", "/apis")[2]["kinds"] == []
            health = call(app, "GET", "/health")[2]
            assert health["quarantined"] == [], health
            assert sorted(i["path"] for i in health["ignored"]) == ["gadgets/", "things/"], health
            assert "rename the right one to widgets/" in health["ignored"][0]["reason"]
        after = _tree(seeded)
        assert {k: v for k, v in after.items() if not k.startswith(".fabrica/")} == \
            {k: v for k, v in before.items() if not k.startswith(".fabrica/")}


def _start_within(app, timeout: float = 10.0, unblock=()):
    """Start ``app`` in a thread; fail if that takes longer than ``timeout`` (a FIFO in ``unblock`` is then
    opened for writing, so the stuck open returns and the test leaves no thread behind)."""
    errors = []

    def start():
        try:
            app.start()
        except BaseException as exc:
            errors.append(exc)
    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in unblock:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout)
        app.stop()
        pytest.fail(f"start-up blocked for {timeout}s")
    if errors:
        raise errors[0]


class TestStartUpNeverBlocksOnOrFollowsAFile:
    """Issue 11 review, F7: every file start-up reads is a regular file, opened without following
    a link or blocking."""

    @pytest.mark.parametrize("where", ["object", "snapshot", "reservation", "object-dir"])
    def test_what_is_not_a_regular_file_is_quarantined(self, tmp_path, where):
        data = tmp_path / "data"
        with history_app(data) as app:
            rack = app.client.create("Rack", name="r", spec={"v": 1})
            app.client.patch("Rack", "r", {"v": 2})
        target = {"object": data / "racks" / "rack-0badf1f0.json",
                  "snapshot": history_dir(data, rack.uid) / "2.json",
                  "reservation": data / ".fabrica" / "resource-version",
                  "object-dir": data / "racks" / "rack-0badf1f1.json"}[where]
        if target.exists():
            target.unlink()
        if where == "object-dir":
            target.mkdir()
        else:
            os.mkfifo(target)
        app = history_app(data)
        _start_within(app, unblock=[target])
        try:
            health = call(app, "GET", "/health")[2]
            assert health["status"] == "degraded", health
            [item] = health["quarantined"]
            assert item["path"] == target.relative_to(data).as_posix(), health
            assert ("a directory" if where == "object-dir" else "a FIFO") in item["reason"], item
            if where == "reservation":      # a new one took its place
                assert os.path.isfile(target) and not os.path.islink(target)
            else:
                assert not os.path.lexists(target)
            assert app.client.get("Rack", "r").spec == {"v": 2}
            assert app.client.patch("Rack", "r", {"v": 3}).spec == {"v": 3}
        finally:
            app.stop()
        with history_app(data) as app:
            assert app.client.get("Rack", "r").spec == {"v": 3}

    def test_links_are_neither_read_nor_written_through(self, tmp_path):
        data, outside = tmp_path / "data", tmp_path / "outside"
        with history_app(data) as app:
            rack = app.client.create("Rack", name="r", spec={"v": 1})
        outside.mkdir()
        (outside / "reservation").write_bytes(b"5000\n")
        shutil.copytree(data / "racks", outside / "racks")
        shutil.copytree(history_dir(data), outside / "history")
        (data / ".fabrica" / "resource-version").unlink()
        (data / ".fabrica" / "resource-version").symlink_to(outside / "reservation")
        shutil.rmtree(history_dir(data))
        history_dir(data).symlink_to(outside / "history")
        before = _tree(outside)
        with history_app(data) as app:
            health = call(app, "GET", "/health")[2]
            moved = sorted(item["path"] for item in health["quarantined"])
            assert moved == [".fabrica/history/racks", ".fabrica/resource-version"], health
            assert app.client.patch("Rack", "r", {"v": 2}).resource_version < "5000"
            assert history_dir(data).is_dir() and not history_dir(data).is_symlink()
        assert _tree(outside) == before
        # a kind folder that is a link: not loaded, so not written either (a restart would not serve it)
        shutil.rmtree(data / "racks")
        (data / "racks").symlink_to(outside / "racks")
        with history_app(data) as app:
            health = call(app, "GET", "/health")[2]
            assert [item["path"] for item in health["ignored"]] == ["racks/"], health
            status, _, err = call(app, "POST", "/racks", {"name": "new"})
            assert_error(status, err, 500)
            assert "symbolic link" in err["error"], err
        assert _tree(outside) == before


def _reservation_slots(data) -> list[int]:
    raw = (Path(data) / ".fabrica" / "resource-version").read_bytes()
    return [fabrica._rv_slot_value(raw[i * fabrica._RV_SLOT:(i + 1) * fabrica._RV_SLOT]) for i in (0, 1)]


class TestResourceVersionsFitTheReservation:
    """Issue 11 review: a resourceVersion past 2^63-1 (a hand edit) fails its check instead of
    breaking the reservation file."""

    @pytest.mark.parametrize("rv", ["9" * 20, "9223372036854775808", "1" * 5000],
                             ids=["20-digits", "2^63", "5000-digits"])
    def test_an_object_past_int64_is_quarantined(self, tmp_path, rv):
        data = tmp_path / "data"
        with make_app(data) as app:
            rack = app.client.create("Rack", name="r")
            app.client.create("Rack", name="s")
        path = data / "racks" / f"{rack.uid}.json"
        path.write_text(path.read_text().replace('"resourceVersion": "1"', f'"resourceVersion": "{rv}"'))
        with make_app(data) as app:
            assert [q["path"] for q in app.store.quarantined] == [f"racks/{rack.uid}.json"]
            assert "2^63-1" in app.store.quarantined[0]["reason"]
            assert int(app.client.create("Rack", name="t").resource_version) < 10 ** 6
        assert min(_reservation_slots(data)) >= 0
        with make_app(data) as app:
            assert app.client.get("Rack", "t").name == "t"

    def test_a_reservation_past_int64_is_not_used(self, tmp_path):
        data = tmp_path / "data"
        with make_app(data) as app:
            app.client.create("Rack", name="r")
        (data / ".fabrica" / "resource-version").write_bytes(b"123456789012345678901\n")     # the legacy form
        with make_app(data) as app:
            assert int(app.client.create("Rack", name="s").resource_version) < 10 ** 6
        assert min(_reservation_slots(data)) >= 0


class TestHealthListsTheWholeQuarantine:
    """Issue 11 review: /health lists every file in the quarantine, from any start-up, and stays
    degraded while one is there."""

    def test_an_earlier_start_ups_quarantine(self, tmp_path, caplog):
        data = tmp_path / "data"
        with make_app(data) as app:
            rack = app.client.create("Rack", name="r")
        (data / "racks" / f"{rack.uid}.json").write_text("{torn")
        with make_app(data) as app:
            first = call(app, "GET", "/health")[2]
        assert first["status"] == "degraded" and len(first["quarantined"]) == 1, first
        moved = first["quarantined"][0]["quarantinedTo"]
        caplog.clear()
        with make_app(data) as app:
            health = call(app, "GET", "/health")[2]
            assert health["status"] == "degraded", health
            assert [(q["path"], q["quarantinedTo"]) for q in health["quarantined"]] == [(moved, moved)], health
            assert "Rack" in app.store.unsure       # what holds garbage collection back is what /health shows
        assert "1 file(s) quarantined by earlier start-ups are still in" in caplog.text
        (data / moved).unlink()
        with make_app(data) as app:
            health = call(app, "GET", "/health")[2]
            assert health["status"] == "healthy" and health["quarantined"] == [], health


class TestFailedCreatesMakeNoKind:
    """Issue 11 review, F4: on the open server a kind exists only once an object of it is stored
    (so /apis agrees with a restart)."""

    def test_creates_that_fail_late_leave_no_kind(self, tmp_path, monkeypatch):
        monkeypatch.setattr(fabrica, "OPEN_KINDS", 4)
        data = tmp_path / "data"
        orphan = {"metadata": {"ownerReferences": [{"kind": "Foo", "uid": "foo-12345678"}]}, "spec": {}}
        with fabrica.Fabrica(data_dir=str(data), open=True, max_body=2000) as app:
            failing = [(f"/ghost{i}s", orphan, 409) for i in range(10)]     # the owner does not exist
            failing += [(f"/big{i}s", {"pad": "x" * 1900}, 413) for i in range(10)]    # the object outgrows the body
            for path, body, code in failing:
                status, _, err = call(app, "POST", path, body)
                assert_error(status, err, code)
            full = _Fault(monkeypatch, "fsync", errno.ENOSPC, 1, persistent=True)
            status, _, err = call(app, "POST", "/fulls", {"name": "f"})
            assert_error(status, err, 507)
            full.remove()
            assert call(app, "GET", "/apis")[2]["kinds"] == []
            assert app.store._plurals == {}     # nothing of them is kept
            assert call(app, "POST", "/widgets", {"name": "w1"})[0] == 201
            assert [k["kind"] for k in call(app, "GET", "/apis")[2]["kinds"]] == ["Widget"]
        with fabrica.Fabrica(data_dir=str(data), open=True) as app:
            assert [k["kind"] for k in call(app, "GET", "/apis")[2]["kinds"]] == ["Widget"]

    def test_a_failed_create_beside_one_in_flight(self, tmp_path, monkeypatch):
        with _open_app(tmp_path / "data") as app:
            store, real = app.store, app.store.create
            inside, release = threading.Event(), threading.Event()

            def held(obj, *args, **kwargs):
                if obj["metadata"]["name"] == "slow":
                    inside.set()
                    assert release.wait(10)
                return real(obj, *args, **kwargs)
            monkeypatch.setattr(store, "create", held)
            answers = []
            thread = threading.Thread(target=lambda: answers.append(call(app, "POST", "/widgets", {"name": "slow"})))
            thread.start()
            try:
                assert inside.wait(10)
                orphan = {"metadata": {"name": "o", "ownerReferences": [{"kind": "Foo", "uid": "foo-12345678"}]}}
                assert call(app, "POST", "/widgets", orphan)[0] == 409
                assert call(app, "GET", "/apis")[2]["kinds"] == []      # nothing stored yet
            finally:
                release.set()
                thread.join(10)
            assert answers[0][0] == 201, answers
            assert [k["kind"] for k in call(app, "GET", "/apis")[2]["kinds"]] == ["Widget"]
            assert call(app, "GET", "/widgets/slow")[0] == 200
            assert call(app, "POST", "/widgets", {"name": "next"})[0] == 201


def _event(n: int, kind: str = "Rack") -> dict:
    return {"type": f"io.fabrica.{kind.lower()}.updated", "resourcekind": kind, "sequence": str(n), "n": n}


class TestSubscriberQueuesShareOneBudget:
    """Issue 11 review, F6: however many slow subscribers there are, their queues together hold
    at most the bus's budget."""

    def test_the_biggest_holder_gets_the_gap(self):
        bus = fabrica.Bus()
        bus.queues_bytes = 10_000
        early = bus.tap("**")
        for n in range(4):
            bus.publish(_event(n), 1000)
        late = bus.tap("**")
        held = []
        for n in range(4, 10):
            bus.publish(_event(n), 1000)
            held.append(early.queued_bytes + late.queued_bytes)
        assert max(held) <= 10_000, held
        # the early tap held the most: it lost its queue and overflowed (GET /events ends its stream)
        assert early.overflowed and early.get(0) is None and early.queued_bytes == 0
        assert not late.overflowed and [late.get(0)["n"] for _ in range(6)] == [4, 5, 6, 7, 8, 9]
        stats = bus.stats()
        assert stats["gaps"] == 1 and stats["shed"] == 1 and stats["queuedBytes"] == 0

    def test_a_subscription_is_resynced_and_keeps_receiving(self):
        bus = fabrica.Bus()
        bus.queues_bytes = 5_000
        first, release, gaps, seen = threading.Event(), threading.Event(), [], []

        def handler(event):
            seen.append(event["n"])
            first.set()
            assert release.wait(10)
        sub = bus.subscribe("**", handler, on_gap=lambda: gaps.append(len(seen)), name="slow")
        watcher = bus.tap("**")         # a reader that keeps up
        try:
            bus.publish(_event(0), 1000)
            assert first.wait(10)       # the handler holds event 0; the next ones queue
            assert watcher.get(0)["n"] == 0
            for n in range(1, 9):
                bus.publish(_event(n), 1000)
                assert watcher.get(0)["n"] == n
                assert sub.queued_bytes + watcher.queued_bytes <= 5_000
            release.set()
            bus.publish(_event(9), 1000)
            assert wait_until(lambda: 9 in seen)
            assert gaps == [1] and sub.dropped >= 1 and not watcher.overflowed
        finally:
            release.set()
            sub.close(5)
            watcher.close()

    def test_an_apps_event_streams_and_controllers_share_it(self, tmp_path):
        app = make_app(tmp_path / "data")
        app.register("Shelf", reconcile=lambda ctx, obj: None)
        with app:
            app.bus.queues_bytes = 200_000
            streams = [app.bus.tap("**") for _ in range(8)]        # GET /events clients that never read
            for n in range(40):
                app.client.create("Rack", name=f"r{n}", spec={"pad": "x" * 20_000})
                assert sum(tap.queued_bytes for tap in streams) <= 200_000
            assert sum(t.overflowed for t in streams) >= 4
            assert re.search(r"^fabrica_event_queue_bytes \d+$", app.metrics_text(), re.M)
            for tap in streams:
                tap.close()
