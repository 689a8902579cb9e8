"""The tests of fabrica.py, in one file whose sections follow fabrica.py's banners.

Sections, in fabrica.py's order: Errors, Helpers, Resources, Patches, Label
selectors, JSON Schema, Schemas, Leader election, Stores, Memory store, File
store, Events, Bus, Work queue, Registry, Controller, Dashboard, OpenAPI, REST
API, HTTP server, Clients, Fabrica, CLI; then the examples, the README and the
benchmarks, run as a user runs them, and the file's layout. A failure points
to a banner: ``grep -n '^# .*####' test_fabrica.py``.

One harness, at the top, serves every section:

- ``call(app, method, path, body=None, headers=None, ctype=...)``: one
  in-process request through ``app.wsgi`` -> ``(status, headers, body)``,
  headers a dict with lower-case names, body the parsed JSON when the answer is
  JSON, else the raw bytes, ``None`` when empty. ``Server.request`` answers in
  the same shape over a real socket.
- ``Server`` / the ``servers`` fixture: ``python fabrica.py serve ...`` (or any
  script) as a subprocess on port 0; the port is read from its ready line.
- ``wait_until(predicate, timeout)``: polls, returns the predicate's last
  value (truthy on success). No test sleeps to wait for something.
- ``FakeClock``: an injected monotonic clock that moves only when told.
- ``STORES``, the ``store_kind`` fixture, ``open_store`` and ``store_app``:
  the stores every store-dependent test runs on.

How a new store joins (SQLite next, then PostgreSQL): add ONE entry to
``STORES`` (below, in the harness), e.g.::

    "sqlite": StoreKind(open=lambda folder, durable: fabrica.SQLiteStore(str(folder / "db.sqlite"),
                                                                        durable=durable),
                        disk=True,
                        serve=lambda folder: ["--database-url", f"sqlite:///{folder}/db.sqlite"]),

``open(folder, durable)`` returns a new, unopened store; ``folder`` is the same
for every reopen within one test, so a store with a disk finds its data there
again. Then every store-dependent test runs on it, with no other edit:

- the store conformance suite (``Stores``, fixture ``store_factory``);
- the REST tests (fixtures ``app`` and ``store_app``), the bus and controller
  tests (fixture ``h``) and owners/garbage collection (``Fabrica``), all
  through the ``store_kind`` fixture; those marked ``@pytest.mark.disk``
  (a restart on the same data, or a look at what is kept) run only on
  entries with ``disk=True`` and are skipped, saying why, on the others;
- with ``serve`` given (the ``fabrica.py serve`` options that keep the data in
  this store on ``folder``), the kill -9 and concurrent-writer tests, which run
  a real server in a subprocess (fixture ``served_store``).

``durable=True`` with ``conformance_only=True`` adds a variant that runs the
conformance suite alone (the file store's fsync variant: the apps' tests run
with fsync off). The ``File store`` section tests FileStore's own files and
faults injected into ``os.*``; a new store brings its own section for those.
"""

from __future__ import annotations   # the dataclasses below are resolved with get_type_hints

import concurrent.futures
import ast
import contextlib
import copy
import dataclasses
import errno
import functools
import http.client
import importlib.util
import io
import itertools
import json
import logging
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
import wsgiref.util
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import fabrica
from fabrica import (ConfigurationError, Schema, ValidationError, WorkQueue, schema_engine,
                     schema_from_dataclass)

ROOT = Path(__file__).resolve().parent
FABRICA_PY = ROOT / "fabrica.py"
EXAMPLES = ROOT / "examples"
README = (ROOT / "README.md").read_text()
WAIT = 10.0         # generous upper bound for anything that should happen "soon", in seconds
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
READY = re.compile(r"listening on http://\S+?:(\d+)")


###############################################################################
# Harness #####################################################################
###############################################################################

def wait_until(predicate, timeout: float = WAIT, interval: float = 0.005):
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy or ``timeout`` seconds pass.

    Returns the predicate's last value: truthy on success, falsy on timeout (so ``assert wait_until(...)``).
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(interval)


class FakeClock:
    """An injected monotonic clock (``clock=`` of WorkQueue, Controller, Fabrica): time moves only when told.

    ``clock()`` reads it; ``clock.now = t`` sets it; ``clock.advance(s)`` moves it on. Thread-safe.
    """

    def __init__(self, now: float = 0.0):
        self._lock = threading.Lock()
        self._now = now

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        with self._lock:
            return self._now

    @now.setter
    def now(self, value: float) -> None:
        with self._lock:
            self._now = value

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


_JSON_TYPE = re.compile(r"application/([\w.-]+\+)?json\b", re.I)
_DEFAULT_CTYPE = object()


def _body(data: bytes, headers: dict):
    """A response body as ``call`` gives it: parsed JSON for a JSON content type, else bytes; None when empty."""
    if not data:
        return None
    if _JSON_TYPE.match(headers.get("content-type", "")):
        return json.loads(data)
    return data


def _encode(body) -> bytes | None:
    """A request body: bytes as they are, str as UTF-8, anything else as JSON; None stays None."""
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")


def call(app, method: str, path: str, body=None, headers=None, ctype=_DEFAULT_CTYPE):
    """One in-process request through ``app.wsgi``: ``(status, headers, body)``.

    ``path`` may carry a query string and %-escapes (decoded the way a WSGI server does). ``body`` is sent as
    bytes as they are, str as UTF-8, anything else as JSON. ``ctype`` is the Content-Type: by default
    application/json when there is a body; a given one is always sent; ``None`` sends none. ``headers`` are
    request headers by their HTTP names. The answer's headers are a dict with lower-case names (repeated ones
    joined with ", "); its body is the parsed JSON when the Content-Type is JSON, else bytes, ``None`` when
    empty. A body containing a Python traceback fails the test.
    """
    environ: dict = {}
    setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    raw = _encode(body) or b""
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
                    "QUERY_STRING": query, "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw))})
    if ctype is _DEFAULT_CTYPE:
        ctype = "application/json" if body is not None else None
    if ctype is not None:
        environ["CONTENT_TYPE"] = ctype
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    seen: dict = {}

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
    assert b"Traceback (most recent call last)" not in data, data
    got = {k: ", ".join(v) for k, v in seen["headers"].items()}
    return seen["status"], got, _body(data, got)


def assert_error(status, body, code):
    """An error answer (SPEC §6.6): the exact status and a body {"error": text, "code": status, "details": [...]}."""
    assert status == code, body
    assert isinstance(body, dict) and set(body) == {"error", "code", "details"}, body
    assert body["code"] == code and isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["details"], list), body


def canon(value):
    """JSON value -> comparable form: true != 1, 1 == 1.0, member order ignored."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, list):
        return ("array", [canon(v) for v in value])
    if isinstance(value, dict):
        return ("object", {k: canon(v) for k, v in value.items()})
    return (type(value).__name__, value)


def names(items):
    """The metadata.name of each object of a list answer, in order."""
    return [o["metadata"]["name"] for o in items]


class Recorder:
    """A bus handler keeping every event it gets; waits block on a condition with a timeout."""

    def __init__(self):
        self.events: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, event):
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = WAIT) -> bool:
        """Wait until ``predicate(events)`` is true; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout)

    def wait_count(self, n: int, timeout: float = WAIT) -> bool:
        return self.wait_for(lambda events: len(events) >= n, timeout)

    def types(self) -> list[str]:
        with self._cond:
            return [e["type"] for e in self.events]

    def deleted(self, uid: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("action") == "deleted" and e.get("resourceuid") == uid]

    def flush(self, app, kind: str) -> None:
        """Create and delete a sentinel and wait for its event: every earlier event has arrived (FIFO)."""
        marker = app.client.create(kind)
        app.client.delete(kind, marker.uid)
        assert self.wait_for(lambda evs: any(e.get("resourceuid") == marker.uid for e in evs)), \
            "the sentinel event never arrived"


# -- real servers --------------------------------------------------------------

def hermetic_env(env: dict | None = None, **more) -> dict:
    """os.environ without FABRICA_* settings, updated with ``env`` and ``more``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FABRICA_")}
    return {**base, **(env or {}), **more}


class Server:
    """A server subprocess, ``python ARGV`` (by default ``fabrica.py serve``), whose port is read from its log.

    ``Server.serve(data_dir, *args, port=0)`` builds ``python fabrica.py serve ARGS --data-dir DIR --port 0``
    (``data_dir=None`` leaves the default ./data of ``cwd``). ``start()`` waits for the ready line ("listening on
    http://HOST:PORT") and sets ``port``; every stderr line is kept in ``lines``. ``request`` answers like
    ``call``. The environment is the test's without FABRICA_* variables, plus ``env``.
    """

    def __init__(self, argv, *, cwd=None, env: dict | None = None, python: str = sys.executable):
        self.python = python
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd or ROOT)
        self.env = hermetic_env(env)
        self.data_dir: str | None = None        # --data-dir, when made by Server.serve
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.ready_line = ""
        self.lines: list[str] = []
        self._cond = threading.Condition()

    @classmethod
    def serve(cls, data_dir, *args, port: int = 0, cwd=None, env: dict | None = None,
              python: str = sys.executable) -> Server:
        tail = ([] if data_dir is None else ["--data-dir", data_dir]) + ["--port", port]
        server = cls([FABRICA_PY, "serve", *args, *tail], cwd=cwd, env=env, python=python)
        server.data_dir = None if data_dir is None else str(data_dir)
        return server

    def start(self, timeout: float = 20.0) -> Server:
        self.lines, self.port, self.ready_line = [], None, ""
        self.proc = subprocess.Popen([self.python, *self.argv], cwd=self.cwd, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        with self._cond:
            self._cond.wait_for(lambda: self.port is not None or self._eof, timeout)
        if self.port is None:
            self.kill()
            pytest.fail(f"server did not start within {timeout}s: {self.argv}\n{self.log()}")
        return self

    _eof = False

    def _pump(self, stream):
        self._eof = False
        for line in stream:
            with self._cond:
                self.lines.append(line)
                match = READY.search(line)
                if match and self.port is None:
                    self.port, self.ready_line = int(match.group(1)), line
                self._cond.notify_all()
        with self._cond:
            self._eof = True        # the process closed its stderr: it is gone
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = WAIT) -> str:
        """The first stderr line matching the regex ``pattern`` (waiting up to ``timeout`` s); "" if none came."""
        found = re.compile(pattern)
        with self._cond:
            self._cond.wait_for(lambda: self._eof or any(found.search(ln) for ln in self.lines), timeout)
            return next((ln for ln in self.lines if found.search(ln)), "")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def connection(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10.0):
        """One request on a fresh connection: ``(status, headers, body)`` as ``call`` gives them."""
        conn = self.connection(timeout)
        try:
            return http_call(conn, method, path, body, headers)
        finally:
            conn.close()

    def ok(self, method: str, path: str, body=None, expect: int = 200):
        """A request that must answer ``expect``: its body."""
        status, _, value = self.request(method, path, body)
        assert status == expect, f"{method} {path} -> {status} {value}"
        return value

    def signal(self, signum) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: the exit code (a server still running after ``timeout`` is killed, and that raises)."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def http_call(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    """A request on an http.client connection (kept open): ``(status, headers, body)`` as ``call`` gives them."""
    headers = dict(headers or {})
    raw = _encode(body)
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=raw, headers=headers)
    res = conn.getresponse()
    data = res.read()
    assert b"Traceback (most recent call last)" not in data, data
    got: dict = {}
    for k, v in res.getheaders():
        got[k.lower()] = f"{got[k.lower()]}, {v}" if k.lower() in got else v
    return res.status, got, _body(data, got)


class Servers:
    """The ``servers`` fixture: ``servers(data_dir, *args)`` starts ``fabrica.py serve`` (see ``Server.serve``),
    ``servers.script(argv, cwd=, env=)`` any script; every one still running is killed at teardown."""

    def __init__(self):
        self.started: list[Server] = []

    def __call__(self, data_dir, *args, port: int = 0, cwd=None, env=None, timeout: float = 20.0) -> Server:
        return self._start(Server.serve(data_dir, *args, port=port, cwd=cwd, env=env), timeout)

    def script(self, argv, *, cwd=None, env=None, timeout: float = 20.0) -> Server:
        return self._start(Server(argv, cwd=cwd, env=env), timeout)

    def _start(self, server: Server, timeout: float) -> Server:
        self.started.append(server)
        return server.start(timeout)

    def close(self):
        for server in self.started:
            server.kill()


@pytest.fixture
def servers():
    started = Servers()
    yield started
    started.close()


def raw_request(port: int, data: bytes, *, method: str = "GET", timeout: float = 5.0):
    """Send raw bytes on a new socket and parse one response: (status, headers, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        res = http.client.HTTPResponse(sock, method=method)
        res.begin()
        return res.status, res.headers, res.read()


def build_request(port, method, path, body: bytes | None = None, headers=None, *,
                  ctype: str | None = "application/json", host: str | None = None) -> bytes:
    """The bytes of one HTTP/1.1 request with ``Connection: close``."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Connection: close"]
    if body is not None:
        if ctype is not None:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# -- stores ----------------------------------------------------------------------

@dataclass(frozen=True)
class StoreKind:
    """One store the store-dependent tests run on.

    ``open(folder: Path, durable: bool) -> fabrica.Store`` makes a new, unopened store; ``folder`` is the same
    for every reopen within one test (a store with a disk keeps its data there). ``disk``: the store keeps its
    data across a restart of the process (the restart, crash and fault tests, marked ``disk``, run on it).
    ``durable``: what ``open`` is given for this entry. ``conformance_only``: run only the store conformance
    suite on it. ``serve(folder) -> list[str]``: the ``fabrica.py serve`` options that keep the data in this
    store on ``folder`` (the kill -9 tests serve it in a subprocess); None for a store a separate process
    cannot reopen. ``on_disk(folder, plural, uid) -> (object or None, [version ids])``: what a disk store
    holds of one object and its spec history, read without the store. ``files``: it keeps the file store's
    layout (tests marked ``files`` run on it only). ``feed_outlives_process``: its change feed survives a
    restart and is bounded by its own retention (tests marked ``memory_feed``, about the in-memory feed, skip it).
    """
    open: Callable[[Path, bool], object]
    disk: bool
    durable: bool = False
    conformance_only: bool = False
    serve: Callable[[Path], list] | None = None
    on_disk: Callable[[Path, str, str], tuple] | None = None
    files: bool = False                     # the file store's layout: the tests marked ``files`` run on it
    feed_outlives_process: bool = False     # a database's feed: the tests marked ``memory_feed`` skip it


def _file_on_disk(folder: Path, plural: str, uid: str) -> tuple:
    path, history = folder / plural / f"{uid}.json", folder / ".fabrica" / "history" / plural / uid
    return (json.loads(path.read_bytes()) if path.exists() else None,
            sorted(int(p.stem) for p in history.glob("*.json")) if history.is_dir() else [])


def _sqlite_on_disk(folder: Path, plural: str, uid: str) -> tuple:
    conn = sqlite3.connect(f"file:{folder / 'app.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT doc FROM objects WHERE uid = ?", (uid,)).fetchone()
        versions = [v for v, in conn.execute("SELECT version FROM history WHERE uid = ? ORDER BY version", (uid,))]
    finally:
        conn.close()
    return (None if row is None else json.loads(row[0])), versions


STORES = {
    "memory": StoreKind(open=lambda folder, durable: fabrica.MemoryStore(), disk=False),
    "file": StoreKind(open=lambda folder, durable: fabrica.FileStore(str(folder), durable=durable), disk=True,
                      serve=lambda folder: ["--data-dir", str(folder)], on_disk=_file_on_disk, files=True),
    "file-fsync": StoreKind(open=lambda folder, durable: fabrica.FileStore(str(folder), durable=durable),
                            disk=True, durable=True, conformance_only=True),
    "sqlite": StoreKind(open=lambda folder, durable: fabrica.SQLiteStore(str(folder / "app.db"), durable=durable),
                        disk=True, serve=lambda folder: ["--database-url", f"sqlite:///{folder}/app.db"],
                        on_disk=_sqlite_on_disk, feed_outlives_process=True),
    "sqlite-fsync": StoreKind(open=lambda folder, durable: fabrica.SQLiteStore(str(folder / "app.db"),
                                                                               durable=durable),
                              disk=True, durable=True, conformance_only=True),
}
APP_STORES = [name for name, kind in STORES.items() if not kind.conformance_only]
SERVED_STORES = [name for name in APP_STORES if STORES[name].disk and STORES[name].serve is not None]


def skip_unless_disk(item, store: str) -> None:
    """Skip, saying why, a ``disk``-marked test on a store that keeps nothing across a restart, a
    ``files``-marked one on a store without the file store's layout, and a ``memory_feed``-marked one on a
    store whose change feed outlives the process."""
    kind = STORES[store]
    if item.get_closest_marker("disk") is not None and not kind.disk:
        pytest.skip(f"needs a store with a disk: the {store!r} store keeps nothing across a restart")
    if item.get_closest_marker("files") is not None and not kind.files:
        pytest.skip(f"tests the file store's layout (a JSON file per object, .fabrica/): the {store!r} store has none")
    if item.get_closest_marker("memory_feed") is not None and kind.feed_outlives_process:
        pytest.skip(f"the {store!r} store keeps its change feed across restarts, within its retention (its own "
                    "section tests both)")


@pytest.fixture(params=APP_STORES)
def store_kind(request) -> str:
    """The name of a STORES entry (every one but the conformance-only ones); ``disk`` tests skip disk-less ones."""
    skip_unless_disk(request.node, request.param)
    return request.param


class StoreMaker:
    """``maker()`` opens a store of one STORES entry (again on the same folder, for a store with a disk) with
    the kinds Rack and Chassis; ``maker.close()`` closes every store it opened."""

    def __init__(self, name: str, folder: Path):
        self.name, self.kind, self.folder = name, STORES[name], folder
        self.opened: list = []

    @property
    def data_dir(self) -> Path:
        return self.folder

    def __call__(self):
        self.close()
        if self.opened and not self.kind.disk:
            pytest.fail(f"the {self.name!r} store keeps nothing across a reopen")
        store = self.kind.open(self.folder, self.kind.durable)
        store.open({"Rack": "racks", "Chassis": "chassis"})
        self.opened.append(store)
        return store

    def close(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=list(STORES))
def store_factory(request, tmp_path):
    """A StoreMaker for each STORES entry (the conformance suite runs on every one)."""
    skip_unless_disk(request.node, request.param)
    maker = StoreMaker(request.param, tmp_path / "store")
    yield maker
    maker.close()


def open_store(store_kind: str, folder: Path):
    """A new store of a STORES entry on ``folder`` (unopened: ``Fabrica(store=...)`` opens it)."""
    kind = STORES[store_kind]
    return kind.open(Path(folder), kind.durable)


@pytest.fixture(params=SERVED_STORES)
def served_store(request) -> str:
    """The name of each STORES entry a ``fabrica.py serve`` subprocess keeps its data in across a kill -9."""
    return request.param


def serve_store(servers: Servers, store_kind: str, folder, *args) -> Server:
    """``fabrica.py serve ARGS`` on port 0 keeping its data in a store of the STORES entry on ``folder``."""
    return servers(None, *STORES[store_kind].serve(Path(folder)), *args)


@pytest.fixture
def store_app(store_kind, tmp_path):
    """``store_app(register=None, **options)`` -> a started Fabrica on a store of the parametrized STORES entry
    (on ``tmp_path/"data"``, the same folder on every call, so a second app on a disk store reopens the data);
    ``register(app)`` declares the kinds first. Every app is stopped at teardown."""
    apps = []

    def make(register=None, **options):
        options.setdefault("durable", False)
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"),
                              store=open_store(store_kind, tmp_path / "data"), **options)
        if register is not None:
            register(app)
        apps.append(app)
        return app.start()
    yield make
    for app in reversed(apps):
        app.stop(timeout=5)


# -- apps of the kinds Rack and Chassis ------------------------------------------
MIB = 1 << 20
ENVELOPE_KEYS = ["apiVersion", "kind", "schemaVersion", "metadata", "spec", "status"]
METADATA_KEYS = ["name", "uid", "labels", "annotations", "createdAt", "updatedAt", "generation",
                 "resourceVersion", "finalizers", "ownerReferences", "deletionTimestamp"]
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def data_files(data_dir, pattern="*.json"):
    return sorted(p for p in Path(data_dir).rglob(pattern) if ".fabrica" not in p.parts)


def temp_files(data_dir):
    return sorted(p for p in Path(data_dir).rglob(".tmp-*"))


def make_app(data_dir, store_kind: str | None = None, **options) -> fabrica.Fabrica:
    """An app (not started) of the kinds Rack and Chassis on ``data_dir``: on the default (file) store, or on
    a store of the STORES entry ``store_kind`` kept in ``data_dir``."""
    if store_kind is not None:
        options["store"] = open_store(store_kind, data_dir)
    app = fabrica.Fabrica(data_dir=str(data_dir), **options)
    app.register("Rack")
    app.register("Chassis", prefix="ch")
    return app


@pytest.fixture
def app(store_kind, tmp_path):
    """A started app of the kinds Rack and Chassis on each store (``store_kind``), on ``tmp_path/"data"``."""
    application = make_app(tmp_path / "data", store_kind)
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


###############################################################################
# Errors ######################################################################
###############################################################################

ERROR_STATUSES = [(fabrica.BadRequestError, 400), (fabrica.UnauthorizedError, 401), (fabrica.ForbiddenError, 403),
                  (fabrica.NotFoundError, 404), (fabrica.RequestTimeoutError, 408), (fabrica.ConflictError, 409),
                  (fabrica.GoneError, 410), (fabrica.PreconditionFailedError, 412),
                  (fabrica.PayloadTooLargeError, 413), (fabrica.UnsupportedMediaTypeError, 415),
                  (fabrica.ValidationError, 422), (fabrica.InsufficientStorageError, 507)]


@pytest.mark.parametrize("cls, status", ERROR_STATUSES, ids=[c.__name__ for c, _ in ERROR_STATUSES])
def test_an_error_body_maps_back_to_its_class(cls, status):
    err = cls("it failed", [{"field": "spec.a", "message": "is required"}])
    assert err.status == status and isinstance(err, fabrica.FabricaError)
    assert err.to_json() == {"error": "it failed", "code": status,
                             "details": [{"field": "spec.a", "message": "is required"}]}
    back = fabrica.error_for_status(status, "it failed", err.details)
    assert type(back) is cls and back.status == status and back.details == err.details


def test_error_for_status_by_reason_and_an_unknown_status():
    assert type(fabrica.error_for_status(409, "m", reason="StaleError")) is fabrica.StaleError
    assert type(fabrica.error_for_status(422, "m", reason="PatchError")) is fabrica.PatchError
    assert type(fabrica.error_for_status(404, "m", reason="StaleError")) is fabrica.NotFoundError  # not a 404 kind
    odd = fabrica.error_for_status(599, "m")
    assert type(odd) is fabrica.FabricaError and odd.status == 599


###############################################################################
# Helpers #####################################################################
###############################################################################

@pytest.mark.parametrize("kind, plural", [("Rack", "racks"), ("Policy", "policies"), ("Key", "keys"),
                                          ("Box", "boxes"), ("Switch", "switches"), ("Chassis", "chassis")])
def test_pluralize_and_singularize_are_inverses(kind, plural):
    assert fabrica.pluralize(kind) == plural
    assert fabrica.singularize(plural) == kind


@pytest.mark.parametrize("raw, words", [
    (b"\xef\xbb\xbf{}", "byte-order mark"),
    (b'{"a": "\xff"}', "invalid UTF-8 at byte 7"),
    (b"  ", "the body is empty"),
    (b'{"a": NaN}', "NaN is not valid JSON"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"a": 1e999}', "overflows a double"),
    (b'{"a": 9223372036854775808}', "outside the signed 64-bit range"),
    (b'{"a": "\\ud800"}', "lone surrogate"),
    (b"[1]", "expected an object, got list"),
    (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", "nesting deeper than 64"),
], ids=["bom", "utf8", "empty", "nan", "duplicate", "overflow", "int64", "surrogate", "not-object", "depth"])
def test_read_json_refuses_what_is_not_plain_json(raw, words):
    with pytest.raises(fabrica.BadRequestError, match=re.escape(words)):
        fabrica.read_json(raw)


def test_read_json_json_size_and_json_depth_of_plain_json():
    value = fabrica.read_json('{"a": [1, 2.5, "é", null, true], "b": {"c": {}}}'.encode())
    assert value == {"a": [1, 2.5, "é", None, True], "b": {"c": {}}}
    assert fabrica.read_json(b"[1]", want_object=False) == [1]
    assert fabrica.json_size(value) == len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    assert fabrica.json_size({"a": "é"}) == 10           # bytes of UTF-8, not characters
    assert [fabrica.json_depth(v) for v in (1, {}, [1], {"a": []}, value)] == [0, 1, 1, 2, 3]
    copied = fabrica.deepcopy_json(value)
    assert copied == value and copied["b"]["c"] is not value["b"]["c"]


###############################################################################
# Resources ###################################################################
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
            assert RFC3339.fullmatch(meta["createdAt"]) and RFC3339.fullmatch(meta["updatedAt"])
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

        def rv_of(answer, expected=200):
            status, _, obj = answer
            assert status == expected, obj
            rvs.append(int(obj["metadata"]["resourceVersion"]))
        rv_of(call(app, "POST", "/racks", {"name": "a"}), 201)
        rv_of(call(app, "POST", "/chassis", {"name": "a"}), 201)
        rv_of(call(app, "PUT", "/racks/a", {"x": 1}))
        rv_of(call(app, "PUT", "/chassis/a/status", {"phase": "x"}))
        rv_of(call(app, "PATCH", "/racks/a", {"y": 2}))
        rv_of(call(app, "PUT", "/racks/a", {"metadata": {"labels": {"k": "v"}}}))
        status, _, body = call(app, "DELETE", "/chassis/a")
        assert status == 200 and body["uid"].startswith("ch-"), body
        rvs.append(app.store.resource_version)
        rv_of(call(app, "POST", "/chassis", {"name": "a"}), 201)
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

    @pytest.mark.disk
    def test_noop_put_answers_200_same_rv_and_publishes_nothing(self, app):
        log = EventLog(app)
        obj = call(app, "POST", "/racks", {"name": "n", "labels": {"a": "b"}, "x": 1})[2]
        rv, uid = obj["metadata"]["resourceVersion"], obj["metadata"]["uid"]
        log.barrier()
        before = len(log.for_uid(uid))
        on_disk = isinstance(app.store, fabrica.FileStore)      # its file is not even rewritten
        path = Path(app.store.data_dir) / "racks" / f"{uid}.json" if on_disk else None
        stamp = (path.stat().st_ino, path.stat().st_mtime_ns) if on_disk else None
        for body in ({"x": 1}, {"labels": {"a": "b"}, "x": 1}, {"metadata": {"labels": {"a": "b"}}, "spec": {"x": 1}}):
            status, headers, same = call(app, "PUT", "/racks/n", body)
            assert status == 200, same
            assert same["metadata"]["resourceVersion"] == rv and headers["etag"] == f'"{rv}"'
            assert same == obj
        status, _, same = call(app, "PUT", "/racks/n/status", {})
        assert status == 200 and same["metadata"]["resourceVersion"] == rv
        log.barrier()
        assert len(log.for_uid(uid)) == before, "a no-op write published an event"
        if on_disk:
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
# Patches #####################################################################
###############################################################################

def json_eq(a, b) -> bool:
    return canon(a) == canon(b)


def snapshot(value) -> str:
    """Exact serialisation (member order and int/float kept) to detect mutation."""
    return json.dumps(value)


def test_canon_distinguishes_bool_from_number():
    assert json_eq(1, 1.0) and json_eq({"a": [1]}, {"a": [1.0]})
    assert not json_eq(1, True) and not json_eq([0], [False]) and not json_eq("1", 1)


# -- Merge patch (RFC 7386) ------------------------------------------------------------------------

RFC7386_EXAMPLES = [  # RFC 7386, Appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize("doc, patch, expected", RFC7386_EXAMPLES)
def test_merge_patch_rfc_examples(doc, patch, expected):
    before = snapshot((doc, patch))
    assert json_eq(fabrica.apply_merge_patch(doc, patch), expected)
    assert snapshot((doc, patch)) == before


def test_merge_patch_result_shares_nothing_with_inputs():
    doc = {"keep": {"x": [1]}, "b": 1}
    patch = {"new": {"y": [2]}, "list": [None, {"z": None}]}
    result = fabrica.apply_merge_patch(doc, patch)
    assert result["list"] == [None, {"z": None}]  # nulls inside arrays are values
    result["keep"]["x"].append(9)
    result["new"]["y"].append(9)
    assert doc == {"keep": {"x": [1]}, "b": 1}
    assert patch == {"new": {"y": [2]}, "list": [None, {"z": None}]}


def test_merge_patch_diff_examples():
    a = {"keep": 1, "gone": 2, "nested": {"x": 1, "y": 2}, "flag": 1, "list": [1, 2]}
    b = {"keep": 1, "nested": {"x": 1, "y": 3}, "flag": True, "list": [1], "new": {"z": 1}}
    assert fabrica.merge_patch_diff(a, b) == {
        "gone": None, "nested": {"y": 3}, "flag": True, "list": [1], "new": {"z": 1}}
    assert fabrica.merge_patch_diff(a, a) == {}
    assert fabrica.merge_patch_diff({"n": 1}, {"n": 1.0}) == {}  # same JSON number


def test_merge_patch_diff_cannot_express_null_values():
    patch = fabrica.merge_patch_diff({"a": 1}, {"a": None})
    assert fabrica.apply_merge_patch({"a": 1}, patch) == {}  # documented limitation


json_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
)
json_keys = st.one_of(st.sampled_from(["a", "b", "c", "d"]), st.text(max_size=3))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(a=json_objects, b=json_objects)
def test_merge_patch_diff_round_trips(a, b):
    before = snapshot((a, b))
    patch = fabrica.merge_patch_diff(a, b)
    assert json_eq(fabrica.apply_merge_patch(a, patch), b)
    assert snapshot((a, b)) == before


@settings(max_examples=100, deadline=None)
@given(a=json_objects)
def test_merge_patch_diff_of_related_documents_round_trips(a):
    # Independent documents rarely share nested structure; derive b from a.
    b = copy.deepcopy(a)
    b.pop(next(iter(b), None), None)
    b.setdefault("d", {})
    if isinstance(b["d"], dict):
        b["d"]["x"] = [True, 0]
    patch = fabrica.merge_patch_diff(a, b)
    assert json_eq(fabrica.apply_merge_patch(a, patch), b)


# -- JSON Patch (RFC 6902) conformance suite -------------------------------------------------------


def _suite_dir() -> Path | None:
    default = Path(__file__).parent.parent / "shared/conformance/json-patch"
    if default.is_dir():
        return default
    override = os.environ.get("FABRICA_JSON_PATCH_SUITE")
    if override and Path(override).is_dir():
        return Path(override)
    return None


def _suite_cases():
    folder = _suite_dir()
    if folder is None:
        reason = ("JSON Patch suite not found: expected ../shared/conformance/json-patch "
                  "or $FABRICA_JSON_PATCH_SUITE")
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="suite-absent")]
    cases = []
    for name in ("tests.json", "spec_tests.json"):
        for index, case in enumerate(json.loads((folder / name).read_text())):
            if case.get("disabled") or "patch" not in case:
                continue
            label = f"{name}:{index}:{case.get('comment', '')[:40]}"
            cases.append(pytest.param(case, id=label))
    return cases


SUITE_CASES = _suite_cases()


@pytest.mark.parametrize("case", SUITE_CASES)
def test_json_patch_conformance(case):
    doc_before, patch_before = snapshot(case["doc"]), snapshot(case["patch"])
    if "error" in case:
        with pytest.raises(fabrica.PatchError):
            fabrica.apply_json_patch(case["doc"], case["patch"])
    else:
        result = fabrica.apply_json_patch(case["doc"], case["patch"])
        if "expected" in case:
            assert json_eq(result, case["expected"]), case.get("comment")
    assert snapshot(case["doc"]) == doc_before, "input document was mutated"
    assert snapshot(case["patch"]) == patch_before, "patch was mutated"


def test_conformance_suite_was_loaded():
    if _suite_dir() is None:
        pytest.skip("JSON Patch suite not found: expected ../shared/conformance/json-patch "
                    "or $FABRICA_JSON_PATCH_SUITE")
    # Both files, every enabled record: 92 from tests.json + 16 from spec_tests.json
    # at the pinned commit. A lower count means the loader lost cases.
    assert len(SUITE_CASES) >= 108
    print(f"JSON Patch conformance cases run: {len(SUITE_CASES)}")


# -- JSON Patch: messages, purity and edge cases ---------------------------------------------------


def patch_error(doc, ops) -> fabrica.PatchError:
    with pytest.raises(fabrica.PatchError) as info:
        fabrica.apply_json_patch(doc, ops)
    assert info.value.status == 422
    return info.value


def test_error_names_op_index_and_path():
    ops = [{"op": "test", "path": "/a", "value": {}},
           {"op": "add", "path": "/x", "value": 1},
           {"op": "remove", "path": "/a/b"}]
    error = patch_error({"a": {}}, ops)
    assert error.message == "op 2 (remove): path '/a/b' does not exist"
    assert error.details == [{"field": "patch[2]", "message": "path '/a/b' does not exist"}]


def test_error_names_the_first_missing_parent():
    error = patch_error({}, [{"op": "add", "path": "/a/b", "value": 1}])
    assert error.message == "op 0 (add): path '/a' does not exist"


@pytest.mark.parametrize("ops, fragment", [
    ({"op": "add"}, "must be an array"),
    ([["add", "/a"]], "op 0: an operation must be an object"),
    ([{"path": "/a", "value": 1}], "'op' must be one of"),
    ([{"op": 1, "path": "/a"}], "'op' must be one of"),
    ([{"op": "add", "value": 1}], "missing 'path'"),
    ([{"op": "add", "path": 1, "value": 1}], "'path' must be a string, not a number"),
    ([{"op": "add", "path": ["a"], "value": 1}], "'path' must be a string, not an array"),
    ([{"op": "copy", "path": "/b", "from": 1}], "'from' must be a string"),
    ([{"op": "move", "path": "/b"}], "missing 'from'"),
    ([{"op": "add", "path": "/~2", "value": 1}], "'~' not followed"),
    ([{"op": "add", "path": "/a~", "value": 1}], "'~' not followed"),
    ([{"op": "replace", "path": "a", "value": 1}], "must be empty or start with '/'"),
    ([{"op": "remove", "path": ""}], "whole document"),
    ([{"op": "move", "from": "/a", "path": "/a/b"}], "into its own child"),
    ([{"op": "move", "from": "", "path": "/a"}], "into its own child"),
    ([{"op": "add", "path": "/a/b", "value": 1}], "parent is a number"),
    ([{"op": "test", "path": "/a", "value": True}], "test failed: '/a' is 1, not true"),
])
def test_malformed_or_failing_operations(ops, fragment):
    assert fragment in patch_error({"a": 1}, ops).message


@pytest.mark.parametrize("op", [
    {"op": "remove", "path": "/l/-"},
    {"op": "replace", "path": "/l/-", "value": 0},
    {"op": "test", "path": "/l/-", "value": 0},
    {"op": "replace", "path": "/l/2", "value": 0},
    {"op": "add", "path": "/l/3", "value": 0},
    {"op": "add", "path": "/l/01", "value": 0},
    {"op": "add", "path": "/l/+1", "value": 0},
    {"op": "add", "path": "/l/ 1", "value": 0},
    {"op": "add", "path": "/l/\u0661", "value": 0},  # ARABIC-INDIC DIGIT ONE
    {"op": "copy", "from": "/l/2", "path": "/x"},
])
def test_array_index_rules(op):
    patch_error({"l": [1, 2]}, [op])


def test_array_index_rules_accept_valid_forms():
    doc = {"l": [1, 2], "o": {}}
    result = fabrica.apply_json_patch(doc, [
        {"op": "add", "path": "/l/2", "value": 3},       # index == len appends
        {"op": "add", "path": "/l/-", "value": 4},
        {"op": "add", "path": "/l/0", "value": 0},
        {"op": "add", "path": "/o/-", "value": "dash"},  # "-" is a plain key in objects
        {"op": "add", "path": "/o/01", "value": "zero-one"},
    ])
    assert result == {"l": [0, 1, 2, 3, 4], "o": {"-": "dash", "01": "zero-one"}}


def test_test_op_uses_json_equality():
    doc = {"i": 1, "f": 1.0, "t": True, "l": [1, {"a": False}]}
    ok = [{"op": "test", "path": "/i", "value": 1.0},
          {"op": "test", "path": "/f", "value": 1},
          {"op": "test", "path": "/t", "value": True},
          {"op": "test", "path": "/l", "value": [1.0, {"a": False}]}]
    assert fabrica.apply_json_patch(doc, ok) == doc
    for path, value in [("/i", True), ("/t", 1), ("/l", [True, {"a": 0}]), ("/i", "1"),
                        ("/l", [1]), ("/f", None)]:
        patch_error(doc, [{"op": "test", "path": path, "value": value}])


def test_move_and_copy():
    doc = {"a": {"b": [1, 2]}, "ab": 0}
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "/a", "path": "/ab"}]) == \
        {"ab": {"b": [1, 2]}}  # "/ab" shares a string prefix, not a token prefix
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "/a/b", "path": ""}]) == [1, 2]
    assert fabrica.apply_json_patch(doc, [{"op": "move", "from": "", "path": ""}]) == doc
    patch_error(doc, [{"op": "move", "from": "/zz", "path": "/zz"}])
    result = fabrica.apply_json_patch(doc, [{"op": "copy", "from": "/a", "path": "/c"}])
    result["c"]["b"].append(3)
    assert result["a"] == {"b": [1, 2]}


def test_json_patch_is_pure_and_does_not_alias_patch_values():
    doc = {"spec": {"x": 1}}
    ops = [{"op": "add", "path": "/new", "value": {}},
           {"op": "add", "path": "/new/inner", "value": [1]},
           {"op": "add", "path": "/new/inner/-", "value": 2},
           {"op": "replace", "path": "/spec", "value": {"y": []}},
           {"op": "add", "path": "/spec/y/0", "value": "z"}]
    before = snapshot((doc, ops))
    result = fabrica.apply_json_patch(doc, ops)
    assert result == {"spec": {"y": ["z"]}, "new": {"inner": [1, 2]}}
    assert snapshot((doc, ops)) == before
    assert fabrica.apply_json_patch(doc, []) is not doc


def test_json_patch_is_atomic():
    doc = {"a": 1}
    patch_error(doc, [{"op": "add", "path": "/b", "value": 2}, {"op": "remove", "path": "/c"}])
    assert doc == {"a": 1}


def test_replace_keeps_member_order():
    result = fabrica.apply_json_patch({"a": 1, "b": 2, "c": 3},
                                      [{"op": "replace", "path": "/a", "value": 9}])
    assert list(result) == ["a", "b", "c"]


def test_resolve_pointer():
    doc = {"a/b": {"~": [10, {"": "empty"}]}, "~1": "tilde-one", "/": "slash"}
    assert fabrica.resolve_pointer(doc, "") is doc
    assert fabrica.resolve_pointer(doc, "/~01") == "tilde-one"  # ~1 unescaped before ~0
    assert fabrica.resolve_pointer(doc, "/~1") == "slash"
    assert fabrica.resolve_pointer(doc, "/a~1b/~0/1/") == "empty"
    for bad in ["/a~1b/~0/2", "/a~1b/~0/-", "/nope", "x", "/a~2b"]:
        with pytest.raises(fabrica.PatchError):
            fabrica.resolve_pointer(doc, bad)
    with pytest.raises(fabrica.PatchError):
        fabrica.resolve_pointer(doc, None)


# -- Shorthand patch -------------------------------------------------------------------------------


def test_shorthand_sets_removes_and_creates():
    doc = {"a": {"b": 1, "keep": True}, "c": 2, "n": None}
    patch = {"a.b": 5, "c": None, "x.y.z": [1], "n.m": "v", "gone": None, "a.q.r": None}
    before = snapshot((doc, patch))
    result = fabrica.apply_shorthand_patch(doc, patch)
    assert result == {"a": {"b": 5, "keep": True}, "x": {"y": {"z": [1]}}, "n": {"m": "v"}}
    assert snapshot((doc, patch)) == before
    result["x"]["y"]["z"].append(2)
    assert patch["x.y.z"] == [1]


def test_shorthand_applies_keys_in_sorted_order():
    assert fabrica.apply_shorthand_patch({"a": 1}, {"a.b": 1, "a": None}) == {"a": {"b": 1}}
    with pytest.raises(fabrica.PatchError, match="'a' is a number"):
        fabrica.apply_shorthand_patch({}, {"a.b": 2, "a": 1})


def test_shorthand_remove_of_missing_path_is_not_an_error():
    doc = {"a": [1], "s": "x"}
    patch = {"a.0": None, "s.t": None, "missing.deep": None, "zz": None}
    assert fabrica.apply_shorthand_patch(doc, patch) == doc


@pytest.mark.parametrize("doc, patch, fragment", [
    ({"a": [1]}, {"a.0": 2}, "'a' is an array"),
    ({"a": {"b": "s"}}, {"a.b.c": 1}, "'a.b' is a string"),
    ({}, {"a..b": 1}, "invalid shorthand path"),
    ({}, {".a": 1}, "invalid shorthand path"),
    ({}, {"a.": None}, "invalid shorthand path"),
    ({}, {"": 1}, "invalid shorthand path"),
    ({}, [("a", 1)], "must be an object"),
    ([], {"a": 1}, "applies to an object"),
])
def test_shorthand_errors(doc, patch, fragment):
    with pytest.raises(fabrica.PatchError) as info:
        fabrica.apply_shorthand_patch(doc, patch)
    assert fragment in info.value.message


###############################################################################
# Label selectors #############################################################
###############################################################################

# -- Label selectors -------------------------------------------------------------------------------

SELECTOR_LABELS = {
    "web-prod": {"app": "web", "env": "prod", "tier": "frontend"},
    "web-dev": {"app": "web", "env": "dev", "canary": "true"},
    "db-prod": {"app": "db", "env": "prod", "tier": "backend", "example.com/owner": "ops"},
    "db-stage": {"app": "db", "env": "staging", "example.com/owner": "team-a"},
    "cache": {"app": "cache", "tier": "backend"},
    "blank": {"app": "", "env": "prod"},
    "keywords": {"in": "notin", "env": "dev"},
    "bare": {},
}
SELECTOR_ALL = set(SELECTOR_LABELS)

SELECTOR_TABLE = [
    ("", SELECTOR_ALL),
    (" \t ", SELECTOR_ALL),
    ("app=web", {"web-prod", "web-dev"}),
    ("app==web", {"web-prod", "web-dev"}),
    ("app!=web", SELECTOR_ALL - {"web-prod", "web-dev"}),
    ("app", SELECTOR_ALL - {"keywords", "bare"}),
    ("!app", {"keywords", "bare"}),
    ("app in (web,db)", {"web-prod", "web-dev", "db-prod", "db-stage"}),
    ("app notin (web,db)", {"cache", "blank", "keywords", "bare"}),
    ("env=prod,tier=backend", {"db-prod"}),
    ("env in (prod),tier", {"web-prod", "db-prod"}),
    ("  app  =  web  ,  env  !=  dev  ", {"web-prod"}),
    ("env=prod\t,\napp", {"web-prod", "db-prod", "blank"}),
    ("app=", {"blank"}),
    ("app==", {"blank"}),
    ("app!=", SELECTOR_ALL - {"blank"}),
    ("app in ()", {"blank"}),
    ("app notin ()", SELECTOR_ALL - {"blank"}),
    ("app in (web,,db)", {"web-prod", "web-dev", "db-prod", "db-stage", "blank"}),
    ("app in (,)", {"blank"}),
    ("app in (db,)", {"db-prod", "db-stage", "blank"}),
    ("example.com/owner", {"db-prod", "db-stage"}),
    ("example.com/owner=ops", {"db-prod"}),
    ("!example.com/owner,app=db", set()),
    ("app in (db),example.com/owner notin (ops)", {"db-stage"}),
    ("in", {"keywords"}),
    ("in=notin", {"keywords"}),
    ("in in (notin,in)", {"keywords"}),
    ("notin notin (in)", SELECTOR_ALL),
    ("canary,!tier", {"web-dev"}),
    ("tier!=frontend,tier", {"db-prod", "cache"}),
    ("env notin (prod,dev),app", {"db-stage", "cache"}),
    ("nosuchlabel", set()),
    ("!nosuchlabel", SELECTOR_ALL),
    ("app=web,app=db", set()),
    ("A.b_c-9=X.y_z-0", set()),
]


@pytest.mark.parametrize("text, expected", SELECTOR_TABLE,
                         ids=[text or "<empty>" for text, _ in SELECTOR_TABLE])
def test_selector_matches(text, expected):
    selector = fabrica.parse_selector(text)
    assert {name for name, labels in SELECTOR_LABELS.items() if selector.matches(labels)} == expected


def test_selector_table_is_large_enough():
    assert len(SELECTOR_TABLE) >= 25 and len(MALFORMED_SELECTORS) >= 12


@pytest.mark.parametrize("text, _", SELECTOR_TABLE)
def test_index_candidates_never_exclude_a_match(text, _):
    selector = fabrica.parse_selector(text)
    for labels in SELECTOR_LABELS.values():
        if selector.matches(labels):
            for key, values in selector.index_candidates():
                assert key in labels and (values is None or labels[key] in values)


def test_selector_requirements_and_index_candidates():
    selector = fabrica.parse_selector("a==b, c in (x,y), !d, e, f notin (z), g!=h, i=j")
    assert selector.requirements == [
        ("a", "=", frozenset({"b"})),
        ("c", "in", frozenset({"x", "y"})),
        ("d", "!", frozenset()),
        ("e", "exists", frozenset()),
        ("f", "notin", frozenset({"z"})),
        ("g", "!=", frozenset({"h"})),
        ("i", "=", frozenset({"j"})),
    ]
    assert selector.index_candidates() == [
        ("a", frozenset({"b"})), ("c", frozenset({"x", "y"})), ("e", None), ("i", frozenset({"j"}))]
    assert fabrica.parse_selector("!a,b!=c,d notin (e)").index_candidates() == []
    assert fabrica.parse_selector("").requirements == []


LONG_PREFIX = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


def test_label_key_and_value_limits():
    for text in ["a" * 63, f"{LONG_PREFIX}/{'n' * 63}", "k=" + "v" * 63, "a-b.c/d_e",
                 "x.io/A_b-c.D=Z_y-x.W", "k in (" + ",".join(["v" * 63] * 3) + ")"]:
        fabrica.parse_selector(text)
    for text in ["a" * 64, f"{LONG_PREFIX}x/n", f"{LONG_PREFIX}/{'n' * 64}",
                 "k=" + "v" * 64, "k in (ok," + "v" * 64 + ")"]:
        with pytest.raises(fabrica.BadRequestError):
            fabrica.parse_selector(text)


MALFORMED_SELECTORS = [
    "=", "=b", "!", "!!a", "a!", "a b", ",a", "a,", "a,,b", "a=b,",
    "!a=b", "!a in (b)", "a=b=c", "a=(b)", "a=b c", "a!!=b", "a===b",
    "a in b", "a in (b", "a in (b c)", "a in (b))", "a in (,,)", "a in (b,,)",
    "a in (b,=)", "a notin", "a in", "a=b!", "a>1", "a<1",
    "a" * 64, "a/b/c", "/a", "Example.com/a", "-a", "a-", "a.", "a=-b", "a=b_",
    "ü=1", "a in (ü)", "c_d/e=1", "a.B/c", "a=b,(c)", "in in", "a notin (b) c",
]


@pytest.mark.parametrize("text", MALFORMED_SELECTORS)
def test_malformed_selectors_raise(text):
    with pytest.raises(fabrica.BadRequestError) as info:
        fabrica.parse_selector(text)
    assert info.value.status == 400
    assert info.value.message.startswith(f"invalid label selector '{text}': ")
    assert info.value.details and info.value.details[0]["field"] == "labelSelector"


def test_selector_error_messages_say_what_was_expected():
    cases = {
        "x!": "found '!' after 'x', expected =, ==, !=, in or notin",
        "a,": "found end of string, expected a label key",
        "a in b": "found 'b', expected '('",
        "a>1": "operator '>' is not supported",
        "a" * 64: "longer than 63 characters",
    }
    for text, reason in cases.items():
        with pytest.raises(fabrica.BadRequestError) as info:
            fabrica.parse_selector(text)
        assert reason in info.value.message, info.value.message
    with pytest.raises(fabrica.BadRequestError):
        fabrica.parse_selector(None)


###############################################################################
# JSON Schema #################################################################
###############################################################################

try:
    import jsonschema  # noqa: F401
    HAVE_JSONSCHEMA = True
except ImportError:
    HAVE_JSONSCHEMA = False

ENGINES = ["builtin", pytest.param("jsonschema", marks=pytest.mark.skipif(
    not HAVE_JSONSCHEMA, reason="jsonschema not installed"))]
DROP = object()     # in a table patch: remove this key from the valid value

# --- schema keywords: each case wraps its schema as property "x" ---

def prop(schema, **outer):
    return {"type": "object", "properties": {"x": schema}, **outer}


KEYWORD_CASES = [
    # (id, schema, value, failing fields)
    ("type-string", prop({"type": "string"}), {"x": "a"}, []),
    ("type-string-bad", prop({"type": "string"}), {"x": 1}, ["spec.x"]),
    ("type-integer", prop({"type": "integer"}), {"x": 2.0}, []),
    ("type-integer-bad", prop({"type": "integer"}), {"x": 2.5}, ["spec.x"]),
    ("type-integer-bool", prop({"type": "integer"}), {"x": False}, ["spec.x"]),
    ("type-number", prop({"type": "number"}), {"x": 1}, []),
    ("type-number-bad", prop({"type": "number"}), {"x": True}, ["spec.x"]),
    ("type-boolean", prop({"type": "boolean"}), {"x": True}, []),
    ("type-boolean-bad", prop({"type": "boolean"}), {"x": 0}, ["spec.x"]),
    ("type-object", prop({"type": "object"}), {"x": {}}, []),
    ("type-object-bad", prop({"type": "object"}), {"x": []}, ["spec.x"]),
    ("type-array", prop({"type": "array"}), {"x": []}, []),
    ("type-array-bad", prop({"type": "array"}), {"x": {}}, ["spec.x"]),
    ("type-null", prop({"type": "null"}), {"x": None}, []),
    ("type-null-bad", prop({"type": "null"}), {"x": 0}, ["spec.x"]),
    ("type-list", prop({"type": ["string", "null"]}), {"x": None}, []),
    ("type-list-bad", prop({"type": ["string", "null"]}), {"x": 1}, ["spec.x"]),
    ("type-root-bad", {"type": "object"}, [], ["spec"]),
    ("properties", prop(prop({"type": "integer"})), {"x": {"x": 1}}, []),
    ("properties-bad", prop(prop({"type": "integer"})), {"x": {"x": "1"}}, ["spec.x.x"]),
    ("required", prop({}, required=["x"]), {"x": 1}, []),
    ("required-bad", prop({}, required=["x", "y"]), {}, ["spec.x", "spec.y"]),
    ("required-nested-bad", prop({"type": "object", "required": ["a"]}), {"x": {}}, ["spec.x.a"]),
    ("additionalProperties-false", prop({}, additionalProperties=False), {"x": 1}, []),
    ("additionalProperties-false-bad", prop({}, additionalProperties=False),
     {"x": 1, "y": 2, "z": 3}, ["spec.y", "spec.z"]),
    ("additionalProperties-schema", {"additionalProperties": {"type": "integer"}}, {"a": 1}, []),
    ("additionalProperties-schema-bad", {"additionalProperties": {"type": "integer"}},
     {"a": 1, "b": "2"}, ["spec.b"]),
    ("additionalProperties-true", {"type": "object", "additionalProperties": True}, {"a": 1}, []),
    ("enum", prop({"enum": ["a", 1, None]}), {"x": 1.0}, []),
    ("enum-bad", prop({"enum": ["a", 1, None]}), {"x": "b"}, ["spec.x"]),
    ("enum-bool-is-not-1", prop({"enum": [1]}), {"x": True}, ["spec.x"]),
    ("const", prop({"const": {"a": [1]}}), {"x": {"a": [1]}}, []),
    ("const-bad", prop({"const": {"a": [1]}}), {"x": {"a": [2]}}, ["spec.x"]),
    ("const-bool-bad", prop({"const": False}), {"x": 0}, ["spec.x"]),
    ("minimum", prop({"minimum": 1}), {"x": 1}, []),
    ("minimum-bad", prop({"minimum": 1}), {"x": 0.5}, ["spec.x"]),
    ("minimum-ignores-strings", prop({"minimum": 1}), {"x": "0"}, []),
    ("maximum", prop({"maximum": 5}), {"x": 5}, []),
    ("maximum-bad", prop({"maximum": 5}), {"x": 6}, ["spec.x"]),
    ("exclusiveMinimum", prop({"exclusiveMinimum": 0}), {"x": 0.1}, []),
    ("exclusiveMinimum-bad", prop({"exclusiveMinimum": 0}), {"x": 0}, ["spec.x"]),
    ("exclusiveMaximum", prop({"exclusiveMaximum": 10}), {"x": 9}, []),
    ("exclusiveMaximum-bad", prop({"exclusiveMaximum": 10}), {"x": 10}, ["spec.x"]),
    ("minLength", prop({"minLength": 2}), {"x": "ab"}, []),
    ("minLength-bad", prop({"minLength": 2}), {"x": "a"}, ["spec.x"]),
    ("maxLength", prop({"maxLength": 2}), {"x": "\u00e9\u00e9"}, []),
    ("maxLength-bad", prop({"maxLength": 2}), {"x": "abc"}, ["spec.x"]),
    ("pattern-search", prop({"pattern": "b+"}), {"x": "abbc"}, []),
    ("pattern-bad", prop({"pattern": "^b"}), {"x": "abc"}, ["spec.x"]),
    ("items", prop({"items": {"type": "string"}}), {"x": ["a", "b"]}, []),
    ("items-bad", prop({"items": {"type": "string"}}), {"x": ["a", 2, "c", None]},
     ["spec.x[1]", "spec.x[3]"]),
    ("items-nested-bad", prop({"items": prop({"type": "integer"})}),
     {"x": [{"x": 1}, {"x": "a"}]}, ["spec.x[1].x"]),
    ("minItems", prop({"minItems": 1}), {"x": [0]}, []),
    ("minItems-bad", prop({"minItems": 1}), {"x": []}, ["spec.x"]),
    ("maxItems", prop({"maxItems": 1}), {"x": [0]}, []),
    ("maxItems-bad", prop({"maxItems": 1}), {"x": [0, 1]}, ["spec.x"]),
    ("anyOf", prop({"anyOf": [{"type": "string"}, {"minimum": 3}]}), {"x": 4}, []),
    ("anyOf-bad", prop({"anyOf": [{"type": "string"}, {"type": "integer"}]}), {"x": 1.5},
     ["spec.x"]),
    ("anyOf-one-candidate-bad",
     prop({"anyOf": [prop({"type": "integer"}), {"type": "null"}]}), {"x": {"x": "a"}},
     ["spec.x.x"]),
    ("anyOf-two-candidates-bad", prop({"anyOf": [{"minimum": 5}, {"maximum": 0}]}), {"x": 3},
     ["spec.x"]),
    ("false-schema", prop(False), {}, []),
    ("false-schema-bad", prop(False), {"x": 1}, ["spec.x"]),
    ("items-false-bad", prop({"items": False}), {"x": [1]}, ["spec.x"]),
    ("annotations-ignored", prop({"title": "X", "description": "d", "format": "email",
                                  "examples": ["no"], "x-kubernetes": 1, "default": "b"}),
     {"x": "not-an-email"}, []),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("schema, value, expected", [c[1:] for c in KEYWORD_CASES],
                         ids=[c[0] for c in KEYWORD_CASES])
def test_keyword_table(engine, schema, value, expected):
    _, errors = Schema(schema, engine=engine).validate(value)
    assert fields(errors) == expected

def test_messages():
    schema = Schema({"properties": {"x": {"type": "integer", "minimum": 1}, "y": {}},
                     "required": ["x", "y"], "additionalProperties": False}, engine="builtin")
    assert schema.validate({"x": 0, "z": 1})[1] == [
        {"field": "spec.x", "message": "must be >= 1"},
        {"field": "spec.y", "message": "is required"},
        {"field": "spec.z", "message": "unknown field; known fields: x, y"},
    ]
    _, errors = Schema(Rack, engine="builtin").validate(patched(VALID_RACK, {"note": 1}))
    assert errors == [{"field": "spec.note",
                       "message": "must be of type string or null, not integer"}]


@pytest.mark.parametrize("engine", ENGINES)
def test_every_error_is_listed_and_check_raises(engine):
    bad = patched(VALID_RACK, {"name": DROP, "count": "3", "tags": [1],
                               "chassis": {"bladeCount": 0}, "extra": 1})
    schema = Schema(Rack, engine=engine)
    _, errors = schema.validate(bad, path="status")
    assert sorted(fields(errors)) == sorted(["status.name", "status.count", "status.tags[0]",
                                             "status.chassis.bladeCount", "status.extra"])
    with pytest.raises(ValidationError) as info:
        schema.check(bad, path="status")
    assert info.value.status == 422
    assert info.value.details == errors
    assert info.value.message.startswith("status is invalid: ")
    assert info.value.message.endswith("; ... (5 errors)")
    assert f"{errors[0]['field']}: {errors[0]['message']}" in info.value.message


def test_check_single_error_message_and_success():
    schema = Schema(prop({"type": "integer"}), engine="builtin")
    with pytest.raises(ValidationError, match=r"^spec is invalid: spec.x: must be of type integer, "
                                              r"not string$"):
        schema.check({"x": "1"})
    assert schema.check({"x": 1}) == {"x": 1}


# --- defaults ---


###############################################################################
# Schemas #####################################################################
###############################################################################

# --- dataclasses under test (module level, so get_type_hints can resolve them) ---

@dataclass
class Chassis:
    bladeCount: int = field(metadata={"minimum": 1, "maximum": 42, "description": "blades"})
    model: str = "x1"


@dataclass
class Port:
    name: str
    speed: int = 10


@dataclass
class Rack:
    name: str = field(metadata={"pattern": "^[a-z]", "minLength": 2, "maxLength": 8})
    height: float
    enabled: bool
    count: int
    tags: list[str]
    ports: list[Port]
    labels: dict[str, int]
    note: Optional[str]
    owner: str | None
    phase: Literal["Pending", "Ready"]
    chassis: Chassis
    spare: Optional[Chassis] = None
    anything: Any = None
    location: str = "dc1"
    zones: list[str] = field(default_factory=lambda: ["a"])
    backup: Chassis = field(default_factory=lambda: Chassis(bladeCount=2))
    flavor: int | str = 0
    untyped: list = field(default_factory=list)
    free: dict = field(default_factory=dict)


VALID_RACK = {
    "name": "rack01", "height": 2.5, "enabled": True, "count": 3, "tags": ["x"],
    "ports": [{"name": "p0"}], "labels": {"env": 1}, "note": None, "owner": "ops",
    "phase": "Ready", "chassis": {"bladeCount": 4},
}

# (id, patch applied to VALID_RACK, failing fields)
DATACLASS_CASES = [
    ("str", {"owner": "x"}, []),
    ("str-bad", {"location": 5}, ["spec.location"]),
    ("int", {"count": 0}, []),
    ("int-as-1.0", {"count": 1.0}, []),
    ("int-bad-float", {"count": 1.5}, ["spec.count"]),
    ("int-bad-bool", {"count": True}, ["spec.count"]),
    ("float", {"height": 3}, []),
    ("float-bad", {"height": "tall"}, ["spec.height"]),
    ("float-bad-bool", {"height": False}, ["spec.height"]),
    ("bool", {"enabled": False}, []),
    ("bool-bad", {"enabled": 1}, ["spec.enabled"]),
    ("list", {"tags": []}, []),
    ("list-bad", {"tags": "x"}, ["spec.tags"]),
    ("list-bad-item", {"tags": ["a", "b", 3]}, ["spec.tags[2]"]),
    ("list-of-dataclass-bad", {"ports": [{"name": "p0"}, {"speed": 1}]}, ["spec.ports[1].name"]),
    ("bare-list", {"untyped": [1, "a", None]}, []),
    ("bare-list-bad", {"untyped": {}}, ["spec.untyped"]),
    ("dict", {"labels": {}}, []),
    ("dict-bad", {"labels": []}, ["spec.labels"]),
    ("dict-bad-value", {"labels": {"a": 1, "b": "2"}}, ["spec.labels.b"]),
    ("bare-dict", {"free": {"a": [1]}}, []),
    ("bare-dict-bad", {"free": 1}, ["spec.free"]),
    ("optional", {"note": "hi"}, []),
    ("optional-bad", {"note": 1}, ["spec.note"]),
    ("pipe-none", {"owner": None}, []),
    ("pipe-none-bad", {"owner": []}, ["spec.owner"]),
    ("literal", {"phase": "Pending"}, []),
    ("literal-bad", {"phase": "Gone"}, ["spec.phase"]),
    ("union", {"flavor": "big"}, []),
    ("union-bad", {"flavor": 1.5}, ["spec.flavor"]),
    ("any", {"anything": {"deep": [1]}}, []),
    ("nested", {"chassis": {"bladeCount": 1, "model": "m"}}, []),
    ("nested-bad", {"chassis": {"bladeCount": "4"}}, ["spec.chassis.bladeCount"]),
    ("nested-missing", {"chassis": DROP}, ["spec.chassis"]),
    ("nested-unknown", {"chassis": {"bladeCount": 4, "color": "red"}}, ["spec.chassis.color"]),
    ("optional-nested", {"spare": {"bladeCount": 42}}, []),
    ("optional-nested-bad", {"spare": {"bladeCount": 43}}, ["spec.spare.bladeCount"]),
    ("optional-nested-wrong-type", {"spare": 7}, ["spec.spare"]),
    ("metadata-minimum", {"chassis": {"bladeCount": 0}}, ["spec.chassis.bladeCount"]),
    ("metadata-maximum", {"backup": {"bladeCount": 43}}, ["spec.backup.bladeCount"]),
    ("metadata-pattern", {"name": "Rack"}, ["spec.name"]),
    ("metadata-minLength", {"name": "r"}, ["spec.name"]),
    ("metadata-maxLength", {"name": "rack-number-1"}, ["spec.name"]),
    ("required", {"name": DROP}, ["spec.name"]),
    ("defaults-may-be-omitted", {}, []),       # VALID_RACK sets no defaulted field
    ("unknown-field", {"colour": "red"}, ["spec.colour"]),
]


def patched(base, patch):
    value = copy.deepcopy(base)
    for key, item in patch.items():
        if item is DROP:
            value.pop(key)
        else:
            value[key] = item
    return value


def fields(errors):
    return [e["field"] for e in errors]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("patch, expected", [c[1:] for c in DATACLASS_CASES],
                         ids=[c[0] for c in DATACLASS_CASES])
def test_dataclass_table(engine, patch, expected):
    _, errors = Schema(Rack, engine=engine).validate(patched(VALID_RACK, patch))
    assert fields(errors) == expected
    assert all(isinstance(e["message"], str) and e["message"] for e in errors)

AGREEMENT_CASES = [(c[0], c[1], c[2]) for c in KEYWORD_CASES] + [
    (c[0], Rack, patched(VALID_RACK, c[1])) for c in DATACLASS_CASES]


@pytest.mark.skipif(not HAVE_JSONSCHEMA, reason="jsonschema not installed")
@pytest.mark.parametrize("schema, value", [c[1:] for c in AGREEMENT_CASES],
                         ids=[c[0] for c in AGREEMENT_CASES])
def test_engines_agree_word_for_word(schema, value, monkeypatch):
    builtin = Schema(schema, engine="builtin").validate(value)
    calls = []
    real = jsonschema.Draft202012Validator.iter_errors
    monkeypatch.setattr(jsonschema.Draft202012Validator, "iter_errors",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert Schema(schema, engine="jsonschema").validate(value) == builtin
    assert calls, "the jsonschema engine did not ask jsonschema"

@pytest.mark.parametrize("engine", ENGINES)
def test_dataclass_defaults_filled_and_input_untouched(engine):
    value = patched(VALID_RACK, {"spare": {"bladeCount": 3}})
    before = copy.deepcopy(value)
    result, errors = Schema(Rack, engine=engine).validate(value)
    assert errors == []
    assert value == before
    assert result["location"] == "dc1" and result["zones"] == ["a"]
    assert result["backup"] == {"bladeCount": 2, "model": "x1"}
    assert result["chassis"] == {"bladeCount": 4, "model": "x1"}        # nested, present
    assert result["spare"] == {"bladeCount": 3, "model": "x1"}          # through X | None
    assert result["ports"] == [{"name": "p0", "speed": 10}]             # list items
    assert result["spare"] is not None and result["untyped"] == [] and result["free"] == {}
    result["tags"].append("mutated")
    result["zones"].append("mutated")
    assert value == before and Schema(Rack).validate(value)[0]["zones"] == ["a"]


def test_schema_defaults_deep_copied_and_only_into_present_or_defaulted_objects():
    schema = Schema({
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}},
            "b": {"type": "object", "default": {}, "properties": {"m": {"default": [1]}}},
            "c": {"type": "array", "items": {"properties": {"k": {"default": "z"}}}},
            "d": {"additionalProperties": {"properties": {"k": {"default": 0}}}},
        },
    })
    first, errors = schema.validate({"c": [{}, {"k": "y"}, 5], "d": {"p": {}}})
    assert errors == []
    assert first == {"c": [{"k": "z"}, {"k": "y"}, 5], "d": {"p": {"k": 0}}, "b": {"m": [1]}}
    assert "a" not in first                 # missing, no default of its own
    first["b"]["m"].append(2)
    assert schema.validate({})[0]["b"] == {"m": [1]}
    assert schema.json["properties"]["b"]["properties"]["m"]["default"] == [1]
    assert schema.validate({"a": {}})[0]["a"] == {"n": 1}


def test_anyof_defaults_come_from_the_branch_that_fits():
    schema = Schema(prop({"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "n": {"default": 1}},
         "required": ["kind"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "m": {"default": 2}},
         "required": ["kind"]},
    ]}))
    assert schema.validate({"x": {"kind": "b"}}) == ({"x": {"kind": "b", "m": 2}}, [])
    assert schema.validate({"x": {"kind": "a"}}) == ({"x": {"kind": "a", "n": 1}}, [])


def test_dataclass_instance_is_accepted():
    result = Schema(Chassis).check(Chassis(bladeCount=3))
    assert result == {"bladeCount": 3, "model": "x1"}


# --- schema_from_dataclass output ---

@dataclass
class Small:
    n: int = field(default=1, metadata={"minimum": 0, "unit": "ignored: not a schema keyword"})
    maybe: Optional[Port] = None
    mode: Literal["a", "b"] | None = None
    both: int | str = 0
    names: typing.List[str] = field(default_factory=list)
    table: typing.Dict[str, float] = field(default_factory=dict)
    other: Any = None


def test_schema_from_dataclass_shape():
    port = {"type": "object",
            "properties": {"name": {"type": "string"}, "speed": {"type": "integer", "default": 10}},
            "required": ["name"], "additionalProperties": False}
    assert schema_from_dataclass(Small) == {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "default": 1},
            "maybe": {**port, "type": ["object", "null"], "default": None},
            "mode": {"enum": ["a", "b", None], "default": None},
            "both": {"anyOf": [{"type": "integer"}, {"type": "string"}], "default": 0},
            "names": {"type": "array", "items": {"type": "string"}, "default": []},
            "table": {"type": "object", "additionalProperties": {"type": "number"}, "default": {}},
            "other": {"default": None},
        },
        "additionalProperties": False,
    }
    assert schema_from_dataclass(Port)["required"] == ["name"]


def test_default_factory_called_once_per_call():
    calls = []

    @dataclass
    class Counted:
        tags: list = field(default_factory=lambda: calls.append(1) or ["t"])

    assert schema_from_dataclass(Counted)["properties"]["tags"]["default"] == ["t"]
    Schema(Counted).validate({})
    Schema(Counted).validate({})
    assert len(calls) == 3          # once per schema built, never per validation


# --- configuration errors ---

@dataclass
class HasSet:
    ids: set[int]


@dataclass
class HasTuple:
    pair: tuple[int, int]


class Plain:
    pass


@dataclass
class HasClass:
    thing: Plain


@dataclass
class HasIntKeys:
    table: dict[int, str]


@dataclass
class HasNestedBad:
    inner: list[HasSet]


@dataclass
class Node:
    children: list[Node]


@dataclass
class Unresolvable:
    x: NoSuchType  # noqa: F821


@dataclass
class BadDefault:
    when: str = field(default_factory=object)


@dataclass
class WrongDefault:
    n: int = "one"


@dataclass
class BadMetadata:
    n: int = field(metadata={"minimum": "1"})


@pytest.mark.parametrize("cls, words", [
    (HasSet, ["HasSet.ids", "set[int]"]),
    (HasTuple, ["HasTuple.pair", "tuple[int, int]"]),
    (HasClass, ["HasClass.thing", "Plain"]),
    (HasIntKeys, ["HasIntKeys.table", "dict[int, str]"]),
    (HasNestedBad, ["HasSet.ids"]),
    (Node, ["Node -> Node", "recursion is not supported"]),
    (Unresolvable, ["Unresolvable", "NoSuchType"]),
    (BadDefault, ["BadDefault.when", "not JSON data"]),
    (WrongDefault, ["WrongDefault.n", "default 'one' does not validate"]),
    (BadMetadata, ["BadMetadata.n", "must be a number"]),
    (Plain, ["not a dataclass"]),
])
def test_dataclass_configuration_errors(cls, words):
    with pytest.raises(ConfigurationError) as info:
        schema_from_dataclass(cls)
    for word in words:
        assert word in info.value.message
    with pytest.raises(ConfigurationError):
        Schema(cls)


@pytest.mark.parametrize("schema, words", [
    ({"type": "str"}, ["#/type"]),
    ({"type": []}, ["#/type"]),
    ({"type": ["string", "string"]}, ["#/type"]),
    ({"required": "name"}, ["#/required", "list of field names"]),
    ({"properties": ["a"]}, ["#/properties"]),
    ({"properties": {"a": {"type": "strnig"}}}, ["#/properties/a/type"]),
    ({"properties": {"a": 1}}, ["#/properties/a", "dict or a boolean"]),
    ({"additionalProperties": "no"}, ["#/additionalProperties"]),
    ({"items": [{"type": "string"}]}, ["#/items"]),
    ({"items": {"minItems": -1}}, ["#/items/minItems", "non-negative integer"]),
    ({"enum": []}, ["#/enum"]),
    ({"anyOf": [{"type": "x"}]}, ["#/anyOf/0/type"]),
    ({"minimum": "1"}, ["#/minimum", "a number"]),
    ({"maxLength": 1.5}, ["#/maxLength"]),
    ({"pattern": "("}, ["#/pattern", "regular expression"]),
    ({"description": 3}, ["#/description"]),
    ({"oneOf": [{}]}, ["unsupported keyword 'oneOf'"]),
    ({"properties": {"a": {"type": "integer", "default": "1"}}}, ["#/properties/a", "default"]),
    ({"required": ["a"], "properties": {}, "additionalProperties": False}, ["['a']"]),
])
def test_malformed_schema_dicts(schema, words):
    with pytest.raises(ConfigurationError) as info:
        Schema(schema, engine="builtin")
    for word in words:
        assert word in info.value.message


def test_not_a_schema_and_unknown_engine():
    with pytest.raises(ConfigurationError, match="dataclass type, a JSON-Schema dict or None"):
        Schema("string")
    with pytest.raises(ConfigurationError, match="unknown schema engine"):
        Schema({}, engine="fast")


# --- Schema object and engines ---

def test_none_means_any_object_and_json_is_a_copy():
    assert Schema(None).json == {"type": "object"}
    assert Schema(None).validate({"a": [1]}) == ({"a": [1]}, [])
    assert fields(Schema(None).validate([1])[1]) == ["spec"]
    original = prop({"type": "integer"})
    schema = Schema(original)
    original["properties"]["x"]["type"] = "string"
    assert schema.validate({"x": 1})[1] == []
    assert Schema(schema).json == schema.json


def test_engine_selection(monkeypatch):
    assert schema_engine() == ("jsonschema" if HAVE_JSONSCHEMA else "builtin")
    assert Schema({}).engine == schema_engine()
    assert Schema({}, engine="builtin").engine == "builtin"
    monkeypatch.setitem(sys.modules, "jsonschema", None)     # makes `import jsonschema` fail
    assert schema_engine() == "builtin"
    assert Schema({}).engine == "builtin"
    with pytest.raises(ConfigurationError, match="pip install jsonschema"):
        Schema({}, engine="jsonschema")


def test_dataclass_fields_resolve_under_future_annotations():
    # This module uses `from __future__ import annotations`: every hint is a string.
    assert isinstance(Rack.__annotations__["tags"], str)
    assert dataclasses.is_dataclass(Rack)
    assert schema_from_dataclass(Rack)["properties"]["tags"] == {"type": "array",
                                                                 "items": {"type": "string"}}


###############################################################################
# Leader election #############################################################
###############################################################################

class TestLeaderElector:
    def test_the_base_elector_leads_from_start_to_stop(self):
        seen = []
        elector = fabrica.LeaderElector("me")
        assert not elector.is_leader() and elector.leader is None
        elector.start(lambda: seen.append(("started", elector.is_leader())), lambda: seen.append(("stopped",)))
        assert seen == [("started", True)] and elector.is_leader() and elector.leader == "me"
        elector._started_leading()              # no second start for one transition
        assert seen == [("started", True)]
        elector.stop()
        assert seen == [("started", True), ("stopped",)] and not elector.is_leader() and elector.leader is None
        elector._started_leading()              # after stop() no callback runs
        elector._stopped_leading()
        assert len(seen) == 2 and not elector.is_leader()

    def test_every_store_gives_an_always_leader_elector(self, store_factory):
        elector = store_factory().leader_elector("host-1")
        assert type(elector) is fabrica.LeaderElector and elector.identity == "host-1"

    def test_the_store_contract_provides_it(self):
        """A store that implements Store directly (a database store) gets the always-leader elector too."""
        class Contract(fabrica.Store):
            pass
        elector = Contract().leader_elector("host-2")
        assert type(elector) is fabrica.LeaderElector and elector.identity == "host-2"


###############################################################################
# Stores ######################################################################
###############################################################################


@pytest.fixture(params=["file", "file-fsync"])
def file_store_factory(request, tmp_path):
    maker = StoreMaker(request.param, tmp_path / "store")
    yield maker
    maker.close()


def new(kind, name, uid, **spec):
    return fabrica.new_object(kind, name, uid, spec=dict(spec))



# the change feed (SPEC §3.0): helpers for the conformance tests below and the feed tests further down

_READY_CONDITION = {"type": "Ready", "status": "True", "reason": "R", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}


def _changed(obj, *, spec=None, status=None, labels=None):
    """A copy of a stored object with a new spec (generation + 1), status or labels, ready to replace it."""
    out = fabrica.deepcopy_json(obj)
    meta = out["metadata"]
    if spec is not None:
        out["spec"] = spec
        meta["generation"] += 1
    if status is not None:
        out["status"] = status
    if labels is not None:
        meta["labels"] = labels
    meta["updatedAt"] = fabrica.utcnow()
    return out


def _write_history(store, uid="rack-000000a1"):
    """create, spec, status (a condition), labels, delete: one change of every kind; the first rv."""
    a = store.create(new("Rack", "a", uid, v=1))
    b = store.replace(_changed(a, spec={"v": 2}), a["metadata"]["resourceVersion"])
    c = store.replace(_changed(b, status={"conditions": [_READY_CONDITION]}), b["metadata"]["resourceVersion"],
                      "patched")
    d = store.replace(_changed(c, labels={"env": "prod"}), c["metadata"]["resourceVersion"])
    store.delete("Rack", uid, d["metadata"]["resourceVersion"])
    return int(a["metadata"]["resourceVersion"])


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


    # -- the change feed (SPEC §3.0) ---------------------------------------------

    def test_every_write_is_one_change_in_order(self, store_factory):
        store = store_factory()
        first = _write_history(store)
        changes = list(store.changes(first - 1))
        assert [c.action for c in changes] == ["created", "updated", "patched", "updated", "deleted"]
        rvs = [c.resource_version for c in changes]
        assert rvs == sorted(set(rvs)) and rvs[0] == first and rvs[-1] == store.resource_version
        assert [c.update_type for c in changes] == ["spec", "spec", "status", "metadata", "spec"]
        assert {(c.kind, c.uid) for c in changes} == {("Rack", "rack-000000a1")}
        assert [c.object["metadata"]["resourceVersion"] for c in changes] == [str(rv) for rv in rvs]
        # the object after; for the delete, its last state carrying the delete's resourceVersion
        assert changes[2].object["status"]["conditions"] == [_READY_CONDITION]
        assert changes[4].object["metadata"]["labels"] == {"env": "prod"}
        assert [c.resource_version for c in store.changes(rvs[1])] == rvs[2:]
        assert list(store.changes(rvs[-1])) == [] and list(store.changes(rvs[-1] + 100)) == []

    def test_previous_is_what_events_need_of_the_object_before(self, store_factory):
        store = store_factory()
        changes = list(store.changes(_write_history(store) - 1))
        assert changes[0].previous is None
        assert changes[1].previous == {"generation": 1, "metadata": {}, "conditions": {}}
        assert changes[2].previous == {"generation": 2, "metadata": {}, "conditions": {}}
        assert changes[3].previous == {"generation": 2, "metadata": {"labels": {}}, "conditions": {"Ready": "True"}}
        assert changes[4].previous == {"generation": 2, "metadata": {}, "conditions": {"Ready": "True"}}

    def test_a_change_is_json_and_rebuilds_from_a_row(self, store_factory):
        store = store_factory()
        for change in store.changes(_write_history(store) - 1):
            row = json.loads(json.dumps(list(change)))
            assert fabrica.Change(*row) == change and fabrica.Change(*row).update_type == change.update_type

    def test_time_is_the_write_time_and_a_delete_records_its_own_once(self, store_factory):
        store = store_factory()
        first = _write_history(store)
        changes = list(store.changes(first - 1))
        for change in changes[:4]:
            assert change.time == change.object["metadata"]["updatedAt"]
        assert fabrica._is_time(changes[4].time) and changes[4].time >= changes[3].time
        assert [c.time for c in store.changes(first - 1)] == [c.time for c in changes]   # read twice: the same

    def test_a_failed_write_records_no_change(self, store_factory):
        store = store_factory()
        obj = store.create(new("Rack", "a", "rack-000000a1"))
        rv = int(obj["metadata"]["resourceVersion"])
        with pytest.raises(fabrica.StaleError):
            store.replace(_changed(obj, spec={"v": 2}), "999999")
        with pytest.raises(fabrica.ConflictError):
            store.create(new("Rack", "a", "rack-000000a2"))
        with pytest.raises(fabrica.NotFoundError):
            store.delete("Rack", "rack-000000a3")
        assert [c.action for c in store.changes(rv - 1)] == ["created"]

    def test_watchers_hear_every_commit_in_order_until_closed(self, store_factory):
        store = store_factory()
        heard, other = [], []
        handle = store.watch(lambda change, size: heard.append((change, size)))
        store.watch(lambda change, size: other.append(change.resource_version))
        first = _write_history(store)
        assert [c for c, _ in heard] == list(store.changes(first - 1))
        assert all(size == fabrica.json_size(c.object) for c, size in heard)
        handle.close()
        handle.close()
        last = store.create(new("Rack", "b", "rack-000000b1"))
        assert len(heard) == 5 and other == [c.resource_version for c, _ in heard] + [
            int(last["metadata"]["resourceVersion"])]

    def test_a_raising_watcher_never_fails_the_write(self, store_factory, caplog):
        store = store_factory()
        heard = []

        def broken(change, size):
            raise RuntimeError("listener broke")
        store.watch(broken)
        store.watch(lambda change, size: heard.append(change.uid))
        obj = store.create(new("Rack", "a", "rack-000000a1"))
        assert store.get("Rack", "rack-000000a1") == obj and heard == ["rack-000000a1"]
        assert "listener broke" in caplog.text


TestStoreConformance = StoreConformance    # pytest collects Test* names only


def test_make_change_is_the_one_rule():
    """Store.make_change: every store records a write the same way (SPEC §3.0)."""
    old = new("Rack", "x", "rack-0000000e")
    old["metadata"]["resourceVersion"] = "7"
    old["status"] = {"conditions": [_READY_CONDITION, {"type": "Other", "status": "False"}, "junk", {"type": 5}]}
    changed = _changed(old, labels={"a": "b"})
    changed["metadata"]["finalizers"] = ["f"]
    changed["metadata"]["resourceVersion"] = "8"
    change = fabrica.Store.make_change("patched", old, changed)
    assert change == (8, "patched", changed, {"generation": 1, "metadata": {"labels": {}, "finalizers": []},
                                              "conditions": {"Ready": "True", "Other": "False"}},
                      changed["metadata"]["updatedAt"])
    assert change.update_type == "metadata"
    assert fabrica.Store.make_change("created", None, old).previous is None
    deleted = fabrica.Store.make_change("deleted", old, old)
    assert deleted.update_type == "spec" and fabrica._is_time(deleted.time)


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

# -- Stores: recovery rules every store keeps (issue 11) -------------------------------------------

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

    def test_kill9_during_spec_writes(self, tmp_path, servers, served_store):
        """A bounded round of real kills; the crash points above make the outcome deterministic."""
        data = tmp_path / "data"
        app_file = tmp_path / "histapp.py"
        app_file.write_text(HISTORY_APP)
        names = ["h0", "h1"]
        server = serve_store(servers, served_store, data, app_file)
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
            server = serve_store(servers, served_store, data, app_file)
            for name in names:
                obj = server.request("GET", f"/widgets/{name}")[2]
                ids = [int(v["versionId"]) for v in server.request("GET", f"/widgets/{name}/versions")[2]]
                assert ids and max(ids) == obj["metadata"]["generation"], (name, ids, obj["metadata"])
                if served_store == "file":
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
# Memory store ################################################################
###############################################################################

# IndexedStore's change feed: bounded in count and in bytes (MemoryStore and FileStore)

INDEXED_STORES = [name for name in STORES if name in ("memory", "file")]


@pytest.fixture(params=INDEXED_STORES)
def indexed_store(request, tmp_path):
    """``indexed_store(**feed_bounds)`` -> an opened store of an IndexedStore entry of STORES."""
    opened = []

    def make(**bounds):
        store = open_store(request.param, tmp_path / "store")
        assert isinstance(store, fabrica.IndexedStore)
        for name, value in bounds.items():
            setattr(store, name, value)
        store.open({"Rack": "racks"})
        opened.append(store)
        return store
    yield make
    for store in opened:
        store.close()


class TestIndexedStoreFeed:
    def test_the_feed_is_bounded_in_count(self, indexed_store):
        store = indexed_store(feed_size=3)
        obj = store.create(new("Rack", "a", "rack-000000a1"))
        first = int(obj["metadata"]["resourceVersion"])
        for n in range(9):
            obj = store.replace(_changed(obj, spec={"n": n}), obj["metadata"]["resourceVersion"])
        assert store.retained()[0] == 3 and store.resource_version == first + 9
        # the newest change let go of is kept aside, so a resume from its own position still works
        assert [c.resource_version for c in store.changes(first + 5)] == [first + k for k in (6, 7, 8, 9)]
        with pytest.raises(fabrica.ExpiredError):
            store.changes(first + 4)

    def test_the_feed_is_bounded_in_bytes(self, indexed_store):
        store = indexed_store(feed_bytes=100_000)
        obj = store.create(new("Rack", "a", "rack-000000a1", pad="x" * 20_000))
        first = int(obj["metadata"]["resourceVersion"])
        for n in range(20):
            obj = store.replace(_changed(obj, spec={"pad": "x" * 20_000, "n": n}), obj["metadata"]["resourceVersion"])
        count, held = store.retained()
        assert 0 < held <= 100_000 and 0 < count < 10
        kept = list(store.changes(store.resource_version - count))
        assert [c.resource_version for c in kept] == list(range(first + 21 - count, first + 21))
        assert held >= sum(fabrica.json_size(c.object) for c in kept)
        with pytest.raises(fabrica.ExpiredError):
            store.changes(first)

    def test_expired_is_a_410_raised_when_called(self, indexed_store):
        store = indexed_store(feed_size=1)
        obj = store.create(new("Rack", "a", "rack-000000a1"))
        for n in range(3):
            obj = store.replace(_changed(obj, spec={"n": n}), obj["metadata"]["resourceVersion"])
        with pytest.raises(fabrica.ExpiredError) as caught:
            store.changes(0)        # not a lazy generator: the caller learns it before reading a change
        assert isinstance(caught.value, fabrica.GoneError) and caught.value.status == 410


###############################################################################
# File store ##################################################################
###############################################################################

# -- Stores: I/O errors and the process lock -------------------------------------------------------

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
    """b4: one process per data dir (per database), on every disk store."""

    @pytest.mark.disk
    def test_second_store_in_process_is_refused(self, tmp_path, store_kind):
        first = open_store(store_kind, tmp_path)
        first.open({})
        try:
            with pytest.raises(fabrica.StoreLockedError, match=rf"\b{os.getpid()}\b"):
                open_store(store_kind, tmp_path).open({})
        finally:
            first.close()
        again = open_store(store_kind, tmp_path)
        again.open({})          # released on close
        again.close()

    def test_second_serve_exits_naming_the_holder(self, tmp_path, servers, served_store):
        data = tmp_path / "data"
        flags = STORES[served_store].serve(data)
        first = serve_store(servers, served_store, data)
        assert first.request("POST", "/widgets", {"name": "w"})[0] == 201
        before = {str(p): p.read_bytes() for p in data.rglob("*") if p.is_file()}
        started = time.monotonic()      # baseline, same machine and load: a start that exits at once
        subprocess.run([sys.executable, str(FABRICA_PY), "--version"], cwd=str(ROOT), capture_output=True, timeout=30)
        baseline = time.monotonic() - started
        started = time.monotonic()
        second = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--port", "0", *flags], cwd=str(ROOT),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - started
        assert second.returncode != 0, second.stderr
        assert elapsed < baseline + 1.5, (elapsed, baseline)     # it does not wait for the lock
        assert re.search(rf"\b{first.proc.pid}\b", second.stderr), second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        after = {str(p): p.read_bytes() for p in data.rglob("*") if p.is_file()}
        assert after == before, "the refused server changed files"
        status, _, health = first.request("GET", "/health")
        assert status == 200 and health["status"] == "healthy"
        assert first.request("GET", "/widgets/w")[0] == 200

# -- Issue 11, adversarial review: what a write stores, start-up loads; the data -------------------
# -- dir's odd corners neither stop a start nor lose data --------------------------------------

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
                assert status == (201 if method == "POST" else 200), (path, got)
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


# File store: the change feed starts with the process; the start-up load path (issue 12, item 6)

class TestFileStoreFeedAndLoad:
    def test_a_feed_starts_empty_and_older_positions_are_expired(self, file_store_factory):
        store = file_store_factory()
        first = _write_history(store)
        again = file_store_factory()
        start = again.resource_version
        assert start >= first + 4 and list(again.changes(start)) == [] and list(again.changes()) == []
        with pytest.raises(fabrica.ExpiredError):
            again.changes(first + 3)

    def test_names_are_in_order_after_a_load(self, file_store_factory):
        store = file_store_factory()
        order = [f"r{n}" for n in (5, 3, 9, 1, 7, 2, 8, 4, 6, 0)]
        for i, name in enumerate(order):        # uids in the opposite order of the names
            store.create(new("Rack", name, f"rack-{0xffff - i:08x}"))
        again = file_store_factory()
        assert names(again.list("Rack")) == sorted(order)
        page, total, more = again.query("Rack", after="r3", limit=2)
        assert names(page) == ["r4", "r5"] and total == 10 and more == "r5"
        again.create(new("Rack", "r10", "rack-00000001"))
        assert names(again.list("Rack"))[:3] == ["r0", "r1", "r10"]

    def test_every_loaded_object_is_in_its_normal_form(self, tmp_path):
        folder = tmp_path / "data" / "racks"
        folder.mkdir(parents=True)
        full = fabrica.new_object("Rack", "full", "rack-0000000f", labels={"a": "b"})
        full["metadata"]["resourceVersion"] = "3"
        (folder / "rack-0000000f.json").write_bytes(fabrica._file_bytes(full))
        (folder / "rack-0000000e.json").write_text(json.dumps(
            {"metadata": {"resourceVersion": "2", "uid": "rack-0000000e", "name": "bare"}, "kind": "Rack"}))
        store = fabrica.FileStore(str(tmp_path / "data"), durable=False)
        store.open({"Rack": "racks"})
        try:
            assert store.find("Rack", "full") == full
            bare = store.find("Rack", "bare")
            assert bare == fabrica.normalize_object(bare) and list(bare) == list(full)
            assert list(bare["metadata"]) == list(fabrica.METADATA_KEYS) and bare["spec"] == bare["status"] == {}
            assert store.resource_version >= 3 and store.quarantined == []
        finally:
            store.close()

    @pytest.mark.parametrize("size", [10, 1 << 20])
    def test_a_file_that_changed_since_its_fstat_is_read_to_its_end(self, tmp_path, monkeypatch, size):
        path = tmp_path / "f.json"
        payload = b"x" * 200_000
        path.write_bytes(payload)
        real = fabrica._open_regular_stat

        def stale(*args):
            fd, info = real(*args)
            fields = list(info)[:10]
            fields[6] = size        # st_size as an earlier fstat would have seen it
            return fd, os.stat_result(fields)
        monkeypatch.setattr(fabrica, "_open_regular_stat", stale)
        assert fabrica._read_regular(str(path)) == payload


###############################################################################
# SQLite store ################################################################
###############################################################################

# SQLite store (SPEC §3.2, issue 16): what only it has. The conformance suite, the REST and controller tests,
# the lock and kill -9 tests run on it through STORES ("sqlite", "sqlite-fsync").

def sqlite_url(path) -> str:
    return f"sqlite:///{path}"          # an absolute path: sqlite:////abs/app.db


def sqlite_app(db, **options) -> fabrica.Fabrica:
    app = fabrica.Fabrica(database_url=sqlite_url(db), **options)
    app.register("Rack")
    app.register("Chassis")
    return app


def _serve(*args, timeout=30):
    return subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--port", "0", *args], cwd=str(ROOT),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


class TestDatabaseURL:
    @pytest.mark.parametrize("url, path", [
        ("sqlite:///data/app.db", "data/app.db"),
        ("sqlite:////srv/fabrica/app.db", "/srv/fabrica/app.db"),
        ("file:data/app.db?_fk=1", "data/app.db"),
        ("file:data/app.db?_fk=true&_busy_timeout=250&_journal_mode=WAL&cache=shared&mode=rwc", "data/app.db"),
        ("file:///srv/app.db", "/srv/app.db"),
        ("file:/srv/app.db", "/srv/app.db"),
        ("file://localhost/srv/app.db", "/srv/app.db"),
        ("sqlite:///my%20data/app.db", "my data/app.db"),
    ])
    def test_forms(self, url, path):
        scheme, settings = fabrica.parse_database_url(url)
        assert scheme == "sqlite" and settings["path"] == path

    def test_parameters(self):
        settings = fabrica.parse_database_url("file:a.db?_busy_timeout=250&change_retention=42")[1]
        assert settings["busy_timeout"] == 0.25 and settings["change_retention"] == 42
        store = fabrica.SQLiteStore.from_url("sqlite:///a.db?change_retention=7", change_retention=99)
        assert store.change_retention == 7 and store.busy_timeout == 5.0
        assert fabrica.SQLiteStore.from_url("sqlite:///a.db", change_retention=99).change_retention == 99
        assert fabrica.parse_database_url("postgresql://db/fabrica") == ("postgresql", {"url": "postgresql://db/fabrica"})

    @pytest.mark.parametrize("url, words", [
        ("sqlite://host/app.db", "no host"),
        ("sqlite://", "names no file"),
        ("sqlite:///:memory:", "names no file"),
        ("file://otherhost/app.db", "no host"),
        ("file:app.db?_fk=0", "_fk=0"),
        ("file:app.db?_journal_mode=DELETE", "WAL only"),
        ("file:app.db?mode=ro", "rwc only"),
        ("file:app.db?_busy_timeout=soon", "whole number"),
        ("file:app.db?change_retention=0", "at least 1"),
        ("file:app.db?_loc=auto", "unknown parameter '_loc'"),
        ("mysql://db/app", "sqlite:///path/app.db"),
    ])
    def test_refused(self, url, words):
        with pytest.raises(fabrica.ConfigurationError, match=re.escape(words)):
            fabrica.parse_database_url(url)

    def test_fabrica_and_serve_take_it(self, tmp_path):
        db = tmp_path / "app.db"
        with sqlite_app(db) as app:
            assert isinstance(app.store, fabrica.SQLiteStore) and app.store.path == str(db)
            assert call(app, "POST", "/racks", {"name": "r1"})[0] == 201
        go_form = fabrica.Fabrica(database_url=f"file:{db}?_fk=1")
        go_form.register("Rack")
        with go_form:
            assert call(go_form, "GET", "/racks/r1")[0] == 200
        with pytest.raises(fabrica.ConfigurationError, match="PostgreSQL store is not available"):
            fabrica.Fabrica(database_url="postgresql://db/fabrica").start()
        done = _serve("--database-url", "file:x.db?_loc=auto")
        assert done.returncode == 2 and "unknown parameter '_loc'" in done.stderr, done.stderr


def _fabrica_db(path, n=200):
    with sqlite_app(path) as app:
        for i in range(n):
            assert call(app, "POST", "/racks", {"name": f"r{i}", "text": "x" * 200})[0] == 201


class TestNotAFabricaDatabase:
    """A file start-up cannot use is one clear line (the reason and the fix), never a traceback, and untouched."""

    def _refused(self, db, *words):
        before = db.read_bytes()
        done = _serve("--database-url", sqlite_url(db))
        assert done.returncode == 2, done.stderr
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("fabrica: ")]
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        for word in words:
            assert word in lines[0], lines[0]
        assert db.read_bytes() == before, "a refused start-up changed the file"

    def test_a_text_file(self, tmp_path):
        db = tmp_path / "app.db"
        db.write_text("name,value\nrack,1\n")
        self._refused(db, str(db), "is not a fabrica database", "not a SQLite file")

    def test_another_applications_database(self, tmp_path):
        db = tmp_path / "app.db"
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.close()
        self._refused(db, "is not a fabrica database", "another application", "users")

    @pytest.mark.parametrize("how", ["garbled-pages", "truncated"])
    def test_a_corrupt_database(self, tmp_path, how):
        db = tmp_path / "app.db"
        _fabrica_db(db)
        raw = bytearray(db.read_bytes())
        page = 4096
        assert len(raw) > 8 * page
        if how == "truncated":
            raw = raw[:len(raw) // 2]
        else:
            for at in range(3 * page, len(raw) - page, 3 * page):
                raw[at + 100:at + 600] = os.urandom(500)
        db.write_bytes(bytes(raw))
        self._refused(db, "is corrupt", "restore it from a backup")


class TestSQLiteChangeFeed:
    def test_events_resume_across_a_restart(self, tmp_path):
        db = tmp_path / "app.db"
        with sqlite_app(db) as app:
            log = EventLog(app)
            first = call(app, "POST", "/racks", {"name": "r1"})[2]
            call(app, "PUT", "/racks/r1", {"v": 2})
            call(app, "PUT", "/racks/r1/status", {"conditions": [{"type": "Ready", "status": "True"}]})
            call(app, "DELETE", "/racks/r1")
        before = log.snapshot()         # stop() delivered every queued event
        assert [e["action"] for e in before if "action" in e] == ["created", "updated", "updated", "deleted"]
        since = int(first["metadata"]["resourceVersion"])
        with sqlite_app(db) as again:
            resumed = again.bus.since((since, 0))
            assert [event for _, event in resumed] == [e for e in before if int(e["resourceversion"]) > since]
            positions = [pos for pos, _ in resumed]
            assert positions == [fabrica.parse_position(e["sequence"]) for e in before][1:]
            cond = next(pos for pos in positions if pos[1])
            assert again.bus.since((cond[0], 0))[0][0] == cond       # from the event before a condition event

    def test_retention_is_configurable_and_past_it_is_410(self, tmp_path):
        db = tmp_path / "app.db"
        url = f"{sqlite_url(db)}?change_retention=5"
        app = fabrica.Fabrica(database_url=url)
        app.register("Rack")
        with app:
            for i in range(20):
                assert call(app, "POST", "/racks", {"name": f"r{i}"})[0] == 201
            kept = app.store.changes(14)
            assert [c.resource_version for c in kept] == [15, 16, 17, 18, 19, 20]
            status, _, err = call(app, "GET", "/events?since=3")
            assert_error(status, err, 410)
            with pytest.raises(fabrica.ExpiredError):
                app.store.changes(3)
        with sqlite3.connect(db) as conn:
            stored = [row[0] for row in conn.execute("SELECT resource_version FROM changes ORDER BY 1")]
        conn.close()
        assert 5 <= len(stored) <= 6 and stored[-1] == 20, stored     # pruned in the write transactions
        app = fabrica.Fabrica(database_url=url)
        app.register("Rack")
        with app:       # across a restart: the same feed, the same bound
            assert [c.resource_version for c in app.store.changes(15)] == [16, 17, 18, 19, 20]
            assert_error(*call(app, "GET", "/events?since=3")[::2], 410)


class TestSQLiteWrites:
    def test_group_commit_shares_one_commit_and_a_conflict_fails_alone(self, tmp_path, monkeypatch):
        store = fabrica.SQLiteStore(str(tmp_path / "app.db"), durable=True)
        store.open({"Rack": "racks"})
        commits, hold = [], threading.Event()
        real = fabrica.SQLiteStore._commit

        def commit(self, conn):
            commits.append(len(commits))
            if len(commits) == 1:
                hold.wait(10)       # the writer is busy: the next writes queue up meanwhile
            real(self, conn)
        monkeypatch.setattr(fabrica.SQLiteStore, "_commit", commit)
        results = {}

        def create(i, name):
            try:
                results[i] = store.create(fabrica.new_object("Rack", name, f"rack-{i:08x}"))
            except fabrica.FabricaError as exc:
                results[i] = exc
        threads = [threading.Thread(target=create, args=(0, "first"))]
        threads[0].start()
        assert wait_until(lambda: commits)
        threads += [threading.Thread(target=create, args=(i, "twin" if i in (3, 4) else f"r{i}")) for i in range(1, 16)]
        for t in threads[1:]:
            t.start()
        assert wait_until(lambda: len(store._jobs) == 15)
        hold.set()
        for t in threads:
            t.join(10)
        store.close()
        assert len(commits) == 2, commits           # 16 acknowledged writes, 2 COMMITs
        failed = [r for r in results.values() if isinstance(r, fabrica.FabricaError)]
        assert len(failed) == 1 and isinstance(failed[0], fabrica.ConflictError), failed
        rvs = sorted(int(r["metadata"]["resourceVersion"]) for r in results.values() if isinstance(r, dict))
        assert rvs == list(range(1, 16))            # the failed one took no resourceVersion

    def test_an_io_error_answers_500_and_changes_nothing_observable(self, tmp_path, monkeypatch):
        db = tmp_path / "app.db"
        with sqlite_app(db) as app:
            old = call(app, "POST", "/racks", {"name": "r", "v": 1})[2]
            log = EventLog(app)
            rv = app.store.resource_version

            def fail(self, conn):
                raise sqlite3.OperationalError("disk I/O error")
            monkeypatch.setattr(fabrica.SQLiteStore, "_commit", fail)
            for method, path, body in (("PUT", "/racks/r", {"v": 2}), ("POST", "/racks", {"name": "s"}),
                                       ("DELETE", "/racks/r", None)):
                status, _, err = call(app, method, path, body)
                assert_error(status, err, 500)
                assert "disk I/O error" in err["error"] and "Traceback" not in err["error"]
            monkeypatch.undo()
            assert call(app, "GET", "/racks/r")[2] == old and call(app, "GET", "/racks/s")[0] == 404
            assert app.store.resource_version == rv and app.store.count("Rack") == 1
            assert call(app, "PUT", "/racks/r", {"v": 3})[0] == 200      # recovers without a restart
            log.barrier()
            assert [e["data"]["resource"]["spec"] for e in log.for_uid(old["metadata"]["uid"])] == [{"v": 3}]
            assert not [e for e in log.snapshot() if e["data"].get("resourceName") == "s"]
        with sqlite_app(db) as again:       # what a GET served is what a restart serves
            assert call(again, "GET", "/racks/r")[2]["spec"] == {"v": 3}
            assert [c.object["spec"] for c in again.store.changes(rv)][0] == {"v": 3}

    def test_a_full_database_answers_507_and_a_delete_still_works(self, tmp_path):
        db = tmp_path / "app.db"
        with sqlite_app(db) as app:
            call(app, "POST", "/racks", {"name": "r", "v": 1})
            old = call(app, "GET", "/racks/r")[2]
            rv = app.store.resource_version

            def cap(conn, _rv):        # a real SQLITE_FULL: no page may be added to the file
                pages = conn.execute("PRAGMA page_count").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {pages}")
            app.store._submit(fabrica._Job(cap, ("updated", "the page limit")))
            status, _, err = call(app, "PUT", "/racks/r", {"v": 2, "big": "x" * 200_000})
            assert_error(status, err, 507)
            assert "no space left" in err["error"] and "the previous version is intact" in err["error"]
            assert call(app, "GET", "/racks/r")[2] == old and app.store.resource_version == rv
            assert call(app, "DELETE", "/racks/r")[0] == 200

    def test_selectors_are_answered_by_the_label_index(self, tmp_path, monkeypatch):
        with sqlite_app(tmp_path / "app.db", durable=False) as app:
            for i in range(300):
                app.client.create("Rack", name=f"r{i:03d}", labels={"group": f"g{i // 10}", "tier": str(i % 3)})
            seen = []
            real = fabrica.SQLiteStore._candidates

            def candidates(conn, kind, selector, name, **options):
                rows = real(conn, kind, selector, name, **options)
                seen.append(len(rows))
                return rows
            monkeypatch.setattr(fabrica.SQLiteStore, "_candidates", staticmethod(candidates))
            status, _, items = call(app, "GET", "/racks?labelSelector=group%3Dg7,tier!%3D0")
            assert status == 200 and [o["metadata"]["name"] for o in items] == \
                [f"r{i:03d}" for i in range(70, 80) if i % 3]
            assert seen == [10]         # the 10 rows of group=g7, not the 300 of the kind

    def test_resource_versions_stop_at_int64_and_a_garbled_row_is_named(self, tmp_path):
        db = tmp_path / "app.db"
        _fabrica_db(db, 1)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE fabrica SET value = ? WHERE key = 'resourceVersion'", (2 ** 63 - 2,))
            conn.execute("UPDATE objects SET doc = '{\"kind\": ' WHERE name = 'r0'")
        conn.close()
        with sqlite_app(db) as app:
            assert call(app, "POST", "/racks", {"name": "last"})[2]["metadata"]["resourceVersion"] == str(2 ** 63 - 1)
            status, _, err = call(app, "POST", "/racks", {"name": "past"})
            assert_error(status, err, 500)
            assert "used up" in err["error"] and call(app, "GET", "/racks/past")[0] == 404
            status, _, err = call(app, "GET", "/racks/r0")
            assert_error(status, err, 500)
            assert "is not valid JSON" in err["error"] and "Traceback" not in err["error"]

    def test_start_up_reads_no_object(self, tmp_path, monkeypatch):
        db = tmp_path / "app.db"
        _fabrica_db(db, 50)
        statements = []
        real = fabrica.SQLiteStore._connect

        def connect(self, **options):
            conn = real(self, **options)
            conn.set_trace_callback(statements.append)
            return conn
        monkeypatch.setattr(fabrica.SQLiteStore, "_connect", connect)
        store = fabrica.SQLiteStore(str(db))
        store.open({"Rack": "racks"})
        try:
            assert statements and not [s for s in statements if re.search(r"\bFROM objects\b", s)], statements
            assert store.count("Rack") == 50 and store.resource_version == 50
        finally:
            store.close()
        statements.clear()
        with sqlite_app(db) as app:     # the app's start-up sweeps and /metrics ask the index rows, not every row
            assert "fabrica_objects{kind=\"Rack\"} 50" in call(app, "GET", "/metrics")[2].decode()
        reads = [s for s in statements if s.startswith("SELECT") and "doc" in s and "owners" not in s and
                 "finalizers" not in s]
        assert not reads, reads

    def test_the_start_up_sweep_collects_orphans_from_the_owner_rows(self, tmp_path):
        db = tmp_path / "app.db"
        with sqlite_app(db) as app:
            keep, lost = app.client.create("Rack", "keep"), app.client.create("Rack", "lost")
            for owner in (keep, lost):
                app.client.create("Chassis", f"of-{owner.name}", owner=owner)
        with sqlite3.connect(db) as conn:       # what a crash between a delete and its cascade leaves
            conn.execute("DELETE FROM objects WHERE uid = ?", (lost.uid,))
        conn.close()
        store = fabrica.SQLiteStore(str(db))
        store.open({"Rack": "racks", "Chassis": "chassis"})
        try:
            assert [o["metadata"]["name"] for o in store.orphan_candidates("Chassis")] == ["of-lost"]
            assert store.orphan_candidates("Rack") == []
        finally:
            store.close()
        with sqlite_app(db) as app:
            assert wait_until(lambda: call(app, "GET", "/chassis/of-lost")[0] == 404)
            assert call(app, "GET", "/chassis/of-keep")[0] == 200


###############################################################################
# Events ######################################################################
###############################################################################

# CloudEvents are a pure function of a change (SPEC §4)

def test_events_are_a_pure_function_of_the_change(store_factory):
    store = store_factory()
    changes = list(store.changes(_write_history(store) - 1))
    for change in changes:
        first = fabrica.change_events(change, prefix="io.x", source="/s")
        assert first == fabrica.change_events(fabrica.Change(*json.loads(json.dumps(list(change)))),
                                              prefix="io.x", source="/s")
    patched, rv = changes[2], changes[2].resource_version
    resource, ready = fabrica.change_events(patched, prefix="io.x", source="/s")
    assert resource["id"] == f"evt-{rv}" and resource["sequence"] == str(rv) and resource["type"] == "io.x.rack.patched"
    assert resource["source"] == f"/s/resources/Rack/{patched.uid}" and resource["time"] == patched.time
    assert resource["data"]["updateType"] == "status" and resource["data"]["resource"] is patched.object
    assert ready["id"] == f"evt-{rv}.1" and ready["sequence"] == f"{rv}.1" and ready["type"] == "io.x.condition.ready"
    assert ready["data"]["previousStatus"] == "Unknown" and ready["data"]["status"] == "True"
    assert [e["type"] for e in fabrica.change_events(changes[4])] == ["io.fabrica.rack.deleted"]
    assert [e["type"] for e in fabrica.change_events(changes[3])] == ["io.fabrica.rack.updated"]  # Ready unchanged


###############################################################################
# Bus #########################################################################
###############################################################################

class Calls:
    """Thread-safe record of reconcile calls: (monotonic time, object copy, ctx)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: list[tuple[float, fabrica.Resource, object]] = []

    def add(self, obj, ctx=None) -> int:
        with self._lock:
            self.items.append((time.monotonic(), fabrica.Resource.copy(obj), ctx))
            return len(self.items)

    def count(self, name: str | None = None) -> int:
        with self._lock:
            return sum(1 for _, o, _ in self.items if name is None or o.name == name)

    def of(self, name: str) -> list[fabrica.Resource]:
        with self._lock:
            return [o for _, o, _ in self.items if o.name == name]

    def times(self, name: str) -> list[float]:
        with self._lock:
            return [t for t, o, _ in self.items if o.name == name]


class Harness:
    """Makes apps on one data dir, on a store of one STORES entry, and gates; stops and releases everything at
    teardown. A second ``app()`` reopens the data (a ``disk`` test)."""

    def __init__(self, tmp_path: Path, store_kind: str = "file"):
        self.store_kind = store_kind
        self.data_dir = tmp_path / "data"
        self.apps: list[fabrica.Fabrica] = []
        self.gates: list[threading.Event] = []

    def app(self, **options) -> fabrica.Fabrica:
        options.setdefault("durable", False)
        options.setdefault("store", open_store(self.store_kind, self.data_dir))
        app = fabrica.Fabrica(data_dir=str(self.data_dir), **options)
        self.apps.append(app)
        return app

    def gate(self) -> threading.Event:
        gate = threading.Event()
        self.gates.append(gate)
        return gate

    def close(self):
        for gate in self.gates:
            gate.set()
        for app in self.apps:
            app.stop(timeout=5)


@pytest.fixture
def h(tmp_path, store_kind):
    harness = Harness(tmp_path, store_kind)
    yield harness
    harness.close()


def reconciled(app, kind, name) -> bool:
    """The controller has caught up with the object's current generation."""
    obj = app.client.get(kind, name)
    return obj.status.get("observedGeneration") == obj.generation


def condition(obj, type_):
    return fabrica.Resource(obj).condition(type_)

# -- Bus (SPEC §4) ---------------------------------------------------------------------------------

class TestBus:

    def test_every_committed_write_publishes_one_event_with_the_spec_fields(self, h):
        app = h.app()
        app.register("Widget")                      # no controller: every event is ours
        rec = Recorder()
        with app:
            app.subscribe("**", rec)
            c = app.client
            created = c.create("Widget", name="w1", spec={"size": 1})
            uid = created.uid
            obj = c.get("Widget", "w1")
            obj["spec"] = {"size": 2}
            put_spec = c.update(obj)                                       # spec PUT
            put_status = c.update_status("Widget", "w1", {"phase": "A"})  # status PUT
            obj = c.get("Widget", "w1")
            obj["metadata"]["labels"] = {"env": "prod"}
            put_labels = c.update(obj)                                     # metadata only
            patched = c.patch("Widget", "w1", {"size": 3})
            # no-ops: same spec, same status, same envelope -> no event, no rv bump
            rv_before = app.store.resource_version
            assert c.patch("Widget", "w1", {"size": 3}).resource_version == patched.resource_version
            c.update_status("Widget", "w1", {"phase": "A"})
            c.update(c.get("Widget", "w1"))
            assert app.store.resource_version == rv_before
            writes = [created, put_spec, put_status, put_labels, patched]
            assert rec.wait_count(len(writes))
            deleted_rv_before = app.store.resource_version
            assert c.delete("Widget", "w1") is None
            assert rec.wait_count(len(writes) + 1)
            delete_rv = app.store.resource_version
            assert delete_rv == deleted_rv_before + 1
            assert app.bus.published == len(writes) + 1

        events = rec.events
        assert len(events) == len(writes) + 1
        expected = [("created", "spec"), ("updated", "spec"), ("updated", "status"),
                    ("updated", "metadata"), ("patched", "spec")]
        for event, write, (action, update_type) in zip(events, writes, expected):
            rv = write.resource_version
            assert event["specversion"] == "1.0"
            assert event["type"] == f"io.fabrica.widget.{action}"
            assert event["source"] == f"/resources/Widget/{uid}"
            assert event["subject"] == uid
            assert RFC3339.fullmatch(event["time"]), event["time"]
            assert event["datacontenttype"] == "application/json"
            assert (event["resourcekind"], event["resourceuid"], event["action"], event["resourceversion"]) == \
                ("Widget", uid, action, rv)
            data = event["data"]
            assert (data["action"], data["resourceKind"], data["resourceUID"], data["resourceName"]) == \
                (action, "Widget", uid, "w1")
            assert RFC3339.fullmatch(data["changeTime"])
            assert data["updateType"] == update_type, action
            assert data["resource"] == write        # the full object after the change
        assert len({e["id"] for e in events}) == len(events)
        rvs = [int(e["resourceversion"]) for e in events]
        assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)

        gone = events[-1]
        assert gone["type"] == "io.fabrica.widget.deleted" and gone["action"] == "deleted"
        assert gone["resourceversion"] == str(delete_rv)
        assert gone["data"]["resource"]["metadata"]["resourceVersion"] == str(delete_rv)
        assert gone["data"]["resource"]["spec"] == {"size": 3}
        assert gone["subject"] == uid and gone["source"] == f"/resources/Widget/{uid}"

    def test_condition_change_publishes_a_condition_event_right_after_the_resource_event(self, h):
        app = h.app()
        app.register("Widget")
        rec = Recorder()
        with app:
            app.subscribe("**", rec)
            c = app.client
            uid = c.create("Widget", name="w1").uid

            def ready(status, reason, message="m"):
                return {"conditions": [{"type": "Ready", "status": status, "reason": reason, "message": message,
                                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]}
            added = c.update_status("Widget", "w1", ready("False", "Init", "starting"))
            flipped = c.update_status("Widget", "w1", ready("True", "Up", "running"))
            same_status = c.update_status("Widget", "w1", ready("True", "StillUp", "still running"))
            assert rec.wait_count(6)            # created, 2 x (resource + condition), 1 resource
            marker = c.patch("Widget", "w1", {"x": 1})
            assert rec.wait_count(7)
        types = rec.types()
        assert types == ["io.fabrica.widget.created",
                         "io.fabrica.widget.updated", "io.fabrica.condition.ready",
                         "io.fabrica.widget.updated", "io.fabrica.condition.ready",
                         "io.fabrica.widget.updated",          # reason changed, status did not
                         "io.fabrica.widget.patched"]
        first, second = rec.events[2], rec.events[4]
        assert first["data"] == {"conditionType": "Ready", "status": "False",
                                 "previousStatus": first["data"]["previousStatus"], "reason": "Init",
                                 "message": "starting", "transitionTime": "2026-01-01T00:00:00Z",
                                 "resourceKind": "Widget", "resourceUID": uid}
        assert first["data"]["previousStatus"] in (None, "Unknown")     # the condition is new
        assert second["data"]["status"] == "True" and second["data"]["previousStatus"] == "False"
        assert second["data"]["reason"] == "Up" and second["data"]["message"] == "running"
        assert first["resourceversion"] == added.resource_version
        assert second["resourceversion"] == flipped.resource_version
        assert rec.events[5]["resourceversion"] == same_status.resource_version
        assert rec.events[6]["resourceversion"] == marker.resource_version
        for cond_event in (first, second):
            assert cond_event["specversion"] == "1.0" and cond_event["subject"] == uid
            assert RFC3339.fullmatch(cond_event["time"])
        assert len({e["id"] for e in rec.events}) == len(rec.events)

    def test_concurrent_writers_events_arrive_in_resource_version_order(self, h):
        app = h.app()
        app.register("Widget")
        rec = Recorder()
        with app:
            app.subscribe("io.fabrica.widget.*", rec)
            for i in range(4):
                app.client.create("Widget", name=f"w{i}")

            def writer(i):
                for n in range(25):
                    app.client.patch("Widget", f"w{i}", {"n": n})
            threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            assert not any(t.is_alive() for t in threads)
            assert rec.wait_count(104)
            final = app.store.resource_version
        rvs = [int(e["resourceversion"]) for e in rec.events]
        assert len(rvs) == 104
        assert rvs == sorted(rvs) and len(set(rvs)) == 104 and rvs[-1] == final
        for i in range(4):          # per object: its patches in the order they were made
            ns = [e["data"]["resource"]["spec"].get("n") for e in rec.events if e["data"]["resourceName"] == f"w{i}"]
            assert ns == [None] + list(range(25))

    # -- patterns ---------------------------------------------------------------------

    @pytest.mark.parametrize("pattern, event_type, hit", [
        ("io.**.created", "io.fabrica.rack.created", True),
        ("io.**.created", "io.fabrica.rack.deleted", False),
        ("io.**.created", "io.created", True),                     # ** is zero segments too
        ("**", "io.fabrica.rack.created", True),
        ("**", "x", True),
        ("io.fabrica.*", "io.fabrica.rack.created", False),         # * is exactly one segment
        ("io.fabrica.*", "io.fabrica.rack", True),
        ("io.fabrica.*.*", "io.fabrica.rack.created", True),
        ("io.fabrica.rack.*", "io.fabrica.rack.created", True),
        ("io.fabrica.rack.*", "io.fabrica.racktemplate.created", False),
        ("io.fabrica.rack.*", "io.fabrica.rack", False),
        ("*.fabrica.rack.created", "io.fabrica.rack.created", True),
        ("**.created", "io.fabrica.rack.created", True),
        ("**.created", "io.fabrica.rack.created.not", False),
        ("io.fabrica.**", "io.fabrica.condition.ready", True),
        ("io.fabrica.**", "io.other.rack.created", False),
        ("io.fabrica.rack.created", "io.fabrica.rack.created", True),
        ("io.fabrica.rack.created", "io.fabrica.rack.createdx", False),
        ("io.fabrica.rack", "io.fabricaXrack", False),             # '.' is not a regex wildcard
    ])
    def test_pattern_table(self, pattern, event_type, hit):
        bus = fabrica.Bus()
        sub = bus.subscribe(pattern, lambda e: None)
        try:
            assert sub.matches(event_type) is hit
        finally:
            sub.close(1)

    @settings(max_examples=300, deadline=None)
    @given(pattern=st.lists(st.sampled_from(["a", "b", "*", "**"]), min_size=1, max_size=5),
           event_type=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5))
    def test_patterns_agree_with_a_reference_matcher(self, pattern, event_type):
        def ref(p, t):
            if not p:
                return not t
            if p[0] == "**":
                return ref(p[1:], t) or (bool(t) and ref(p, t[1:]))
            return bool(t) and p[0] in ("*", t[0]) and ref(p[1:], t[1:])
        regex = fabrica.compile_pattern(".".join(pattern))
        assert fabrica.pattern_matches(regex, ".".join(event_type)) is ref(pattern, event_type)

    def test_subscribers_get_only_the_events_their_pattern_matches(self, h):
        app = h.app()
        app.register("Rack")
        app.register("Chassis")
        created, fabrica_one, everything, racks = Recorder(), Recorder(), Recorder(), Recorder()
        with app:
            app.subscribe("io.**.created", created)
            app.subscribe("io.fabrica.*", fabrica_one)
            app.subscribe("**", everything)
            app.subscribe("io.fabrica.rack.*", racks)
            app.client.create("Rack", name="r1")
            app.client.create("Chassis", name="c1")
            app.client.patch("Rack", "r1", {"a": 1})
            app.client.delete("Rack", "r1")
            assert everything.wait_count(4)
            marker = Recorder()
            app.subscribe("io.fabrica.chassis.deleted", marker)
            app.client.delete("Chassis", "c1")
            assert marker.wait_count(1) and everything.wait_count(5)
            # each subscriber's thread delivers in order; the marker went through last
            assert wait_until(lambda: len(racks.events) >= 3 and len(created.events) >= 2)
        assert created.types() == ["io.fabrica.rack.created", "io.fabrica.chassis.created"]
        assert fabrica_one.types() == []
        assert racks.types() == ["io.fabrica.rack.created", "io.fabrica.rack.patched", "io.fabrica.rack.deleted"]
        assert len(everything.events) == 5

    # -- isolation, overflow, close ---------------------------------------------------

    def test_raising_and_slow_subscribers_block_neither_publisher_nor_others(self, h, caplog):
        app = h.app()
        app.register("Widget")
        fast = Recorder()
        slow_gate, slow_entered = h.gate(), threading.Event()
        slow_got = Recorder()

        def raiser(event):
            raise RuntimeError("subscriber bug")

        def slow(event):
            slow_entered.set()
            slow_gate.wait(WAIT)
            slow_got(event)

        with app:
            bad = app.subscribe("**", raiser)
            app.subscribe("**", slow)
            app.subscribe("**", fast)
            app.client.create("Widget", name="w1")
            assert slow_entered.wait(WAIT)

            def writes():
                for n in range(50):
                    app.client.patch("Widget", "w1", {"n": n})
            writer = threading.Thread(target=writes)
            writer.start()
            writer.join(WAIT)
            assert not writer.is_alive(), "a blocked subscriber blocked the publisher"
            assert fast.wait_count(51), "a blocked subscriber blocked another subscriber"
            assert not slow_gate.is_set() and len(slow_got.events) == 0   # still blocked all along
            assert [e["data"]["resource"]["spec"].get("n") for e in fast.events] == [None] + list(range(50))
            assert wait_until(lambda: bad.errors == 51)                      # raised each time, kept going
            logged = [r for r in caplog.records if r.name == "fabrica.bus" and r.exc_info]
            assert logged and "subscriber bug" in str(logged[0].exc_info[1])     # with its traceback
            slow_gate.set()
            assert slow_got.wait_count(51)
            assert [e["resourceversion"] for e in slow_got.events] == [e["resourceversion"] for e in fast.events]

    def test_overflow_drops_and_counts_a_gap_without_blocking_the_publisher(self, h):
        app = h.app()
        app.register("Widget")
        gate, entered = h.gate(), threading.Event()
        got = Recorder()

        def stuck(event):
            entered.set()
            gate.wait(WAIT)
            got(event)

        with app:
            sub = app.subscribe("**", stuck, queue_size=1)
            app.client.create("Widget", name="w1")
            assert entered.wait(WAIT)              # event 1 in hand, the queue is empty

            def writes():
                for n in range(9):
                    app.client.patch("Widget", "w1", {"n": n})
            writer = threading.Thread(target=writes)
            writer.start()
            writer.join(WAIT)
            assert not writer.is_alive(), "a full subscriber queue blocked the publisher"
            assert sub.dropped == 8                # one queued, eight dropped
            gate.set()
            assert wait_until(lambda: sub.gaps == 1 and len(got.events) == 2)
            assert [e["data"]["resource"]["spec"].get("n") for e in got.events] == [None, 0]
            assert app.bus.stats()["dropped"] >= 8
            # after the gap it receives again
            app.client.patch("Widget", "w1", {"n": 99})
            assert got.wait_count(3)
            assert got.events[-1]["data"]["resource"]["spec"]["n"] == 99
            assert sub.dropped == 8 and sub.gaps == 1

    def test_close_stops_delivery(self, h):
        app = h.app()
        app.register("Widget")
        closed, still = Recorder(), Recorder()
        with app:
            sub = app.subscribe("**", closed)
            app.subscribe("**", still)
            app.client.create("Widget", name="w1")
            assert closed.wait_count(1)
            sub.close(WAIT)
            assert sub not in app.bus.subscriptions
            for n in range(5):
                app.client.patch("Widget", "w1", {"n": n})
            assert still.wait_count(6)
            assert len(closed.events) == 1

    # -- ring buffer --------------------------------------------------------------------

    def test_since_returns_exactly_the_events_after_a_position(self, h):
        app = h.app()
        app.register("Widget")
        rec = Recorder()
        with app:
            app.subscribe("**", rec)
            c = app.client
            c.create("Widget", name="w1")
            c.update_status("Widget", "w1", {"conditions": [
                {"type": "Ready", "status": "True", "reason": "R", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]})
            c.patch("Widget", "w1", {"a": 1})
            assert rec.wait_count(4)
            first_rv = int(rec.events[0]["resourceversion"])
            tail = app.bus.since((first_rv, 0))
            assert [e for _, e in tail] == rec.events[1:]
            positions = [p for p, _ in tail]
            assert positions == [(first_rv + 1, 0), (first_rv + 1, 1), (first_rv + 2, 0)]
            assert [e for _, e in app.bus.since((first_rv + 1, 0))] == rec.events[2:]   # <rv>.<n> positions
            assert [e for _, e in app.bus.since((first_rv + 1, 1))] == rec.events[3:]
            assert app.bus.since((first_rv + 2, 0)) == []

    @pytest.mark.memory_feed
    def test_since_older_than_the_ring_is_gone(self, h):
        app = h.app(ring_size=5)
        app.register("Widget")
        with app:
            app.client.create("Widget", name="w1")
            for n in range(9):
                app.client.patch("Widget", "w1", {"n": n})
            last = app.store.resource_version       # 10 events: rv last-9 .. last; the ring keeps 5
            assert [p for p, _ in app.bus.since((last - 5, 0))] == [(last - k, 0) for k in range(4, -1, -1)]
            with pytest.raises(fabrica.GoneError):
                app.bus.since((last - 6, 0))        # event last-5 was evicted
            with pytest.raises(fabrica.GoneError):
                app.bus.since((0, 0))
            assert app.bus.since((last, 0)) == []

    @pytest.mark.disk
    @pytest.mark.memory_feed
    def test_since_before_this_process_started_is_gone(self, h):
        first = h.app()
        first.register("Widget")
        with first:
            for i in range(3):
                first.client.create("Widget", name=f"w{i}")
            rv_at_stop = first.store.resource_version
        second = h.app()
        second.register("Widget")
        with second:
            start_rv = second.store.resource_version      # may jump ahead: rvs are reserved in blocks
            assert start_rv >= rv_at_stop
            assert second.bus.since((start_rv, 0)) == []
            with pytest.raises(fabrica.GoneError):
                second.bus.since((rv_at_stop - 1, 0))   # event rv_at_stop was never in this ring
            with pytest.raises(fabrica.GoneError):
                second.bus.since((0, 0))
            new = second.client.create("Widget", name="w9")
            assert int(new.resource_version) > start_rv
            assert [e["data"]["resourceName"] for _, e in second.bus.since((start_rv, 0))] == ["w9"]

def _event(n: int, kind: str = "Rack") -> dict:
    return {"type": f"io.fabrica.{kind.lower()}.updated", "resourcekind": kind, "sequence": str(n), "n": n}


class TestBusDerivesEventsFromTheFeed:
    """Issue 12, item 2: the bus keeps no events; live, resumed and re-read events are the same."""

    def test_two_readers_of_one_feed_derive_identical_events(self, h):
        app = h.app(event_source="/here")
        app.register("Rack")
        live = Recorder()
        with app:
            app.subscribe("**", live)
            c = app.client
            c.create("Rack", name="a", spec={"v": 1})
            c.update_status("Rack", "a", {"conditions": [_READY_CONDITION]})
            c.delete("Rack", "a")
            assert live.wait_count(4)
            resumed = [event for _, event in app.bus.since((app.bus.start_rv, 0))]
            again = [event for _, event in app.bus.since((app.bus.start_rv, 0))]
            from_feed = [e for change in app.store.changes(app.bus.start_rv)
                         for e in fabrica.change_events(change, prefix="io.fabrica", source="/here")]
        assert live.events == resumed == again == from_feed
        rv = int(live.events[0]["resourceversion"])
        assert [e["id"] for e in live.events] == [f"evt-{rv}", f"evt-{rv + 1}", f"evt-{rv + 1}.1", f"evt-{rv + 2}"]
        assert live.events[-1]["time"] == live.events[-1]["data"]["changeTime"]    # the delete's, recorded once

    def test_a_resume_sends_what_the_live_stream_sent(self, h):
        app = h.app()
        app.register("Rack")
        with app:
            tap = app.bus.tap("**")
            first = app.client.create("Rack", name="a")
            app.client.update_status("Rack", "a", {"conditions": [_READY_CONDITION]})
            app.client.delete("Rack", "a")
            live = [tap.get(WAIT) for _ in range(4)]
            tap.close()
            rv = int(first.resource_version)
            assert [p for p, _ in app.bus.since((rv, 0))] == [(rv + 1, 0), (rv + 1, 1), (rv + 2, 0)]
            assert [e for _, e in app.bus.since((rv + 1, 0))] == live[2:]
            assert [e for _, e in app.bus.since((rv + 1, 1))] == live[3:]
            assert app.bus.since((rv + 2, 0)) == [] and app.bus.since((rv, 0), kind="Other") == []
            assert app.bus.recent("Rack", first.uid) == live

    def test_the_bus_needs_nothing_but_the_store_contract(self):
        """A store that keeps its feed elsewhere (a database) plugs in through changes() and watch()."""
        feed = []

        class FeedOnly(fabrica.Store):
            resource_version = property(lambda self: feed[-1].resource_version if feed else 0)

            def changes(self, since=None):
                if since is not None and since < 0:
                    raise fabrica.ExpiredError("too old")
                return iter([c for c in feed if since is None or c.resource_version > since])

        store = FeedOnly()
        bus = fabrica.Bus()
        bus.attach(store, prefix="io.db")
        got, changes = Recorder(), Recorder()
        sub = bus.subscribe("io.db.**", got)
        watcher = bus.subscribe_changes(changes)
        try:
            obj = fabrica.new_object("Rack", "a", "rack-0000000a")
            obj["metadata"]["resourceVersion"] = "1"
            obj["status"] = {"conditions": [_READY_CONDITION]}
            change = fabrica.Store.make_change("created", None, obj)
            feed.append(change)
            store._announce(change, fabrica.json_size(obj))
            assert got.wait_count(2) and changes.wait_count(1)
            assert changes.events == [change] and got.events == fabrica.change_events(change, prefix="io.db")
            assert [p for p, _ in bus.since((0, 0))] == [(1, 0), (1, 1)]
            assert [p for p, _ in bus.since((1, 0))] == [(1, 1)]
            assert bus.recent("Rack", "rack-0000000a") == got.events
            with pytest.raises(fabrica.GoneError):
                bus.since((-1, 0))
        finally:
            sub.close(WAIT)
            watcher.close(WAIT)
            bus.detach()


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


###############################################################################
# Work queue ##################################################################
###############################################################################

NO_BUCKET = dict(qps=1e12, burst=10**9)  # bucket never delays: isolates the per-key backoff


def K(i):
    return ("Widget", f"uid-{i}")


# -- dedupe / dirty / reasons ------------------------------------------------------


def test_dedupe_while_queued_coalesces_reasons_in_order():
    q = WorkQueue()
    q.add(K(1), "a")
    q.add(K(1), "b")
    q.add(K(1), "a")
    q.add(K(1))
    q.add(K(2), "c")
    assert len(q) == 2
    assert q.get(timeout=0) == (K(1), ["a", "b"])
    assert q.get(timeout=0) == (K(2), ["c"])
    assert q.get(timeout=0) is None


def test_add_while_processing_reruns_exactly_once_and_never_concurrently():
    q = WorkQueue()
    q.add(K(1), "first")
    key, reasons = q.get(timeout=0)
    assert (key, reasons) == (K(1), ["first"])
    q.add(K(1), "x")
    q.add(K(1), "y")
    q.add(K(1), "x")
    assert q.is_processing(K(1)) and q.is_pending(K(1))
    assert len(q) == 0                     # not handed out while running...
    assert q.get(timeout=0) is None        # ...to anyone
    q.done(K(1))
    assert not q.is_processing(K(1)) and len(q) == 1
    assert q.get(timeout=0) == (K(1), ["x", "y"])
    q.done(K(1))
    assert q.get(timeout=0) is None        # exactly one re-run
    assert q.idle()


def test_done_without_readd_does_not_requeue():
    q = WorkQueue()
    q.add(K(1))
    q.get(timeout=0)
    q.done(K(1))
    assert len(q) == 0 and not q.is_pending(K(1)) and q.idle()


def test_stray_done_does_not_duplicate_a_queued_key():
    q = WorkQueue()
    q.add(K(1))
    q.get(timeout=0)
    q.done(K(1))
    q.add(K(1))
    q.done(K(1))                           # double done while K(1) is queued
    q.done(K(2))                           # done for a key never handed out
    assert len(q) == 1
    q.get(timeout=0)
    assert q.get(timeout=0) is None


def test_get_timeout_returns_none_promptly():
    q = WorkQueue()
    t0 = time.monotonic()
    assert q.get(timeout=0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 1.0


# -- add_after / fire_due on a fake clock -----------------------------------------------


def test_add_after_keeps_earliest_due_time():
    clock = FakeClock(100.0)
    q = WorkQueue(clock=clock)
    q.add_after(K(1), 10, "r10")
    q.add_after(K(1), 20, "r20")           # later: ignored (reason merged)
    assert q.next_due() == 110.0 and q.delayed_count() == 1
    q.add_after(K(1), 5, "r5")             # earlier: replaces
    assert q.next_due() == 105.0 and q.delayed_count() == 1
    assert not q.is_pending(K(1)) and len(q) == 0
    clock.now = 104.999
    assert q.fire_due() == 0 and len(q) == 0
    clock.now = 105.0
    assert q.fire_due() == 1
    assert q.delayed_count() == 0 and q.next_due() is None
    assert q.get(timeout=0) == (K(1), ["r10", "r20", "r5"])
    q.done(K(1))
    clock.now = 1000.0
    assert q.fire_due() == 0               # the stale 110/120 heap entries are skipped
    assert q.get(timeout=0) is None


def test_add_after_non_positive_delay_adds_now():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after(K(1), 0, "now")
    q.add_after(K(2), -1)
    assert q.delayed_count() == 0 and len(q) == 2
    assert q.get(timeout=0) == (K(1), ["now"])


def test_fire_due_orders_by_due_time_and_fires_all_due():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    for i, delay in enumerate([3, 1, 2, 9]):
        q.add_after(K(i), delay)
    clock.now = 3
    assert q.fire_due() == 3
    assert [q.get(timeout=0)[0] for _ in range(3)] == [K(1), K(2), K(0)]
    assert q.next_due() == 9 and q.delayed_count() == 1


def test_delayed_key_due_while_queued_or_processing_follows_add_rules():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add(K(1), "direct")
    q.add_after(K(1), 1, "later")
    clock.now = 1
    assert q.fire_due() == 1
    assert len(q) == 1                                  # deduped
    assert q.get(timeout=0) == (K(1), ["direct", "later"])
    q.add_after(K(1), 1, "while-running")
    clock.now = 2
    q.fire_due()
    assert len(q) == 0 and q.is_pending(K(1))           # dirty, not handed out
    q.done(K(1))
    assert q.get(timeout=0) == (K(1), ["while-running"])


def test_idle_accounts_for_queue_processing_and_due_items():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    assert q.idle()
    q.add(K(1))
    assert not q.idle()
    q.get(timeout=0)
    assert not q.idle()
    q.done(K(1))
    assert q.idle()
    q.add_after(K(2), 5)
    assert q.idle() and q.idle(within=4.9) and not q.idle(within=5)
    clock.now = 5
    assert not q.idle()


# -- rate limiting --------------------------------------------------------------------


def test_per_key_exponential_backoff_capped_and_forget_resets():
    q = WorkQueue(clock=FakeClock(), max_delay=0.03, **NO_BUCKET)
    delays = [q.add_rate_limited(K(1)) for _ in range(5)]
    assert delays == pytest.approx([0.005, 0.01, 0.02, 0.03, 0.03])
    assert q.num_requeues(K(1)) == 5
    assert q.add_rate_limited(K(2)) == pytest.approx(0.005)       # per key
    q.forget(K(1))
    assert q.num_requeues(K(1)) == 0
    assert q.add_rate_limited(K(1)) == pytest.approx(0.005)


def test_default_backoff_sequence_and_huge_failure_counts():
    q = WorkQueue(clock=FakeClock(), **NO_BUCKET)
    assert [q.add_rate_limited(K(1)) for _ in range(4)] == pytest.approx([0.005, 0.01, 0.02, 0.04])
    for _ in range(1100):                             # must not overflow
        d = q.add_rate_limited(K(1))
    assert d == 300.0


def test_add_rate_limited_schedules_with_the_delay_used():
    clock = FakeClock(50.0)
    q = WorkQueue(clock=clock, **NO_BUCKET)
    assert q.add_rate_limited(K(1), "err") == pytest.approx(0.005)
    assert q.next_due() == pytest.approx(50.005) and len(q) == 0
    clock.now = 50.005
    assert q.fire_due() == 1
    assert q.get(timeout=0) == (K(1), ["err"])


def test_token_bucket_third_immediate_reservation_waits_one_second():
    clock = FakeClock(10.0)
    q = WorkQueue(clock=clock, base_delay=1e-6, qps=1, burst=2)
    d = [q.add_rate_limited(K(i)) for i in range(4)]
    assert d == pytest.approx([1e-6, 1e-6, 1.0, 2.0])
    assert q.next_due() == pytest.approx(10.0 + 1e-6)
    clock.now = 11.0                                  # one token refilled, but two are owed
    assert q.add_rate_limited(K(9)) == pytest.approx(2.0)
    clock.now = 1000.0                                # refill caps at burst
    assert [q.add_rate_limited(K(10 + i)) for i in range(3)] == pytest.approx([1e-6, 1e-6, 1.0])


@settings(max_examples=60, deadline=None)
@given(qps=st.floats(0.5, 50), burst=st.integers(1, 5),
       gaps=st.lists(st.floats(0, 2), min_size=1, max_size=40))
def test_token_bucket_never_exceeds_rate(qps, burst, gaps):
    # GCRA property: in any window [a, b] of availability times at most
    # burst + qps*(b - a) tokens become available.
    clock = FakeClock()
    q = WorkQueue(clock=clock, base_delay=0.0, qps=qps, burst=burst)
    avail = []
    for i, gap in enumerate(gaps):
        clock.now += gap
        avail.append(clock.now + q.add_rate_limited(K(i)))
    avail.sort()
    for i, j in itertools.combinations(range(len(avail)), 2):
        assert j - i + 1 <= burst + qps * (avail[j] - avail[i]) + 1e-6


# -- shutdown -------------------------------------------------------------------------


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    return t, box


def test_shutdown_wakes_blocked_getters_promptly():
    q = WorkQueue()
    getters = [_in_thread(q.get) for _ in range(3)]
    time_started = time.monotonic()
    q.shutdown()
    for t, box in getters:
        t.join(2)
        assert not t.is_alive() and box["r"] is None
    assert time.monotonic() - time_started < 2


def test_shutdown_without_drain_returns_none_and_ignores_adds():
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add(K(1))
    q.add_after(K(2), 1)
    q.shutdown()
    assert q.get() is None                            # no drain: even with keys queued
    q.add(K(3))
    q.add_after(K(4), 1)
    q.add_after(K(5), 0)
    q.add_rate_limited(K(6))
    assert q.delayed_count() == 0 and q.next_due() is None
    clock.now = 10
    assert q.fire_due() == 0
    assert not any(q.is_pending(K(i)) for i in (3, 4, 5, 6))


def test_shutdown_drain_hands_out_remaining_then_none():
    q = WorkQueue()
    q.add(K(1))
    q.add(K(2))
    q.add(K(3))
    assert q.get(timeout=0)[0] == K(1)
    q.add(K(1), "owed")                                # dirty while processing
    q.shutdown(drain=True)
    q.stop()                                           # keeps the drain choice
    q.add(K(4))                                        # ignored
    assert q.get(timeout=1)[0] == K(2)
    q.done(K(2))
    assert q.get(timeout=1)[0] == K(3)
    q.done(K(3))
    # K(1) is owed a run: a getter waits for done() instead of giving up.
    t, box = _in_thread(q.get)
    t.join(0.1)
    assert t.is_alive()
    q.done(K(1))
    t.join(2)
    assert box["r"] == (K(1), ["owed"])
    q.done(K(1))
    assert q.get() is None


# -- the timer thread ------------------------------------------------------------------


def test_timer_thread_delivers_delayed_and_wakes_for_earlier_items():
    with WorkQueue("t") as q:
        assert any(t.name == "fabrica-t-timer" for t in threading.enumerate())
        q.add_after(K(1), 60)
        # Make sure the timer is asleep (its ~1 s heartbeat) before the earlier
        # item arrives; Condition._waiters is private, but only a test peeks.
        assert wait_until(lambda: len(q._due_changed._waiters) == 1, timeout=2, interval=0.001)
        t0 = time.monotonic()
        q.add_after(K(2), 0.05)
        got = q.get(timeout=5)
        elapsed = time.monotonic() - t0
        assert got == (K(2), [])
        assert 0.045 <= elapsed < 0.5                  # woken, not heartbeat-polled
        q.done(K(2))
        assert q.delayed_count() == 1
        timer = q._timer
    assert not timer.is_alive()                        # __exit__ joined it
    assert q.get() is None


def test_rate_limited_retry_through_the_timer_thread():
    q = WorkQueue("r", base_delay=0.02)
    q.start()
    try:
        q.add(K(1), "watch")
        key, _ = q.get(timeout=1)
        q.add_rate_limited(key, "retry")
        q.done(key)
        assert q.get(timeout=2) == (K(1), ["retry"])
        q.done(K(1))
        assert q.wait_until(q.idle, 2)
    finally:
        q.stop(timeout=2)


# -- concurrency ------------------------------------------------------------------------


def test_real_threads_no_concurrent_processing_and_no_lost_adds():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                        # force many interleavings
    try:
        _run_stress()
    finally:
        sys.setswitchinterval(old)


def _run_stress():
    keys = [K(i) for i in range(50)]
    q = WorkQueue("stress")
    track = threading.Lock()
    seq = itertools.count()
    last_add = {}           # key -> seq recorded *before* q.add
    last_get = {}           # key -> seq recorded *after* q.get returned
    running = {k: 0 for k in keys}
    errors = []
    processed = 0

    def producer(seed):
        rnd = random.Random(seed)
        for _ in range(3000):
            k = rnd.choice(keys)
            with track:
                last_add[k] = next(seq)
            q.add(k, rnd.choice(["a", "b", None]))

    def worker():
        nonlocal processed
        while (item := q.get(timeout=5)) is not None:
            k, _ = item
            with track:
                last_get[k] = next(seq)
                running[k] += 1
                if running[k] != 1:
                    errors.append(f"{k} processed by {running[k]} workers")
            time.sleep(0)                              # yield mid-"reconcile"
            with track:
                running[k] -= 1
                processed += 1
            q.done(k)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    producers = [threading.Thread(target=producer, args=(s,), daemon=True) for s in (1, 2)]
    for t in workers + producers:
        t.start()
    for t in producers:
        t.join(10)
        assert not t.is_alive()
    assert q.wait_until(q.idle, 10)
    q.shutdown(drain=True)
    for t in workers:
        t.join(10)
        assert not t.is_alive()
    assert not errors, errors[:5]
    owed = [k for k in keys if last_get.get(k, -1) < last_add[k]]
    assert not owed, f"keys added after their last get but never re-run: {owed}"
    assert processed < 6000                            # dedupe actually happened


# -- stateful model test ------------------------------------------------------------------


class WorkQueueModel(RuleBasedStateMachine):
    """Checks WorkQueue against a plain-list model (no dedupe tricks, O(n) fine)."""

    def __init__(self):
        super().__init__()
        self.clock = FakeClock()
        self.q = WorkQueue(clock=self.clock)
        self.queue: list = []
        self.dirty: set = set()
        self.processing: dict = {}      # worker id -> key
        self.reasons: dict = {}         # key -> list of reasons for its next run
        self.waiting: dict = {}         # key -> (due, order)
        self.waiting_reasons: dict = {}
        self.order = itertools.count()
        self.owed: set = set()          # keys added (to the FIFO path) since their last get

    def _model_add(self, k, reasons):
        rs = self.reasons.setdefault(k, [])
        rs.extend(r for r in reasons if r is not None and r not in rs)
        self.owed.add(k)
        if k in self.dirty:
            return
        self.dirty.add(k)
        if k not in self.processing.values():
            self.queue.append(k)

    @rule(k=st.integers(0, 4), reason=st.sampled_from([None, "a", "b", "c"]))
    def add(self, k, reason):
        self.q.add(k, reason)
        self._model_add(k, [reason])

    @rule(k=st.integers(0, 4), delay=st.integers(-1, 5), reason=st.sampled_from([None, "d", "e"]))
    def add_after(self, k, delay, reason):
        self.q.add_after(k, delay, reason)
        if delay <= 0:
            self._model_add(k, [reason])
            return
        rs = self.waiting_reasons.setdefault(k, [])
        if reason is not None and reason not in rs:
            rs.append(reason)
        due = self.clock.now + delay
        if k not in self.waiting or due < self.waiting[k][0]:
            self.waiting[k] = (due, next(self.order))

    @rule(dt=st.integers(0, 3))
    def tick(self, dt):
        self.clock.now += dt
        fired = sorted((v, k) for k, v in self.waiting.items() if v[0] <= self.clock.now)
        assert self.q.fire_due() == len(fired)
        for _, k in fired:
            del self.waiting[k]
            self._model_add(k, self.waiting_reasons.pop(k, []))

    @rule(worker=st.integers(0, 2))
    def get(self, worker):
        if worker in self.processing:
            return                      # a model worker holds one key at a time
        got = self.q.get(timeout=0)
        if not self.queue:
            assert got is None
            return
        assert got is not None
        k, reasons = got
        assert k not in self.processing.values(), "handed out a key that is processing"
        assert k == self.queue.pop(0), "not FIFO"
        assert reasons == self.reasons.pop(k, [])
        self.dirty.discard(k)
        self.owed.discard(k)
        self.processing[worker] = k

    @precondition(lambda self: self.processing)
    @rule(data=st.data())
    def done(self, data):
        worker = data.draw(st.sampled_from(sorted(self.processing)))
        k = self.processing.pop(worker)
        self.q.done(k)
        if k in self.dirty:
            self.queue.append(k)

    @invariant()
    def state_matches(self):
        pending_not_processing = self.dirty - set(self.processing.values())
        assert len(self.q) == len(pending_not_processing) == len(self.queue)
        for k in range(5):
            assert self.q.is_pending(k) == (k in self.dirty)
            assert self.q.is_processing(k) == (k in self.processing.values())
        assert self.q.delayed_count() == len(self.waiting)
        expected_due = min((v[0] for v in self.waiting.values()), default=None)
        assert self.q.next_due() == expected_due

    def teardown(self):
        # Drain: finish everything running, then get/done until empty.  Every
        # key owed a run must come out (and nothing may be handed out twice).
        for k in self.processing.values():
            self.q.done(k)
        seen = []
        while (item := self.q.get(timeout=0)) is not None:
            assert not self.q.is_pending(item[0])
            seen.append(item[0])
            self.q.done(item[0])
        assert self.owed <= set(seen), f"owed {self.owed - set(seen)} never returned"
        assert len(seen) == len(set(seen)) == len(self.owed)
        assert self.q.idle()


WorkQueueModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
test_workqueue_model = WorkQueueModel.TestCase


# -- a queue.Queue on client-go semantics (SPEC §5.1) ----------------------------------


def in_thread(fn, *args):
    """Run fn(*args) in a daemon thread -> (thread, box); box["r"] holds the result."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn(*args)), daemon=True)
    t.start()
    return t, box


def blocked_in(condition, waiters: int = 1) -> bool:
    """True once ``waiters`` threads wait on ``condition`` (Condition._waiters is private; only tests peek)."""
    return wait_until(lambda: len(condition._waiters) == waiters)


# -- it is a queue.Queue ---------------------------------------------------------------


def test_is_a_stdlib_queue_on_its_own_mutex_and_conditions():
    q = WorkQueue()
    assert isinstance(q, queue.Queue)
    assert q.maxsize == 0 and not q.full()
    for cond in (q.not_empty, q.not_full, q.all_tasks_done):
        assert isinstance(cond, threading.Condition)
    # one mutex for everything: holding it from outside blocks every method
    with q.mutex:
        t, box = in_thread(q.add, K(1))
        t.join(0.05)
        assert t.is_alive()
    t.join(WAIT)
    assert not t.is_alive() and q.qsize() == 1


def test_qsize_and_empty_count_the_keys_ready_to_hand_out():
    clock = FakeClock()
    q = WorkQueue(clock=clock)

    def size():
        assert q.qsize() == len(q)
        assert q.empty() == (q.qsize() == 0)
        assert not q.full()
        return q.qsize()

    assert size() == 0
    q.add(K(1))
    q.add(K(1), "again")                 # deduped
    q.put(K(2))
    assert size() == 2
    key, _ = q.get()
    assert key == K(1) and size() == 1
    q.add(K(1), "while running")         # dirty, not ready: not counted
    assert size() == 1 and q.is_pending(K(1))
    q.get()                              # K(2)
    assert size() == 0 and q.empty()
    q.done(K(1))                         # owed a re-run: ready again
    assert size() == 1
    q.get()
    q.add_after(K(3), 5)                 # delayed: not ready yet
    assert size() == 0 and q.delayed_count() == 1
    clock.now = 5
    assert q.fire_due() == 1 and size() == 1


def test_put_is_add_and_never_blocks():
    q = WorkQueue()
    for i in range(1000):
        q.put(K(i % 10), block=True, timeout=0)
        q.put_nowait(K(i % 10))
    assert q.qsize() == 10 and q.unfinished_tasks == 10
    assert q.get_nowait() == (K(0), [])
    q.shutdown()
    q.put(K(99))                         # ignored after shutdown, as add() is
    assert not q.is_pending(K(99))


def test_get_nowait_raises_empty_and_get_without_block_returns_none():
    q = WorkQueue()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.get(block=False) is None
    q.add(K(1), "a")
    assert q.get_nowait() == (K(1), ["a"])
    q.add(K(1))                          # processing: not handed out again
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.get(block=False) is None
    q.done(K(1))
    assert q.get_nowait() == (K(1), [])
    q.shutdown()
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_task_done_needs_the_key_and_is_done():
    q = WorkQueue()
    q.add(K(1))
    key, _ = q.get()
    with pytest.raises(TypeError, match=r"done\(key\)"):
        q.task_done()
    assert q.is_processing(key)          # the failed call changed nothing
    q.add(key)
    q.task_done(key)                     # like done(): re-queued once
    assert not q.is_processing(key) and q.qsize() == 1
    q.get()
    q.task_done(key)
    assert q.unfinished_tasks == 0 and q.idle()


def test_unfinished_tasks_counts_queued_owed_and_processing_keys():
    q = WorkQueue()
    q.add(K(1))
    q.add(K(1))
    q.add(K(2))
    assert q.unfinished_tasks == 2
    q.get()                              # K(1) processing
    assert q.unfinished_tasks == 2
    q.add(K(1))                          # owed a re-run: still one task
    assert q.unfinished_tasks == 2
    q.done(K(1))                         # re-queued
    assert q.unfinished_tasks == 2
    q.get()
    q.done(K(2))
    q.done(K(2))                         # stray: nothing counted twice
    assert q.unfinished_tasks == 1
    q.get()
    q.done(K(1))
    assert q.unfinished_tasks == 0


def test_join_waits_for_every_key_including_its_re_run():
    q = WorkQueue()
    q.join()                             # nothing added: returns at once
    q.add(K(1))
    q.add(K(2))
    joiner, _ = in_thread(q.join)
    assert blocked_in(q.all_tasks_done)
    key, _ = q.get()
    q.add(key, "while running")
    q.done(key)
    other, _ = q.get()
    q.done(other)
    assert q.get() == (key, ["while running"])
    joiner.join(0.05)
    assert joiner.is_alive()             # the re-run is still processing
    q.done(key)
    joiner.join(WAIT)
    assert not joiner.is_alive()


def test_the_stdlib_worker_pattern_works():
    """put / get / task_done / join as the queue module documents them, with keys."""
    q = WorkQueue()
    seen, lock = [], threading.Lock()

    def worker():
        while (item := q.get()) is not None:
            key, reasons = item
            with lock:
                seen.append(key)
            q.task_done(key)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(50):
        q.put(K(i))
    q.join()
    with lock:
        assert sorted(seen) == sorted(K(i) for i in range(50))
    q.shutdown()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()


# -- shutdown ----------------------------------------------------------------------------


def test_shutdown_without_drain_drops_queued_keys_and_join_waits_for_running_ones():
    q = WorkQueue()
    for i in range(3):
        q.add(K(i))
    key, _ = q.get()
    q.add(key)                           # owed a re-run that will not happen
    joiner, _ = in_thread(q.join)
    assert blocked_in(q.all_tasks_done)
    q.shutdown()
    assert q.is_shutdown
    assert q.qsize() == 0 and q.unfinished_tasks == 1 and not q.is_pending(K(1))
    joiner.join(0.05)
    assert joiner.is_alive()             # K(0) is still processing
    q.done(key)
    joiner.join(WAIT)
    assert not joiner.is_alive() and q.unfinished_tasks == 0 and q.get() is None


def test_shutdown_with_drain_keeps_join_waiting_for_the_queued_keys():
    q = WorkQueue()
    q.add(K(1))
    q.add(K(2))
    q.shutdown(drain=True)
    assert q.qsize() == 2 and q.unfinished_tasks == 2
    joiner, _ = in_thread(q.join)
    assert blocked_in(q.all_tasks_done)
    for _ in range(2):
        key, _ = q.get()
        q.done(key)
    joiner.join(WAIT)
    assert not joiner.is_alive() and q.get() is None


# -- a blocked get wakes ---------------------------------------------------------------------


def test_blocked_get_wakes_on_add():
    q = WorkQueue()
    t, box = in_thread(q.get)
    assert blocked_in(q.not_empty)
    q.add(K(1), "a")
    t.join(WAIT)
    assert not t.is_alive() and box["r"] == (K(1), ["a"])


def test_blocked_get_wakes_on_done_of_a_key_owed_a_re_run():
    q = WorkQueue()
    q.add(K(1))
    key, _ = q.get()
    q.add(key, "again")
    t, box = in_thread(q.get)
    assert blocked_in(q.not_empty)
    q.done(key)
    t.join(WAIT)
    assert not t.is_alive() and box["r"] == (K(1), ["again"])


def test_blocked_get_wakes_on_add_after_through_the_timer_thread(monkeypatch):
    # A heartbeat of an hour: only add_after waking the sleeping timer delivers the key in time.
    monkeypatch.setattr(WorkQueue, "_HEARTBEAT", 3600.0)
    with WorkQueue("wake") as q:
        assert blocked_in(q._due_changed)    # the timer sleeps, nothing is delayed
        t, box = in_thread(q.get)
        assert blocked_in(q.not_empty)
        q.add_after(K(1), 0.02, "later")
        t.join(WAIT)
        assert not t.is_alive() and box["r"] == (K(1), ["later"])
        q.done(K(1))
        q.add_after(K(2), 3000)              # a far one, then an earlier one: the timer re-aims
        assert blocked_in(q._due_changed)
        q.add_after(K(3), 0.02)
        assert q.get(timeout=WAIT) == (K(3), [])


def test_blocked_get_wakes_on_add_after_with_no_delay():
    q = WorkQueue()                          # no timer thread: a delay <= 0 is an add
    t, box = in_thread(q.get)
    assert blocked_in(q.not_empty)
    q.add_after(K(1), 0, "now")
    t.join(WAIT)
    assert not t.is_alive() and box["r"] == (K(1), ["now"])


@pytest.mark.parametrize("drain", [False, True])
def test_blocked_gets_wake_on_shutdown(drain):
    q = WorkQueue()
    getters = [in_thread(q.get) for _ in range(3)]
    assert blocked_in(q.not_empty, 3)
    q.shutdown(drain=drain)
    for t, box in getters:
        t.join(WAIT)
        assert not t.is_alive() and box["r"] is None


def test_draining_getters_wait_for_an_owed_re_run():
    q = WorkQueue()
    q.add(K(1))
    key, _ = q.get()
    q.add(key, "owed")
    q.shutdown(drain=True)
    getters = [in_thread(q.get) for _ in range(2)]
    assert blocked_in(q.not_empty, 2)        # K(1) will be re-queued by done(): they wait for it
    q.done(key)                              # one getter takes it; nothing is left for the other
    for t, _ in getters:
        t.join(WAIT)
        assert not t.is_alive()
    assert sorted((box["r"] for _, box in getters), key=repr) == [(K(1), ["owed"]), None]
    q.done(K(1))
    assert q.get() is None and q.unfinished_tasks == 0


# -- stress: several threads add, get and done random keys for a bounded time --------------------


def test_stress_no_key_runs_twice_at_once_no_add_is_lost():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)              # force many interleavings
    try:
        _stress(seconds=1.5, keys=20, threads=6)
    finally:
        sys.setswitchinterval(old)


def _stress(seconds: float, keys: int, threads: int) -> None:
    """Every thread loops for ``seconds``: add / add_after / add_rate_limited a random key with a
    unique reason, or get a key, sometimes re-add it while running, and done it.

    Checked: no key is processed by two threads at once; every key added after its last get is
    got again; every reason is delivered exactly once (nothing lost, nothing doubled)."""
    q = WorkQueue("stress", base_delay=0.001, max_delay=0.01, **NO_BUCKET)
    q.start()
    names = [K(i) for i in range(keys)]
    track = threading.Lock()
    seq = itertools.count()
    last_add: dict = {}          # key -> seq taken *before* the add call
    last_get: dict = {}          # key -> seq taken *after* get returned
    running = {k: 0 for k in names}
    added, delivered, errors = [], [], []
    deadline = time.monotonic() + seconds

    def add(rnd, key):
        reason = f"r{next(seq)}"
        how = rnd.random()
        with track:
            last_add[key] = next(seq)
            added.append(reason)
        if how < 0.7:
            q.add(key, reason)
        elif how < 0.9:
            q.add_after(key, rnd.choice([0, 0.001, 0.005]), reason)
        else:
            q.add_rate_limited(key, reason)

    def work(item, rnd):
        key, reasons = item
        with track:
            last_get[key] = next(seq)
            delivered.extend(reasons)
            running[key] += 1
            if running[key] != 1:
                errors.append(f"{key} processed by {running[key]} threads at once")
        if rnd.random() < 0.3:
            add(rnd, key)                # re-added while running: owed exactly one more run
        if rnd.random() < 0.5:
            q.forget(key)
        time.sleep(0)                    # yield mid-"reconcile"
        with track:
            running[key] -= 1
        q.done(key)

    def loop(seed):
        rnd = random.Random(seed)
        while time.monotonic() < deadline:
            if rnd.random() < 0.5:
                add(rnd, rnd.choice(names))
            elif (item := q.get(timeout=0.01)) is not None:
                work(item, rnd)
        # the adds are over: keep working until nothing is queued, owed, running or delayed
        while not q.idle(within=60):
            if (item := q.get(timeout=0.01)) is not None:
                work(item, rnd)

    workers = [threading.Thread(target=loop, args=(s,), daemon=True) for s in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + WAIT)
        assert not t.is_alive()
    try:
        assert not errors, errors[:5]
        assert q.idle(within=60) and q.unfinished_tasks == 0 and q.qsize() == 0
        owed = [k for k in last_add if last_get.get(k, -1) < last_add[k]]
        assert not owed, f"keys added after their last get but never got again: {owed}"
        assert len(delivered) == len(set(delivered)), "a reason was delivered twice"
        assert set(delivered) == set(added), f"{len(set(added) - set(delivered))} reasons lost"
        assert len(last_get) == keys and len(added) > 1000   # the run did real work
    finally:
        q.stop(WAIT)


###############################################################################
# Registry ####################################################################
###############################################################################

# The write path used directly, without HTTP (REST, app.client and the controllers all go through it).

SIZED = {"type": "object", "properties": {"size": {"type": "integer", "default": 1}}}


@pytest.fixture
def registry(store_kind, tmp_path):
    """A started Registry on a store of each STORES entry: Rack (a spec schema), Shelf, Bin (finalize=),
    Note (history)."""
    reg = fabrica.Registry()
    reg.store = store = open_store(store_kind, tmp_path / "data")
    reg.declare("Rack", spec=SIZED)
    reg.declare("Shelf")
    reg.declare("Bin", finalize=lambda ctx, obj: None)
    reg.declare("Note", history=True)
    store.open({info.kind: info.plural for info in reg.kinds.values()})
    reg.start()
    yield reg
    reg.stop()
    store.close()


def kind_of(reg, name):
    return reg.resolve_kind(name)


class TestRegistry:
    def test_a_write_before_start_is_a_configuration_error(self):
        reg = fabrica.Registry()
        rack = reg.declare("Rack")
        with pytest.raises(fabrica.ConfigurationError, match="not started"):
            reg.create(rack, name="r1")

    def test_declare_refuses_what_register_refuses(self, registry):
        with pytest.raises(fabrica.ConfigurationError, match="already registered"):
            registry.declare("Rack")
        with pytest.raises(fabrica.ConfigurationError, match="unknown option"):
            registry.declare("Crate", colour="red")
        assert registry.served("racks") is kind_of(registry, "RACKS") is registry.kinds["Rack"]
        assert registry.served("crates") is None
        assert [k["kind"] for k in registry.discovery()["kinds"]] == ["Rack", "Shelf", "Bin", "Note"]

    def test_create_sets_server_managed_fields_and_spec_defaults(self, registry):
        obj = registry.create(kind_of(registry, "Rack"), name="r1", labels={"zone": "a"})
        meta = obj["metadata"]
        assert obj["spec"] == {"size": 1} and obj["status"] == {}
        assert meta["name"] == "r1" and meta["uid"].startswith("rack-") and meta["generation"] == 1
        assert meta["labels"] == {"zone": "a"} and meta["finalizers"] == [] and meta["ownerReferences"] == []
        assert registry.get(kind_of(registry, "Rack"), "r1") is registry.store.get("Rack", meta["uid"])
        with pytest.raises(fabrica.NotFoundError):
            registry.get(kind_of(registry, "Rack"), "r2")

    def test_every_invalid_field_is_listed_at_once(self, registry):
        with pytest.raises(fabrica.ValidationError) as caught:
            registry.create(kind_of(registry, "Rack"), name="Not_A_Name", labels={"zone": 7}, finalizers=[""],
                            spec={"size": "big"}, resource_version=7)
        fields = [d["field"] for d in caught.value.details]
        assert fields == ["metadata.name", "metadata.labels.zone", "metadata.finalizers",
                          "metadata.resourceVersion", "spec.size"], fields
        with pytest.raises(fabrica.BadRequestError, match="spec must be a JSON object"):
            registry.create(kind_of(registry, "Rack"), name="r1", spec=["not", "a", "dict"])
        assert registry.store.count("Rack") == 0

    def test_generation_moves_exactly_when_the_spec_changes(self, registry):
        rack = kind_of(registry, "Rack")
        registry.create(rack, name="r1", spec={"size": 2}, labels={"a": "1"})
        obj = registry.update(rack, "r1", labels={"b": "2"}, merge_metadata=True)
        assert obj["metadata"]["labels"] == {"a": "1", "b": "2"} and obj["metadata"]["generation"] == 1
        obj = registry.update(rack, "r1", labels={"c": "3"})
        assert obj["metadata"]["labels"] == {"c": "3"} and obj["metadata"]["generation"] == 1
        same = registry.update(rack, "r1", spec={"size": 2})
        assert same is obj          # nothing changed: nothing written, the stored object back
        obj = registry.update(rack, "r1", spec={"size": 3})
        assert obj["spec"] == {"size": 3} and obj["metadata"]["generation"] == 2
        obj = registry.update_status(rack, "r1", {"phase": "Up"})
        assert obj["status"] == {"phase": "Up"} and obj["metadata"]["generation"] == 2
        with pytest.raises(fabrica.ValidationError, match="immutable"):
            registry.update(rack, "r1", name="r2")

    def test_a_stale_resource_version_is_409_an_unmet_if_match_412(self, registry):
        rack = kind_of(registry, "Rack")
        rv = registry.create(rack, name="r1")["metadata"]["resourceVersion"]
        with pytest.raises(fabrica.ConflictError) as caught:
            registry.update(rack, "r1", spec={"size": 5}, resource_version="999")
        assert type(caught.value) is fabrica.ConflictError and "resourceVersion" in str(caught.value)
        for if_match in (("999",), ()):     # () is an If-Match of weak tags only: it never matches
            with pytest.raises(fabrica.PreconditionFailedError, match="If-Match"):
                registry.patch(rack, "r1", {"size": 5}, if_match=if_match)
        with pytest.raises(fabrica.PreconditionFailedError, match="If-None-Match"):
            registry.update(rack, "r1", spec={"size": 5}, if_none_match=("*",))
        with pytest.raises(fabrica.PreconditionFailedError):
            registry.delete(rack, "r1", if_match=("999",))
        assert registry.get(rack, "r1")["metadata"]["resourceVersion"] == rv
        registry.update(rack, "r1", spec={"size": 5}, if_match=("1", rv), resource_version=rv)
        obj = registry.patch(rack, "r1", {"size": 6}, if_match=("*",), if_none_match=("1",))
        assert obj["spec"] == {"size": 6}
        assert registry.delete(rack, "r1", if_match=(obj["metadata"]["resourceVersion"],))[1] is True

    def test_patches_of_the_spec_and_the_status(self, registry):
        rack = kind_of(registry, "Rack")
        registry.create(rack, name="r1")
        assert registry.patch(rack, "r1", [{"op": "add", "path": "/rows", "value": 4}], "json")["spec"] == \
            {"size": 1, "rows": 4}
        assert registry.patch(rack, "r1", {"rows": 5}, "shorthand")["spec"]["rows"] == 5
        with pytest.raises(fabrica.ValidationError, match="not a spec field"):
            registry.patch(rack, "r1", {"labels": {"a": "b"}})
        with pytest.raises(fabrica.UnsupportedMediaTypeError):
            registry.patch(rack, "r1", {}, "xml")
        obj = registry.patch(rack, "r1", {"phase": "Up"}, status=True)
        assert obj["status"] == {"phase": "Up"} and obj["metadata"]["generation"] == 3
        with pytest.raises(fabrica.ValidationError, match="conditions"):
            registry.check_status(rack, {"conditions": "ready"}, obj["status"])

    def test_owners_and_the_cascade(self, registry):
        rack, shelf = kind_of(registry, "Rack"), kind_of(registry, "Shelf")
        owner = registry.create(rack, name="r1")
        ref = {"kind": "Rack", "uid": owner["metadata"]["uid"], "controller": True}
        dependent = registry.create(shelf, name="s1", owner_references=[ref])
        assert dependent["metadata"]["ownerReferences"] == [{**ref, "name": "r1"}]
        with pytest.raises(fabrica.ValidationError, match="ownerReferences"):
            registry.create(shelf, name="s2", owner_references=[{"kind": "Rack"}])
        registry.delete(rack, "r1")
        assert registry.store.find("Shelf", "s1") is None        # collected in the caller's thread
        with pytest.raises(fabrica.ConflictError, match="does not exist"):
            registry.create(shelf, name="s3", owner_references=[ref])

    def test_finalizers_hold_a_delete_until_they_are_removed(self, registry):
        bin_ = kind_of(registry, "Bin")
        obj = registry.create(bin_, name="b1")
        assert obj["metadata"]["finalizers"] == [fabrica.FINALIZER]
        marked, gone = registry.delete(bin_, "b1")
        assert not gone and marked["metadata"]["deletionTimestamp"]
        assert registry.delete(bin_, "b1") == (marked, False)      # a second DELETE changes nothing
        with pytest.raises(fabrica.ValidationError, match="being deleted"):
            registry.update(bin_, "b1", finalizers=[fabrica.FINALIZER, "example.com/x"])
        last = registry.mutate(bin_, "b1", lambda new: new["metadata"].__setitem__("finalizers", []))
        assert last["metadata"]["finalizers"] == [] and registry.store.find("Bin", "b1") is None

    def test_history_and_restore(self, registry):
        note = kind_of(registry, "Note")
        registry.create(note, name="n1", spec={"text": "one"})
        obj = registry.update(note, "n1", spec={"text": "two"})
        assert obj["status"]["version"] == "2"
        assert [v["versionId"] for v in registry.store.versions("Note", obj["metadata"]["uid"])] == ["1", "2"]
        obj = registry.restore(note, "n1", "1")
        assert obj["spec"] == {"text": "one"} and obj["status"]["version"] == "3"
        with pytest.raises(fabrica.NotFoundError, match="no version"):
            registry.restore(note, "n1", "9")

    def test_the_open_server_declares_a_kind_only_once_an_object_of_it_is_stored(self, registry):
        registry.open = True
        with pytest.raises(RuntimeError):
            with registry.open_kind("widgets") as info:
                assert info.kind == "Widget" and registry.served("widgets") is None
                raise RuntimeError("the create failed")
        assert registry.served("widgets") is None and "Widget" not in registry.kinds
        with registry.open_kind("gizmos", "Gadget") as info:
            registry.create(info, name="g1")
        assert registry.served("gizmos").kind == "Gadget"
        with pytest.raises(fabrica.ValidationError, match="cannot create kind"):
            with registry.open_kind("things", "lower"):
                pass


###############################################################################
# Controller ##################################################################
###############################################################################

# -- Controller (SPEC §2, §5.1-§5.4) ---------------------------------------------------------------

class TestController:

    @pytest.mark.disk
    def test_objects_created_while_stopped_are_reconciled_at_start(self, h):
        before = h.app()
        before.register("Widget")
        with before:
            for i in range(3):
                before.client.create("Widget", name=f"w{i}", spec={"i": i})
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj, ctx)
            obj.status["seen"] = obj.spec["i"]

        with app:
            assert app.wait_idle(WAIT)
            for i in range(3):
                obj = app.client.get("Widget", f"w{i}")
                assert obj.status["seen"] == i and obj.status["observedGeneration"] == 1
            assert calls.count() == 3
            assert all(ctx.reasons for _, _, ctx in calls.items)

    def test_status_only_writes_do_not_retrigger_but_metadata_changes_do(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            n = calls.add(obj)
            obj.status["runs"] = n          # a status write on every call

        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"v": 0})
            assert app.wait_idle(WAIT)
            for v in (1, 2, 3):
                c.patch("Widget", "w1", {"v": v})
                assert app.wait_idle(WAIT)
            assert calls.count() == 4
            assert [o.spec["v"] for o in calls.of("w1")] == [0, 1, 2, 3]
            # a status write by someone else does not re-trigger either
            c.patch_status("Widget", "w1", {"note": "external"})
            assert app.wait_idle(WAIT)
            assert calls.count() == 4

            def metadata(change):
                obj = c.get("Widget", "w1")
                change(obj["metadata"])
                c.update(obj)
                assert app.wait_idle(WAIT)
            metadata(lambda m: m.__setitem__("labels", {"env": "prod"}))
            assert calls.count() == 5
            metadata(lambda m: m.__setitem__("annotations", {"note": "x"}))
            assert calls.count() == 6
            metadata(lambda m: m.__setitem__("finalizers", ["example.com/hold"]))
            assert calls.count() == 7
            c.delete("Widget", "w1")            # deletionTimestamp set (finalizer pending)
            assert app.wait_idle(WAIT)
            obj = c.get("Widget", "w1")
            assert obj["metadata"]["deletionTimestamp"] is not None
            # SPEC §5.3: while deletionTimestamp is set only finalize is called (none here)
            assert calls.count() == 7
            assert obj.generation == 4 and obj.status["observedGeneration"] == 4

    def test_update_storm_coalesces_into_one_rerun_and_a_key_never_runs_twice_at_once(self, h):
        app = h.app()
        calls = Calls()
        gate, entered = h.gate(), threading.Event()
        lock = threading.Lock()
        active: dict[str, int] = {}
        peak: dict[str, int] = {}

        @app.register("Widget", workers=4)
        def reconcile(ctx, obj):
            with lock:
                active[obj.name] = active.get(obj.name, 0) + 1
                peak[obj.name] = max(peak.get(obj.name, 0), active[obj.name])
            try:
                n = calls.add(obj, ctx)
                if obj.name == "storm" and calls.count("storm") == 1:
                    entered.set()
                    gate.wait(WAIT)
                obj.status["sawRV"] = obj.resource_version
                obj.status["calls"] = n
            finally:
                with lock:
                    active[obj.name] -= 1

        with app:
            c = app.client
            c.create("Widget", name="storm", spec={"n": -1})
            assert entered.wait(WAIT)
            others = [f"o{i}" for i in range(6)]
            for name in others:
                c.create("Widget", name=name)

            def patch_others():
                for n in range(10):
                    for name in others:
                        c.patch("Widget", name, {"n": n})
            other_writer = threading.Thread(target=patch_others)
            other_writer.start()
            for n in range(100):
                last = c.patch("Widget", "storm", {"n": n})
            other_writer.join(WAIT)
            # other keys flow on the other workers while "storm" is held
            assert wait_until(lambda: all(c.get("Widget", o).status.get("observedGeneration") == 11
                                          for o in others))
            assert calls.count("storm") == 1 and not gate.is_set()
            # the controller has taken in every event of the storm (delivery is asynchronous)
            ctl = app.controllers["Widget"]
            assert wait_until(lambda: ctl._subscription.idle() and ctl.queue.is_pending(("Widget", last.uid)))
            gate.set()
            assert app.wait_idle(WAIT)
            runs = calls.of("storm")
            assert len(runs) == 2, "the storm must coalesce into exactly one re-run"
            reasons = [ctx.reasons for _, o, ctx in calls.items if o.name == "storm"][-1]
            assert reasons and len(reasons) == len(set(reasons)), reasons     # coalesced
            assert runs[-1].resource_version == last.resource_version and runs[-1].spec == {"n": 99}
            final = c.get("Widget", "storm")
            assert final.status["sawRV"] == last.resource_version and final.status["observedGeneration"] == 101
        assert peak and all(v == 1 for v in peak.values()), peak

    def test_status_conflict_with_an_outside_status_write_is_requeued_and_converges(self, h):
        app = h.app()
        calls = Calls()
        gate, entered = h.gate(), threading.Event()

        @app.register("Widget")
        def reconcile(ctx, obj):
            if calls.add(obj, ctx) == 1:
                entered.set()
                gate.wait(WAIT)
            obj.status["mine"] = calls.count()

        with app:
            c = app.client
            uid = c.create("Widget", name="w1").uid
            assert entered.wait(WAIT)
            # a status-only write queues nothing, so only the conflict can bring the key back
            c.patch_status("Widget", "w1", {"theirs": True})
            assert not app.controllers["Widget"].queue.is_pending(("Widget", uid))
            gate.set()
            assert app.wait_idle(WAIT)
            assert calls.count() == 2, "a status write that lost the race must re-queue the key"
            obj = c.get("Widget", "w1")
            assert obj.status == {"theirs": True, "mine": 2, "observedGeneration": 1}
            assert app.controllers["Widget"].queue.num_requeues(("Widget", uid)) == 0

    def test_reconcile_gets_a_copy_and_only_its_status_edits_are_written(self, h):
        app = h.app()
        seen = []

        @app.register("Widget")
        def reconcile(ctx, obj):
            seen.append((ctx.client is app.client, ctx.deleting, isinstance(ctx.stopping, threading.Event)))
            obj.spec["size"] = 999
            obj.labels["sneaky"] = "yes"
            obj.status["phase"] = "Ready"

        with app:
            app.client.create("Widget", name="w1", spec={"size": 1})
            assert app.wait_idle(WAIT)
            obj = app.client.get("Widget", "w1")
            assert obj.spec == {"size": 1} and obj.labels == {} and obj.generation == 1
            assert obj.status == {"phase": "Ready", "observedGeneration": 1}
            assert seen == [(True, False, True)]

    def test_requeue_and_requeue_after_run_again(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget", workers=2)
        def reconcile(ctx, obj):
            n = len(calls.of(obj.name))
            calls.add(obj)
            mode = obj.spec["mode"]
            if n >= 3:
                return None
            if mode == "requeue":
                return fabrica.Result(requeue=True)
            if mode == "after":
                return fabrica.Result(requeue_after=0.05)
            return 0.05                                     # a bare number = requeue_after

        with app:
            for mode in ("requeue", "after", "number"):
                app.client.create("Widget", name=mode, spec={"mode": mode})
            assert app.wait_idle(WAIT)
            for mode in ("requeue", "after", "number"):
                assert calls.count(mode) == 4, mode
                assert app.controllers["Widget"].queue.num_requeues(("Widget", app.client.get("Widget", mode).uid)) == 0
            for mode in ("after", "number"):
                times = calls.times(mode)
                assert all(b - a >= 0.05 for a, b in zip(times, times[1:])), (mode, times)

    def test_backoff_grows_per_failure_and_resets_on_success(self, h):
        clock = FakeClock(1000.0)
        app = h.app(clock=clock)
        calls = Calls()
        failing = {"fail": True}

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            if failing["fail"]:
                raise RuntimeError("not yet")

        with app:
            ctl = app.controllers["Widget"]
            q = ctl.queue
            key = ("Widget", app.client.create("Widget", name="w1").uid)
            delays = []
            for attempt in range(1, 19):
                assert wait_until(lambda: calls.count() == attempt and q.num_requeues(key) == attempt
                                  and q.delayed_count() == 1 and not q.is_processing(key)), attempt
                delays.append(q.next_due() - clock.now)
                q.fire_due()
                assert calls.count() == attempt         # not due yet on the injected clock
                if attempt == 18:
                    obj = app.client.get("Widget", "w1")
                    assert condition(obj, "Ready")["reason"] == "ReconcileError"
                    failing["fail"] = False
                clock.advance(delays[-1])
                q.fire_due()
            # 5 ms doubling, capped at 300 s (SPEC §5.1)
            assert delays == pytest.approx([min(0.005 * 2 ** i, 300.0) for i in range(18)])
            assert wait_until(lambda: calls.count() == 19 and not q.is_processing(key))
            assert wait_until(lambda: q.num_requeues(key) == 0)         # forgotten on success
            assert q.delayed_count() == 0 and app.wait_idle(WAIT)
            assert condition(app.client.get("Widget", "w1"), "Ready")["reason"] == "ReconcileSuccess"
            # the next failure starts again at the base delay
            failing["fail"] = True
            app.client.patch("Widget", "w1", {"again": True})
            assert wait_until(lambda: calls.count() == 20 and q.delayed_count() == 1 and not q.is_processing(key))
            assert q.num_requeues(key) == 1
            assert q.next_due() - clock.now == pytest.approx(0.005)

    def test_requeue_true_is_rate_limited_by_the_per_key_backoff(self, h):
        clock = FakeClock(50.0)
        app = h.app(clock=clock)
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            return fabrica.Result(requeue=True)

        with app:
            q = app.controllers["Widget"].queue
            key = ("Widget", app.client.create("Widget", name="w1").uid)
            delays = []
            for attempt in range(1, 4):
                assert wait_until(lambda: calls.count() == attempt and q.delayed_count() == 1
                                  and not q.is_processing(key))
                delays.append(q.next_due() - clock.now)
                clock.advance(delays[-1])
                q.fire_due()
            assert delays == pytest.approx([0.005, 0.01, 0.02])

    @pytest.mark.disk
    def test_failing_key_retries_with_backoff_while_others_flow_then_converges(self, h):
        seed = h.app()
        seed.register("Widget")
        with seed:                                   # all 21 queued by the start-up list, in FIFO order
            seed.client.create("Widget", name="bad")
            for i in range(20):
                seed.client.create("Widget", name=f"ok{i:02d}")
        app = h.app()
        calls = Calls()
        seen_at_success = {}

        @app.register("Widget", workers=1)
        def reconcile(ctx, obj):
            n = len(calls.of(obj.name)) + 1
            calls.add(obj)
            if obj.name == "bad":
                if n <= 5:
                    raise RuntimeError(f"boom {n}")
                seen_at_success["obj"] = obj.copy()
                seen_at_success["others"] = sum(1 for i in range(20) if calls.count(f"ok{i:02d}"))
            obj.status["phase"] = "Done"

        with app:
            assert app.wait_idle(WAIT)
            assert calls.count("bad") == 6
            assert seen_at_success["others"] == 20, "the failing key held up the other keys"
            # each retry waited at least the doubling backoff (5 ms, 10 ms, ...)
            times = calls.times("bad")
            for i, (a, b) in enumerate(zip(times, times[1:])):
                assert b - a >= 0.005 * 2 ** i, (i, b - a)
            # while failing, the object carried the framework's error condition
            failed = seen_at_success["obj"].condition("Ready")
            assert (failed["status"], failed["reason"]) == ("False", "ReconcileError")
            assert re.fullmatch(r"boom 5; retrying in [0-9.]+s", failed["message"]), failed["message"]
            assert "Traceback" not in failed["message"]
            assert "phase" not in seen_at_success["obj"].status   # failed runs' status edits were discarded
            bad = app.client.get("Widget", "bad")
            ready = bad.condition("Ready")
            assert (ready["status"], ready["reason"]) == ("True", "ReconcileSuccess")
            assert ready["observedGeneration"] == 1 and bad.status["phase"] == "Done"
            key = ("Widget", bad.uid)
            assert app.controllers["Widget"].queue.num_requeues(key) == 0
            for i in range(20):
                obj = app.client.get("Widget", f"ok{i:02d}")
                assert obj.status == {"phase": "Done", "observedGeneration": 1}
                assert calls.count(obj.name) == 1

    def test_error_condition_message_is_the_exception_text_only(self, h):
        app = h.app()
        gate = h.gate()

        @app.register("Widget")
        def reconcile(ctx, obj):
            if not gate.is_set():
                raise ValueError("disk 'd1' is missing")

        with app:
            app.client.create("Widget", name="w1")
            assert wait_until(lambda: condition(app.client.get("Widget", "w1"), "Ready") is not None)
            cond = condition(app.client.get("Widget", "w1"), "Ready")
            assert (cond["status"], cond["reason"]) == ("False", "ReconcileError")
            assert re.fullmatch(r"disk 'd1' is missing; retrying in [0-9.]+s", cond["message"]), cond["message"]
            gate.set()
            assert wait_until(lambda: condition(app.client.get("Widget", "w1"), "Ready")["status"] == "True")
            assert app.wait_idle(WAIT)

    def test_reconciler_that_sets_ready_itself_keeps_its_condition(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            if calls.add(obj) == 1:
                raise RuntimeError("first try fails")
            obj.set_condition("Ready", False, reason="Waiting", message="for hardware")

        with app:
            app.client.create("Widget", name="w1")
            assert app.wait_idle(WAIT) and calls.count() == 2
            cond = condition(app.client.get("Widget", "w1"), "Ready")
            assert (cond["status"], cond["reason"], cond["message"]) == ("False", "Waiting", "for hardware")

    def test_permanent_error_is_recorded_and_not_retried_until_the_next_change(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            if obj.spec.get("bad"):
                raise fabrica.PermanentError("spec.size must be even")
            obj.status["ok"] = True

        with app:
            c = app.client
            uid = c.create("Widget", name="w1", spec={"bad": True}).uid
            assert app.wait_idle(WAIT)
            q = app.controllers["Widget"].queue
            key = ("Widget", uid)
            assert calls.count() == 1
            assert q.delayed_count() == 0 and not q.is_pending(key)        # nothing scheduled, ever
            cond = condition(c.get("Widget", "w1"), "Ready")
            assert (cond["status"], cond["reason"], cond["message"]) == (
                "False", "ReconcilePermanentError", "spec.size must be even; not retried until the object changes")
            assert "ok" not in c.get("Widget", "w1").status
            c.patch("Widget", "w1", {"bad": False})
            assert app.wait_idle(WAIT)
            assert calls.count() == 2
            obj = c.get("Widget", "w1")
            assert obj.status["ok"] is True and obj.condition("Ready")["reason"] == "ReconcileSuccess"

    def test_temporary_error_is_retried_after_its_delay(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            if calls.add(obj) == 1:
                raise fabrica.TemporaryError("controller busy", delay=0.1)

        with app:
            uid = app.client.create("Widget", name="w1").uid
            assert wait_until(lambda: calls.count() == 2)
            first, second = calls.times("w1")
            assert 0.1 <= second - first < 2.0
            assert app.wait_idle(WAIT) and calls.count() == 2
            assert app.controllers["Widget"].queue.num_requeues(("Widget", uid)) == 0
            assert condition(app.client.get("Widget", "w1"), "Ready")["reason"] == "ReconcileSuccess"

    def test_hanging_reconcile_gets_stopping_is_marked_stalled_and_others_flow(self, h):
        app = h.app()
        calls = Calls()
        gate = h.gate()
        stopping_seen = threading.Event()
        lock = threading.Lock()
        running = {"hang": 0, "peak": 0}

        @app.register("Widget", workers=1, timeout=0.2)
        def reconcile(ctx, obj):
            n = len(calls.of(obj.name)) + 1
            calls.add(obj)
            if obj.name != "hang":
                obj.status["done"] = True
                return None
            with lock:
                running["hang"] += 1
                running["peak"] = max(running["peak"], running["hang"])
            try:
                if n == 1:
                    if ctx.stopping.wait(WAIT):
                        stopping_seen.set()
                    gate.wait(WAIT)             # keep hanging after the watchdog fired
                obj.status["done"] = True
            finally:
                with lock:
                    running["hang"] -= 1

        with app:
            c = app.client
            uid = c.create("Widget", name="hang").uid
            key = ("Widget", uid)
            assert stopping_seen.wait(WAIT), "ctx.stopping was never set for the hung reconcile"
            assert wait_until(lambda: (condition(c.get("Widget", "hang"), "Stalled") or {}).get("status") == "True")
            for i in range(3):
                c.create("Widget", name=f"other{i}")
            assert wait_until(lambda: all(reconciled(app, "Widget", f"other{i}") for i in range(3))), \
                "other keys did not flow while one reconcile hung (workers=1)"
            q = app.controllers["Widget"].queue
            assert q.is_processing(key) and calls.count("hang") == 1 and not gate.is_set()
            c.patch("Widget", "hang", {"poke": 1})        # dirty while hung: must not start a second run
            assert wait_until(lambda: q.is_pending(key))
            assert calls.count("hang") == 1
            gate.set()
            assert app.wait_idle(WAIT)
            obj = c.get("Widget", "hang")
            assert obj.status["done"] is True and obj.status["observedGeneration"] == obj.generation == 2
            assert (obj.condition("Stalled") or {}).get("status") != "True"
            assert running["peak"] == 1

            def workers():
                return sum(1 for t in threading.enumerate()
                           if t.name.startswith("fabrica-widget-worker-") and t.is_alive())
            assert wait_until(lambda: workers() == 1), "the stand-in worker did not retire"

    def test_stop_sets_ctx_stopping_for_running_reconciles(self, h):
        app = h.app()
        entered, saw_stop = threading.Event(), threading.Event()

        @app.register("Widget")
        def reconcile(ctx, obj):
            entered.set()
            if ctx.stopping.wait(WAIT):
                saw_stop.set()

        app.start()
        app.client.create("Widget", name="w1")
        assert entered.wait(WAIT)
        started = time.monotonic()
        app.stop(timeout=5)
        assert saw_stop.is_set() and time.monotonic() - started < 5

    def test_lost_events_converge_through_resync(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            obj.status["size"] = obj.spec.get("size")

        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"size": 1})
            assert app.wait_idle(WAIT) and reconciled(app, "Widget", "w1")
            ctl = app.controllers["Widget"]
            ctl._subscription.close(WAIT)        # from now on no event reaches the controller
            c.patch("Widget", "w1", {"size": 2})
            c.create("Widget", name="w2", spec={"size": 5})
            assert app.wait_idle(WAIT)
            assert not reconciled(app, "Widget", "w1") and not reconciled(app, "Widget", "w2")  # really lost
            assert calls.count() == 1
            ctl.resync()
            assert app.wait_idle(WAIT)
            for name, size in (("w1", 2), ("w2", 5)):
                obj = c.get("Widget", name)
                assert obj.status["size"] == size and obj.status["observedGeneration"] == obj.generation

    def test_a_flooded_event_queue_of_size_1_converges_through_the_gap_resync(self, h, monkeypatch):
        """The controller's own event queue overflows: the gap triggers a full resync, nothing is lost."""
        monkeypatch.setattr(fabrica.Controller, "event_queue_size", 1)
        app = h.app()
        gate, blocked = h.gate(), threading.Event()

        def slow_mapper(obj):           # holds the controller's bus thread while events pile up
            blocked.set()
            gate.wait(WAIT)
            return []

        @app.register("Widget", watches={"Other": slow_mapper})
        def reconcile(ctx, obj):
            obj.status["size"] = obj.spec.get("size")

        app.register("Other")
        with app:
            c = app.client
            c.create("Widget", name="w0", spec={"size": 0})
            assert app.wait_idle(WAIT)
            c.create("Other", name="o1")
            assert blocked.wait(WAIT)
            for i in range(20):         # 20 changes while the controller cannot take events in
                c.patch("Widget", "w0", {"size": i + 1})
                c.create("Widget", name=f"w{i + 1}", spec={"size": i + 1})
            sub = app.controllers["Widget"]._subscription
            assert sub.dropped > 0
            gate.set()
            assert wait_until(lambda: sub.gaps >= 1)
            assert app.wait_idle(WAIT)
            for i in range(21):
                obj = c.get("Widget", f"w{i}")
                assert obj.status["size"] == (20 if i == 0 else i)
                assert obj.status["observedGeneration"] == obj.generation
            assert app.controllers["Widget"].resyncs >= 1

    def test_lost_events_converge_through_the_periodic_resync(self, h):
        app = h.app()

        @app.register("Widget", resync=0.2)
        def reconcile(ctx, obj):
            obj.status["size"] = obj.spec.get("size")

        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"size": 1})
            assert wait_until(lambda: reconciled(app, "Widget", "w1"))
            app.controllers["Widget"]._subscription.close(WAIT)
            c.patch("Widget", "w1", {"size": 2})
            c.create("Widget", name="w2", spec={"size": 5})
            assert wait_until(lambda: reconciled(app, "Widget", "w1") and reconciled(app, "Widget", "w2"))
            assert c.get("Widget", "w1").status["size"] == 2 and c.get("Widget", "w2").status["size"] == 5

    def test_delete_during_reconcile_does_not_resurrect(self, h):
        app = h.app()
        calls = Calls()
        gate, entered, returned = h.gate(), threading.Event(), threading.Event()
        rec = Recorder()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            if obj.name == "victim":
                entered.set()
                gate.wait(WAIT)
                obj.status["written"] = "after delete"
                obj.set_condition("Ready", True, reason="Done")
                returned.set()

        with app:
            app.subscribe("**", rec)
            c = app.client
            uid = c.create("Widget", name="victim").uid
            assert entered.wait(WAIT)
            assert c.delete("Widget", "victim") is None
            gate.set()
            assert returned.wait(WAIT)
            assert app.wait_idle(WAIT)
            c.create("Widget", name="marker")          # a later event: everything before it was delivered
            assert app.wait_idle(WAIT)
            with pytest.raises(fabrica.NotFoundError):
                c.get("Widget", "victim")
            with pytest.raises(fabrica.NotFoundError):
                c.get("Widget", uid)
            assert not [p for p in Path(h.data_dir).rglob("*") if uid in p.name], "the file came back"
            assert calls.count("victim") == 1, "reconcile was called for an object that no longer exists"
            assert wait_until(lambda: any(e["data"].get("resourceName") == "marker" for e in rec.events))
            victim_types = [e["type"] for e in rec.events if e.get("subject") == uid]
            assert victim_types == ["io.fabrica.widget.created", "io.fabrica.widget.deleted"]

    @pytest.mark.disk
    def test_restart_reconciles_changes_made_while_the_controller_was_down(self, h):
        def with_controller():
            app = h.app()
            calls = Calls()

            @app.register("Widget")
            def reconcile(ctx, obj):
                calls.add(obj)
                obj.status["size"] = obj.spec["size"]
            return app, calls

        app, calls = with_controller()
        with app:
            app.client.create("Widget", name="w1", spec={"size": 1})
            assert app.wait_idle(WAIT) and reconciled(app, "Widget", "w1")
        offline = h.app()
        offline.register("Widget")                  # no reconcile: nobody reacts to this change
        with offline:
            offline.client.patch("Widget", "w1", {"size": 7})
            obj = offline.client.get("Widget", "w1")
            assert obj.generation == 2 and obj.status["observedGeneration"] == 1
        app, calls = with_controller()
        with app:
            assert app.wait_idle(WAIT)
            obj = app.client.get("Widget", "w1")
            assert obj.status == {"size": 7, "observedGeneration": 2}
            assert [o.spec for o in calls.of("w1")] == [{"size": 7}]

    def test_observed_generation_conditions_and_no_op_reconciles(self, h):
        app = h.app()
        calls = Calls()
        rec = Recorder()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            obj.set_condition("Ready", obj.spec.get("up", True), reason="Checked", message="by reconcile")
            obj.status["phase"] = "Up" if obj.spec.get("up", True) else "Down"

        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"up": True})
            assert app.wait_idle(WAIT)
            obj = c.get("Widget", "w1")
            cond = obj.condition("Ready")
            assert obj.status["observedGeneration"] == 1 and cond["observedGeneration"] == 1
            assert cond["status"] == "True" and RFC3339.fullmatch(cond["lastTransitionTime"])
            # pin the transition time, then show a same-status reconcile keeps it
            obj.status["conditions"][0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
            c.update_status("Widget", "w1", obj.status)
            assert app.wait_idle(WAIT) and calls.count() == 1
            c.patch("Widget", "w1", {"other": 1})
            assert app.wait_idle(WAIT) and calls.count() == 2
            obj = c.get("Widget", "w1")
            cond = obj.condition("Ready")
            assert obj.status["observedGeneration"] == 2 and cond["observedGeneration"] == 2
            assert cond["lastTransitionTime"] == "2000-01-01T00:00:00Z"
            # a reconcile that changes nothing writes nothing
            app.subscribe("**", rec)
            rv = obj.resource_version
            app.controllers["Widget"].resync()
            assert wait_until(lambda: calls.count() == 3) and app.wait_idle(WAIT)
            assert c.get("Widget", "w1").resource_version == rv
            assert app.store.resource_version == int(rv) and rec.events == []
            # the status flips: the transition time moves
            c.patch("Widget", "w1", {"up": False})
            assert app.wait_idle(WAIT)
            obj = c.get("Widget", "w1")
            cond = obj.condition("Ready")
            assert cond["status"] == "False" and cond["observedGeneration"] == 3
            assert cond["lastTransitionTime"] != "2000-01-01T00:00:00Z"
            assert obj.status["phase"] == "Down"

    def test_set_condition_moves_the_transition_time_only_on_status_change(self):
        obj = fabrica.Resource(fabrica.new_object("Widget", "w1", "widget-0000abcd"))
        obj["metadata"]["generation"] = 3
        assert obj.set_condition("Ready", True, reason="A", message="a") is True
        cond = obj.condition("Ready")
        assert cond["status"] == "True" and cond["observedGeneration"] == 3
        assert RFC3339.fullmatch(cond["lastTransitionTime"])
        assert obj.set_condition("Ready", "True", reason="A", message="a") is False      # nothing changed
        cond["lastTransitionTime"] = "2000-01-01T00:00:00Z"
        assert obj.set_condition("Ready", True, reason="B", message="b") is True         # reason changed
        assert obj.condition("Ready")["lastTransitionTime"] == "2000-01-01T00:00:00Z"
        obj["metadata"]["generation"] = 4
        assert obj.set_condition("Ready", True, reason="B", message="b") is True         # generation changed
        assert obj.condition("Ready")["observedGeneration"] == 4
        assert obj.condition("Ready")["lastTransitionTime"] == "2000-01-01T00:00:00Z"
        assert obj.set_condition("Ready", False, reason="B", message="b") is True        # status changed
        assert obj.condition("Ready")["status"] == "False"
        assert obj.condition("Ready")["lastTransitionTime"] != "2000-01-01T00:00:00Z"
        assert len(obj.status["conditions"]) == 1
        with pytest.raises(ValueError):
            obj.set_condition("Ready", "maybe")

    def test_wait_idle_is_false_while_a_reconcile_is_blocked_and_true_after(self, h):
        app = h.app()
        gate, entered = h.gate(), threading.Event()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            calls.add(obj)
            entered.set()
            gate.wait(WAIT)

        with app:
            app.client.create("Widget", name="w1")
            assert entered.wait(WAIT)
            started = time.monotonic()
            assert app.wait_idle(0.3) is False
            assert 0.25 <= time.monotonic() - started < 3
            gate.set()
            assert app.wait_idle(WAIT) is True
            assert calls.count() == 1

    def test_wait_idle_zero_on_an_idle_app_is_true(self, h):
        app = h.app()

        @app.register("Widget")
        def reconcile(ctx, obj):
            pass

        with app:
            app.client.create("Widget", name="w1")
            assert app.wait_idle(WAIT) is True
            assert app.controllers["Widget"].idle()
            assert app.wait_idle(0) is True

    def test_wait_idle_counts_only_delayed_work_due_within_its_timeout(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Widget")
        def reconcile(ctx, obj):
            if calls.add(obj) == 1:
                return fabrica.Result(requeue_after=1.0)

        with app:
            app.client.create("Widget", name="w1")
            q = app.controllers["Widget"].queue
            assert wait_until(lambda: calls.count() == 1 and q.delayed_count() == 1)
            assert app.wait_idle(0.1) is True and calls.count() == 1     # due later than the timeout
            assert app.wait_idle(WAIT) is True
            assert calls.count() == 2

# -- controller semantics through an app: finalizers (SPEC §5.6), Stalled (SPEC §5.3) ---------

HOLD = "example.com/hold"


class FinalizeLog:
    """A finalize function that records (name, ctx.deleting) and raises the given exceptions first."""

    def __init__(self, *failures: Exception):
        self.failures = list(failures)
        self.calls: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, ctx, obj):
        with self._lock:
            self.calls.append((obj.name, ctx.deleting))
            if self.failures:
                raise self.failures.pop(0)

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.calls]


class TestFinalizerLifecycle:
    """fabrica.io/finalize follows the kind at start-up and at DELETE; user finalizers follow Kubernetes."""

    def _leave_deleting(self, store_app):
        """A first run whose finalize never succeeds: t-gone and t-held stay deleting; t-live stays live."""
        refused = set()

        def refuse(ctx, obj):
            refused.add(obj.name)
            raise fabrica.PermanentError("cannot release")
        app = store_app(lambda a: a.register("Thing", finalize=refuse))
        c = app.client
        c.create("Thing", name="t-gone")
        c.create("Thing", name="t-held", finalizers=[HOLD])
        c.create("Thing", name="t-live")
        for name in ("t-gone", "t-held"):
            assert c.delete("Thing", name).deleting
        assert wait_until(lambda: refused == {"t-gone", "t-held"}) and app.wait_idle(WAIT)
        stamps = {name: c.get("Thing", name)["metadata"]["deletionTimestamp"] for name in ("t-gone", "t-held")}
        assert fabrica.FINALIZER in c.get("Thing", "t-gone").finalizers
        app.stop()
        return stamps

    @pytest.mark.disk
    @pytest.mark.parametrize("served", ["without finalize", "open server"])
    def test_restart_without_a_finalize_function_releases_its_finalizer(self, store_app, served):
        stamps = self._leave_deleting(store_app)
        if served == "open server":
            app = store_app(open=True)
        else:
            app = store_app(lambda a: a.register("Thing"))
        # t-gone waited only for fabrica's finalizer, which nothing handles now: deleted at start-up
        assert call(app, "GET", "/things/t-gone")[0] == 404
        status, _, held = call(app, "GET", "/things/t-held")
        assert status == 200 and held["metadata"]["finalizers"] == [HOLD]
        assert held["metadata"]["deletionTimestamp"] == stamps["t-held"]
        status, _, live = call(app, "GET", "/things/t-live")
        assert status == 200 and live["metadata"]["finalizers"] == []
        assert call(app, "DELETE", "/things/t-live")[0] == 200
        # the user's finalizer removed through PUT: the last one, so the object goes
        status, _, _ = call(app, "PUT", "/things/t-held", {"metadata": {"finalizers": []}})
        assert status == 200 and call(app, "GET", "/things/t-held")[0] == 404
        assert app.wait_idle(WAIT) and call(app, "GET", "/things")[2] == []

    @pytest.mark.disk
    def test_a_kind_that_gains_finalize_puts_it_on_existing_objects(self, store_app):
        app = store_app(lambda a: a.register("Thing"))
        app.client.create("Thing", name="t1")
        app.client.create("Thing", name="t2", finalizers=[HOLD])
        assert app.client.delete("Thing", "t2").deleting
        app.stop()

        fin = FinalizeLog()
        app = store_app(lambda a: a.register("Thing", finalize=fin))
        assert app.client.get("Thing", "t1").finalizers == [fabrica.FINALIZER]
        # no new finalizer once deletion has begun (Kubernetes): t2 keeps only its own
        assert app.client.get("Thing", "t2").finalizers == [HOLD]
        status, _, obj = call(app, "DELETE", "/things/t1")
        assert status == 202 and obj["metadata"]["deletionTimestamp"]
        assert wait_until(lambda: call(app, "GET", "/things/t1")[0] == 404)
        assert app.wait_idle(WAIT) and fin.calls == [("t1", True)]

    def test_delete_applies_the_kinds_rule_to_fabricas_finalizer(self, store_app):
        fin = FinalizeLog()

        def register(app):
            app.register("Thing", finalize=fin)
            app.register("Widget")
        app = store_app(register)
        store = app.store

        def smuggle(kind, name, finalizers):
            """Store finalizers past the write path, as an older version of a kind would have left them."""
            obj = app.client.get(kind, name)
            obj["metadata"]["finalizers"] = finalizers
            store.replace(dict(obj), obj.resource_version)

        app.client.create("Widget", name="w1")
        smuggle("Widget", "w1", [fabrica.FINALIZER])
        assert call(app, "DELETE", "/widgets/w1")[0] == 200       # nothing handles it: not waited for
        app.client.create("Widget", name="w2")
        smuggle("Widget", "w2", [HOLD, fabrica.FINALIZER])
        status, _, obj = call(app, "DELETE", "/widgets/w2")
        assert status == 202 and obj["metadata"]["finalizers"] == [HOLD]

        app.client.create("Thing", name="t1")
        smuggle("Thing", "t1", [])
        status, _, obj = call(app, "DELETE", "/things/t1")         # finalize still runs
        assert status == 202 and obj["metadata"]["finalizers"] == [fabrica.FINALIZER]
        assert wait_until(lambda: call(app, "GET", "/things/t1")[0] == 404)
        assert fin.names() == ["t1"]

    def test_user_finalizers_follow_kubernetes(self, store_app):
        app = store_app(lambda a: a.register("Widget"))
        status, _, obj = call(app, "POST", "/widgets", {"metadata": {"name": "w1", "finalizers": [
            "example.com/a", "example.com/b", fabrica.FINALIZER]}, "spec": {}})
        assert status == 201 and obj["metadata"]["finalizers"] == ["example.com/a", "example.com/b"]
        status, _, obj = call(app, "DELETE", "/widgets/w1")
        assert status == 202
        stamp, rv = obj["metadata"]["deletionTimestamp"], obj["metadata"]["resourceVersion"]
        status, _, again = call(app, "DELETE", "/widgets/w1")        # idempotent: nothing written
        assert status == 202 and again == obj

        for added in (["example.com/a", "example.com/b", "example.com/c"], ["example.com/a", fabrica.FINALIZER]):
            status, _, body = call(app, "PUT", "/widgets/w1", {"metadata": {"finalizers": added}})
            assert status == 422 and body["details"][0]["field"] == "metadata.finalizers", body
        assert call(app, "GET", "/widgets/w1")[2]["metadata"]["resourceVersion"] == rv

        status, _, obj = call(app, "PUT", "/widgets/w1", {"metadata": {"finalizers": ["example.com/b"],
                                                                     "deletionTimestamp": None}})
        assert status == 200 and obj["metadata"]["finalizers"] == ["example.com/b"]
        assert obj["metadata"]["deletionTimestamp"] == stamp           # cannot be cleared
        current = app.client.get("Widget", "w1")
        current["metadata"]["finalizers"] = []
        app.client.update(current)
        assert call(app, "GET", "/widgets/w1")[0] == 404

    def test_a_finalize_kind_keeps_its_finalizer_until_deletion(self, store_app):
        fin = FinalizeLog()
        app = store_app(lambda a: a.register("Thing", finalize=fin))
        app.client.create("Thing", name="t1", finalizers=[HOLD])
        status, _, obj = call(app, "PUT", "/things/t1", {"metadata": {"finalizers": []}, "spec": {"a": 1}})
        assert status == 200 and obj["metadata"]["finalizers"] == [fabrica.FINALIZER], obj
        assert call(app, "DELETE", "/things/t1")[0] == 202
        assert wait_until(lambda: call(app, "GET", "/things/t1")[0] == 404) and fin.names() == ["t1"]

    def test_a_finalize_that_succeeds_clears_its_recorded_failure(self, store_app):
        fin = FinalizeLog(RuntimeError("lease busy"))
        app = store_app(lambda a: a.register("Thing", finalize=fin))
        app.client.create("Thing", name="t1", finalizers=[HOLD])
        app.client.delete("Thing", "t1")
        assert wait_until(lambda: app.client.get("Thing", "t1").finalizers == [HOLD]) and app.wait_idle(WAIT)
        obj = app.client.get("Thing", "t1")
        assert fin.names() == ["t1", "t1"] and obj.deleting
        ready = obj.condition("Ready")
        assert ready is not None and ready["status"] == "True" and ready["reason"] == "ReconcileSuccess", obj.status


class TestStalledClears:
    """Stalled=True from a run that overran ``timeout`` goes with the next run that completes in time."""

    @pytest.mark.parametrize("recorded", ["while the run hangs", "after the run returned"])
    def test_stalled_is_removed_even_when_the_late_run_changed_nothing(self, store_app, monkeypatch, recorded):
        clock = FakeClock(1000.0)
        hang, entered, gate, returned = (threading.Event() for _ in range(4))

        def reconcile(ctx, obj):
            try:
                if hang.is_set():
                    hang.clear()
                    entered.set()
                    assert gate.wait(WAIT)
                obj.status["phase"] = "Ready"       # the same every time: the late run writes nothing new
            finally:
                returned.set()
        app = store_app(lambda a: a.register("Widget", reconcile, timeout=0.4), clock=clock)
        c = app.client
        c.create("Widget", name="w1")
        assert app.wait_idle(WAIT) and c.get("Widget", "w1").status == {"phase": "Ready", "observedGeneration": 1}

        ctl = app.controllers["Widget"]
        original, marking, written = ctl._write_condition, threading.Event(), threading.Event()

        def write_condition(key, type, *args):
            if type == "Stalled":
                marking.set()
                if recorded == "after the run returned":
                    assert returned.wait(WAIT)
            original(key, type, *args)
            if type == "Stalled":
                written.set()
        monkeypatch.setattr(ctl, "_write_condition", write_condition)
        hang.set()
        returned.clear()
        obj = c.get("Widget", "w1")
        obj["metadata"]["labels"] = {"poke": "1"}
        c.update(obj)
        assert entered.wait(WAIT)
        clock.now += 1.0                            # past timeout=0.4: the watchdog marks the run Stalled
        assert marking.wait(WAIT)
        if recorded == "while the run hangs":
            assert written.wait(WAIT) and c.get("Widget", "w1").condition("Stalled")["status"] == "True"
        gate.set()
        assert written.wait(WAIT) and app.wait_idle(WAIT)
        assert c.get("Widget", "w1").status == {"phase": "Ready", "observedGeneration": 1}


###############################################################################
# Dashboard ###################################################################
###############################################################################

# The stream tickets, GET / and GET /events with --token, the page's own text; then the page in a real
# headless Chromium: Debian's chromium and chromium-driver driven by Selenium against
# `fabrica.py serve examples/rack_reconciliation.py`. Those skip, saying why, only when Selenium, Chromium or
# its driver is missing or cannot start (.ci/run installs them). Screenshots go to $FABRICA_ARTIFACTS when it
# is set, else to the test's tmp dir.

DASH_TOKEN = "s3cret-dashboard-token"
DASH_BEARER = {"Authorization": f"Bearer {DASH_TOKEN}"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class TestStreamTickets:
    def test_a_ticket_is_redeemed_once(self):
        tickets = fabrica.StreamTickets(clock=FakeClock(1.8e9))
        issued = tickets.issue()
        assert set(issued) == {"ticket", "expiresAt"} and RFC3339.fullmatch(issued["expiresAt"])
        tickets.redeem(issued["ticket"])
        with pytest.raises(fabrica.UnauthorizedError, match="used already"):
            tickets.redeem(issued["ticket"])

    def test_an_expired_ticket_is_refused(self):
        clock = FakeClock(1.8e9)
        tickets = fabrica.StreamTickets(ttl=30, clock=clock)
        ticket = tickets.issue()["ticket"]
        clock.advance(30)
        with pytest.raises(fabrica.UnauthorizedError, match="expired"):
            tickets.redeem(ticket)

    @pytest.mark.parametrize("mangle", [
        lambda t: "", lambda t: "not-a-ticket", lambda t: t + "x", lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: str(int(t.split(".")[0]) + 3600) + t[t.index("."):],      # a later expiry, the same mac
        lambda t: t.replace(".", "\n", 1), lambda t: "\u0661" + t])
    def test_a_forged_or_malformed_ticket_is_refused(self, mangle):
        tickets = fabrica.StreamTickets(clock=FakeClock(1.8e9))
        with pytest.raises(fabrica.UnauthorizedError, match="invalid stream ticket"):
            tickets.redeem(mangle(tickets.issue()["ticket"]))

    def test_another_servers_ticket_is_refused(self):
        clock = FakeClock(1.8e9)
        with pytest.raises(fabrica.UnauthorizedError, match="invalid"):
            fabrica.StreamTickets(clock=clock).redeem(fabrica.StreamTickets(clock=clock).issue()["ticket"])

    def test_the_redeemed_set_is_bounded(self):
        clock = FakeClock(1.8e9)
        tickets = fabrica.StreamTickets(ttl=30, clock=clock, capacity=3)
        for _ in range(3):
            tickets.redeem(tickets.issue()["ticket"])
        with pytest.raises(fabrica.FabricaError, match="retry shortly") as refused:
            tickets.redeem(tickets.issue()["ticket"])
        assert refused.value.status == 429
        clock.advance(31)       # the three have expired: forgotten, so there is room again
        tickets.redeem(tickets.issue()["ticket"])
        assert len(tickets._used) == 1


@pytest.fixture
def token_app(tmp_path):
    app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, token=DASH_TOKEN)
    app.register("Widget")
    app.rest.tickets.clock = FakeClock(1.8e9)
    with app:
        yield app


def stream_ticket(app) -> str:
    status, headers, body = call(app, "POST", "/events/ticket", headers=DASH_BEARER)
    assert status == 200 and headers["cache-control"] == "no-store", body
    return body["ticket"]


class TestDashboardTokenAndStream:
    def test_the_page_needs_no_token_and_the_data_does(self, token_app):
        status, headers, body = call(token_app, "GET", "/", headers={"Accept": BROWSER_ACCEPT})
        assert status == 200 and body == fabrica.DASHBOARD_HTML.encode()
        assert "frame-ancestors 'none'" in headers["content-security-policy"] and "Accept" in headers["vary"]
        for path in ("/", "/apis", "/widgets", "/metrics", "/events"):
            assert_error(*call(token_app, "GET", path)[::2], 401)
        assert_error(*call(token_app, "POST", "/events/ticket")[::2], 401)

    @pytest.mark.parametrize("query", ["", "?ticket=", "?ticket=123.abc.def", "?since=0"])
    def test_the_stream_refuses_no_ticket_or_a_bad_one(self, token_app, query):
        assert_error(*call(token_app, "GET", "/events" + query)[::2], 401)

    def test_the_stream_refuses_an_expired_or_a_used_ticket(self, token_app):
        used = stream_ticket(token_app)
        token_app.rest.tickets.redeem(used)
        status, _, body = call(token_app, "GET", f"/events?ticket={used}")
        assert status == 401 and "used already" in body["error"]
        expired = stream_ticket(token_app)
        token_app.rest.tickets.clock.advance(fabrica.STREAM_TICKET_TTL)
        status, _, body = call(token_app, "GET", f"/events?ticket={expired}")
        assert status == 401 and "expired" in body["error"]

    def test_a_ticket_opens_nothing_but_the_stream(self, token_app):
        ticket = stream_ticket(token_app)
        for method, path in (("GET", "/apis"), ("GET", "/widgets"), ("POST", "/events/ticket"), ("GET", "/"),
                             ("GET", "/widgets/w1/events")):
            assert call(token_app, method, f"{path}?ticket={ticket}")[0] == 401, path
        token_app.rest.tickets.redeem(ticket)      # it was not spent by any of those

    def test_a_ticket_opens_a_real_stream_once_and_untyped_frames_carry_no_event_field(self, tmp_path, servers,
                                                                                       streams):
        server = servers(tmp_path / "data", write_app(tmp_path), "--no-fsync", "--token", DASH_TOKEN)
        ticket = lambda: server.request("POST", "/events/ticket", headers=DASH_BEARER)[2]["ticket"]  # noqa: E731
        typed, first = streams(server.port, f"?ticket={ticket()}"), ticket()
        untyped = streams(server.port, f"?ticket={first}&untyped=true")
        again = streams(server.port, f"?ticket={first}")
        assert (typed.status, untyped.status, again.status) == (200, 200, 401)
        assert "used already" in again.json_body()["error"]
        assert server.request("POST", "/widgets", {"name": "w1"}, DASH_BEARER)[0] == 201
        frame = typed.events(1)[0]
        assert frame["event"] == "io.fabrica.widget.created" and frame["json"]["type"] == frame["event"]
        frame = untyped.events(1)[0]
        assert set(frame) == {"id", "data", "json"} and frame["json"]["type"] == "io.fabrica.widget.created"

    def test_the_openapi_document_names_the_ticket(self, token_app):
        doc = call(token_app, "GET", "/openapi.json", headers=DASH_BEARER)[2]
        assert "post" in doc["paths"]["/events/ticket"]
        names = {p["$ref"].rsplit("/", 1)[1] for p in doc["paths"]["/events"]["get"]["parameters"]}
        assert {"StreamTicket", "Untyped"} <= names


def test_the_dashboard_page_is_offline_and_in_budget():
    html = fabrica.DASHBOARD_HTML
    assert html.startswith("<!doctype html>") and "new EventSource(" in html
    assert not re.search(r"https?://", html), "nothing is fetched from another host"
    assert not re.search(r"<script[^>]*\bsrc\s*=|@import|url\(", html, re.I), "scripts and styles are inline"
    urls = re.findall(r"""<\w[^>]*\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html)
    assert urls and all(url.startswith("data:") for url in urls), urls
    assert "innerHTML" not in html, "text from the server goes in with textContent only"
    assert len(html.encode()) < 24 * 1024


# -- the page in a real browser ------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """A headless Chromium through chromedriver; skips (with the reason) when either is missing or cannot start."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    binary = os.environ.get("FABRICA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = os.environ.get("FABRICA_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    for path, package in ((binary, "chromium"), (driver_path, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: apt-get install -y {package} (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1440,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # performance: requests
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium could not start: {str(exc).strip().splitlines()[0]}")
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


class RackServer:
    """``fabrica.py serve examples/rack_reconciliation.py`` (see ``Server``) with a keep-alive connection per
    thread, for bursts."""

    def __init__(self, data_dir: Path, *args: str):
        self.server = Server.serve(data_dir, EXAMPLES / "rack_reconciliation.py", "--no-fsync", *args).start()
        self.url, self.headers, self._local = self.server.url, {}, threading.local()

    def request(self, method: str, path: str, body=None):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.server.connection(WAIT)
        return http_call(conn, method, path, body, self.headers)

    def create(self, plural: str, spec: dict) -> dict:
        status, _, body = self.request("POST", f"/{plural}", spec)
        assert status == 201, body
        return body

    def counts(self) -> dict[str, int]:
        return {k["kind"]: int(self.request("GET", f"/{k['plural']}?limit=1")[1]["x-total-count"])
                for k in self.request("GET", "/apis")[2]["kinds"]}


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory):
    server = RackServer(tmp_path_factory.mktemp("dashboard") / "data")
    yield server
    server.server.kill()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where screenshots go: $FABRICA_ARTIFACTS, else the test's tmp dir."""
    folder = Path(os.environ.get("FABRICA_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def page(driver, js: str, *args):
    return driver.execute_script(js, *args)


def shown_counts(driver) -> dict[str, int]:
    return page(driver, """const out = {};
        for (const e of document.querySelectorAll('#kinds .kind'))
          out[e.children[0].textContent] = +e.children[2].textContent.replace(/[^0-9]/g, '');
        return out;""")


def table_rows(driver) -> list[list[str]]:
    return page(driver, """return [...document.querySelectorAll('#table .row')].filter((e) => !e.hidden)
        .map((e) => [...e.children].map((c) => c.textContent));""")


def page_text(driver, element_id: str) -> str:
    return page(driver, "return document.getElementById(arguments[0]).innerText", element_id)


def severe_logs(driver, allow: str | None = None) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not (allow and allow in e["message"])]


def click_row(driver, name: str) -> None:
    assert page(driver, """for (const e of document.querySelectorAll('#table .row'))
        if (!e.hidden && e.children[0].textContent === arguments[0]) { e.click(); return true; }
        return false;""", name), f"no row {name!r}: {table_rows(driver)}"


def type_into(driver, element_id: str, text: str) -> None:
    page(driver, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                 "e.dispatchEvent(new Event('input'))", element_id, text)


def is_live(driver) -> bool:
    return page_text(driver, "live") == "live"


def open_page(driver, url: str, fragment: str = "") -> None:
    driver.get("about:blank")       # a new document, even when only the fragment differs
    driver.get(url + "/" + fragment)
    page(driver, "window.loadedOnce = true;")     # gone if the page ever reloads
    assert wait_until(lambda: is_live(driver), 20), page(driver, "return document.body.innerText")


def rack_template(name: str, chassis: int, blades: int = 2, nodes: int = 1) -> dict:
    return {"name": name, "chassisCount": chassis,
            "chassisConfig": {"bladeCount": blades, "bladeConfig": {"nodeCount": nodes, "bmcMode": "shared"}}}


class TestDashboardInABrowser:
    def test_a_rack_appears_turns_ready_and_shows_its_chassis(self, browser, dash_server, artifacts):
        open_page(browser, dash_server.url, "#Rack")
        dash_server.create("racktemplates", rack_template("standard", chassis=2))
        dash_server.create("racks", {"name": "rack-01", "templateUID": "standard"})
        assert wait_until(lambda: any(r[0] == "rack-01" and r[1].startswith("Ready") for r in table_rows(browser)),
                          20), table_rows(browser)
        row = next(r for r in table_rows(browser) if r[0] == "rack-01")
        assert row[2] == "1 / 1" and re.fullmatch(r"\d+s", row[3]), row
        click_row(browser, "rack-01")
        detail = lambda: page_text(browser, "detail")     # noqa: E731
        assert wait_until(lambda: "Chassis rack-01-c0" in detail() and "Chassis rack-01-c1" in detail()), detail()
        assert '"totalChassis": 2' in detail()
        page(browser, """for (const a of document.querySelectorAll('#detail a'))
            if (a.textContent === 'Chassis rack-01-c1') a.click();""")     # a dependent: its owner links back
        assert wait_until(lambda: "owner: Rack rack-01" in detail()), detail()
        assert wait_until(lambda: shown_counts(browser) == dash_server.counts()), shown_counts(browser)
        assert page(browser, "return window.loadedOnce") is True, "the page reloaded"
        assert severe_logs(browser) == []
        browser.save_screenshot(str(artifacts / "dashboard-rack.png"))

    def test_a_burst_of_2000_leaves_the_page_responsive_and_right(self, browser, dash_server, artifacts):
        open_page(browser, dash_server.url, "#RackTemplate")
        page(browser, """window.worstGap = 0; let last = performance.now();
            window.probe = setInterval(() => { const now = performance.now();
              window.worstGap = Math.max(window.worstGap, now - last); last = now; }, 50);""")
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: dash_server.create("racktemplates", rack_template(f"burst-{n:04d}", 1)),
                          range(2000)))
        dash_server.create("racks", {"name": "rack-02", "templateUID": "burst-0007"})
        assert wait_until(lambda: shown_counts(browser) == dash_server.counts(), 60), \
            (shown_counts(browser), dash_server.counts())
        caught_up = time.monotonic() - started
        worst = page(browser, "clearInterval(window.probe); return window.worstGap")
        click_row(browser, "burst-0000")
        assert wait_until(lambda: "RackTemplate burst-0000" in page_text(browser, "detail"), 5)
        type_into(browser, "types", "io.**.created")
        assert wait_until(lambda: page(browser, """const t = [...document.querySelectorAll('#log > div > div')]
            .filter((e) => !e.hidden).map((e) => e.children[1].textContent);
            return t.length > 5 && t.every((x) => x.endsWith('.created'));"""))
        print(f"\n2,000 creates: the page showed the right counts {caught_up:.1f} s after the burst began; "
              f"longest gap between 50 ms timer ticks {worst:.0f} ms")
        assert worst < 5000, f"the page froze for {worst:.0f} ms"
        assert severe_logs(browser) == []
        page(browser, "[...document.querySelectorAll('#kinds .kind')].find((e) => e.firstChild.textContent === "
                      "'Rack').click()")
        assert wait_until(lambda: any(r[0] == "rack-02" for r in table_rows(browser)))
        click_row(browser, "rack-02")
        assert wait_until(lambda: "dependents: Chassis" in page_text(browser, "detail"))
        browser.save_screenshot(str(artifacts / "dashboard.png"))
        assert (artifacts / "dashboard.png").stat().st_size > 10000

    def test_a_dropped_stream_resumes_and_a_lost_position_relists(self, browser, dash_server):
        open_page(browser, dash_server.url, "#RackTemplate")
        names = lambda: {r[0] for r in table_rows(browser)}     # noqa: E731
        type_into(browser, "filter", "after-")
        dash_server.create("racktemplates", rack_template("after-open", 1))
        assert wait_until(lambda: "after-open" in names()), names()
        listed = page(browser, "return epoch")
        page(browser, "es.onerror()")         # as when the server ends the stream: a new ticket, ?since=
        assert wait_until(lambda: is_live(browser))
        dash_server.create("racktemplates", rack_template("after-resume", 1))
        assert wait_until(lambda: "after-resume" in names()), names()
        assert page(browser, "return epoch") == listed, "resumed from the last event, not listed again"
        page(browser, "lastId = '999999999'; es.onerror()")   # a position the server never had: 410, relist
        assert wait_until(lambda: page(browser, "return epoch") == listed + 1 and is_live(browser))
        dash_server.create("racktemplates", rack_template("after-relist", 1))
        assert wait_until(lambda: {"after-open", "after-resume", "after-relist"} <= names()), names()
        assert wait_until(lambda: shown_counts(browser) == dash_server.counts()), shown_counts(browser)
        assert page(browser, "return window.loadedOnce") is True
        assert severe_logs(browser, allow="/events?") == []     # the 410 is the one expected failure

    def test_with_a_token_the_page_asks_and_the_stream_uses_a_ticket(self, browser, tmp_path):
        server = RackServer(tmp_path / "data", "--token", DASH_TOKEN, "--log-level", "debug")
        try:
            server.headers.update(DASH_BEARER)
            browser.get("about:blank")
            browser.get_log("performance")      # only this test's requests from here on
            browser.get(server.url + "/#RackTemplate")
            assert wait_until(lambda: page(browser, "return document.getElementById('auth').open"))
            page(browser, "document.getElementById('token').value = arguments[0];"
                          "document.querySelector('#auth button').click()", DASH_TOKEN)
            assert wait_until(lambda: is_live(browser), 20)
            server.create("racktemplates", rack_template("tokened", 1))
            assert wait_until(lambda: any(r[0] == "tokened" for r in table_rows(browser))), table_rows(browser)
            assert severe_logs(browser, allow=" 401 ") == []    # the first GET /apis, before the token
            urls = [m["params"]["request"]["url"] for m in (json.loads(e["message"])["message"]
                                                            for e in browser.get_log("performance"))
                    if m["method"] == "Network.requestWillBeSent"]
            assert any("/events?ticket=" in url for url in urls), urls
            assert not any(DASH_TOKEN in url for url in urls), "the stream's URL carries a ticket, never the token"
            assert DASH_TOKEN not in server.server.log()
        finally:
            page(browser, "sessionStorage.clear()")
            server.server.kill()


###############################################################################
# OpenAPI #####################################################################
###############################################################################


try:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)
except ImportError:         # pragma: no cover - schemathesis is a test-only extra
    schemathesis = None


# -- the app under test ----------------------------------------------------------

@dataclasses.dataclass
class ServerSpec:
    rack: str
    slot: int = dataclasses.field(default=1, metadata={"minimum": 1, "maximum": 48})
    role: typing.Literal["compute", "storage"] = "compute"
    tags: list[str] = dataclasses.field(default_factory=list)
    bmc: str | None = None


@dataclasses.dataclass
class ServerStatus:
    phase: str = "Pending"


def _reconcile_server(ctx, obj):
    obj.status["phase"] = "Ready"
    obj.set_condition("Ready", True, reason="Placed", message=f"in {obj.spec['rack']}")


def make_openapi_app(data_dir, **kw) -> fabrica.Fabrica:
    app = fabrica.Fabrica(data_dir=str(data_dir), durable=False, **kw)
    app.register("Server", _reconcile_server, spec=ServerSpec, status=ServerStatus,
                 finalize=lambda ctx, obj: None)
    app.register("Note", history=True)         # history, no schema
    app.register("Thing")                      # plain
    return app


FIXTURES = {"Server": {"rack": "r1"}, "Note": {"text": "hello"}, "Thing": {}}


def ensure_fixtures(app):
    """Objects named fx-a in every kind (the Note with versions 1 and 2), re-made when a case broke them."""
    for kind, spec in FIXTURES.items():
        try:
            obj = app.client.get(kind, "fx-a")
        except fabrica.NotFoundError:
            obj = None
        if kind == "Note" and obj is not None:
            status, _, body = call(app, "GET", "/notes/fx-a/versions")
            if status != 200 or {"1", "2"} - {v["versionId"] for v in body}:
                app.client.delete("Note", "fx-a", force=True)
                obj = None
        if obj is None:
            app.client.create(kind, name="fx-a", spec=spec)
            if kind == "Note":
                app.client.patch("Note", "fx-a", {"text": "second"})


@pytest.fixture(scope="module")
def openapi_app(tmp_path_factory):
    """The app under test, started, with one object of each kind (module scope)."""
    app = make_openapi_app(tmp_path_factory.mktemp("openapi"))
    app.rest.keepalive = 0.05       # /events: a comment every 50 ms, so a read can stop on time
    with app:
        ensure_fixtures(app)
        yield app


def _shape(path: str) -> str:
    """A route or an OpenAPI path with every parameter blanked: /racks/<ref> and /racks/{ref} -> /racks/{}."""
    return re.sub(r"<[^>]*>|\{[^}]*\}", "{}", path)


# -- (a) a valid OpenAPI 3.1 document --------------------------------------------

def test_document_is_valid_openapi_31(openapi_app, tmp_path):
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator (the test extra)")
    doc = fabrica.openapi_document(openapi_app)
    assert doc["openapi"] == "3.1.0"
    validator.validate(doc)
    json.dumps(doc)     # plain JSON data
    # the open server and the token variants are valid too
    validator.validate(fabrica.openapi_document(make_openapi_app(tmp_path / "open", open=True)))
    secured = fabrica.openapi_document(make_openapi_app(tmp_path / "tok", token="s3cret"))
    validator.validate(secured)
    assert secured["security"] == [{"bearerAuth": []}]
    assert secured["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert secured["paths"]["/health"]["get"]["security"] == []
    assert "401" in secured["paths"]["/servers"]["get"]["responses"]
    assert "security" not in doc and "securitySchemes" not in doc["components"]


def test_document_contents(openapi_app):
    doc = fabrica.openapi_document(openapi_app)
    schemas = doc["components"]["schemas"]
    for name in ("Error", "ObjectMeta", "Condition", "DeleteResponse", "Version", "Server", "ServerCreate",
                 "Note", "NoteCreate", "Thing", "ThingCreate"):
        assert name in schemas, name
    assert schemas["Error"]["required"] == ["error", "code", "details"]
    assert schemas["ServerSpec"]["properties"]["slot"] == {"type": "integer", "minimum": 1, "maximum": 48,
                                                           "default": 1}
    ops = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items() if m != "parameters"]
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids))
    for path, method, op in ops:
        assert op["tags"] and op["responses"], (path, method)
        for code, res in op["responses"].items():
            if code >= "400":
                assert res["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    servers = doc["paths"]["/servers"]
    assert {p["$ref"].rsplit("/", 1)[1] for p in servers["get"]["parameters"]} == {
        "LabelSelector", "Name", "Limit", "Continue"}
    assert doc["components"]["parameters"]["Limit"]["schema"] == {"type": "integer", "minimum": 1,
                                                                  "maximum": 2 ** 31}
    assert set(servers["post"]["responses"]["201"]["headers"]) == {"Location", "ETag"}
    patch = doc["paths"]["/servers/{ref}"]["patch"]
    assert set(patch["requestBody"]["content"]) == {"application/merge-patch+json", "application/json-patch+json",
                                                   "application/shorthand-patch+json", "application/json"}
    assert {"400", "404", "409", "412", "413", "415", "422", "507"} <= set(patch["responses"])
    assert "304" in doc["paths"]["/servers/{ref}"]["get"]["responses"]
    assert "/notes/{ref}/versions/{versionId}/restore" in doc["paths"]
    assert "/things/{ref}/versions" not in doc["paths"]
    assert set(doc["paths"]["/events"]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert set(doc["paths"]["/docs"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_names_never_collide(tmp_path):
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator (the test extra)")
    app = make_openapi_app(tmp_path, open=True)
    for kind in ("Error", "ServerStatus", "Health", "Resource", "Version", "NoteVersions"):
        app.register(kind, history=True)
    doc = fabrica.openapi_document(app)
    validator.validate(doc)
    ids = [op["operationId"] for item in doc["paths"].values() for m, op in item.items() if m != "parameters"]
    assert len(ids) == len(set(ids))
    schemas = doc["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error", "code", "details"]
    assert schemas["ErrorKind"]["properties"]["kind"] == {"const": "Error"}
    assert schemas["ServerStatusKind"]["properties"]["kind"] == {"const": "ServerStatus"}
    assert "phase" in schemas["ServerStatus"]["properties"]          # still the Server's status
    assert doc["paths"]["/servers/{ref}/status"]["get"]["operationId"] == "getServerStatus"
    assert doc["paths"]["/serverstatuses/{ref}"]["get"]["operationId"] == "getServerStatusKind"
    assert doc["paths"]["/{plural}/{ref}"]["get"]["operationId"] == "getResourceKind"


# -- (b) the document and the routes agree -----------------------------------------

def test_every_route_is_documented_and_back(openapi_app):
    doc = fabrica.openapi_document(openapi_app)
    documented = {(m.upper(), _shape(p)) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    served = {(r.method, _shape(r.rule)) for r in openapi_app.wsgi.routes if r.method not in ("HEAD", "OPTIONS")}
    assert documented - served == set(), "documented but not served"
    missing = served - documented
    # The /versions routes of kinds without history exist but answer only 404: not documented.
    plain = {"/" + info.plural for info in openapi_app.kinds.values() if not info.history_on}
    for method, path in sorted(missing):
        base = "/" + path.split("/")[1]
        assert base in plain and "/versions" in path, f"{method} {path} is served but not documented"
        real = path.replace("{}", "fx-a", 1).replace("{}", "1")
        status, _, body = call(openapi_app, method, real)
        assert status == 404 and body["code"] == 404, (method, real)


def test_openapi_json_route(openapi_app):
    status, headers, body = call(openapi_app, "GET", "/openapi.json")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert body == json.loads(json.dumps(fabrica.openapi_document(openapi_app)))


def test_token_guards_openapi_but_not_health(tmp_path):
    app = make_openapi_app(tmp_path, token="s3cret")
    with app:
        assert call(app, "GET", "/openapi.json")[0] == 401
        status, _, body = call(app, "GET", "/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "bearerAuth" in body["components"]["securitySchemes"]
        assert call(app, "GET", "/health")[0] == 200


# -- (d) /docs is offline --------------------------------------------------------

def test_docs_page_is_offline(openapi_app):
    status, headers, body = call(openapi_app, "GET", "/docs")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    html = body.decode("utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "/openapi.json" in html
    assert not re.search(r"https?://", html), "no absolute URL: nothing is fetched from another host"
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", html), "no protocol-relative URL"
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "scripts are inline"
    assert not re.search(r"<link[^>]*\bhref\s*=", html, re.I), "styles are inline"
    assert not re.search(r"@import|url\(", html), "no CSS fetches"
    assert len(html.splitlines()) < 200


# -- (c) schemathesis over every operation ------------------------------------------

if schemathesis is not None:
    @pytest.fixture(scope="module")
    def api_schema(openapi_app):
        return schemathesis.openapi.from_wsgi("/openapi.json", openapi_app.wsgi)

    schema = schemathesis.pytest.from_fixture("api_schema")

    @schema.parametrize()
    @settings(max_examples=int(os.environ.get("FABRICA_SCHEMATHESIS_EXAMPLES", "15")), deadline=None,
              suppress_health_check=list(HealthCheck))
    def test_schemathesis(case, openapi_app):
        ensure_fixtures(openapi_app)
        # Random refs almost never exist: two times in three, aim at the fixture object (and a real version).
        params = case.path_parameters or {}
        pick = zlib.crc32(repr(sorted(params.items())).encode() + repr(case.body).encode()) % 3
        if "ref" in params and pick:
            params["ref"] = "fx-a"
            if "versionId" in params:
                params["versionId"] = str(pick)
        # /events never ends: read it for a moment (keep-alive comments keep the stream moving).
        extra = {"timeout": 0.2} if case.path == "/events" else {}
        case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                       response_headers_conformance, response_schema_conformance], **extra)
else:
    def test_schemathesis():
        pytest.skip("schemathesis is not installed (the test extra: pip install '.[test]')")


OPENAPI_TESTS = [f"test_fabrica.py::{name}" for name in (   # run again in a fresh venv (README section)
    "test_document_is_valid_openapi_31", "test_document_contents", "test_names_never_collide",
    "test_every_route_is_documented_and_back", "test_openapi_json_route", "test_token_guards_openapi_but_not_health",
    "test_docs_page_is_offline", "test_schemathesis")]


###############################################################################
# REST API ####################################################################
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
        for (status, headers, obj), expected in zip(checks, [201, 200, 200, 200, 200, 200]):
            assert status == expected, obj
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
            server = Server.serve(tmp_path_factory.mktemp(name), *args).start()
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
            assert headers.get("content-type", "").startswith("application/json"), dict(headers)
        if expected == 405:
            assert "GET" in headers.get("allow", ""), dict(headers)
        if expected == 401:
            assert headers.get("www-authenticate", "").startswith("Bearer"), dict(headers)
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

ACCEPT_PATCH_TYPES = {"application/merge-patch+json", "application/json-patch+json",
                      "application/shorthand-patch+json"}
MERGE, JSONP, SHORT = ("application/merge-patch+json", "application/json-patch+json",
                       "application/shorthand-patch+json")


# -- Helpers ---------------------------------------------------------------------------------------


def fields_of(details):
    return sorted(d["field"] for d in details)


def plain(app):
    app.register("Rack")


# -- PATCH (SPEC §6.4) -----------------------------------------------------------------------------

def new_rack(app, name="r1", spec=None, path="/racks"):
    status, _, obj = call(app, "POST", path, {"metadata": {"name": name}, "spec": spec or {}})
    assert status == 201, obj
    return obj


class TestPatch:

    @pytest.mark.parametrize("ctype", [MERGE, MERGE + "; charset=utf-8", "application/json",
                                       "application/json; charset=UTF-8", None])
    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_merge_patch_by_content_type(self, store_app, ctype, part):
        app = store_app(plain)
        new_rack(app, spec={"a": {"b": 1, "c": 2}, "keep": True})
        if part == "status":
            call(app, "PUT", "/racks/r1/status", {"a": {"b": 1, "c": 2}, "keep": True})
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, headers, obj = call(app, "PATCH", url, {"a": {"b": 10, "c": None}, "new": [1]}, ctype=ctype)
        assert status == 200, obj
        assert obj[part] == {"a": {"b": 10}, "keep": True, "new": [1]}
        assert set(t.strip() for t in headers["accept-patch"].split(",")) == ACCEPT_PATCH_TYPES
        assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert call(app, "GET", "/racks/r1")[2][part] == obj[part]

    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_json_patch_every_op_and_pointer_escapes(self, store_app, part):
        app = store_app(plain)
        doc = {"a": {"b": 1}, "list": [1, 2, 3], "x/y": "slash", "m~n": "tilde"}
        new_rack(app, spec=doc)
        call(app, "PUT", "/racks/r1/status", doc)
        ops = [
            {"op": "test", "path": "/x~1y", "value": "slash"},
            {"op": "test", "path": "/m~0n", "value": "tilde"},
            {"op": "add", "path": "/list/-", "value": 4},
            {"op": "add", "path": "/list/0", "value": 0},
            {"op": "remove", "path": "/list/1"},
            {"op": "replace", "path": "/a/b", "value": 2},
            {"op": "move", "from": "/a/b", "path": "/moved"},
            {"op": "copy", "from": "/list", "path": "/copied"},
            {"op": "replace", "path": "/x~1y", "value": "new slash"},
            {"op": "remove", "path": "/m~0n"},
            {"op": "add", "path": "/a~1b", "value": {"~": 1}},
        ]
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, headers, obj = call(app, "PATCH", url, ops, ctype=JSONP)
        assert status == 200, obj
        assert obj[part] == {"a": {}, "list": [0, 2, 3, 4], "x/y": "new slash", "moved": 2,
                             "copied": [0, 2, 3, 4], "a/b": {"~": 1}}
        assert "accept-patch" in headers

    @pytest.mark.parametrize("part", ["spec", "status"])
    def test_shorthand_patch(self, store_app, part):
        app = store_app(plain)
        doc = {"a": {"b": 0, "keep": 1}, "c": 5, "n": None}
        new_rack(app, spec=doc)
        call(app, "PUT", "/racks/r1/status", doc)
        url = "/racks/r1" + ("/status" if part == "status" else "")
        patch = {"a.b": 1, "c": None, "d.e.f": "x", "gone.deeper": None, "n.x": True, "missing": None}
        status, headers, obj = call(app, "PATCH", url, patch, ctype=SHORT)
        assert status == 200, obj
        assert obj[part] == {"a": {"b": 1, "keep": 1}, "d": {"e": {"f": "x"}}, "n": {"x": True}}
        assert "accept-patch" in headers

    @pytest.mark.parametrize("part", ["spec", "status"])
    @pytest.mark.parametrize("ctype, patch, field", [
        (JSONP, [{"op": "add", "path": "/x", "value": 1}, {"op": "test", "path": "/c", "value": 6}], "patch[1]"),
        (JSONP, [{"op": "remove", "path": "/nope"}], "patch[0]"),
        (JSONP, [{"op": "replace", "path": "/nope/deeper", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/a/5", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/a/01", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "move", "from": "/nope", "path": "/x"}], "patch[0]"),
        (JSONP, [{"op": "frobnicate", "path": "/c"}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "c", "value": 1}], "patch[0]"),
        (JSONP, [{"op": "add", "path": "/c"}], "patch[0]"),
        (JSONP, [{"op": "replace", "path": "", "value": [1, 2]}], None),   # the result is not an object
        (SHORT, {"c.x": 1}, None),                                            # c is a number
        (SHORT, {"a..b": 1}, None),
    ])
    def test_patch_that_cannot_apply_is_422_and_writes_nothing(self, store_app, part, ctype, patch, field):
        app = store_app(plain)
        doc = {"a": [1], "c": 5}
        new_rack(app, spec=doc)
        before = call(app, "PUT", "/racks/r1/status", doc)[2]
        url = "/racks/r1" + ("/status" if part == "status" else "")
        status, _, body = call(app, "PATCH", url, patch, ctype=ctype)
        assert_error(status, body, 422)
        if field is not None:
            assert field in fields_of(body["details"]), body
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("ctype", ["application/strategic-merge-patch+json", "text/plain",
                                       "application/xml", "application/apply-patch+yaml"])
    @pytest.mark.parametrize("suffix", ["", "/status"])
    def test_unsupported_patch_type_is_415_with_accept_patch(self, store_app, ctype, suffix):
        app = store_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, headers, body = call(app, "PATCH", "/racks/r1" + suffix, {"a": 2}, ctype=ctype)
        assert_error(status, body, 415)
        assert set(t.strip() for t in headers["accept-patch"].split(",")) == ACCEPT_PATCH_TYPES
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("body", [{"op": "add", "path": "/a", "value": 1}, "ops", 1, None, True])
    @pytest.mark.parametrize("suffix", ["", "/status"])
    def test_json_patch_body_that_is_not_a_list(self, store_app, body, suffix):
        app = store_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, _, err = call(app, "PATCH", "/racks/r1" + suffix, json.dumps(body).encode(), ctype=JSONP)
        assert_error(status, err, 422)      # well-formed JSON that is not an array of operations
        assert err["error"].startswith("a JSON Patch must be an array of operations, not "), err
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("ctype", [MERGE, SHORT])
    @pytest.mark.parametrize("body", [b"[1]", b'"x"', b"1", b"null", b"{", b"", b'{"a": NaN}'])
    def test_object_patch_bodies_that_are_not_objects_are_400(self, store_app, ctype, body):
        app = store_app(plain)
        before = new_rack(app, spec={"a": 1})
        status, _, err = call(app, "PATCH", "/racks/r1", body, ctype=ctype)
        assert_error(status, err, 400)
        assert call(app, "GET", "/racks/r1")[2] == before

    def test_patch_of_a_missing_object_is_404(self, store_app):
        app = store_app(plain)
        for suffix in ("", "/status"):
            status, _, err = call(app, "PATCH", "/racks/nope" + suffix, {"a": 1}, ctype=MERGE)
            assert_error(status, err, 404)

    def test_generation_moves_only_when_the_spec_changes(self, store_app):
        app = store_app(plain)
        obj = new_rack(app, spec={"a": 1})
        gen, rv = obj["metadata"]["generation"], int(obj["metadata"]["resourceVersion"])
        assert gen == 1
        # A spec change: generation and resourceVersion move.
        _, _, obj = call(app, "PATCH", "/racks/r1", {"a": 2}, ctype=MERGE)
        assert obj["metadata"]["generation"] == 2 and int(obj["metadata"]["resourceVersion"]) > rv
        rv = int(obj["metadata"]["resourceVersion"])
        # Patches that change nothing: 200, nothing written (SPEC §1).
        for ctype, patch in ((MERGE, {"a": 2}), (MERGE, {}), (MERGE, {"zz": None}),
                             (JSONP, []), (JSONP, [{"op": "test", "path": "/a", "value": 2}]),
                             (JSONP, [{"op": "replace", "path": "/a", "value": 2}]),
                             (SHORT, {"a": 2}), (SHORT, {"q.r": None})):
            status, _, same = call(app, "PATCH", "/racks/r1", patch, ctype=ctype)
            assert status == 200 and same == obj, (ctype, patch)
        # A status patch moves resourceVersion only.
        status, _, st_obj = call(app, "PATCH", "/racks/r1/status", {"phase": "Ready"}, ctype=MERGE)
        assert status == 200 and st_obj["status"] == {"phase": "Ready"}
        assert st_obj["metadata"]["generation"] == 2 and st_obj["spec"] == {"a": 2}
        assert int(st_obj["metadata"]["resourceVersion"]) > rv
        for ctype, patch in ((JSONP, [{"op": "add", "path": "/n", "value": 1}]), (SHORT, {"m.k": "v"})):
            status, _, st_obj = call(app, "PATCH", "/racks/r1/status", patch, ctype=ctype)
            assert status == 200 and st_obj["metadata"]["generation"] == 2
        assert st_obj["status"] == {"phase": "Ready", "n": 1, "m": {"k": "v"}}
        # Each spec patch type bumps it by exactly one.
        for gen, (ctype, patch) in enumerate(((MERGE, {"b": 1}), (JSONP, [{"op": "add", "path": "/c", "value": 1}]),
                                              (SHORT, {"d.e": 1})), start=3):
            _, _, obj = call(app, "PATCH", "/racks/r1", patch, ctype=ctype)
            assert obj["metadata"]["generation"] == gen
        assert obj["spec"] == {"a": 2, "b": 1, "c": 1, "d": {"e": 1}}
        assert obj["status"] == st_obj["status"]

    @pytest.mark.parametrize("suffix, part", [("", "spec"), ("/status", "status")])
    def test_patch_true_to_1_is_a_change(self, store_app, suffix, part):
        app = store_app(plain)
        new_rack(app, spec={"x": True})
        call(app, "PUT", "/racks/r1/status", {"x": True})
        status, _, obj = call(app, "PATCH", "/racks/r1" + suffix, {"x": 1}, ctype=MERGE)
        assert status == 200
        assert canon(obj[part]) == canon({"x": 1}), obj[part]

    def test_client_patch_types(self, store_app):
        app = store_app(plain)
        app.client.create("Rack", "r1", spec={"a": {"b": 1}, "l": [1]})
        obj = app.client.patch("Rack", "r1", {"a": {"c": 2}})
        assert obj.spec == {"a": {"b": 1, "c": 2}, "l": [1]} and obj.generation == 2
        obj = app.client.patch("Rack", "r1", [{"op": "add", "path": "/l/-", "value": 2}], type="json")
        assert obj.spec["l"] == [1, 2] and obj.generation == 3
        obj = app.client.patch("Rack", "r1", {"a.b": None, "z.y": 0}, type="shorthand")
        assert obj.spec == {"a": {"c": 2}, "l": [1, 2], "z": {"y": 0}} and obj.generation == 4
        obj = app.client.patch_status("Rack", "r1", {"phase": "Ready"})
        obj = app.client.patch_status("Rack", "r1", [{"op": "add", "path": "/n", "value": 1}], type="json")
        obj = app.client.patch_status("Rack", "r1", {"m.k": "v", "phase": None}, type="shorthand")
        assert obj.status == {"n": 1, "m": {"k": "v"}} and obj.generation == 4
        with pytest.raises(fabrica.PatchError) as err:
            app.client.patch("Rack", "r1", [{"op": "remove", "path": "/nope"}], type="json")
        assert err.value.status == 422
        with pytest.raises(fabrica.FabricaError) as err:
            app.client.patch("Rack", "r1", {"a": 1}, type="strategic")
        assert err.value.status == 415
        assert app.client.get("Rack", "r1") == obj


# -- Validation on every write path (SPEC §2) ------------------------------------------------------

@dataclass
class BladeConfig:
    nodeCount: int = field(default=1, metadata={"minimum": 1})
    bmcMode: Literal["shared", "dedicated"] = "shared"


@dataclass
class RackSpec:
    chassisCount: int = field(metadata={"minimum": 1, "maximum": 42})
    bmcMode: Literal["shared", "dedicated"] = "shared"
    blade: BladeConfig = field(default_factory=BladeConfig)
    location: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)


RACK_STATUS = {
    "type": "object",
    "properties": {
        "phase": {"enum": ["Pending", "Ready", "Error"]},
        "totalChassis": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}

GOOD_SPEC = {"chassisCount": 2}
DEFAULTED = {"chassisCount": 2, "bmcMode": "shared", "blade": {"nodeCount": 1, "bmcMode": "shared"},
             "location": None, "tags": [], "ports": {}}
BAD_SPECS = [  # (a bad spec or spec patch, every field that must be reported)
    ({"chassisCount": 0, "bmcMode": "bogus", "blade": {"nodeCount": "x"}},
     ["spec.blade.nodeCount", "spec.bmcMode", "spec.chassisCount"]),
    ({"chassisCount": 43, "location": 5, "tags": ["ok", 1], "ports": {"a": "x"}, "blade": {"bmcMode": "none"}},
     ["spec.blade.bmcMode", "spec.chassisCount", "spec.location", "spec.ports.a", "spec.tags[1]"]),
    ({"chassisCount": 2, "bogus": 1}, ["spec.bogus"]),
    ({"chassisCount": 2.5}, ["spec.chassisCount"]),
    ({"chassisCount": True}, ["spec.chassisCount"]),
    ({"chassisCount": 2, "blade": {"nodeCount": 1, "extra": True}}, ["spec.blade.extra"]),
]
BAD_STATUS = {"phase": "Bogus", "totalChassis": -1, "extra": 1}
BAD_STATUS_FIELDS = ["status.extra", "status.phase", "status.totalChassis"]


def forbid(obj):
    if not isinstance(obj, fabrica.Resource):
        raise AssertionError("validate must receive a Resource")
    if obj.spec.get("location") == "forbidden":
        raise fabrica.ValidationError("location 'forbidden' is not allowed",
                                      [{"field": "spec.location", "message": "is not allowed"}])
    if obj.labels.get("stop") == "yes":
        raise fabrica.ValidationError("label stop=yes is not allowed",
                                      [{"field": "metadata.labels.stop", "message": "is not allowed"}])


def typed(app):
    app.register("Rack", spec=RackSpec, status=RACK_STATUS, validate=forbid)


def flatten(value, prefix=""):
    """A nested dict as shorthand patch keys ({"a": {"b": 1}} -> {"a.b": 1})."""
    out = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            out.update(flatten(item, prefix + key + "."))
        else:
            out[prefix + key] = item
    return out


def as_json_patch(value):
    return [{"op": "add", "path": "/" + key, "value": item} for key, item in value.items()]


# Each spec write path: fn(app, bad_spec) -> (status, details) of the refused write to r1.
def _rest(method, path, body_of, ctype="application/json"):
    def run(app, bad):
        status, _, body = call(app, method, path, body_of(bad), ctype=ctype)
        if status < 400:
            return status, body
        assert_error(status, body, 422)     # a refused write is a 422 on every path
        return status, body["details"]
    return run


def _client(fn):
    def run(app, bad):
        with pytest.raises(fabrica.FabricaError) as err:
            fn(app, bad)
        return err.value.status, err.value.details
    return run


def _client_update(app, spec):
    obj = app.client.get("Rack", "r1")
    obj["spec"] = spec
    app.client.update(obj)


SPEC_WRITES = {
    "POST flat": _rest("POST", "/racks", lambda bad: {"name": "r2", **bad}),
    "POST envelope": _rest("POST", "/racks", lambda bad: {"metadata": {"name": "r2"}, "spec": bad}),
    "PUT flat": _rest("PUT", "/racks/r1", lambda bad: {"name": "r1", **bad}),
    "PUT envelope": _rest("PUT", "/racks/r1", lambda bad: {"metadata": {"name": "r1"}, "spec": bad}),
    "PATCH merge": _rest("PATCH", "/racks/r1", lambda bad: bad, MERGE),
    "PATCH json (application/json)": _rest("PATCH", "/racks/r1", lambda bad: bad),
    "PATCH json-patch": _rest("PATCH", "/racks/r1", as_json_patch, JSONP),
    "PATCH shorthand": _rest("PATCH", "/racks/r1", flatten, SHORT),
    "client.create": _client(lambda app, bad: app.client.create("Rack", "r2", spec=bad)),
    "client.update": _client(_client_update),
    "client.patch merge": _client(lambda app, bad: app.client.patch("Rack", "r1", bad)),
    "client.patch json": _client(lambda app, bad: app.client.patch("Rack", "r1", as_json_patch(bad), type="json")),
    "client.patch shorthand": _client(lambda app, bad: app.client.patch("Rack", "r1", flatten(bad),
                                                                        type="shorthand")),
}
STATUS_WRITES = {
    "PUT status": _rest("PUT", "/racks/r1/status", lambda bad: bad),
    "PATCH status merge": _rest("PATCH", "/racks/r1/status", lambda bad: bad, MERGE),
    "PATCH status json-patch": _rest("PATCH", "/racks/r1/status", as_json_patch, JSONP),
    "PATCH status shorthand": _rest("PATCH", "/racks/r1/status", flatten, SHORT),
    "client.update_status": _client(lambda app, bad: app.client.update_status("Rack", "r1", bad)),
    "client.patch_status merge": _client(lambda app, bad: app.client.patch_status("Rack", "r1", bad)),
    "client.patch_status json": _client(lambda app, bad: app.client.patch_status("Rack", "r1", as_json_patch(bad),
                                                                                 type="json")),
    "client.patch_status shorthand": _client(lambda app, bad: app.client.patch_status("Rack", "r1", flatten(bad),
                                                                                      type="shorthand")),
}


class TestValidation:

    @pytest.fixture
    def app(self, store_app):
        app = store_app(typed)
        status, _, obj = call(app, "POST", "/racks", {"name": "r1", **GOOD_SPEC})
        assert status == 201, obj
        call(app, "PUT", "/racks/r1/status", {"phase": "Pending"})
        return app

    @pytest.mark.parametrize("bad, expected", BAD_SPECS)
    @pytest.mark.parametrize("path", list(SPEC_WRITES))
    def test_every_spec_write_path_lists_every_failing_field(self, app, path, bad, expected):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = SPEC_WRITES[path](app, bad)
        assert status == 422, details
        assert fields_of(details) == expected, details
        assert all(isinstance(d["message"], str) and d["message"] for d in details)
        assert call(app, "GET", "/racks/r1")[2] == before          # rv, spec, status unchanged
        assert call(app, "GET", "/racks/r2")[0] == 404             # and no create happened
        assert call(app, "GET", "/racks")[2] == [before]

    @pytest.mark.parametrize("path", list(STATUS_WRITES))
    def test_every_status_write_path_lists_every_failing_field(self, app, path):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = STATUS_WRITES[path](app, BAD_STATUS)
        assert status == 422, details
        assert fields_of(details) == BAD_STATUS_FIELDS, details
        assert call(app, "GET", "/racks/r1")[2] == before

    @pytest.mark.parametrize("path", list(SPEC_WRITES))
    def test_validate_function_refuses_on_every_spec_write_path(self, app, path):
        before = call(app, "GET", "/racks/r1")[2]
        status, details = SPEC_WRITES[path](app, {"chassisCount": 3, "location": "forbidden"})
        assert status == 422, details
        assert details == [{"field": "spec.location", "message": "is not allowed"}]
        assert call(app, "GET", "/racks/r1")[2] == before
        assert call(app, "GET", "/racks/r2")[0] == 404

    def test_validate_function_error_body_on_create_and_update(self, app):
        status, _, body = call(app, "POST", "/racks", {"name": "r2", "chassisCount": 1, "location": "forbidden"})
        assert_error(status, body, 422)
        assert "forbidden" in body["error"]
        assert body["details"] == [{"field": "spec.location", "message": "is not allowed"}]
        status, _, body = call(app, "PUT", "/racks/r1", {"name": "r1", "chassisCount": 1, "labels": {"stop": "yes"}})
        assert_error(status, body, 422)
        assert body["details"] == [{"field": "metadata.labels.stop", "message": "is not allowed"}]
        with pytest.raises(fabrica.ValidationError) as err:
            app.client.create("Rack", "r3", spec=GOOD_SPEC, labels={"stop": "yes"})
        assert err.value.status == 422 and err.value.details[0]["field"] == "metadata.labels.stop"
        assert [o["metadata"]["name"] for o in call(app, "GET", "/racks")[2]] == ["r1"]

    @pytest.mark.disk
    def test_defaults_are_filled_in_and_stored(self, app, tmp_path, store_kind):
        obj = call(app, "GET", "/racks/r1")[2]
        assert obj["spec"] == DEFAULTED
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r2"},
                                                      "spec": {"chassisCount": 5, "blade": {"nodeCount": 3}}})
        assert status == 201
        assert obj["spec"] == {**DEFAULTED, "chassisCount": 5, "blade": {"nodeCount": 3, "bmcMode": "shared"}}
        assert call(app, "GET", "/racks/r2")[2]["spec"] == obj["spec"]
        stored, _ = STORES[store_kind].on_disk(tmp_path / "data", "racks", obj["metadata"]["uid"])
        assert stored["spec"] == obj["spec"]      # stored, not filled in on read
        # Removing a defaulted field by patch brings the default back: no spec change, no write.
        status, _, same = call(app, "PATCH", "/racks/r2", {"bmcMode": None, "tags": None}, ctype=MERGE)
        assert status == 200 and same == obj
        # A PUT replaces the spec, so unspecified fields return to their defaults.
        _, _, obj = call(app, "PUT", "/racks/r2", {"name": "r2", "chassisCount": 6})
        assert obj["spec"] == {**DEFAULTED, "chassisCount": 6} and obj["metadata"]["generation"] == 2
        assert app.client.create("Rack", "r3", spec={"chassisCount": 2}).spec == DEFAULTED

    def test_good_writes_on_every_path_pass(self, app):
        ok = {"chassisCount": 4, "bmcMode": "dedicated", "tags": ["a"], "ports": {"p": 1}, "location": "dc2"}
        # Each spec write path accepts a valid spec (defaults filled in).
        writes = [
            lambda s: call(app, "PUT", "/racks/r1", {"name": "r1", **s}),
            lambda s: call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": s}),
            lambda s: call(app, "PATCH", "/racks/r1", s, ctype=MERGE),
            lambda s: call(app, "PATCH", "/racks/r1", as_json_patch(s), ctype=JSONP),
            lambda s: call(app, "PATCH", "/racks/r1", flatten(s), ctype=SHORT),
        ]
        for count, write in enumerate(writes, start=10):
            status, _, obj = write({**ok, "chassisCount": count})
            assert status == 200, obj
            assert obj["spec"]["chassisCount"] == count and obj["spec"]["bmcMode"] == "dedicated"
        obj = app.client.patch("Rack", "r1", {"chassisCount": 30})
        obj["spec"]["chassisCount"] = 31
        assert app.client.update(obj).spec["chassisCount"] == 31
        for status_write in (
                lambda: call(app, "PUT", "/racks/r1/status", {"phase": "Ready", "totalChassis": 3})[2],
                lambda: call(app, "PATCH", "/racks/r1/status", {"totalChassis": 4}, ctype=MERGE)[2],
                lambda: app.client.update_status("Rack", "r1", {"phase": "Error"}),
                lambda: app.client.patch_status("Rack", "r1", {"totalChassis": 0})):
            assert isinstance(status_write()["status"], dict)
        assert call(app, "GET", "/racks/r1/status")[2] == {"phase": "Error", "totalChassis": 0}

    def test_status_schema_admits_the_framework_fields(self, app):
        status_body = {"phase": "Ready", "observedGeneration": 1,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Provisioned", "message": "",
                                       "lastTransitionTime": "2026-11-26T07:00:01Z", "observedGeneration": 1}]}
        status, _, obj = call(app, "PUT", "/racks/r1/status", status_body)
        assert status == 200, obj
        assert obj["status"] == status_body
        status, _, obj = call(app, "PATCH", "/racks/r1/status", {"observedGeneration": 2}, ctype=MERGE)
        assert status == 200 and obj["status"]["observedGeneration"] == 2
        # ...yet they are still typed.
        status, _, err = call(app, "PATCH", "/racks/r1/status", {"observedGeneration": "two"}, ctype=MERGE)
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["status.observedGeneration"]

    def test_framework_status_fields_pass_a_status_schema_without_properties(self, store_app):
        counts = {"type": "object", "additionalProperties": {"type": "integer"}}
        app = store_app(lambda app: app.register("Rack", status=counts, history=True))
        new_rack(app)
        status, _, obj = call(app, "PUT", "/racks/r1/status", {"a": 1})
        assert status == 200 and obj["status"] == {"a": 1, "version": "1"}
        status, _, obj = call(app, "PATCH", "/racks/r1/status", {"b": 2}, ctype=MERGE)
        assert status == 200, obj
        assert obj["status"] == {"a": 1, "b": 2, "version": "1"}
        body = {"a": 1, "observedGeneration": 1,
                "conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "",
                                "lastTransitionTime": "2026-11-26T07:00:01Z", "observedGeneration": 1}]}
        status, _, obj = call(app, "PUT", "/racks/r1/status", body)
        assert status == 200, obj

    def test_reconciler_status_with_conditions_passes_a_status_schema_without_them(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Rack", spec=RackSpec, status=RACK_STATUS)
        def reconcile(ctx, rack):
            rack.status["phase"] = "Ready"
            rack.status["totalChassis"] = rack.spec["chassisCount"]
            rack.set_condition("Ready", True, reason="Provisioned")
        with app:
            app.client.create("Rack", "r1", spec={"chassisCount": 3})
            assert app.wait_idle(10)
            obj = app.client.get("Rack", "r1")
        assert obj.status["phase"] == "Ready" and obj.status["totalChassis"] == 3
        assert obj.status["observedGeneration"] == 1
        assert obj.condition("Ready")["status"] == "True"
        assert obj.condition("Ready")["reason"] == "Provisioned"

    @pytest.mark.parametrize("method, path", [("POST", "/racks"), ("PUT", "/racks/r1")])
    def test_metadata_and_spec_errors_are_listed_together(self, app, method, path):
        body = {"name": "r1", "labels": {"bad key": "v"}, "chassisCount": 0, "bmcMode": "bogus"}
        status, _, err = call(app, method, path, body)
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["metadata.labels.bad key", "spec.bmcMode", "spec.chassisCount"]

    def test_envelope_and_metadata_errors_are_422_and_listed(self, app):
        before = call(app, "GET", "/racks/r1")[2]
        body = {"metadata": {"name": "r1", "labels": {"bad key!": "v", "ok": "-bad"}}, "spec": {"chassisCount": 0}}
        status, _, err = call(app, "PUT", "/racks/r1", body)
        assert_error(status, err, 422)
        assert {"metadata.labels.bad key!", "metadata.labels.ok"} <= set(fields_of(err["details"]))
        status, _, err = call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": GOOD_SPEC, "extra": 1})
        assert_error(status, err, 422)
        assert fields_of(err["details"]) == ["extra"]
        assert call(app, "GET", "/racks/r1")[2] == before


# -- List options (SPEC §6.5) ----------------------------------------------------------------------

LIST_LABELS = {
    "a1": {"env": "prod", "tier": "web"},
    "a2": {"env": "prod", "tier": "db"},
    "a3": {"env": "dev", "tier": "web", "canary": "true"},
    "a4": {"env": "dev"},
    "a5": {"env": "staging", "tier": "cache"},
    "a6": {},
    "a7": {"tier": "web", "team": "x"},
    "a8": {"env": "prod", "canary": "false", "team": "y"},
    "a9": {"example.com/owner": "ops", "env": "qa"},
    "b0": {"env": "", "tier": "db"},
}
LIST_ALL = sorted(LIST_LABELS)

SELECTORS = [
    ("env=prod", "a1 a2 a8"),
    ("env==prod", "a1 a2 a8"),
    ("env!=prod", "a3 a4 a5 a6 a7 a9 b0"),
    ("env in (prod,dev)", "a1 a2 a3 a4 a8"),
    ("env in (prod, dev)", "a1 a2 a3 a4 a8"),
    ("env notin (prod,dev)", "a5 a6 a7 a9 b0"),
    ("tier", "a1 a2 a3 a5 a7 b0"),
    ("!tier", "a4 a6 a8 a9"),
    ("env=prod,tier=web", "a1"),
    ("env=prod, tier!=web", "a2 a8"),
    ("tier in (web), env notin (dev)", "a1 a7"),
    ("canary", "a3 a8"),
    ("!canary,!team", "a1 a2 a4 a5 a6 a9 b0"),
    ("env=", "b0"),
    ("env in ()", "b0"),
    ("env in (prod,,dev)", "a1 a2 a3 a4 a8 b0"),
    ("example.com/owner=ops", "a9"),
    ("example.com/owner", "a9"),
    ("", " ".join(LIST_ALL)),
    ("  env = prod  ,  tier = db ", "a2"),
    ("env\t=\tprod", "a1 a2 a8"),
    ("env=nope", ""),
    ("nokey", ""),
    ("!nokey", " ".join(LIST_ALL)),
    ("tier in (web,db,cache),!env", "a7"),
    ("env,!tier", "a4 a8 a9"),
    ("team notin (x)", "a1 a2 a3 a4 a5 a6 a8 a9 b0"),
    ("env in (prod,dev),tier in (web)", "a1 a3"),
    ("tier!=web,tier!=db", "a4 a5 a6 a8 a9"),
    ("env==dev,canary==true", "a3"),
    ("env=prod,env=dev", ""),
    ("env,env!=", "a1 a2 a3 a4 a5 a8 a9"),
]

BAD_SELECTORS = [
    "env=prod,", ",env", "env in prod", "env in (prod", "env notin", "!env=prod", "env<1", "env>1",
    "env=a b", "env=(prod)", "=prod", "Env_=x", "env=-prod", "env=" + "a" * 64, "a/b/c=x", "/x=1",
    "env in (a,,)", "!", "env=prod)", "env in (a b)", "env=prod env=dev", "(", "env!",
]


@pytest.fixture(scope="class")
def list_app(tmp_path_factory):
    app = fabrica.Fabrica(data_dir=str(tmp_path_factory.mktemp("list") / "data"), durable=False)
    app.register("Rack")
    with app:
        for name in reversed(LIST_ALL):      # creation order is not name order
            app.client.create("Rack", name, spec={"n": name}, labels=LIST_LABELS[name])
        yield app


class TestListOptions:

    @pytest.fixture
    def app(self, list_app):
        return list_app

    @staticmethod
    def get(app, **query):
        return call(app, "GET", "/racks?" + urllib.parse.urlencode(query))

    @pytest.mark.parametrize("selector, expected", SELECTORS)
    def test_selector(self, app, selector, expected):
        status, headers, items = self.get(app, labelSelector=selector)
        assert status == 200, items
        assert [o["metadata"]["name"] for o in items] == expected.split()
        assert headers["x-total-count"] == str(len(expected.split()))
        assert "x-continue" not in headers and "link" not in headers
        assert [o.name for o in app.client.list("Rack", selector=selector)] == expected.split()

    def test_percent_encoded_selector_characters(self, app):
        status, _, items = call(app, "GET", "/racks?labelSelector=env%20in%20%28prod%2Cdev%29%2C%21canary")
        assert status == 200 and [o["metadata"]["name"] for o in items] == ["a1", "a2", "a4"]
        status, _, items = call(app, "GET", "/racks?labelSelector=example.com%2Fowner%3D%3Dops")
        assert status == 200 and [o["metadata"]["name"] for o in items] == ["a9"]

    @pytest.mark.parametrize("selector", BAD_SELECTORS)
    def test_malformed_selector_is_400(self, app, selector):
        status, headers, body = self.get(app, labelSelector=selector)
        assert_error(status, body, 400)
        assert headers["content-type"].startswith("application/json")
        with pytest.raises(fabrica.BadRequestError):
            app.client.list("Rack", selector=selector)

    def test_no_options_lists_all_by_name(self, app):
        status, headers, items = call(app, "GET", "/racks")
        assert status == 200 and [o["metadata"]["name"] for o in items] == LIST_ALL
        assert headers["x-total-count"] == "10"
        assert items[0] == call(app, "GET", "/racks/a1")[2]

    @pytest.mark.parametrize("name, expected", [("a3", ["a3"]), ("a", []), ("A3", []), ("a3 ", []),
                                                ("zz", []), ("b0", ["b0"])])
    def test_name_is_an_exact_match(self, app, name, expected):
        status, headers, items = self.get(app, name=name)
        assert status == 200 and [o["metadata"]["name"] for o in items] == expected
        assert headers["x-total-count"] == str(len(expected))

    def test_name_and_selector_combine(self, app):
        assert [o["metadata"]["name"] for o in self.get(app, name="a3", labelSelector="env=dev")[2]] == ["a3"]
        status, headers, items = self.get(app, name="a3", labelSelector="env=prod")
        assert status == 200 and items == [] and headers["x-total-count"] == "0"

    @pytest.mark.parametrize("limit", ["0", "-1", "abc", str(2 ** 31 + 1), "1.5", " 1", "+1", "1e3",
                                       "٣", "0x10", str(10 ** 30)])
    def test_limit_out_of_bounds_is_400(self, app, limit):
        status, _, body = self.get(app, limit=limit)
        assert_error(status, body, 400)

    @pytest.mark.parametrize("limit, size", [("1", 1), ("3", 3), ("10", 10), ("11", 10), (str(2 ** 31), 10)])
    def test_limit_in_bounds(self, app, limit, size):
        status, headers, items = self.get(app, limit=limit)
        assert status == 200, items
        assert [o["metadata"]["name"] for o in items] == LIST_ALL[:size]
        assert headers["x-total-count"] == "10"
        assert ("x-continue" in headers) == (size < 10)

    def walk(self, app, first_url):
        """Follow Link rel=next from first_url; returns the list of pages (name lists) and headers seen."""
        pages, url, headers_seen = [], first_url, []
        for _ in range(100):
            status, headers, items = call(app, "GET", url)
            assert status == 200, items
            pages.append([o["metadata"]["name"] for o in items])
            headers_seen.append(headers)
            if "link" not in headers:
                assert "x-continue" not in headers
                return pages, headers_seen
            match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', headers["link"])
            assert match, headers["link"]
            url = match.group(1)
            token = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["continue"][0]
            assert token == headers["x-continue"]
            assert re.fullmatch(r"[A-Za-z0-9_.~-]+", headers["x-continue"])     # URL-safe, opaque
        raise AssertionError("paging did not end")

    def test_paging_walks_everything_in_name_order(self, app):
        pages, headers = self.walk(app, "/racks?limit=3")
        assert pages == [LIST_ALL[0:3], LIST_ALL[3:6], LIST_ALL[6:9], LIST_ALL[9:]]
        assert all(h["x-total-count"] == "10" for h in headers)
        # The X-Continue token alone works too.
        token = headers[0]["x-continue"]
        _, _, items = self.get(app, limit=3, **{"continue": token})
        assert [o["metadata"]["name"] for o in items] == LIST_ALL[3:6]
        # An exact multiple of the limit has no empty last page.
        pages, _ = self.walk(app, "/racks?limit=5")
        assert pages == [LIST_ALL[:5], LIST_ALL[5:]]

    def test_selector_and_paging_together(self, app):
        matching = "a1 a2 a3 a4 a5 a8 a9 b0".split()                  # "env"
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env", "limit": 3}))
        assert pages == [matching[:3], matching[3:6], matching[6:]]
        assert all(h["x-total-count"] == "8" for h in headers)
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env!=prod", "limit": 2}))
        assert pages == [["a3", "a4"], ["a5", "a6"], ["a7", "a9"], ["b0"]]
        assert all(h["x-total-count"] == "7" for h in headers)
        pages, _ = self.walk(app, "/racks?" + urllib.parse.urlencode({"labelSelector": "env=prod", "limit": 3}))
        assert pages == [["a1", "a2", "a8"]]
        pages, headers = self.walk(app, "/racks?" + urllib.parse.urlencode(
            {"labelSelector": "env in (prod, dev), tier", "limit": 1}))
        assert pages == [["a1"], ["a2"], ["a3"]]
        assert all(h["x-total-count"] == "3" for h in headers)

    @pytest.mark.parametrize("token", ["!!!", "abc", "bjpBQkM", "eDpmb28", "bjo", "%%%", "bjpmb28gYmFy",
                                       "bjphLi5i" * 100])
    def test_malformed_continue_token_is_400(self, app, token):
        status, _, body = self.get(app, limit=3, **{"continue": token})
        assert_error(status, body, 400)


# -- Paging under writes (SPEC §6.5) ---------------------------------------------------------------

class TestPagingUnderWrites:

    @pytest.mark.parametrize("selector", [None, "grp=x", "grp!=y"])
    def test_objects_present_for_the_whole_walk_appear_exactly_once(self, store_app, selector):
        app = store_app(plain)
        initial = [f"obj-{i:02d}" for i in range(60)]
        for name in initial:
            app.client.create("Rack", name, labels={"grp": "x"})
        deleted, seen = set(), []
        url = "/racks?limit=7" + (f"&labelSelector={urllib.parse.quote(selector)}" if selector else "")
        step = 0
        while True:
            status, headers, items = call(app, "GET", url)
            assert status == 200, items
            seen += [o["metadata"]["name"] for o in items]
            if "link" not in headers:
                break
            url = re.fullmatch(r'<([^>]+)>; rel="next"', headers["link"]).group(1)
            # Writes between pages: new names before, at and after the cursor; deletes, and
            # deletes + re-creates of names already walked and not yet walked.
            cursor = seen[-1]
            for name in (f"new-{step}", f"obj-{step:02d}-late", f"zzz-{step}", f"obj-{(step * 11) % 60:02d}x",
                         cursor + "a"):
                app.client.create("Rack", name, labels={"grp": "x"})
            for victim in (f"obj-{(step * 7 + 3) % 60:02d}", f"obj-{(59 - step * 5) % 60:02d}"):
                if victim not in deleted:
                    app.client.delete("Rack", victim)
                    app.client.create("Rack", victim, labels={"grp": "x"})
                    deleted.add(victim)
            app.client.patch("Rack", initial[(step * 13) % 60], {"touched": step})      # an update moves nothing
            step += 1
            assert step < 60, "paging did not end"
        assert step >= 8
        assert len(seen) == len(set(seen)), sorted(n for n in seen if seen.count(n) > 1)
        assert seen == sorted(seen)
        stable = set(initial) - deleted
        assert stable <= set(seen), sorted(stable - set(seen))
        assert len(deleted) >= 8 and len(stable) >= 30


# -- Spec history (SPEC §6.9) ----------------------------------------------------------------------

SNAPSHOT_KEYS = {"versionId", "createdAt", "uid", "name", "labels", "annotations", "spec"}


def with_history(app):
    app.register("Rack", history=True)
    app.register("Pod", history=3)
    app.register("Box")


def version_ids(app, path="/racks/r1"):
    status, _, body = call(app, "GET", path + "/versions")
    assert status == 200, body
    return [v["versionId"] for v in body]


class TestHistory:

    def test_snapshot_on_create_and_on_every_spec_write_only(self, store_app):
        app = store_app(with_history)
        status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r1", "labels": {"env": "dev"},
                                                                   "annotations": {"note": "n"}},
                                                      "spec": {"size": 1}})
        assert status == 201
        uid = obj["metadata"]["uid"]
        assert obj["status"] == {"version": "1"}
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert len(versions) == 1
        snap = versions[0]
        assert set(snap) == SNAPSHOT_KEYS
        assert snap["versionId"] == "1" and snap["uid"] == uid and snap["name"] == "r1"
        assert snap["labels"] == {"env": "dev"} and snap["annotations"] == {"note": "n"}
        assert snap["spec"] == {"size": 1} and RFC3339.fullmatch(snap["createdAt"])

        spec_writes = [
            ("PUT", "/racks/r1", {"name": "r1", "size": 2}, "application/json", {"size": 2}),
            ("PUT", "/racks/r1", {"metadata": {"name": "r1", "labels": {"env": "prod"}}, "spec": {"size": 3}},
             "application/json", {"size": 3}),
            ("PATCH", "/racks/r1", {"extra": "e"}, MERGE, {"size": 3, "extra": "e"}),
            ("PATCH", "/racks/r1", [{"op": "replace", "path": "/size", "value": 4}], JSONP, {"size": 4, "extra": "e"}),
            ("PATCH", "/racks/r1", {"extra": None, "deep.x": 1}, SHORT, {"size": 4, "deep": {"x": 1}}),
        ]
        for gen, (method, path, body, ctype, spec) in enumerate(spec_writes, start=2):
            status, _, obj = call(app, method, path, body, ctype=ctype)
            assert status == 200, obj
            assert obj["spec"] == spec and obj["metadata"]["generation"] == gen
            assert obj["status"]["version"] == str(gen)
            assert version_ids(app) == [str(g) for g in range(1, gen + 1)]
            snap = call(app, "GET", f"/racks/r1/versions/{gen}")[2]
            assert set(snap) == SNAPSHOT_KEYS and snap["versionId"] == str(gen) and snap["spec"] == spec
            assert snap["labels"] == obj["metadata"]["labels"]
        # Not snapshotted: status writes, no-op writes, label/annotation-only writes.
        no_snapshot = [
            ("PUT", "/racks/r1/status", {"phase": "Ready"}, "application/json"),
            ("PATCH", "/racks/r1/status", {"phase": "Done", "version": None}, MERGE),
            ("PATCH", "/racks/r1/status", [{"op": "add", "path": "/n", "value": 1}], JSONP),
            ("PATCH", "/racks/r1/status", {"m.k": 1}, SHORT),
            ("PUT", "/racks/r1", {"name": "r1", "size": 4, "deep": {"x": 1}}, "application/json"),
            ("PATCH", "/racks/r1", {"size": 4}, MERGE),
            ("PATCH", "/racks/r1", [], JSONP),
            ("PATCH", "/racks/r1", {"nope": None}, SHORT),
            ("PUT", "/racks/r1", {"name": "r1", "labels": {"more": "x"}, "size": 4, "deep": {"x": 1}},
             "application/json"),
        ]
        for method, path, body, ctype in no_snapshot:
            status, _, obj = call(app, method, path, body, ctype=ctype)
            assert status == 200, obj
            assert obj["metadata"]["generation"] == 6, (method, path, body)
            assert obj["status"]["version"] == "6", (method, path, body, obj["status"])
            assert version_ids(app) == ["1", "2", "3", "4", "5", "6"], (method, path, body)
        assert obj["status"] == {"phase": "Done", "n": 1, "m": {"k": 1}, "version": "6"}
        assert obj["metadata"]["labels"] == {"env": "prod", "more": "x"}
        # Client writes snapshot alike.
        obj = app.client.patch("Rack", "r1", {"size": 7})
        assert obj.generation == 7 and obj.status["version"] == "7"
        obj = app.client.update_status("Rack", "r1", {"phase": "Again"})
        assert obj.status == {"phase": "Again", "version": "7"}
        obj = app.client.patch_status("Rack", "r1", {"version": "99"})
        assert obj.status["version"] == "7"
        assert [v["versionId"] for v in app.client.versions("Rack", "r1")] == [str(g) for g in range(1, 8)]

    def test_get_delete_and_missing_versions(self, store_app):
        app = store_app(with_history)
        new_rack(app, spec={"v": 1})
        for v in (2, 3):
            call(app, "PATCH", "/racks/r1", {"v": v}, ctype=MERGE)
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert [s["spec"] for s in versions] == [{"v": 1}, {"v": 2}, {"v": 3}]
        uid = versions[0]["uid"]
        for ref in ("r1", uid):
            assert call(app, "GET", f"/racks/{ref}/versions/2")[2] == versions[1]
        status, _, body = call(app, "DELETE", "/racks/r1/versions/2")
        assert status == 200 and body == {"message": "version deleted", "uid": "2"}
        assert version_ids(app) == ["1", "3"]
        for method in ("GET", "DELETE"):
            status, _, body = call(app, method, "/racks/r1/versions/2")
            assert_error(status, body, 404)
        status, _, body = call(app, "POST", "/racks/r1/versions/2/restore")
        assert_error(status, body, 404)
        for vid in ("99", "0", "abc", "-1"):
            assert_error(*call(app, "GET", f"/racks/r1/versions/{vid}")[::2], 404)
        for path in ("/racks/nope/versions", "/racks/nope/versions/1", "/racks/nope/versions/1/restore"):
            method = "POST" if path.endswith("restore") else "GET"
            assert_error(*call(app, method, path)[::2], 404)
        # Deleting a version leaves the object alone.
        obj = call(app, "GET", "/racks/r1")[2]
        assert obj["spec"] == {"v": 3} and obj["status"]["version"] == "3"
        # Client methods.
        assert app.client.get_version("Rack", "r1", "3")["spec"] == {"v": 3}
        assert app.client.get_version("Rack", "r1", 1)["spec"] == {"v": 1}
        app.client.delete_version("Rack", "r1", "1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.get_version("Rack", "r1", "1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.delete_version("Rack", "r1", "1")
        assert [v["versionId"] for v in app.client.versions("Rack", uid)] == ["3"]

    def test_restore(self, store_app):
        app = store_app(with_history)
        new_rack(app, spec={"v": 1, "keep": True})
        call(app, "PUT", "/racks/r1", {"metadata": {"name": "r1"}, "spec": {"v": 2}})
        call(app, "PUT", "/racks/r1/status", {"phase": "Ready"})
        before = call(app, "GET", "/racks/r1")[2]
        status, headers, obj = call(app, "POST", "/racks/r1/versions/1/restore")
        assert status == 200, obj
        assert obj["spec"] == {"v": 1, "keep": True}
        assert obj["metadata"]["generation"] == 3 and obj["status"] == {"phase": "Ready", "version": "3"}
        assert int(obj["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
        assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert call(app, "GET", "/racks/r1")[2] == obj
        _, _, versions = call(app, "GET", "/racks/r1/versions")
        assert [v["versionId"] for v in versions] == ["1", "2", "3"]
        assert versions[2]["spec"] == versions[0]["spec"]
        # Restoring the current spec is a no-op write.
        status, _, same = call(app, "POST", "/racks/r1/versions/3/restore")
        assert status == 200 and same == obj and version_ids(app) == ["1", "2", "3"]
        # The client restores alike; If-Match guards it over REST.
        assert app.client.restore_version("Rack", "r1", "2").spec == {"v": 2}
        status, _, body = call(app, "POST", "/racks/r1/versions/1/restore", headers={"If-Match": '"1"'})
        assert_error(status, body, 412)
        assert version_ids(app) == ["1", "2", "3", "4"]

    def test_restore_of_a_spec_the_current_schema_refuses_is_422(self, tmp_path):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True)
        with app:
            app.client.create("Rack", "r1", spec={"size": 100, "old": True})
            app.client.update({**app.client.get("Rack", "r1"), "spec": {"size": 5}})
        strict = {"type": "object", "properties": {"size": {"type": "integer", "maximum": 10}},
                  "additionalProperties": False}
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", spec=strict, history=True)
        with app:
            before = call(app, "GET", "/racks/r1")[2]
            status, _, body = call(app, "POST", "/racks/r1/versions/1/restore")
            assert_error(status, body, 422)
            assert fields_of(body["details"]) == ["spec.old", "spec.size"]
            with pytest.raises(fabrica.ValidationError):
                app.client.restore_version("Rack", "r1", "1")
            assert call(app, "GET", "/racks/r1")[2] == before
            assert version_ids(app) == ["1", "2"]

    def test_restore_runs_the_validate_function(self, tmp_path):
        def no_big(obj):
            if obj.spec.get("size", 0) > 10:
                raise fabrica.ValidationError("too big", [{"field": "spec.size", "message": "too big"}])
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True)
        with app:
            app.client.create("Rack", "r1", spec={"size": 100})
            app.client.patch("Rack", "r1", {"size": 5})
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack", history=True, validate=no_big)
        with app:
            status, _, body = call(app, "POST", "/racks/r1/versions/1/restore")
            assert_error(status, body, 422)
            assert body["details"] == [{"field": "spec.size", "message": "too big"}]
            assert call(app, "GET", "/racks/r1")[2]["spec"] == {"size": 5}

    def test_retention_keeps_the_newest_n(self, store_app):
        app = store_app(with_history)
        new_rack(app, spec={"v": 1}, path="/pods")
        assert version_ids(app, "/pods/r1") == ["1"]
        for v in range(2, 8):
            call(app, "PATCH", "/pods/r1", {"v": v}, ctype=MERGE)
            assert version_ids(app, "/pods/r1") == [str(g) for g in range(max(1, v - 2), v + 1)], v
        _, _, versions = call(app, "GET", "/pods/r1/versions")
        assert [s["spec"] for s in versions] == [{"v": 5}, {"v": 6}, {"v": 7}]
        assert call(app, "GET", "/pods/r1")[2]["status"]["version"] == "7"

    @pytest.mark.disk
    def test_retention_never_keeps_more_than_n(self, store_app, tmp_path, store_kind):
        app = store_app(with_history)
        obj = new_rack(app, spec={"v": 1}, path="/pods")
        for v in range(2, 12):
            call(app, "PATCH", "/pods/r1", {"v": v}, ctype=MERGE)
            ids = version_ids(app, "/pods/r1")
            assert 1 <= len(ids) <= 3 and ids[-1] == str(v)
        assert 1 <= len(STORES[store_kind].on_disk(tmp_path / "data", "pods", obj["metadata"]["uid"])[1]) <= 3
        assert call(app, "GET", "/pods/r1/versions/1")[0] == 404

    def test_kind_without_history_has_no_versions(self, store_app):
        app = store_app(with_history)
        new_rack(app, spec={"v": 1}, path="/boxes")
        call(app, "PATCH", "/boxes/r1", {"v": 2}, ctype=MERGE)
        for method, path in (("GET", "/boxes/r1/versions"), ("GET", "/boxes/r1/versions/1"),
                             ("DELETE", "/boxes/r1/versions/1"), ("POST", "/boxes/r1/versions/1/restore")):
            assert_error(*call(app, method, path)[::2], 404)
        obj = call(app, "GET", "/boxes/r1")[2]
        assert obj["status"] == {} and obj["spec"] == {"v": 2}
        with pytest.raises(fabrica.NotFoundError):
            app.client.versions("Box", "r1")
        with pytest.raises(fabrica.NotFoundError):
            app.client.restore_version("Box", "r1", "1")

    def test_history_survives_a_restart_lives_in_the_data_dir_and_goes_with_the_object(self, tmp_path):
        data = tmp_path / "data"
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            uid = new_rack(app, spec={"v": 1})["metadata"]["uid"]
            call(app, "PATCH", "/racks/r1", {"v": 2}, ctype=MERGE)
            call(app, "PUT", "/racks/r1/status", {"phase": "Ready"})
            before = call(app, "GET", "/racks/r1/versions")[2]
        directory = data / ".fabrica" / "history" / "racks" / uid
        assert sorted(os.listdir(directory)) == ["1.json", "2.json"]
        with open(directory / "2.json") as f:
            assert json.load(f) == before[1]
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            assert call(app, "GET", "/racks/r1/versions")[2] == before
            obj = call(app, "GET", "/racks/r1")[2]
            assert obj["status"] == {"phase": "Ready", "version": "2"}
            _, _, obj = call(app, "POST", "/racks/r1/versions/1/restore")
            assert obj["spec"] == {"v": 1} and obj["status"]["version"] == "3"
            assert sorted(os.listdir(directory)) == ["1.json", "2.json", "3.json"]
            # Deleting the object deletes its history, on disk too.
            status, _, body = call(app, "DELETE", "/racks/r1")
            assert status == 200, body
            assert not os.path.isdir(directory) or os.listdir(directory) == []
            assert call(app, "GET", "/racks/r1/versions")[0] == 404
            # A new object with the same name starts a history of its own.
            uid2 = new_rack(app, spec={"v": 9})["metadata"]["uid"]
            assert uid2 != uid
            _, _, versions = call(app, "GET", "/racks/r1/versions")
            assert [(v["versionId"], v["uid"], v["spec"]) for v in versions] == [("1", uid2, {"v": 9})]
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        with_history(app)
        with app:
            assert version_ids(app) == ["1"]
            assert app.store.versions("Rack", uid) == []
        # Nothing about history was written outside the data dir.
        for root, _, files in os.walk(data):
            assert root.startswith(str(data))


# -- Merge patch round trip through the API (property) ---------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)
_numbers = st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1) | st.floats(allow_nan=False, allow_infinity=False)


def _json_values(scalars):
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                        max_leaves=10)


# a spec patch may not write the top-level keys a flat body reserves (fabrica._NOT_SPEC: 422 by design), so the
# generated specs leave them out; a spec field of such a name is the envelope form's, tested on its own
_spec_keys = _text.filter(lambda key: key not in fabrica._NOT_SPEC)
_specs_with_bools = st.dictionaries(_spec_keys, _json_values(st.booleans() | _numbers | _text), max_size=5)
_specs = st.dictionaries(_spec_keys, _json_values(_numbers | _text), max_size=5)


def _round_trip(a, b):
    with tempfile.TemporaryDirectory() as data:
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Rack")
        with app:
            status, _, obj = call(app, "POST", "/racks", {"metadata": {"name": "r1"}, "spec": a})
            assert status == 201, obj
            assert canon(obj["spec"]) == canon(a)
            patch = fabrica.merge_patch_diff(a, b)
            status, _, obj = call(app, "PATCH", "/racks/r1", patch, ctype=MERGE)
            assert status == 200, obj
            assert canon(obj["spec"]) == canon(b), (a, b, patch, obj["spec"])
            assert canon(call(app, "GET", "/racks/r1")[2]["spec"]) == canon(b)
            changed = canon(a) != canon(b)
            assert obj["metadata"]["generation"] == (2 if changed else 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=_specs, b=_specs)
def test_merge_patch_diff_applied_over_http_yields_b(a, b):
    _round_trip(a, b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(a={"x": True}, b={"x": 1})
@given(a=_specs_with_bools, b=_specs_with_bools)
def test_merge_patch_diff_applied_over_http_yields_b_with_booleans(a, b):
    _round_trip(a, b)


# -- Bounds: object size, event ring, caches and metric labels (SPEC §4, §6.4, §6.7) ---------------

@pytest.fixture
def bounded_app(tmp_path):
    """bounded_app(register, **options) -> a started Fabrica built with ``options`` (max_body, ring_bytes...)."""
    apps = []

    def make(register, **options):
        options.setdefault("data_dir", str(tmp_path / f"data{len(apps)}"))
        options.setdefault("durable", False)
        app = fabrica.Fabrica(**options)
        register(app)
        app.start()
        apps.append(app)
        return app
    yield make
    for app in reversed(apps):
        app.stop()


def _unchanged(app, path, before):
    """The object at ``path`` is exactly ``before`` (same resourceVersion, same JSON)."""
    status, headers, now = call(app, "GET", path)
    assert status == 200 and now == before and headers["etag"] == f'"{before["metadata"]["resourceVersion"]}"'


def _copy_amplifier(copies):
    """A JSON Patch of ~50 bytes per op that doubles /a with every copy (CVE-2019-1002100)."""
    return [{"op": "add", "path": "/a", "value": [1]}] + [{"op": "copy", "from": "/a", "path": "/a/-"}] * copies


class TestObjectSizeLimit:
    LIMIT = 8192

    def test_copy_amplifying_json_patch_is_refused_before_it_grows(self, bounded_app):
        app = bounded_app(plain, max_body=self.LIMIT)
        before = new_rack(app)
        published = app.bus.published
        ops = _copy_amplifier(16)           # 16 doublings: about 256 KiB from an 800-byte body
        assert len(json.dumps(ops)) < 1000
        status, _, body = call(app, "PATCH", "/racks/r1", ops, ctype=JSONP)
        assert_error(status, body, 413)
        # the refusal names the first op whose result passes the limit: the document never got larger
        sizes, doc = [], {}
        for op in ops:
            doc = fabrica.apply_json_patch(doc, [op])
            sizes.append(fabrica.json_size(doc))
        first_over = next(i for i, size in enumerate(sizes) if size > self.LIMIT)
        assert body["details"] == [{"field": f"patch[{first_over}]", "message": body["details"][0]["message"]}]
        _unchanged(app, "/racks/r1", before)
        assert app.bus.published == published
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.patch("Rack", "r1", ops, type="json")
        with pytest.raises(fabrica.PatchError) as caught:   # the pure function: a PatchError, status 413
            fabrica.apply_json_patch({}, _copy_amplifier(40), max_size=1 << 20)
        assert caught.value.status == 413
        # copies that only churn (copy, then remove) are bounded too: their copied bytes add up
        churn = [{"op": "add", "path": "/big", "value": "x" * 3000}] + [
            {"op": "copy", "from": "/big", "path": "/tmp"}, {"op": "remove", "path": "/tmp"}] * 3
        status, _, body = call(app, "PATCH", "/racks/r1", churn, ctype=JSONP)
        assert_error(status, body, 413)
        # a patch that stays under the limit still applies, and keeps its exact meaning
        status, _, obj = call(app, "PATCH", "/racks/r1", _copy_amplifier(4), ctype=JSONP)
        assert status == 200, obj
        assert obj["spec"]["a"] == fabrica.apply_json_patch({}, _copy_amplifier(4))["a"]

    def test_every_write_path_keeps_the_object_limit(self, bounded_app):
        pad = {"type": "string", "default": "x" * 200}
        schema = {"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"pad": pad}}},
            "a": {}, "b": {}}}

        def register(app):
            app.register("Rack")
            app.register("Shelf", spec=schema)
        app = bounded_app(register, max_body=self.LIMIT)
        before = new_rack(app, spec={"a": "y" * 5000})
        published = app.bus.published
        big = "z" * 4000             # each body is under the limit; what it makes is over it
        writes = [
            ("PATCH", "/racks/r1", {"b": big}, MERGE),
            ("PATCH", "/racks/r1", {"b.c": big}, SHORT),
            ("PATCH", "/racks/r1", [{"op": "add", "path": "/b", "value": big}], JSONP),
            ("PUT", "/racks/r1", {"a": "y" * (self.LIMIT - 150)}, "application/json"),
            ("PUT", "/racks/r1/status", {"note": big}, "application/json"),
            ("PATCH", "/racks/r1/status", {"note": big}, MERGE),
        ]
        for method, path, body, ctype in writes:
            assert len(json.dumps(body)) < self.LIMIT
            status, _, err = call(app, method, path, body, ctype=ctype)
            assert_error(status, err, 413)
            _unchanged(app, "/racks/r1", before)
        # a create whose object (body plus metadata) passes the limit stores nothing
        status, _, err = call(app, "POST", "/racks", {"name": "r2", "a": "y" * (self.LIMIT - 100)})
        assert_error(status, err, 413)
        # defaults the schema fills in: 60 empty items of a 200-byte default each
        status, _, err = call(app, "POST", "/shelfs", {"name": "s1", "items": [{}] * 60})
        assert_error(status, err, 413)
        # app.client takes the same path
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.create("Rack", "r3", spec={"a": "y" * 2 * self.LIMIT})
        with pytest.raises(fabrica.PayloadTooLargeError):
            app.client.update_status("Rack", "r1", {"note": big})
        assert [r.name for r in app.client.list("Rack")] == ["r1"] and app.client.list("Shelf") == []
        assert app.bus.published == published
        _unchanged(app, "/racks/r1", before)

    def test_an_object_over_a_lowered_limit_can_still_shrink_and_go(self, bounded_app):
        app = bounded_app(plain, max_body=self.LIMIT)
        new_rack(app, spec={"a": "y" * 6000, "b": "short", "c": "short"})
        app.max_body = 4096
        status, _, err = call(app, "PATCH", "/racks/r1", {"d": 1}, ctype=MERGE)
        assert_error(status, err, 413)                      # growing it is refused
        status, _, obj = call(app, "PATCH", "/racks/r1", {"b": None}, ctype=MERGE)
        assert status == 200 and fabrica.json_size(obj) > 4096, obj     # shrinking it is not
        status, _, obj = call(app, "PATCH", "/racks/r1", [{"op": "remove", "path": "/c"}], ctype=JSONP)
        assert status == 200 and fabrica.json_size(obj) > 4096, obj
        status, _, obj = call(app, "DELETE", "/racks/r1")
        assert status == 200, obj


def get_text(app, path, headers=None):
    """GET a text endpoint (/metrics) in-process; its body as str."""
    status, _, body = call(app, "GET", path, headers=headers)
    assert status == 200, body
    return body.decode()


class TestEventRingBytes:
    def test_the_ring_is_bounded_in_bytes_and_resume_past_it_is_gone(self, bounded_app):
        assert fabrica.FileStore(".").feed_bytes == fabrica.MemoryStore().feed_bytes == 64 << 20 == fabrica.RING_BYTES
        app = bounded_app(plain, ring_bytes=100_000)
        first = new_rack(app, spec={"a": "y" * 20_000})
        for n in range(20):        # 20 PUTs of one ~20 KB object: 400 KB of events
            status, _, obj = call(app, "PUT", "/racks/r1", {"a": "y" * 20_000, "n": n})
            assert status == 200, obj
        stats = app.bus.stats()
        assert 0 < stats["bufferedBytes"] <= 100_000
        assert 0 < stats["buffered"] < 10       # far below the count bound: bytes evicted them
        last = int(obj["metadata"]["resourceVersion"])
        kept = app.bus.since((last - stats["buffered"], 0))
        assert [pos for pos, _ in kept] == [(rv, 0) for rv in range(last - stats["buffered"] + 1, last + 1)]
        assert stats["bufferedBytes"] >= sum(fabrica.json_size(ev["data"]["resource"]) for _, ev in kept)
        status, _, err = call(app, "GET", f"/events?since={first['metadata']['resourceVersion']}")
        assert_error(status, err, 410)
        assert f"fabrica_event_ring_bytes {stats['bufferedBytes']}\n" in get_text(app, "/metrics")

    def test_subscriber_queues_are_bounded_in_bytes_and_share_the_events(self, bounded_app):
        assert fabrica.Controller.event_queue_bytes == fabrica.QUEUE_BYTES
        app = bounded_app(plain)
        release, entered = threading.Event(), threading.Event()

        def stuck(event):
            entered.set()
            release.wait(30)
        sub = app.subscribe("io.fabrica.rack.*", stuck, queue_bytes=50_000)
        taps = [app.bus.tap("**"), app.bus.tap("**")]
        try:
            for n in range(10):         # 10 events of ~20 KB: the handler holds the first, the queue 2 more
                new_rack(app, name=f"r{n}", spec={"a": "y" * 20_000})
                if n == 0:              # so the queue never drains in between: one gap, not two
                    assert entered.wait(WAIT)
            assert 0 < sub.queued_bytes <= 50_000 and sub.dropped >= 7
            # the taps hold the very same event dicts: nothing is copied per subscriber; a resume
            # derives equal events from the store's change feed
            ring = [event for _, event in app.bus.since((0, 0))]
            first, second = ([event for event in iter(lambda t=tap: t.get(0), None)] for tap in taps)
            assert len(first) == len(second) == len(ring) == 10
            assert all(a is b and a == c for a, b, c in zip(first, second, ring))
        finally:
            release.set()
            for tap in taps:
                tap.close()
        assert wait_until(sub.idle)
        assert sub.gaps == 1 and sub.queued_bytes == 0


class TestBoundedCachesAndLabels:
    def test_unknown_methods_and_raw_paths_never_become_metric_labels(self, bounded_app):
        app = bounded_app(plain, token="s3cret")
        auth = {"Authorization": "Bearer s3cret"}
        for name in ("r1", "r2"):
            assert call(app, "POST", "/racks", {"name": name}, auth)[0] == 201
            assert call(app, "GET", f"/racks/{name}", headers=auth)[0] == 200
        assert call(app, "BREW0", "/racks")[0] == 401       # unauthenticated, as in the report
        get_text(app, "/metrics", auth)             # so that /metrics itself has its labels
        before = get_text(app, "/metrics", auth)
        for n in range(1, 300):
            assert call(app, f"BREW{n}", f"/racks/x{n}")[0] == 401
        after = get_text(app, "/metrics", auth)
        def label_sets(text):
            return [re.sub(r" \S+$", "", line) for line in text.splitlines()]
        assert label_sets(after) == label_sets(before)     # only sample values moved
        assert 'route="unmatched",method="other",code="401"} 300\n' in after
        assert 'route="/racks/<ref>",method="GET",code="200"} 2\n' in after
        assert "BREW" not in after and "/racks/x" not in after and "/racks/r1" not in after

    def test_condition_types_are_not_remembered_forever(self, bounded_app):
        app = bounded_app(plain)
        got = []
        sub = app.subscribe("io.fabrica.condition.*", got.append)
        new_rack(app)
        conditions = [{"type": f"Custom{n}", "status": "True"} for n in range(600)]
        app.client.update_status("Rack", "r1", {"conditions": conditions})
        assert wait_until(lambda: len(got) == 600)    # every distinct type still matched...
        assert len(sub._matches) <= 256             # ...but only a bounded number of verdicts is kept

    def test_owner_and_fsync_bookkeeping_leave_nothing_behind(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))     # durable: directory fsyncs run
        app.register("Rack", history=True)
        app.register("Chassis")
        with app:
            for n in range(20):
                owner = app.client.create("Rack", f"r{n}")
                app.client.create("Chassis", f"c{n}", owner=owner)
                assert app.client.delete("Rack", owner.uid) is None       # and its chassis with it
            assert app.client.list("Chassis") == []
            assert app.store._owned == {}
            assert app.store._dirsync._dirs == {}

    def test_an_open_server_makes_a_bounded_number_of_kinds(self, bounded_app, monkeypatch):
        app = bounded_app(lambda app: None, open=True)
        status, _, err = call(app, "POST", "/widgets", {"name": "Not A Name"})
        assert_error(status, err, 422)
        assert call(app, "GET", "/apis")[2]["kinds"] == []     # a body that could not be stored made no kind
        monkeypatch.setattr(fabrica, "OPEN_KINDS", 3)
        for plural in ("widgets", "gadgets", "gizmos"):
            assert call(app, "POST", f"/{plural}", {"name": "one"})[0] == 201
        status, _, err = call(app, "POST", "/doodads", {"name": "one"})
        assert_error(status, err, 422)
        assert [k["plural"] for k in call(app, "GET", "/apis")[2]["kinds"]] == ["widgets", "gadgets", "gizmos"]

    def test_the_get_body_cache_is_bounded_in_bytes(self, bounded_app, monkeypatch):
        monkeypatch.setattr(fabrica, "_BODY_CACHE_BYTES", 50_000)
        app = bounded_app(plain)
        for n in range(6):
            new_rack(app, name=f"r{n}", spec={"a": "y" * 20_000})
            assert call(app, "GET", f"/racks/r{n}")[0] == 200
            cached = app.rest._bodies
            assert sum(len(body) for _, body in cached.values()) == app.rest._bodies_bytes <= 50_000
            assert 1 <= len(cached) <= 2

# -- REST: empty list options (SPEC §6.5) and status in flat bodies and spec patches (§6.2, §6.4) --

MERGE, JSONP, SHORT = ("application/merge-patch+json", "application/json-patch+json",
                       "application/shorthand-patch+json")


@pytest.fixture(params=["registered", "open server"])
def widgets(request, tmp_path):
    """A started app serving /widgets, as a registered kind or made at first create by the open server."""
    app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, open=request.param == "open server")
    if request.param == "registered":
        app.register("Widget")
    with app:
        yield app


class TestEmptyListOptions:
    """An empty list option is an absent one, as in Kubernetes (whose clients page from continue="")."""

    @pytest.fixture
    def app(self, widgets):
        for name in ("w3", "w1", "w4", "w2", "w5"):
            assert call(widgets, "POST", "/widgets", {"name": name, "labels": {"n": name}})[0] == 201
        return widgets

    def test_a_kubernetes_paging_loop_starts_with_an_empty_continue(self, app):
        pages, token = [], ""
        for _ in range(10):
            status, headers, items = call(app, "GET", "/widgets?" + urllib.parse.urlencode(
                {"limit": 2, "continue": token}))
            assert status == 200, items
            pages.append(names(items))
            token = headers.get("x-continue", "")
            if not token:
                break
        assert pages == [["w1", "w2"], ["w3", "w4"], ["w5"]]

    @pytest.mark.parametrize("query", ["continue=", "limit=", "labelSelector=", "name=",
                                       "limit=&continue=&labelSelector=&name="])
    def test_empty_option_means_no_option(self, app, query):
        status, headers, items = call(app, "GET", "/widgets?" + query)
        assert status == 200, items
        assert names(items) == ["w1", "w2", "w3", "w4", "w5"] and headers["x-total-count"] == "5"
        assert "x-continue" not in headers

    def test_empty_options_next_to_real_ones(self, app):
        status, _, items = call(app, "GET", "/widgets?name=&labelSelector=n%3Dw4&continue=")
        assert status == 200 and names(items) == ["w4"]
        status, headers, items = call(app, "GET", "/widgets?limit=&continue=&name=w2")
        assert status == 200 and names(items) == ["w2"] and headers["x-total-count"] == "1"


class TestStatusIsNotASpecField:
    """A top-level status in a flat body or a spec patch is a 422 (status goes through /status);
    the envelope form keeps ignoring it, and a spec field named status is written with the envelope."""

    @staticmethod
    def refused(status, body):
        assert status == 422, body
        assert [d["field"] for d in body["details"]] == ["status"] and "/status" in body["details"][0]["message"]

    def test_flat_create_and_put(self, widgets):
        self.refused(*call(widgets, "POST", "/widgets", {"name": "w1", "status": {"phase": "x"}})[::2])
        assert call(widgets, "GET", "/widgets/w1")[0] == 404
        status, _, obj = call(widgets, "POST", "/widgets", {"name": "w1", "size": 1})
        assert status == 201 and obj["spec"] == {"size": 1}
        self.refused(*call(widgets, "PUT", "/widgets/w1", {"size": 2, "status": {"phase": "x"}})[::2])
        self.refused(*call(widgets, "PUT", "/widgets/w1", {"status": None})[::2])
        assert call(widgets, "GET", "/widgets/w1")[2] == obj

    @pytest.mark.parametrize("ctype, patch", [
        (MERGE, {"status": {"phase": "x"}}),
        (MERGE, {"size": 2, "status": None}),
        ("application/json", {"status": {}}),
        (JSONP, [{"op": "add", "path": "/status", "value": {"phase": "x"}}]),
        (JSONP, [{"op": "move", "from": "/size", "path": "/status"}]),
        (JSONP, [{"op": "copy", "from": "/size", "path": "/status"}]),
        (JSONP, [{"op": "replace", "path": "", "value": {"size": 1, "status": {}}}]),
        (SHORT, {"status.phase": "x"}),
        (SHORT, {"status": None}),
    ])
    def test_spec_patch_that_touches_status(self, widgets, ctype, patch):
        status, _, obj = call(widgets, "POST", "/widgets", {"name": "w1", "size": 1})
        assert status == 201
        self.refused(*call(widgets, "PATCH", "/widgets/w1", patch, ctype=ctype)[::2])
        assert call(widgets, "GET", "/widgets/w1")[2] == obj            # nothing stored
        with pytest.raises(fabrica.ValidationError):
            widgets.client.patch("Widget", "w1", patch, {MERGE: "merge", "application/json": "merge",
                                                         JSONP: "json", SHORT: "shorthand"}[ctype])

    def test_envelope_ignores_status_and_writes_a_spec_field_named_status(self, widgets):
        status, _, obj = call(widgets, "POST", "/widgets", {"metadata": {"name": "w1"}, "spec": {
            "status": "spare", "size": 1}, "status": {"phase": "x"}})
        assert status == 201 and obj["spec"] == {"status": "spare", "size": 1} and obj["status"] == {}
        # a patch that leaves that spec field alone is fine; one that touches it is refused
        status, _, obj = call(widgets, "PATCH", "/widgets/w1", {"size": 2}, ctype=MERGE)
        assert status == 200 and obj["spec"] == {"status": "spare", "size": 2}
        self.refused(*call(widgets, "PATCH", "/widgets/w1", {"status": "used"}, ctype=MERGE)[::2])
        status, _, obj = call(widgets, "PUT", "/widgets/w1", {"spec": {"status": "used", "size": 2}})
        assert status == 200 and obj["spec"] == {"status": "used", "size": 2} and obj["status"] == {}
        # the status route still takes a status (and a member named status inside it)
        status, _, obj = call(widgets, "PATCH", "/widgets/w1/status", {"status": "ok"}, ctype=MERGE)
        assert status == 200 and obj["status"] == {"status": "ok"}


# -- issue 11 reviews: condition types and every line-oriented output (F2), the write that removes the last
# -- finalizer (NU-1), the flat form's reserved keys in spec patches (SPEC §6.2, §6.4), the README's claims

def open_events(app, last_event_id=None):
    """GET /events in-process -> (status, the response's chunk iterator); close the iterator when done."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO="/events", QUERY_STRING="")
    if last_event_id is not None:
        environ["HTTP_LAST_EVENT_ID"] = last_event_id
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status.split()[0])
    body = app.wsgi(environ, start_response)
    return seen["status"], body


def sse_events(raw: str) -> list[dict]:
    """The events a WHATWG EventSource dispatches for ``raw``: lines end at CRLF, CR or LF, a blank line
    dispatches, ``id``/``event``/``data`` fields (a leading space dropped), ``:`` comments ignored."""
    events, fields, data = [], {}, []
    for line in re.split(r"\r\n|\r|\n", raw):
        if not line:
            if data:
                events.append({**fields, "data": "\n".join(data)})
            fields, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            fields[name] = value
    return events


def backlog(app, last_event_id="0") -> list[dict]:
    """What a client resuming from ``last_event_id`` receives: every buffered event after it, as parsed."""
    expected = len(app.bus.since(fabrica.parse_position(last_event_id)))
    status, body = open_events(app, last_event_id)
    assert status == 200
    chunks = iter(body)
    try:
        # the opening comment, then one chunk per buffered event: read no further (live events block)
        raw = b"".join(next(chunks) for _ in range(1 + expected))
    finally:
        body.close()
    return sse_events(raw.decode())


FORGED_TYPE = 'Ready\nid: 99999999\nevent: io.fabrica.widget.deleted\ndata: {"forged":true}\n\nevent: x'


class TestConditionTypesAreNames:
    """F2 (a): a condition's type is a Kubernetes condition type (a qualified name, at most 316 characters)
    and its status True, False or Unknown, on every status write and in set_condition."""

    VALID = ["Ready", "example.com/Ready", "a", "A_b.c-9", "x" * 316, "a.b-c/D_e.f"]
    INVALID = [FORGED_TYPE, "Ready\n", "Disk Pressure", "-Ready", "Ready-", "example.com/", "/Ready",
               "Example.com/Ready", "a/b/c", "x" * 317, "Réady", "Ready\r", "Re\x00ady", "Ready\u2028"]

    def test_a_forged_condition_type_is_refused_and_no_client_sees_a_forged_event(self, widgets):
        assert call(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        status, _, err = call(widgets, "PUT", "/widgets/w1/status",
                              {"conditions": [{"type": FORGED_TYPE, "status": "True"}]})
        assert status == 422 and err["details"][0]["field"] == "status.conditions[0].type", err
        status, _, obj = call(widgets, "PUT", "/widgets/w1/status",
                              {"conditions": [{"type": "Ready", "status": "True"}]})
        assert status == 200, obj
        events = backlog(widgets)
        assert [(e["id"], e["event"]) for e in events] == [
            ("1", "io.fabrica.widget.created"), ("2", "io.fabrica.widget.updated"),
            ("2.1", "io.fabrica.condition.ready")]
        assert all(json.loads(e["data"])["sequence"] == e["id"] for e in events)

    @pytest.mark.parametrize("ctype", INVALID, ids=range(len(INVALID)))
    def test_every_status_write_checks_the_type(self, widgets, ctype):
        assert call(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        conditions = [{"type": ctype, "status": "True"}]
        for status, _, body in (
                call(widgets, "PUT", "/widgets/w1/status", {"conditions": conditions}),
                call(widgets, "PATCH", "/widgets/w1/status", {"conditions": conditions}, ctype=MERGE),
                call(widgets, "PATCH", "/widgets/w1/status", [{"op": "add", "path": "/conditions",
                                                               "value": conditions}], ctype=JSONP)):
            assert status == 422, body
            assert body["details"][0]["field"] == "status.conditions[0].type"
            assert "qualified name" in body["details"][0]["message"]
        with pytest.raises(ValidationError):
            widgets.client.update_status("Widget", "w1", {"conditions": conditions})
        with pytest.raises(ValidationError):
            widgets.client.patch_status("Widget", "w1", {"conditions": conditions})
        assert call(widgets, "GET", "/widgets/w1")[2]["status"] == {}
        for valid in self.VALID:        # what the rule admits
            conditions = [{"type": valid, "status": "True"}]
            status, _, obj = call(widgets, "PUT", "/widgets/w1/status", {"conditions": conditions})
            assert status == 200 and obj["status"] == {"conditions": conditions}, obj
            conditions[0]["status"] = "False"
            assert widgets.client.patch_status("Widget", "w1", {"conditions": conditions}).status == {
                "conditions": conditions}

    @pytest.mark.parametrize("cond", [{"type": "Ready", "status": "true"}, {"type": "Ready", "status": "Yes"},
                                      {"type": "Ready", "status": ""}, {"type": "Ready"}])
    def test_the_status_is_true_false_or_unknown(self, widgets, cond):
        assert call(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        status, _, err = call(widgets, "PUT", "/widgets/w1/status", {"conditions": [cond]})
        assert status == 422 and err["details"][0]["field"] == "status.conditions[0].status", err
        for value in ("True", "False", "Unknown"):
            status, _, obj = call(widgets, "PUT", "/widgets/w1/status",
                                  {"conditions": [{"type": "Ready", "status": value}]})
            assert status == 200, obj

    @pytest.mark.parametrize("ctype", INVALID + [None, 7], ids=range(len(INVALID) + 2))
    def test_set_condition_raises_value_error(self, ctype):
        obj = fabrica.Resource(fabrica.new_object("Widget", "w1", "widget-00000001"))
        with pytest.raises(ValueError, match="qualified name"):
            obj.set_condition(ctype, True)
        assert obj.status == {}
        for valid in self.VALID:
            assert obj.set_condition(valid, True, reason="R")

    def test_a_reconcile_that_writes_a_bad_type_is_recorded_as_a_failure(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            obj.status.setdefault("conditions", []).append({"type": "Disk Pressure", "status": "True"})
        with app:
            app.client.create("Widget", "w1")
            assert wait_until(lambda: app.client.get("Widget", "w1").condition("Ready") is not None)
            obj = app.client.get("Widget", "w1")
        assert obj.condition("Disk Pressure") is None
        assert obj.condition("Ready")["status"] == "False" and obj.condition("Ready")["reason"] == "ReconcileError"
        assert "qualified name" in obj.condition("Ready")["message"]

    def test_conditions_an_older_fabrica_stored_still_load_and_can_be_kept(self, tmp_path):
        """Files written before the rule (any non-empty type, any string status) are not quarantined;
        their conditions may be written back unchanged, and only a new condition or a status change
        must follow the rule (ratcheting, as Kubernetes does)."""
        data = tmp_path / "data"
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        app.register("Widget")
        with app:
            uid = app.client.create("Widget", "w1").uid
        legacy = [{"type": "Disk Pressure", "status": "true", "reason": "", "message": ""},
                  {"type": "Ready\nid: 7", "status": "True"}, {"type": "Synced"}]
        path = data / "widgets" / f"{uid}.json"
        doc = json.loads(path.read_text())
        doc["status"]["conditions"] = legacy
        path.write_text(json.dumps(doc))
        app = fabrica.Fabrica(data_dir=str(data), durable=False)
        app.register("Widget")
        with app:
            assert app.health()["quarantined"] == [] and app.client.get("Widget", "w1").status["conditions"] == legacy
            # kept as they are, beside a new valid condition and another status field
            kept = [*legacy, {"type": "Ready", "status": "True"}]
            status, _, obj = call(app, "PUT", "/widgets/w1/status", {"conditions": kept, "phase": "x"})
            assert status == 200 and obj["status"]["conditions"] == kept, obj
            changed = [dict(legacy[0], reason="Changed"), *legacy[1:]]
            assert call(app, "PUT", "/widgets/w1/status", {"conditions": changed})[0] == 200
            # a status change publishes a condition event: then the type must be a name, the status valid
            for i, cond in ((0, dict(legacy[0], status="False")), (1, dict(legacy[1], status="False")),
                            (2, dict(legacy[2], status="yes"))):
                conditions = list(changed)
                conditions[i] = cond
                status, _, err = call(app, "PUT", "/widgets/w1/status", {"conditions": conditions})
                assert status == 422 and err["details"][0]["field"].startswith(f"status.conditions[{i}]"), err
            obj = app.client.get("Widget", "w1")
            assert obj.set_condition("Ready", False, reason="Down")
            app.client.update_status("Widget", "w1", obj.status)


class TestLineOrientedOutputs:
    """F2 (b): whatever reaches them, SSE fields, log lines and metric labels stay on their line."""

    @pytest.mark.parametrize("bad", ["\n", "\r", "\r\n", "\n\n", "\n\r"])
    def test_an_sse_frame_is_one_event_whatever_its_type(self, bad):
        event = {"type": f"io.x{bad}id: 99999999{bad}event: forged{bad}{bad}data: {{}}",
                 "data": {"text": f"a{bad}b\r\nc\u2028d"}}
        frame = fabrica._sse_frame((42, 3), event).decode()
        assert frame.count("\n") == 4 and "\r" not in frame and frame.endswith("\n\n")
        [parsed] = sse_events(frame)
        assert parsed["id"] == "42.3" and json.loads(parsed["data"]) == event
        assert parsed["event"].startswith("io.x") and "99999999" in parsed["event"]

    def test_the_stream_escapes_a_configured_type_with_line_breaks(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False,
                              event_prefix="io.x\r\nid: 99999999\nevent: io.x.widget.deleted\n\nid: 5")
        app.register("Widget")
        with app:
            app.client.create("Widget", "w1")
            events = backlog(app)
        assert [e["id"] for e in events] == ["1"]
        assert events[0]["event"] == "io.x\\r\\nid: 99999999\\nevent: io.x.widget.deleted\\n\\nid: 5.widget.created"

    def test_a_last_event_id_newer_than_every_event_is_gone(self, widgets):
        assert call(widgets, "POST", "/widgets", {"name": "w1"})[0] == 201
        for since in ("99999999", "2", "2.1"):
            status, body = open_events(widgets, since)
            if hasattr(body, "close"):
                body.close()        # a stream (an error answer is a list)
            assert status == 410, since
        assert [e["id"] for e in backlog(widgets, "1")] == []
        assert [e["id"] for e in backlog(widgets, "0")] == ["1"]

    def test_a_request_path_cannot_forge_a_log_line(self, tmp_path, caplog, monkeypatch):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget", history=True)

        @app.wsgi.route("/boom/<x>")        # an app's own route that fails: Bottle's 500 handler logs it
        def boom(x):
            raise RuntimeError("boom")

        def broken(*args):
            raise RuntimeError("the store failed")
        caplog.set_level(logging.DEBUG, logger="fabrica")
        with app:
            app.client.create("Widget", "w1")
            monkeypatch.setattr(app.store, "get_version", broken)     # fabrica's own route fails
            assert call(app, "GET", "/boom/a\nFORGED line\r\x1b[2J")[0] == 500
            assert call(app, "GET", "/widgets/w1/versions/1\nFORGED line\r\x1b[2J")[0] == 500
        messages = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
        assert len(messages) == 2
        assert "GET /boom/a\\nFORGED line\\r\\x1b[2J" in messages[0]
        assert "GET /widgets/w1/versions/1\\nFORGED line\\r\\x1b[2J" in messages[1]
        for message in messages:
            assert not any(line.startswith("FORGED") for line in message.splitlines()) and "\x1b" not in message

    def test_the_built_in_server_logs_the_request_line_on_one_line(self, caplog):
        handler = object.__new__(fabrica._WSGIRequestHandler)
        handler.client_address = ("127.0.0.1", 5000)
        caplog.set_level(logging.DEBUG, logger="fabrica.http")
        handler.log_message('"%s" %s %s', "GET /a\rFORGED\x1b[2J\x85 HTTP/1.1", "404", "-")
        [record] = caplog.records
        assert record.getMessage() == '127.0.0.1 - "GET /a\\rFORGED\\x1b[2J\\x85 HTTP/1.1" 404 -'


class TestTheLastFinalizerRemoved:
    """NU-1: the write that removes the last finalizer of an object being deleted deletes it; its answer and
    its deleted event show the object as that write left it (finalizers gone), at the delete's
    resourceVersion (Kubernetes; SPEC §4, §5.6), whoever removes it."""

    @staticmethod
    def deleted_event(app, obj) -> dict:
        """The deleted event of ``obj`` in the event ring."""
        [event] = [ev for _, ev in app.bus.since((app.bus.start_rv, 0))
                   if ev["type"].endswith(".deleted") and ev["resourceuid"] == obj["metadata"]["uid"]]
        return event

    @staticmethod
    def assert_final_state(event, before, finalizers=()):
        """The deleted event's object is ``before`` with ``finalizers`` left, at the event's resourceVersion."""
        resource = event["data"]["resource"]
        assert resource["metadata"]["finalizers"] == list(finalizers)
        assert resource["metadata"]["resourceVersion"] == event["resourceversion"]
        assert int(event["resourceversion"]) > int(before["metadata"]["resourceVersion"])
        assert resource["metadata"]["deletionTimestamp"] is not None
        same = {k: v for k, v in resource["metadata"].items() if k not in ("finalizers", "resourceVersion",
                                                                          "updatedAt", "deletionTimestamp")}
        assert same == {k: before["metadata"][k] for k in same} and resource["spec"] == before["spec"]

    @pytest.fixture
    def app(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Box")
        with app:
            yield app

    def test_a_put_that_removes_the_last_finalizer(self, app):
        status, _, obj = call(app, "POST", "/boxes", {"metadata": {"name": "b3", "finalizers": ["example.com/keep"]}})
        assert status == 201
        status, _, deleting = call(app, "DELETE", "/boxes/b3")
        assert status == 202 and deleting["metadata"]["finalizers"] == ["example.com/keep"]
        status, headers, gone = call(app, "PUT", "/boxes/b3", {"metadata": {"finalizers": []}})
        assert status == 200 and gone["metadata"]["finalizers"] == [], gone
        assert headers["etag"] == f'"{gone["metadata"]["resourceVersion"]}"'
        assert call(app, "GET", "/boxes/b3")[0] == 404
        event = self.deleted_event(app, obj)
        assert event["data"]["resource"] == gone
        self.assert_final_state(event, deleting)

    def test_app_client_update_that_removes_the_last_finalizer(self, app):
        app.client.create("Box", "b3", finalizers=["example.com/a", "example.com/b"])
        deleting = app.client.delete("Box", "b3")
        deleting.metadata["finalizers"] = ["example.com/b"]
        deleting = app.client.update(deleting)
        assert deleting.finalizers == ["example.com/b"]
        deleting.metadata["finalizers"] = []
        deleting.spec["size"] = 2          # the same write changes the spec: the final state shows it
        gone = app.client.update(deleting)
        assert gone.finalizers == [] and gone.spec == {"size": 2} and gone.generation == 2
        with pytest.raises(fabrica.NotFoundError):
            app.client.get("Box", "b3")
        event = self.deleted_event(app, gone)
        assert event["data"]["resource"] == gone

    def test_the_controller_removes_its_finalizer_after_finalize(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        finalized = []
        app.register("Box", finalize=lambda ctx, obj: finalized.append(obj.name))
        with app:
            app.client.create("Box", "b1", spec={"size": 1})
            deleting = app.client.delete("Box", "b1")
            assert deleting.finalizers == [fabrica.FINALIZER]
            assert wait_until(lambda: app.store.get("Box", deleting.uid) is None)
            assert finalized == ["b1"]
            self.assert_final_state(self.deleted_event(app, deleting), deleting)

    def test_start_up_removes_fabricas_finalizer_from_an_object_being_deleted(self, tmp_path):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)

        def finalize(ctx, obj):
            raise RuntimeError("not yet")       # keeps the object waiting for its finalizer
        app.register("Box", finalize=finalize)
        with app:
            app.client.create("Box", "b1")
            deleting = app.client.delete("Box", "b1")
            assert deleting.finalizers == [fabrica.FINALIZER]
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box")         # finalize= is gone: nothing would remove it
        with app:
            assert app.store.get("Box", deleting.uid) is None
            self.assert_final_state(self.deleted_event(app, deleting), deleting)

    def test_delete_removes_fabricas_finalizer_that_start_up_could_not(self, tmp_path, monkeypatch):
        data = str(tmp_path / "data")
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box", finalize=lambda ctx, obj: None)
        with app:
            obj = app.client.create("Box", "b1", spec={"size": 1})
            assert obj.finalizers == [fabrica.FINALIZER]
        app = fabrica.Fabrica(data_dir=data, durable=False)
        app.register("Box")
        real = os.replace

        def failing(*args, **kwargs):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        monkeypatch.setattr(os, "replace", failing)       # start-up's sweep cannot take the finalizer off
        with app:
            monkeypatch.setattr(os, "replace", real)
            before = app.client.get("Box", "b1")
            assert before.finalizers == [fabrica.FINALIZER]
            status, _, body = call(app, "DELETE", "/boxes/b1")
            assert status == 200 and body["uid"] == obj.uid, body
            event = self.deleted_event(app, obj)
        resource = event["data"]["resource"]
        assert resource["metadata"]["finalizers"] == [] and resource["spec"] == {"size": 1}
        assert resource["metadata"]["resourceVersion"] == event["resourceversion"]
        assert int(event["resourceversion"]) > int(before.resource_version)


class TestReservedKeysInSpecPatches:
    """SPEC §6.2, §6.4: a spec patch (merge, shorthand, JSON Patch; REST and app.client) that would create,
    change or remove a top-level spec key among the flat form's reserved keys and the envelope's markers is
    a 422 saying what to do instead, by one rule with status; a patch that leaves such a key alone works."""

    TYPES = {MERGE: "merge", "application/json": "merge", JSONP: "json", SHORT: "shorthand"}

    @pytest.mark.parametrize("ctype, patch, field, advice", [
        (MERGE, {"metadata": {"labels": {"a": "1"}}}, "metadata", "PUT the envelope"),
        (MERGE, {"labels": {"a": "1"}}, "labels", "PUT the envelope form"),
        ("application/json", {"annotations": {"a": "1"}}, "annotations", "or the flat form"),
        (MERGE, {"spec": {"x": 9}}, "spec", "patch its fields directly"),
        (MERGE, {"x": 2, "name": "g3"}, "name", "never changes"),
        (MERGE, {"kind": "Other"}, "kind", "served at the URL"),
        (MERGE, {"apiVersion": "v2"}, "apiVersion", "'v1'"),
        (MERGE, {"labels": None}, "labels", "PUT the envelope form"),
        (SHORT, {"labels.a": "1"}, "labels", "PUT the envelope form"),
        (SHORT, {"metadata.labels.a": "1"}, "metadata", "PUT the envelope"),
        (SHORT, {"spec.x": 9}, "spec", "patch its fields directly"),
        (JSONP, [{"op": "add", "path": "/metadata", "value": {"labels": {"a": "1"}}}], "metadata", "PUT"),
        (JSONP, [{"op": "add", "path": "/spec", "value": {"x": 9}}], "spec", "patch its fields directly"),
        (JSONP, [{"op": "move", "from": "/x", "path": "/name"}], "name", "never changes"),
        (JSONP, [{"op": "copy", "from": "/x", "path": "/kind"}], "kind", "served at the URL"),
        (JSONP, [{"op": "replace", "path": "", "value": {"x": 1, "labels": {}}}], "labels", "PUT the envelope"),
    ])
    def test_a_spec_patch_that_writes_one_is_refused(self, widgets, ctype, patch, field, advice):
        status, _, obj = call(widgets, "POST", "/widgets", {"name": "g2", "x": 1})
        assert status == 201
        status, _, err = call(widgets, "PATCH", "/widgets/g2", patch, ctype=ctype)
        assert status == 422, err
        assert [d["field"] for d in err["details"]] == [field] and advice in err["details"][0]["message"], err
        assert call(widgets, "GET", "/widgets/g2")[2] == obj            # nothing stored, no generation bump
        with pytest.raises(ValidationError, match=re.escape(advice)):
            widgets.client.patch("Widget", "g2", patch, self.TYPES[ctype])
        assert widgets.client.get("Widget", "g2") == obj

    @pytest.mark.parametrize("key", ["labels", "metadata", "spec", "name", "kind", "apiVersion", "annotations"])
    def test_a_spec_field_of_that_name_is_written_with_the_envelope_and_left_alone(self, widgets, key):
        status, _, obj = call(widgets, "POST", "/widgets", {"metadata": {"name": "g2"}, "spec": {key: "kept", "x": 1}})
        assert status == 201 and obj["spec"] == {key: "kept", "x": 1}
        for ctype, patch in ((MERGE, {"x": 2}), (SHORT, {"x": 3}), (JSONP, [{"op": "replace", "path": "/x", "value": 4},
                                                                           {"op": "test", "path": f"/{key}",
                                                                            "value": "kept"}])):
            status, _, obj = call(widgets, "PATCH", "/widgets/g2", patch, ctype=ctype)
            assert status == 200 and obj["spec"][key] == "kept", obj
        assert widgets.client.patch("Widget", "g2", {"x": 5}).spec == {key: "kept", "x": 5}
        status, _, err = call(widgets, "PATCH", "/widgets/g2", {key: "changed"}, ctype=MERGE)
        assert status == 422 and err["details"][0]["field"] == key
        status, _, obj = call(widgets, "PUT", "/widgets/g2", {"spec": {key: "changed", "x": 5}})
        assert status == 200 and obj["spec"] == {key: "changed", "x": 5} and obj["metadata"]["generation"] == 6

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


# -- helpers: an app file, event streams read from raw sockets -------------------------------------


def write_app(directory: Path, *, ring_size: int = 10000, keepalive: float = 0.2, name: str = "widgets_app") -> Path:
    path = Path(directory) / f"{name}.py"
    path.write_text(APP_SOURCE.format(ring_size=ring_size, keepalive=keepalive))
    return path


@pytest.fixture
def server(tmp_path, servers):
    """A real server for the standard app file (keep-alive comments every 0.2 s)."""
    return servers(tmp_path / "data", write_app(tmp_path), "--no-fsync")


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


def cors_headers(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}

# -- REST API: event stream (SPEC §6.8) ------------------------------------------------------------

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
        server = servers(tmp_path / "data", write_app(tmp_path, ring_size=5), "--no-fsync")
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
        server = servers(data, app_file, "--no-fsync")
        client = fabrica.Client(server.url)
        for i in range(3):
            client.create("Widget", name=f"w{i}")
        assert server.stop() == 0, server.log()
        server = servers(data, app_file, "--no-fsync")
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
                    assert res.status == (201 if method == "POST" else 200), (method, path, res.status)
                    assert elapsed < 1.0, f"{method} {path} took {elapsed:.2f}s with 50 open streams"
        finally:
            conn.close()
        for stream in opened:       # every stream is live and got every event
            assert [f["id"] for f in stream.events(10)] == [str(i) for i in range(1, 11)]


# -- REST API: metrics (SPEC §6.1) -----------------------------------------------------------------

FAMILIES = ["fabrica_http_requests_total", "fabrica_http_request_duration_seconds", "fabrica_store_writes_total",
            "fabrica_events_published_total", "fabrica_queue_depth", "fabrica_reconcile_total",
            "fabrica_reconcile_duration_seconds", "fabrica_objects", "fabrica_objects_not_ready"]


class TestMetrics:
    def scrape(self, app) -> dict:
        parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client (the test extra)")
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
        pytest.importorskip("prometheus_client", reason="prometheus_client (the test extra)")
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


# -- REST API: CORS (SPEC §6.7) --------------------------------------------------------------------

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
        assert headers.get("allow") and body["code"] == 405

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
        for path, auth, expected in (("/widgets/nope", "Bearer s3cret", 404), ("/widgets", "Bearer wrong", 401)):
            status, headers, _ = call(app, "GET", path, headers={"Origin": ORIGIN, "Authorization": auth})
            assert status == expected, path     # a browser script can read the error too
            assert headers.get("access-control-allow-origin") == ORIGIN, (path, headers)

    def test_serve_cors_flag(self, tmp_path, servers, streams):
        server = servers(tmp_path / "data", write_app(tmp_path), "--no-fsync", "--cors", ORIGIN)
        status, headers, _ = server.request("GET", "/widgets", headers={"Origin": ORIGIN})
        assert status == 200 and headers.get("access-control-allow-origin") == ORIGIN
        status, headers, _ = server.request("OPTIONS", "/widgets", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert status == 204 and headers.get("access-control-allow-origin") == ORIGIN
        stream = streams(server.port, headers={"Origin": ORIGIN})       # a cross-origin EventSource
        assert stream.status == 200 and stream.headers.get("access-control-allow-origin") == ORIGIN


# The REST layer's parsing: the If-Match family and the body forms, handed to the Registry as values

class TestRestParsing:
    def test_etag_versions_names_resource_versions(self):
        assert fabrica.etag_versions(None) is None
        assert fabrica.etag_versions('"7"') == ("7",)
        assert fabrica.etag_versions('W/"7", "8", *') == ("8", "*")
        assert fabrica.etag_versions('7, W/"7", "') == ()

    def test_parse_body_gives_the_registry_arguments(self):
        reg = fabrica.Registry()
        rack = reg.declare("Rack")
        flat = fabrica.parse_body(rack, {"name": "r1", "labels": {"a": "b"}, "size": 2}, update=True)
        assert flat == {"name": "r1", "labels": {"a": "b"}, "annotations": None, "finalizers": None,
                        "spec": {"size": 2}, "resource_version": None, "merge_metadata": True}
        ref = {"kind": "Shelf", "uid": "shelf-1"}
        envelope = fabrica.parse_body(rack, {"metadata": {"name": "r1", "resourceVersion": "4",
                                                          "ownerReferences": [ref]}, "spec": {}})
        assert envelope["owner_references"] == [ref] and envelope["resource_version"] == "4"
        assert "merge_metadata" not in envelope
        for body, problem in (({"size": 1, "status": {}}, "status"), ({"kind": "Shelf"}, "kind"),
                              ({"spec": {}, "extra": 1}, "unknown top-level")):
            with pytest.raises(fabrica.ValidationError, match=problem):
                fabrica.parse_body(rack, body)


###############################################################################
# HTTP server #################################################################
###############################################################################

# -- HTTP server and CLI (real subprocesses) -------------------------------------------------------

class TestServe:
    def test_open_server_create_restart_sigterm_keepalive(self, tmp_path, servers):
        data = tmp_path / "data"
        server = servers(data)
        conn = server.connection()
        status, headers, obj = http_call(conn, "POST", "/widgets", {"name": "w1", "size": 3})
        assert status == 201, obj
        assert obj["kind"] == "Widget" and obj["spec"] == {"size": 3} and obj["metadata"]["name"] == "w1"
        assert headers["location"].endswith(f"/widgets/{obj['metadata']['uid']}")
        sock = conn.sock
        assert sock is not None, "the server closed a keep-alive connection"
        local = sock.getsockname()
        status, headers, again = http_call(conn, "GET", "/widgets/w1")
        assert status == 200 and again == obj
        assert conn.sock is sock and sock.getsockname() == local, "the second request used a new socket"
        assert headers.get("connection", "").lower() != "close"
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
    """a1: SIGKILL during a write storm never loses an acknowledged write nor tears a file (on every disk store)."""

    ITERATIONS = 30
    WRITERS = 4

    def test_kill9_during_write_storm(self, tmp_path, servers, served_store):
        data = tmp_path / "data"
        names = [f"w{i}" for i in range(self.WRITERS)]
        sent = dict.fromkeys(names, 0)          # highest seq sent, across iterations
        acked = dict.fromkeys(names, 0)         # highest seq answered 2xx
        seen_rvs: list[int] = []
        failures: list[str] = []
        lock = threading.Lock()
        rng = random.Random()
        total_acked = 0

        server = serve_store(servers, served_store, data)
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

            if served_store == "file":
                for path in data_files(data):
                    json.loads(path.read_bytes())       # never torn: every file parses
            server = serve_store(servers, served_store, data)
            status, _, health = server.request("GET", "/health")
            assert status == 200 and health["status"] == "healthy" and not health["quarantined"], health
            if served_store == "file":
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

    def test_no_lost_updates(self, tmp_path, servers, served_store):
        server = serve_store(servers, served_store, tmp_path / "data")
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
                                                      {"If-Match": headers["etag"]})
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
    server = Server.serve(tmp_path_factory.mktemp("framing")).start()
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

# -- HTTP server: streams and their connections ----------------------------------------------------

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

APP = '''
import fabrica
app = fabrica.Fabrica(data_dir="./data")

@app.register("Greeting")
def reconcile(ctx, obj):
    obj.status["message"] = "Hello, " + obj.spec.get("to", "world")
    obj.set_condition("Ready", True, reason="Greeted")
'''


def free_port() -> int:
    """A port nothing listens on now. Only for the adapters (waitress, granian): their ready line reports the
    port they were given, not the one bound, so they cannot be given port 0; ``serve_app`` retries if it is taken."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(tmp_path, server: str, *args) -> Server:
    """``fabrica.py serve app.py --server SERVER ARGS`` in tmp_path (APP written there), started, accepting
    connections. The built-in server binds port 0 and reports the port; an adapter gets ``free_port()``, and
    another one if that was taken meanwhile."""
    (tmp_path / "app.py").write_text(APP)
    for _ in range(5):
        proc = Server.serve(None, "app.py", "--no-fsync", "--server", server, *args,
                            port=0 if server == "fabrica" else free_port(), cwd=tmp_path)
        try:
            proc.start()
        except pytest.fail.Exception:
            if server == "fabrica" or "cannot listen" not in proc.log() and "in use" not in proc.log():
                raise
            continue
        assert wait_until(lambda: accepts(proc.port)), f"--server {server} logged ready but does not accept"
        return proc
    pytest.fail(f"--server {server}: every free port was taken before it bound one")


def accepts(port: int) -> bool:
    """Whether something accepts a TCP connection on the port now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except ConnectionRefusedError:
        return False


@pytest.mark.parametrize("server", ["fabrica", "waitress", "granian"])
def test_server_keeps_store_and_controllers_in_one_process(tmp_path, server):
    pytest.importorskip("bottle" if server == "fabrica" else server,
                        reason=f"--server {server} needs {server} (the test extra)")
    proc = serve_app(tmp_path, server)
    try:
        assert proc.request("POST", "/greetings", {"name": "hi", "to": "you"})[0] == 201
        assert wait_until(lambda: proc.request("GET", "/greetings/hi")[2]["status"].get("message") == "Hello, you"), \
            "the controller did not run in the serving process"
        lock = (tmp_path / "data" / ".fabrica" / "lock").read_text().strip()
        assert lock == str(proc.proc.pid), "the store lock belongs to the serving process"
        status, _, errors = proc.request("GET", "/greetings/nope")
        assert status == 404 and errors["code"] == 404
    finally:
        assert proc.stop() == 0
    second = serve_app(tmp_path, server)        # the lock was released
    try:
        # served, not only accepting: granian binds its socket before its worker thread runs, and a SIGTERM
        # that lands while that thread is still starting can leave granian waiting for it (seen under load)
        assert second.request("GET", "/greetings/hi")[0] == 200
    finally:
        assert second.stop() == 0


# -- HTTP server: slow and greedy clients (SPEC §6.6, §6.7) ----------------------------------------

HEADER_LINE = b"X-Filler: " + b"a" * 4000 + b"\r\n"


def read_head(sock) -> bytes:
    """One response head from a raw socket (a 100 Continue included, which http.client would skip)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, read from a raw socket."""
    res = http.client.HTTPResponse(sock, method="GET")
    res.begin()
    return res.status, res.read()


def closed_by_server(sock, timeout: float = 10.0) -> bool:
    """True when the server closes ``sock`` (whatever it sent first) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionError:
        pass
    except socket.timeout:
        return False
    return True


class Dripper:
    """A client that sends its request head one byte at a time and never finishes it (slowloris)."""

    def __init__(self, port: int, interval: float = 0.05):
        self.sock = connect(port)
        self.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drip, args=(interval,), daemon=True)
        self.thread.start()

    def _drip(self, interval):
        while not self.stop.wait(interval):
            try:
                self.sock.sendall(b"a")
            except OSError:
                return          # the server hung up: what the tests wait for

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def small_server(tmp_path):
    """``small_server(max_threads=, head_timeout=, timeout=, token=)``: a Fabrica served in-process
    by the built-in server on port 0; returns the port. Stopped at teardown."""
    started = []

    def start(*, max_threads=2, head_timeout=10.0, timeout=30.0, token=None):
        app = fabrica.Fabrica(data_dir=str(tmp_path / f"data{len(started)}"), durable=False, token=token)
        app.register("Widget")
        app.start()
        httpd = fabrica.ThreadedWSGIServer(("127.0.0.1", 0), app.wsgi, max_threads=max_threads,
                                           head_timeout=head_timeout, timeout=timeout)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((app, httpd, thread))
        return httpd.server_port
    yield start
    for app, httpd, thread in started:
        httpd.stop(5)
        thread.join(5)
        app.stop()


def connect(port) -> socket.socket:
    """A socket to the server (``serve_app`` returns once the server accepts connections)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def fresh_get(port, path="/health") -> int:
    """GET on a new connection that closes after the answer: the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock)[0]


def poll_status(port, want: int, timeout: float = 15.0) -> list[int]:
    """Fresh GETs until one answers ``want`` or ``timeout`` passes: every status seen."""
    seen: list[int] = []
    wait_until(lambda: seen.append(fresh_get(port)) or seen[-1] == want, timeout, interval=0.1)
    return seen


class TestSlowAndIdleClients:
    """The built-in server: no client holds a connection slot by being slow or idle (SPEC §6.7)."""

    def test_idle_keepalive_connections_give_way_and_requests_in_flight_are_kept(self, small_server):
        port = small_server(max_threads=2)
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")        # mid-head: not idle
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idle.request("GET", "/health")
        assert idle.getresponse().read() and idle.sock is not None       # kept alive, now idle
        # polled: a connection may give way once it has waited a second (idle_grace) for a request
        seen = poll_status(port, 200)
        assert seen[-1] == 200, f"an idle keep-alive connection kept its slot: {len(seen)} x {seen[-1]}"
        assert closed_by_server(idle.sock), "the idle connection was not the one closed"
        busy.sendall(b"\r\n")                                           # the request in flight is whole
        assert read_response(busy)[0] == 200
        busy.close()

    def test_every_slot_mid_request_answers_503_and_cuts_no_one_off(self, small_server):
        port = small_server(max_threads=2)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for sock in clients:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert fresh_get(port) == 503
        for sock in clients:
            sock.sendall(b"\r\n")
            assert read_response(sock)[0] == 200
            sock.close()

    def test_header_drippers_are_dropped_at_the_head_deadline(self, small_server):
        port = small_server(max_threads=2, head_timeout=0.5, timeout=30.0)
        drippers = [Dripper(port) for _ in range(2)]
        try:
            seen = poll_status(port, 200)
            assert seen[-1] == 200, f"drippers held the slots past the head deadline: {len(seen)} x {seen[-1]}"
            for dripper in drippers:
                dripper.sock.settimeout(10)
                head = read_head(dripper.sock)
                assert head.startswith(b"HTTP/1.1 408") or not head, head
                assert closed_by_server(dripper.sock)
        finally:
            for dripper in drippers:
                dripper.close()

    def test_a_body_slower_than_the_minimum_rate_is_dropped(self, small_server):
        port = small_server(max_threads=2, timeout=0.5)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        stop = threading.Event()

        def drip():
            while not stop.wait(0.05):
                try:
                    sock.sendall(b" ")
                except OSError:
                    return
        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        try:
            status, body = read_response(sock)
            assert status == 408 and json.loads(body)["code"] == 408, body
            assert closed_by_server(sock)
        finally:
            stop.set()
            thread.join(5)
            sock.close()
        assert fresh_get(port) == 200

    def test_a_head_over_64_kib_is_refused_before_the_client_sends_the_rest(self, small_server):
        port = small_server(max_threads=2)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + HEADER_LINE * 18      # 72 KB, no end
        assert len(head) > fabrica.MAX_HEAD
        sock.sendall(head)
        status, body = read_response(sock)          # the client sends nothing more
        assert status == 431 and json.loads(body)["code"] == 431, body
        assert closed_by_server(sock)
        sock.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /" + b"a" * fabrica.MAX_HEAD)               # a request line alone
            assert read_response(sock)[0] == 414
        assert fresh_get(port) == 200

    def test_chunked_trailer_fields_are_capped_like_a_head(self, small_server):
        port = small_server(max_threads=2)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nd\r\n{\"name\": \"t\"}\r\n0\r\n" + HEADER_LINE * 18)
        status, body = read_response(sock)          # no end of the trailers: the server must not wait for it
        assert status == 400 and "trailer" in json.loads(body)["error"], body
        assert closed_by_server(sock)
        sock.close()

    @pytest.mark.parametrize("case", ["no-token", "wrong-token", "too-large"])
    def test_expect_100_continue_is_refused_without_a_100(self, small_server, case):
        port = small_server(token="s3cret")
        auth = {"no-token": "", "wrong-token": "Authorization: Bearer nope\r\n",
                "too-large": "Authorization: Bearer s3cret\r\n"}[case]
        length = 2 << 20 if case == "too-large" else 20
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"{auth}Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n".encode())
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 413" if case == "too-large" else b"HTTP/1.1 401"), head

    def test_expect_100_continue_is_answered_when_the_checks_pass(self, small_server):
        port = small_server(token="s3cret")
        body = b'{"name": "w1"}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /widgets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer s3cret\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            assert read_response(sock)[0] == 201


@pytest.mark.parametrize("server", ["fabrica", "waitress", "granian"])
def test_every_server_refuses_a_head_over_64_kib_as_it_arrives(tmp_path, server):
    pytest.importorskip("bottle" if server == "fabrica" else server,
                        reason=f"--server {server} needs {server} (the test extra)")
    proc = serve_app(tmp_path, server)
    try:
        with connect(proc.port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + HEADER_LINE * 18)
            head = read_head(sock)
            assert head.split(b" ", 2)[1] == b"431", head                # waitress answers as HTTP/1.0
    finally:
        proc.stop()


@pytest.mark.parametrize("server", ["fabrica", "granian"])     # waitress has no head deadline (README)
def test_every_server_cuts_a_dripper_off_at_the_head_deadline(tmp_path, server):
    pytest.importorskip("bottle" if server == "fabrica" else server,
                        reason=f"--server {server} needs {server} (the test extra)")
    proc = serve_app(tmp_path, server, "--head-timeout", "1", "--max-threads", "2")
    dripper = Dripper(proc.port)
    try:
        assert closed_by_server(dripper.sock, 15), "the dripper kept its connection past the head deadline"
        assert proc.request("GET", "/health")[0] == 200
    finally:
        dripper.close()
        proc.stop()


@pytest.mark.parametrize("server", ["fabrica", "granian"])     # waitress sends the 100 on the head (README)
def test_every_server_sends_100_continue_only_after_the_token_check(tmp_path, server):
    pytest.importorskip("bottle" if server == "fabrica" else server,
                        reason=f"--server {server} needs {server} (the test extra)")
    proc = serve_app(tmp_path, server, "--token", "s3cret")
    head = b"POST /greetings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
           b"Expect: 100-continue\r\nContent-Length: 14\r\n"
    try:
        with connect(proc.port) as sock:
            sock.sendall(head + b"\r\n")
            assert read_head(sock).startswith(b"HTTP/1.1 401")
        with connect(proc.port) as sock:
            sock.sendall(head + b"Authorization: Bearer s3cret\r\n\r\n")
            assert read_head(sock) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b'{"name": "g1"}')
            assert read_head(sock).startswith(b"HTTP/1.1 201")
    finally:
        proc.stop()


###############################################################################
# Clients #####################################################################
###############################################################################

# -- Clients (SPEC §2.1): one scenario, app.client and fabrica.Client alike ------------------------

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
        server = servers(tmp_path / "remote", app_file, "--no-fsync")
        with fabrica.Client(server.url) as client:
            remote = scenario(client)
        assert len(local) == len(remote)
        for a, b in zip(local, remote):
            assert a == b, f"app.client and Client differ at {a[0]!r}"

    def test_patch_errors_same_class(self, tmp_path, servers):
        app_file = write_app(tmp_path)
        app = fabrica.load_app(str(app_file))
        app.configure_store(data_dir=str(tmp_path / "local"), durable=False)
        server = servers(tmp_path / "remote", app_file, "--no-fsync")
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
        assert status == 200 and len(page) == 7 and headers["x-continue"] and headers["x-total-count"] == "30"

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
        first = servers(data, app_file, "--no-fsync")
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
            second = servers(data, app_file, "--no-fsync")
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
# Fabrica #####################################################################
###############################################################################

# -- Owners and garbage collection (SPEC §3.0 recovery rules, §5.5) --------------------------------


class PathFault:
    """``os.<name>`` raises OSError(err) for every path containing ``needle`` while ``armed``; counts them."""

    def __init__(self, monkeypatch, name: str, needle: str = "", err: int = errno.EIO):
        self.real = getattr(os, name)
        self.needle, self.err = needle, err
        self.armed = threading.Event()
        self.armed.set()
        self.fired = 0
        monkeypatch.setattr(os, name, self)

    def __call__(self, target, *args, **kwargs):
        if self.armed.is_set() and self.needle in str(target):
            self.fired += 1
            raise OSError(self.err, os.strerror(self.err), str(target))
        return self.real(target, *args, **kwargs)


def snapshot_files(folder: Path) -> list[str]:
    """The snapshot files in a history folder; [] once the folder is gone. (Path.glob would raise
    FileNotFoundError when the garbage collector removes the folder between its checks.)"""
    try:
        return sorted(name for name in os.listdir(folder) if name.endswith(".json"))
    except FileNotFoundError:
        return []


def gc_kinds(app, history: bool = False):
    app.register("Owner")
    app.register("Dependent", history=history)
    app.register("Leaf")


def deleted_uids(rec: Recorder) -> list[str]:
    return [e["resourceuid"] for e in list(rec.events) if e["type"].endswith(".deleted")]


def file_of(h: Harness, plural: str, uid: str) -> Path:
    return h.data_dir / plural / f"{uid}.json"


class TestUnloadedOwnersAreNotDeleted:
    """Item 1: a start-up never deletes data because an owner could not be loaded (SPEC §3.0)."""

    @pytest.mark.files
    def test_a_truncated_owner_keeps_its_dependents_and_their_history(self, h):
        app = h.app()
        gc_kinds(app, history=True)
        with app:
            c = app.client
            o1 = c.create("Owner", name="o1")
            d1 = c.create("Dependent", name="d1", owner=o1)
            c.patch("Dependent", "d1", {"v": 2})
            l1 = c.create("Leaf", name="l1", owner=d1)
        file_of(h, "owners", o1.uid).write_text('{"apiVersion": "v1", "kind": "Own')     # torn by hand

        for start in (1, 2):    # the first start-up quarantines it, the next one finds it in the quarantine
            app = h.app()
            gc_kinds(app, history=True)
            with app:
                assert [q["path"] for q in app.store.quarantined] == ([f"owners/{o1.uid}.json"] if start == 1
                                                                      else [])
                assert app.client.get("Dependent", "d1").uid == d1.uid
                assert app.client.get("Leaf", "l1").uid == l1.uid
                assert [v["versionId"] for v in app.client.versions("Dependent", "d1")] == ["1", "2"]
                assert "Owner" in app.store.unsure
            assert file_of(h, "dependents", d1.uid).exists() and file_of(h, "leafs", l1.uid).exists()

        # the operator decides the owner is gone for good: now its deletion is known, and it is collected
        for path in (h.data_dir / ".fabrica" / "quarantine" / "owners").iterdir():
            path.unlink()
        app = h.app()
        gc_kinds(app, history=True)
        with app:
            for kind in ("Dependent", "Leaf"):
                assert app.client.list(kind) == []
        assert not list((h.data_dir / ".fabrica" / "history" / "dependents" / d1.uid).glob("*.json"))

    @pytest.mark.files
    def test_a_changed_plural_keeps_the_dependents_of_the_old_folder(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            o1 = app.client.create("Owner", name="o1")
            d1 = app.client.create("Dependent", name="d1", owner=o1)

        def renamed():
            app = h.app()
            app.register("Owner", plural="proprietors")
            app.register("Dependent")
            app.register("Leaf")
            return app
        app = renamed()
        with app:
            assert app.client.get("Dependent", "d1").uid == d1.uid
            o2 = app.client.create("Owner", name="o2")      # the new folder exists from now on
            d2 = app.client.create("Dependent", name="d2", owner=o2)
            app.client.delete("Owner", "o2")                 # a deletion seen happening is still collected
            assert [d.name for d in app.client.list("Dependent")] == ["d1"]
        assert not file_of(h, "dependents", d2.uid).exists()
        app = renamed()
        with app:
            assert app.client.get("Dependent", "d1").uid == d1.uid
        assert file_of(h, "dependents", d1.uid).exists() and file_of(h, "owners", o1.uid).exists()

    @pytest.mark.files
    def test_an_owner_deleted_while_its_kind_is_unsure_is_still_collected(self, h):
        (h.data_dir / "owners").mkdir(parents=True)
        (h.data_dir / "owners" / "owner-00000000.json").write_text("{")       # quarantined at start
        app = h.app()
        gc_kinds(app)
        with app:
            assert "Owner" in app.store.unsure
            o1 = app.client.create("Owner", name="o1")
            app.client.create("Dependent", name="d1", owner=o1)
            app.client.delete("Owner", "o1")
            assert app.client.list("Dependent") == []
            assert not app.store._deleted_owners        # the record left with the last dependent


class TestCascadeRetries:
    """Items 5 and 6: a failed cascade step is retried until it succeeds, also one of start-up's sweep."""

    @pytest.mark.files
    def test_a_failed_cascade_step_is_retried_without_a_restart(self, h, monkeypatch):
        clock = FakeClock()
        app = h.app(clock=clock)
        gc_kinds(app)
        rec = Recorder()
        app.subscribe("io.fabrica.*.deleted", rec)
        with app:
            c = app.client
            o1 = c.create("Owner", name="o1")
            d1, d2 = c.create("Dependent", name="d1", owner=o1), c.create("Dependent", name="d2", owner=o1)
            l1 = c.create("Leaf", name="l1", owner=d1)
            fault = PathFault(monkeypatch, "unlink", d1.uid)
            assert c.delete("Owner", "o1") is None          # the owner's delete is committed: no error
            assert fault.fired == 1
            assert [d.name for d in c.list("Dependent")] == ["d1"] and c.get("Leaf", "l1").uid == l1.uid
            for n in (2, 3):        # retried with backoff while the fault lasts
                clock.advance(1)
                assert wait_until(lambda: fault.fired == n), fault.fired
            fault.armed.clear()
            clock.advance(1000)
            assert wait_until(lambda: not c.list("Dependent") and not c.list("Leaf"))
            assert app.wait_idle(WAIT)
            assert wait_until(lambda: len(deleted_uids(rec)) >= 4)
            assert sorted(deleted_uids(rec)) == sorted([o1.uid, d1.uid, d2.uid, l1.uid])   # one event each
            assert not file_of(h, "dependents", d1.uid).exists()

    @pytest.mark.files
    def test_spec_history_a_delete_could_not_remove_is_removed_later(self, h, monkeypatch):
        clock = FakeClock()
        app = h.app(clock=clock)
        gc_kinds(app, history=True)
        with app:
            o1 = app.client.create("Owner", name="o1")
            d1 = app.client.create("Dependent", name="d1", owner=o1)
            history = h.data_dir / ".fabrica" / "history" / "dependents" / d1.uid
            assert snapshot_files(history)
            fault = PathFault(monkeypatch, "unlink", d1.uid + os.sep)     # the snapshots, not the object
            app.client.delete("Owner", "o1")
            assert app.client.list("Dependent") == [] and fault.fired == 1
            assert snapshot_files(history)
            fault.armed.clear()
            clock.advance(1000)
            assert wait_until(lambda: not snapshot_files(history))

    @pytest.mark.files
    def test_a_startup_sweep_that_cannot_delete_does_not_stop_start_up(self, h, monkeypatch):
        app = h.app()
        gc_kinds(app)
        with app:
            o1 = app.client.create("Owner", name="o1")
            d1 = app.client.create("Dependent", name="d1", owner=o1)
            l1 = app.client.create("Leaf", name="l1", owner=d1)
        file_of(h, "owners", o1.uid).unlink()          # the owner's delete hit the disk, the cascade did not

        clock = FakeClock()
        app = h.app(clock=clock)
        gc_kinds(app)
        rec = Recorder()
        app.subscribe("io.fabrica.*.deleted", rec)
        fault = PathFault(monkeypatch, "unlink", d1.uid)
        with app:                                        # an I/O error in the sweep: start-up still works
            assert app.client.get("Dependent", "d1").uid == d1.uid and fault.fired == 1
            assert app.client.create("Owner", name="fresh").name == "fresh"      # and it serves
            clock.advance(1)
            assert wait_until(lambda: fault.fired == 2)
            fault.armed.clear()
            clock.advance(1000)
            assert wait_until(lambda: not app.client.list("Dependent") and not app.client.list("Leaf"))
            assert wait_until(lambda: len(deleted_uids(rec)) >= 2)
            assert sorted(deleted_uids(rec)) == sorted([d1.uid, l1.uid])

    @pytest.mark.files
    def test_start_up_on_a_full_disk_with_an_interrupted_cascade(self, h, monkeypatch):
        app = h.app()
        gc_kinds(app)
        with app:
            o1 = app.client.create("Owner", name="o1")
            d1 = app.client.create("Dependent", name="d1", owner=o1)
        file_of(h, "owners", o1.uid).unlink()

        clock = FakeClock()
        app = h.app(clock=clock)
        gc_kinds(app)
        full = PathFault(monkeypatch, "write", err=errno.ENOSPC)       # every file write: no space
        with app:                                        # start-up works (and serves reads) on a full disk
            assert app.client.list("Owner") == []
            full.armed.clear()                           # space is back: the sweep's delete goes through
            assert wait_until(lambda: (clock.advance(1), not app.client.list("Dependent"))[1])
        assert not file_of(h, "dependents", d1.uid).exists()


class TestSeveralOwners:
    """Item 15: every owner reference is kept; a dependent goes when none of its owners exists."""

    @pytest.mark.disk
    def test_every_reference_is_stored_typed_and_validated(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            c = app.client
            a, b = c.create("Owner", name="a"), c.create("Leaf", name="b")
            refs = [{"kind": "Owner", "uid": a.uid, "controller": True}, {"kind": "Leaf", "uid": b.uid}]
            status, _, body = call(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
            assert status == 201, body
            want = [{"kind": "Owner", "uid": a.uid, "name": "a", "controller": True},
                    {"kind": "Leaf", "uid": b.uid, "name": "b", "controller": False}]
            assert body["metadata"]["ownerReferences"] == want
            assert c.get("Dependent", "d")["metadata"]["ownerReferences"] == want

            bad = {
                "two controllers": [dict(refs[0]), dict(refs[1], controller=True)],
                "uid not a string": [{"kind": "Owner", "uid": 5}],
                "controller not a bool": [{"kind": "Owner", "uid": a.uid, "controller": "yes"}],
                "not an object": ["Owner"],
                "unknown field": [{"kind": "Owner", "uid": a.uid, "blockOwnerDeletion": True}],
                "the same owner twice": [refs[1], dict(refs[1])],
                "lower-case kind": [{"kind": "owner", "uid": a.uid}],
                "not a list": {"kind": "Owner", "uid": a.uid},
            }
            for case, value in bad.items():
                status, _, body = call(app, "POST", "/dependents",
                                    {"metadata": {"name": "x", "ownerReferences": value}})
                assert status == 422, (case, body)
                assert body["details"][0]["field"].startswith("metadata.ownerReferences"), (case, body)
            c.delete("Leaf", "b")
            status, _, body = call(app, "POST", "/dependents", {"metadata": {"name": "x", "ownerReferences": refs}})
            assert status == 409 and b.uid in body["error"], body      # every owner must exist
        app = h.app()
        gc_kinds(app)
        with app:                                        # kept on disk, and b is gone: a still holds it
            assert app.client.get("Dependent", "d")["metadata"]["ownerReferences"] == want

    @pytest.mark.files
    def test_a_stored_file_with_malformed_references_is_quarantined(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            o1 = app.client.create("Owner", name="o1")
            d1 = app.client.create("Dependent", name="d1", owner=o1)
        path = file_of(h, "dependents", d1.uid)
        doc = json.loads(path.read_text())
        doc["metadata"]["ownerReferences"] = ["Owner"]
        path.write_text(json.dumps(doc))
        app = h.app()
        gc_kinds(app)
        with app:                                        # recovery quarantines it instead of failing
            assert [q["path"] for q in app.store.quarantined] == [f"dependents/{d1.uid}.json"]
            assert "ownerReferences" in app.store.quarantined[0]["reason"]
            assert app.client.get("Owner", "o1").uid == o1.uid

    def test_a_dependent_goes_only_when_its_last_owner_is_gone(self, h):
        app = h.app()
        gc_kinds(app)
        rec = Recorder()
        app.subscribe("io.fabrica.*.deleted", rec)
        with app:
            c = app.client
            a, b = c.create("Owner", name="a"), c.create("Owner", name="b")
            refs = [{"kind": "Owner", "uid": a.uid, "controller": True}, {"kind": "Owner", "uid": b.uid}]
            status, _, d = call(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
            assert status == 201, d
            leaf = c.create("Leaf", name="l", owner=d)
            c.delete("Owner", "a")
            assert app.wait_idle(WAIT)
            assert c.get("Dependent", "d").uid == d["metadata"]["uid"] and c.get("Leaf", "l").uid == leaf.uid
            c.delete("Owner", "b")
            assert c.list("Dependent") == [] and c.list("Leaf") == []
            assert wait_until(lambda: len(deleted_uids(rec)) >= 4)
            assert sorted(deleted_uids(rec)) == sorted([a.uid, b.uid, d["metadata"]["uid"], leaf.uid])

    @pytest.mark.files
    def test_the_start_up_sweep_keeps_a_dependent_while_one_owner_lives(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            a, b = app.client.create("Owner", name="a"), app.client.create("Owner", name="b")
            refs = [{"kind": "Owner", "uid": a.uid, "controller": True}, {"kind": "Owner", "uid": b.uid}]
            status, _, d = call(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
            assert status == 201, d
        file_of(h, "owners", a.uid).unlink()           # the controller owner is gone, b is not
        app = h.app()
        gc_kinds(app)
        with app:
            assert app.client.get("Dependent", "d").uid == d["metadata"]["uid"]
        file_of(h, "owners", b.uid).unlink()
        app = h.app()
        gc_kinds(app)
        with app:
            assert app.client.list("Dependent") == []

    def test_list_by_owner_on_both_clients(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            c = app.client
            a, b = c.create("Owner", name="a"), c.create("Owner", name="b")
            c.create("Dependent", name="d1", owner=a, labels={"tier": "x"})
            refs = [{"kind": "Owner", "uid": a.uid}, {"kind": "Owner", "uid": b.uid, "controller": True}]
            assert call(app, "POST", "/dependents", {"metadata": {"name": "d2", "ownerReferences": refs}})[0] == 201
            c.create("Dependent", name="d3", owner=b)
            c.create("Dependent", name="free")
            c.create("Leaf", name="l1", owner=a)
            httpd = fabrica.ThreadedWSGIServer(("127.0.0.1", 0), app.wsgi)
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            try:
                for client in (c, fabrica.Client(f"http://127.0.0.1:{httpd.server_port}")):
                    def names(**kw):
                        return [o.name for o in client.list("Dependent", **kw)]
                    assert names(owner=a) == ["d1", "d2"], client
                    assert names(owner=b) == ["d2", "d3"], client
                    assert names(owner=a, selector="tier=x") == ["d1"], client
                    assert names(owner=b, limit=1) == ["d2"], client
                    assert [o.name for o in client.list("Leaf", owner=a)] == ["l1"], client
                    assert names(owner=c.get("Leaf", "l1")) == [], client
            finally:
                httpd.stop(5)
                thread.join(5)

    def test_owns_enqueues_every_owner_of_the_watching_kind(self, h):
        app = h.app()
        calls = Calls()

        @app.register("Parent", owns=["Kid"])
        def reconcile(ctx, obj):
            calls.add(obj)
        app.register("Kid")
        app.register("Other")
        with app:
            c = app.client
            p1, p2, p3 = (c.create("Parent", name=n) for n in ("p1", "p2", "p3"))
            other = c.create("Other", name="o")
            refs = [{"kind": "Parent", "uid": p1.uid, "controller": True}, {"kind": "Other", "uid": other.uid},
                    {"kind": "Parent", "uid": p2.uid}]
            assert call(app, "POST", "/kids", {"metadata": {"name": "k", "ownerReferences": refs}})[0] == 201
            assert app.wait_idle(WAIT)
            before = {n: calls.count(n) for n in ("p1", "p2", "p3")}
            c.update_status("Kid", "k", {"phase": "Up"})
            assert wait_until(lambda: calls.count("p1") > before["p1"] and calls.count("p2") > before["p2"])
            assert app.wait_idle(WAIT)
            assert calls.count("p3") == before["p3"]


# Leadership: the controllers and the garbage collector's sweeps run while the store's elector leads

class FakeElector(fabrica.LeaderElector):
    """Leads only when a test says so (gain/lose), as a lease-based elector does when it wins or loses."""

    def start(self, on_started_leading, on_stopped_leading):
        self._callbacks = (on_started_leading, on_stopped_leading)

    def gain(self):
        self._started_leading()

    def lose(self, holder="someone-else"):
        self._stopped_leading(holder)


@pytest.fixture
def elected(store_kind, tmp_path):
    """``elected()`` -> (an unstarted Fabrica on a store of each STORES entry, the FakeElector that store
    gives it); every app is stopped at teardown."""
    apps = []

    def make():
        store = open_store(store_kind, tmp_path / "data")
        elector = FakeElector("unset")

        def leader_elector(identity):
            elector.identity = identity
            return elector
        store.leader_elector = leader_elector
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), store=store, durable=False)
        apps.append(app)
        return app, elector
    yield make
    for app in apps:
        app.stop(timeout=5)


class TestLeadership:
    def test_a_single_process_store_always_leads(self, store_app):
        app = store_app(lambda app: app.register("Rack", lambda ctx, obj: None))
        health = app.health()
        assert health["leader"] is True and health["holderIdentity"] == app.identity
        assert list(app.controllers) == ["Rack"]
        assert f'fabrica_leader{{identity="{app.identity}"}} 1' in app.metrics_text().splitlines()
        app.stop()
        assert app.controllers == {} and not app.elector.is_leader()

    def test_before_start_nobody_is_known_to_lead(self):
        health = fabrica.Fabrica(store=fabrica.MemoryStore()).health()
        assert health["leader"] is False and health["holderIdentity"] is None

    def test_controllers_run_only_while_this_process_leads(self, elected):
        app, elector = elected()
        seen, held, stopping = [], threading.Event(), []

        def reconcile(ctx, obj):
            seen.append(obj.name)
            if obj.name == "slow":
                held.set()
                stopping.append(ctx.stopping.wait(WAIT))
        app.register("Rack", reconcile)
        app.start()
        app.client.create("Rack", "r1")
        assert app.wait_idle(WAIT) and seen == [] and app.controllers == {}
        assert app.health()["leader"] is False
        assert f'fabrica_leader{{identity="{app.identity}"}} 0' in app.metrics_text().splitlines()

        elector.gain()                      # the start-up list finds what was written meanwhile
        assert wait_until(lambda: seen == ["r1"]) and list(app.controllers) == ["Rack"]
        assert app.health()["leader"] is True and app.health()["holderIdentity"] == app.identity
        app.client.create("Rack", "slow")
        assert held.wait(WAIT)
        workers = list(app.controllers["Rack"]._threads)

        elector.lose("replica-b")           # the controllers stop before lose() returns
        assert stopping == [True] and app.controllers == {}
        assert workers and not any(t.is_alive() for t in workers)
        assert app.health()["leader"] is False and app.health()["holderIdentity"] == "replica-b"
        app.client.create("Rack", "r3")
        assert app.wait_idle(WAIT) and "r3" not in seen

        elector.gain()
        assert wait_until(lambda: "r3" in seen)
        app.stop()
        assert app.controllers == {} and not elector.is_leader()

    def test_the_garbage_collector_sweeps_only_while_leading(self, elected):
        app, elector = elected()
        app.register("Rack")
        app.register("Shelf")
        app.start()
        # as a crash mid-cascade leaves it: an object whose owner is gone
        app.store.create(fabrica.new_object("Shelf", "s1", "shelf-0000000a", owner_references=[
            {"kind": "Rack", "uid": "rack-0000000b", "name": "gone", "controller": True}]))
        assert app.wait_idle(WAIT) and app.store.find("Shelf", "s1") is not None
        elector.gain()                      # the start-up sweep runs now
        assert app.store.find("Shelf", "s1") is None


###############################################################################
# CLI #########################################################################
###############################################################################

# -- CLI (SPEC §7) ---------------------------------------------------------------------------------

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


@pytest.fixture(scope="class", params=["file", "sqlite"])
def cli_server(request, tmp_path_factory):
    """The CLI's server, on each store that ``serve`` can take (file, then SQLite)."""
    tmp = tmp_path_factory.mktemp("cli")
    server = Server.serve(None, write_app(tmp, name="cli_app"), "--no-fsync",
                          *STORES[request.param].serve(tmp / "data")).start()
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
        yaml = pytest.importorskip("yaml", reason="PyYAML (the yaml extra)")
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
        yaml = pytest.importorskip("yaml", reason="PyYAML (the yaml extra)")
        self.cli("widget", "create", "--spec", '{"name": "y1", "size": 1}')
        obj = yaml.safe_load(self.cli("-o", "yaml", "widget", "get", "y1", ok=False).stdout)
        assert obj == self.js("widget", "get", "y1")
        items = yaml.safe_load(self.cli("-o", "yaml", "widget", "list", ok=False).stdout)
        assert items == self.js("widget", "list")


class TestCLIToken:
    def test_token(self, tmp_path, servers):
        server = servers(tmp_path / "data", write_app(tmp_path), "--no-fsync", "--token", "s3cret")
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


###############################################################################
# Examples ####################################################################
###############################################################################

RACK_APP = EXAMPLES / "rack_reconciliation.py"
RACK_LABEL = "example.fabrica.io/rack"
EXAMPLE_WAIT = 15.0
PLURAL = {"Rack": "racks", "RackTemplate": "racktemplates", "Chassis": "chassis", "Blade": "blades",
          "Node": "nodes", "BMC": "bmcs"}
CHILD_KINDS = ("Chassis", "Blade", "Node", "BMC")


# -- helpers -------------------------------------------------------------------


# -- the rack example over HTTP -----------------------------------------------------

def count_of(server: Server, kind: str) -> int:
    """How many objects of a kind exist (X-Total-Count of a one-item page: cheap to poll)."""
    status, headers, _ = server.request("GET", f"/{PLURAL[kind]}?limit=1")
    assert status == 200
    return int(headers["x-total-count"])


def template_body(name: str, chassis: int, blades: int, nodes: int, mode: str = "shared") -> dict:
    return {"name": name, "chassisCount": chassis,
            "chassisConfig": {"bladeCount": blades, "bladeConfig": {"nodeCount": nodes, "bmcMode": mode}}}


def rack_children(server: Server, kind: str, rack_uid: str) -> list[dict]:
    return server.ok("GET", f"/{PLURAL[kind]}?labelSelector={RACK_LABEL}={rack_uid}")


def wait_rack(server: Server, name: str, predicate, timeout: float = EXAMPLE_WAIT) -> dict:
    last = {}

    def check():
        last["rack"] = server.ok("GET", f"/racks/{name}")
        return predicate(last["rack"])
    assert wait_until(check, timeout), f"rack {name} did not get there: {json.dumps(last.get('rack'))[:2000]}"
    return last["rack"]


def ready_with(chassis: int):
    return lambda r: r["status"].get("phase") == "Ready" and r["status"].get("totalChassis") == chassis


def owner_ref(obj: dict) -> dict:
    refs = obj["metadata"]["ownerReferences"]
    assert len(refs) == 1, obj["metadata"]
    return refs[0]


def check_tree(server: Server, rack: dict, chassis: int, blades: int, nodes: int, mode: str = "shared") -> None:
    """The rack's children match the template exactly, with the SPEC §8 ownership."""
    uid, name = rack["metadata"]["uid"], rack["metadata"]["name"]
    kids = {kind: rack_children(server, kind, uid) for kind in CHILD_KINDS}
    n_bmcs = chassis * blades * (1 if mode == "shared" else nodes)
    assert {k: len(v) for k, v in kids.items()} == {
        "Chassis": chassis, "Blade": chassis * blades, "Node": chassis * blades * nodes, "BMC": n_bmcs}
    status = rack["status"]
    assert (status["totalChassis"], status["totalBlades"], status["totalNodes"], status["totalBMCs"]) == \
        (chassis, chassis * blades, chassis * blades * nodes, n_bmcs)
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", status
    by_number = sorted(kids["Chassis"], key=lambda c: c["spec"]["chassisNumber"])
    assert status["chassisUIDs"] == [c["metadata"]["uid"] for c in by_number]
    assert sorted(c["metadata"]["name"] for c in kids["Chassis"]) == sorted(f"{name}-c{i}" for i in range(chassis))
    uids = {kind: {o["metadata"]["uid"]: o for o in objs} for kind, objs in kids.items()}
    for c in kids["Chassis"]:
        assert owner_ref(c) == {"kind": "Rack", "uid": uid, "name": name, "controller": True}
    parent_of = {"Blade": "Chassis", "Node": "Blade", "BMC": "Blade" if mode == "shared" else "Node"}
    for kind, parent_kind in parent_of.items():
        per_parent: dict[str, int] = {}
        for obj in kids[kind]:
            ref = owner_ref(obj)
            assert ref["kind"] == parent_kind and ref["controller"] is True, (kind, ref)
            parent = uids[parent_kind].get(ref["uid"])
            assert parent is not None and parent["metadata"]["name"] == ref["name"], (kind, ref)
            per_parent[ref["uid"]] = per_parent.get(ref["uid"], 0) + 1
        want = {"Blade": blades, "Node": nodes, "BMC": 1}[kind]
        assert sorted(per_parent.values()) == [want] * len(uids[parent_kind]), (kind, per_parent)
    bmc_names = {b["metadata"]["name"] for b in kids["BMC"]}
    for node in kids["Node"]:
        assert node["spec"]["bmcName"] in bmc_names     # every node points at an existing BMC
    for kind in CHILD_KINDS:
        for obj in kids[kind]:
            conds = {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}
            assert conds.get("Ready") == "True", obj


@pytest.fixture(scope="class", params=["file", "sqlite"])
def rack_server(request, tmp_path_factory):
    """The rack example served on each store that ``serve`` can take (file, then SQLite)."""
    data = tmp_path_factory.mktemp("rack")
    server = Server.serve(None, RACK_APP, "--no-fsync", *STORES[request.param].serve(data)).start()
    yield server
    server.kill()


class TestRackExample:
    def test_shared_tree_scale_up_down_and_delete(self, rack_server):
        s = rack_server
        tmpl = s.ok("POST", "/racktemplates", template_body("standard", 2, 4, 2), expect=201)
        assert tmpl["spec"]["chassisConfig"]["bladeConfig"] == {"nodeCount": 2, "bmcMode": "shared"}
        rack = s.ok("POST", "/racks", {"name": "rack-01", "templateUID": "standard"}, expect=201)
        assert rack["status"] == {"phase": "Pending", "chassisUIDs": [], "totalChassis": 0, "totalBlades": 0,
                                  "totalNodes": 0, "totalBMCs": 0}      # RackStatus's defaults, stored at create
        rack = wait_rack(s, "rack-01", ready_with(2))
        check_tree(s, rack, 2, 4, 2)
        assert rack["status"]["observedGeneration"] == rack["metadata"]["generation"]

        # the template changes: the rack re-converges (watches), scaling up ...
        s.ok("PATCH", "/racktemplates/standard", {"chassisCount": 3})
        rack = wait_rack(s, "rack-01", ready_with(3))
        assert (rack["status"]["totalBlades"], rack["status"]["totalNodes"], rack["status"]["totalBMCs"]) == \
            (12, 24, 12)
        check_tree(s, rack, 3, 4, 2)
        first_chassis = rack["status"]["chassisUIDs"][0]

        # ... and down: the dropped chassis take their blades, nodes and BMCs with them
        s.ok("PATCH", "/racktemplates/standard", {"chassisCount": 1, "chassisConfig": {"bladeCount": 2}})
        rack = wait_rack(s, "rack-01", ready_with(1))
        assert wait_until(lambda: [len(rack_children(s, k, rack["metadata"]["uid"])) for k in CHILD_KINDS]
                          == [1, 2, 4, 2])
        check_tree(s, rack, 1, 2, 2)
        assert rack["status"]["chassisUIDs"] == [first_chassis]     # c0 was kept, not re-created

        # deleting the rack deletes every descendant
        body = s.ok("DELETE", "/racks/rack-01")
        assert body == {"message": "Rack deleted successfully", "uid": rack["metadata"]["uid"]}
        assert wait_until(lambda: all(not rack_children(s, k, rack["metadata"]["uid"]) for k in CHILD_KINDS))
        for kind in CHILD_KINDS:
            left = [o["metadata"]["name"] for o in s.ok("GET", f"/{PLURAL[kind]}")
                    if o["metadata"]["name"].startswith("rack-01-")]
            assert left == [], (kind, left)
        assert s.request("GET", "/racks/rack-01")[0] == 404
        assert s.request("GET", "/racktemplates/standard")[0] == 200    # the template is not owned by the rack

    def test_template_by_uid(self, rack_server):
        s = rack_server
        tmpl = s.ok("POST", "/racktemplates", template_body("by-uid", 1, 2, 3), expect=201)
        assert tmpl["metadata"]["uid"].startswith("rktmpl-")
        s.ok("POST", "/racks", {"name": "rack-uid", "templateUID": tmpl["metadata"]["uid"], "location": "dc1"},
             expect=201)
        rack = wait_rack(s, "rack-uid", ready_with(1))
        check_tree(s, rack, 1, 2, 3)

    def test_dedicated_bmcs_are_owned_by_nodes(self, rack_server):
        s = rack_server
        s.ok("POST", "/racktemplates", template_body("dedicated", 1, 2, 4, "dedicated"), expect=201)
        s.ok("POST", "/racks", {"name": "rack-ded", "templateUID": "dedicated"}, expect=201)
        rack = wait_rack(s, "rack-ded", ready_with(1))
        check_tree(s, rack, 1, 2, 4, mode="dedicated")
        bmcs = rack_children(s, "BMC", rack["metadata"]["uid"])
        nodes = {n["metadata"]["uid"]: n for n in rack_children(s, "Node", rack["metadata"]["uid"])}
        assert len(bmcs) == 8
        for bmc in bmcs:
            ref = owner_ref(bmc)
            assert ref["kind"] == "Node" and ref["uid"] in nodes
            assert nodes[ref["uid"]]["spec"]["bmcName"] == bmc["metadata"]["name"]
        assert len({owner_ref(b)["uid"] for b in bmcs}) == 8     # one BMC per node

    def test_missing_template_is_an_error_until_it_appears(self, rack_server):
        s = rack_server
        s.ok("POST", "/racks", {"name": "rack-late", "templateUID": "late"}, expect=201)
        rack = wait_rack(s, "rack-late", lambda r: r["status"].get("phase") == "Error")
        ready = [c for c in rack["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "False" and ready[0]["reason"] == "TemplateNotFound", ready
        assert "late" in ready[0]["message"]
        assert not rack_children(s, "Chassis", rack["metadata"]["uid"])
        # creating the template re-queues the rack (watches), no rack write needed
        s.ok("POST", "/racktemplates", template_body("late", 2, 1, 1), expect=201)
        rack = wait_rack(s, "rack-late", ready_with(2))
        check_tree(s, rack, 2, 1, 1)


class TestRackCrash:
    """SIGKILL a durable server while the rack builds a 6x8x4 tree; the restart converges with no duplicates."""

    DIMS = (6, 8, 4)     # 6 chassis, 48 blades, 192 nodes, 48 shared BMCs

    @pytest.mark.parametrize("kind, at_least", [("Chassis", 1), ("Blade", 20), ("Node", 60)])
    def test_kill_while_building(self, servers, tmp_path, kind, at_least):
        c, b, n = self.DIMS
        data = tmp_path / "data"
        s = servers(data, str(RACK_APP))
        s.ok("POST", "/racktemplates", template_body("big", c, b, n), expect=201)
        rack = s.ok("POST", "/racks", {"name": "rack-big", "templateUID": "big"}, expect=201)
        assert wait_until(lambda: count_of(s, kind) >= at_least, interval=0.001), f"no {kind} appeared"
        s.kill()
        before = {k: len(list((data / PLURAL[k]).glob("*.json"))) for k in CHILD_KINDS}
        on_disk = json.loads((data / "racks" / f"{rack['metadata']['uid']}.json").read_text())
        total = c * b * (2 + n)
        assert on_disk["status"].get("phase") != "Ready" and sum(before.values()) < total, \
            f"the kill came too late to test anything: {before}"

        s = servers(data, str(RACK_APP))
        rack = wait_rack(s, "rack-big", ready_with(c), timeout=40)
        check_tree(s, rack, c, b, n)
        for k in CHILD_KINDS:       # the whole store, not just the rack's label: nothing extra anywhere
            objs = s.ok("GET", f"/{PLURAL[k]}")
            names = [o["metadata"]["name"] for o in objs]
            assert len(names) == len(set(names)) == {"Chassis": c, "Blade": c * b, "Node": c * b * n,
                                                     "BMC": c * b}[k], (k, len(names))
        health = s.ok("GET", "/health")
        assert health["quarantined"] == []
        assert s.stop() == 0


# -- finalizers (§5.6), in process ----------------------------------------------------

@pytest.fixture
def example_app(tmp_path):
    """``example_app(setup)`` builds a started app; gates in ``example_app.gates`` are released at teardown."""
    apps: list[fabrica.Fabrica] = []
    gates: list[threading.Event] = []

    def build(setup, data_dir=None):
        app = fabrica.Fabrica(data_dir=str(data_dir or tmp_path / f"data{len(apps)}"), durable=False)
        setup(app)
        app.start()
        apps.append(app)
        return app
    build.gates = gates
    yield build
    for gate in gates:
        gate.set()
    for app in apps:
        app.stop(timeout=5)


class Finalizer:
    """A finalize function that records its calls and blocks on ``gate`` (or raises while ``fail`` is set)."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.fail = threading.Event()
        self.calls: list[tuple[float, str, bool]] = []
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def finalize(self, ctx, obj):
        with self._lock:
            self.calls.append((time.monotonic(), obj.name, ctx.deleting))
        self.entered.set()
        if self.fail.is_set():
            raise RuntimeError("disk busy: cannot release the lease")
        if self.gate is not None:
            assert self.gate.wait(60), "test gate never released"

    def count(self, name: str) -> int:
        with self._lock:
            return sum(1 for _, n, _ in self.calls if n == name)


class TestFinalizers:
    @pytest.fixture
    def env(self, example_app):
        gate = threading.Event()
        example_app.gates.append(gate)
        fin = Finalizer(gate)
        rec = Recorder()

        def setup(app):
            app.register("Thing", finalize=fin.finalize, workers=3)    # several may block at once
            app.register("Widget")
            app.subscribe("io.fabrica.**", rec)
        app = example_app(setup)
        return app, fin, gate, rec

    def test_delete_waits_for_finalize_and_deletion_cannot_be_undone(self, env):
        app, fin, gate, rec = env
        status, _, obj = call(app, "POST", "/things", {"name": "t1", "size": 1})
        assert status == 201 and obj["metadata"]["finalizers"] == [fabrica_finalizer()]
        uid = obj["metadata"]["uid"]
        status, headers, obj = call(app, "DELETE", "/things/t1")
        assert status == 202, obj
        stamp = obj["metadata"]["deletionTimestamp"]
        assert RFC3339.fullmatch(stamp) and fabrica_finalizer() in obj["metadata"]["finalizers"]
        assert headers["etag"] == f'"{obj["metadata"]["resourceVersion"]}"'
        assert fin.entered.wait(EXAMPLE_WAIT)
        assert fin.calls[0][1:] == ("t1", True)     # finalize sees ctx.deleting
        status, _, got = call(app, "GET", "/things/t1")
        assert status == 200 and got["metadata"]["deletionTimestamp"] == stamp

        # no write can take the deletion back: deletionTimestamp is server-managed
        for body in ({"metadata": {"name": "t1", "deletionTimestamp": None}, "spec": {"size": 2}},
                     {"name": "t1", "size": 3, "deletionTimestamp": None}):
            status, _, put = call(app, "PUT", "/things/t1", body)        # the spec is written, the stamp kept
            assert status == 200 and put["metadata"]["deletionTimestamp"] == stamp, put
            status, _, got = call(app, "GET", "/things/t1")
            assert status == 200 and got["metadata"]["deletionTimestamp"] == stamp, got["metadata"]
        status, _, again = call(app, "DELETE", "/things/t1")
        assert status == 202 and again["metadata"]["deletionTimestamp"] == stamp

        gate.set()
        assert wait_until(lambda: call(app, "GET", "/things/t1")[0] == 404)
        assert not (Path(app.data_dir) / "things" / f"{uid}.json").exists()
        rec.flush(app, "Widget")
        assert len(rec.deleted(uid)) == 1, rec.deleted(uid)
        assert fin.count("t1") == 1

    def test_user_finalizer_blocks_until_a_put_removes_it(self, env):
        app, fin, gate, rec = env
        status, _, obj = call(app, "POST", "/widgets",
                              {"metadata": {"name": "w1", "finalizers": ["example.com/x"]}, "spec": {"a": 1}})
        assert status == 201 and obj["metadata"]["finalizers"] == ["example.com/x"]
        uid = obj["metadata"]["uid"]
        status, _, obj = call(app, "DELETE", "/widgets/w1")
        assert status == 202 and obj["metadata"]["deletionTimestamp"]
        assert app.wait_idle(EXAMPLE_WAIT)
        status, _, obj = call(app, "GET", "/widgets/w1")
        assert status == 200 and obj["metadata"]["finalizers"] == ["example.com/x"]
        status, _, obj = call(app, "PUT", "/widgets/w1", {"metadata": {"name": "w1", "finalizers": []}})
        assert status == 200, obj
        assert call(app, "GET", "/widgets/w1")[0] == 404
        rec.flush(app, "Widget")
        assert len(rec.deleted(uid)) == 1

    def test_user_finalizer_outlives_the_finalize_function(self, env):
        app, fin, gate, rec = env
        gate.set()
        obj = app.client.create("Thing", name="t2", finalizers=["example.com/x"])
        assert sorted(obj.finalizers) == sorted(["example.com/x", fabrica_finalizer()])
        pending = app.client.delete("Thing", "t2")
        assert pending is not None and pending.deleting
        assert wait_until(lambda: app.client.get("Thing", "t2").finalizers == ["example.com/x"])
        assert app.wait_idle(EXAMPLE_WAIT)
        current = app.client.get("Thing", "t2")
        assert current.deleting and fin.count("t2") == 1
        current["metadata"]["finalizers"] = []
        app.client.update(current)
        with pytest.raises(fabrica.NotFoundError):
            app.client.get("Thing", "t2")

    def test_raising_finalize_is_retried_with_backoff_and_recorded(self, env):
        app, fin, gate, rec = env
        gate.set()
        fin.fail.set()
        app.client.create("Thing", name="t3")
        started = time.monotonic()
        assert app.client.delete("Thing", "t3") is not None
        assert wait_until(lambda: fin.count("t3") >= 3)

        def error_condition():
            conds = app.client.get("Thing", "t3").status.get("conditions") or []
            return next((c for c in conds if c["type"] == "Ready" and c["reason"] == "ReconcileError"), None)
        cond = wait_until(error_condition)
        assert cond and cond["status"] == "False" and "disk busy" in cond["message"]
        assert "Traceback" not in cond["message"]
        # exponential backoff: 5 ms doubling gives about 8 calls in the first second; a hot loop gives
        # hundreds, a fixed long retry (Go Fabrica's 30 s) one
        pause = threading.Event()
        pause.wait(max(0.0, 1.0 - (time.monotonic() - started)))
        assert 3 <= fin.count("t3") <= 15, fin.count("t3")
        fin.fail.clear()
        assert wait_until(lambda: call(app, "GET", "/things/t3")[0] == 404, timeout=20)

    def test_stuck_finalizer_is_bypassed_by_force(self, env):
        app, fin, gate, rec = env
        for name in ("t4", "t5"):
            app.client.create("Thing", name=name)
        uid4 = app.client.get("Thing", "t4").uid
        assert call(app, "DELETE", "/things/t4")[0] == 202
        assert wait_until(lambda: fin.count("t4") == 1)
        status, _, body = call(app, "DELETE", "/things/t4?force=true")
        assert status == 200 and body == {"message": "Thing deleted successfully", "uid": uid4}
        assert call(app, "GET", "/things/t4")[0] == 404

        assert app.client.delete("Thing", "t5") is not None
        assert wait_until(lambda: fin.count("t5") == 1)
        assert app.client.delete("Thing", "t5", force=True) is None
        with pytest.raises(fabrica.NotFoundError):
            app.client.get("Thing", "t5")

        gate.set()          # the stuck finalize functions return late: nothing comes back
        assert app.wait_idle(EXAMPLE_WAIT)
        assert [o.name for o in app.client.list("Thing")] == []
        assert list((Path(app.data_dir) / "things").glob("*.json")) == []
        rec.flush(app, "Widget")
        assert len(rec.deleted(uid4)) == 1

    def test_only_finalize_runs_while_deleting(self, example_app):
        reconciled: list[str] = []
        gate = threading.Event()
        example_app.gates.append(gate)
        fin = Finalizer(gate)

        def setup(app):
            app.register("Both", lambda ctx, obj: reconciled.append(obj.name), finalize=fin.finalize)
        app = example_app(setup)
        app.client.create("Both", name="b1")
        assert app.wait_idle(EXAMPLE_WAIT) and reconciled == ["b1"]
        app.client.delete("Both", "b1")
        assert fin.entered.wait(EXAMPLE_WAIT)
        app.client.patch("Both", "b1", {"x": 1})            # a spec change while deleting: still no reconcile
        app.client.update_status("Both", "b1", {"phase": "Draining"})
        gate.set()
        assert wait_until(lambda: not app.client.list("Both"))
        assert app.wait_idle(EXAMPLE_WAIT)
        assert reconciled == ["b1"]

    def test_finalize_may_be_any_callable(self, example_app):
        def release(what, ctx, obj):
            raise RuntimeError(f"cannot release {what}")

        def setup(app):
            app.register("Lease", finalize=functools.partial(release, "the lease"))
        app = example_app(setup)
        app.client.create("Lease", name="l1")
        app.client.delete("Lease", "l1")

        def recorded():
            conds = app.client.get("Lease", "l1").status.get("conditions") or []
            return any(c["reason"] == "ReconcileError" and "cannot release the lease" in c["message"]
                       for c in conds)
        assert wait_until(recorded, timeout=3)


def fabrica_finalizer() -> str:
    return getattr(fabrica, "FINALIZER", "fabrica.io/finalize")


# -- owners and garbage collection (§5.5), in process ----------------------------------

def plain_kinds(*kinds):
    def setup(app):
        for kind in kinds:
            app.register(kind)
    return setup


class TestGarbageCollection:
    def test_owner_references_and_cascade(self, example_app):
        rec = Recorder()

        def setup(app):
            plain_kinds("Owner", "Dependent", "Leaf", "Marker")(app)
            app.subscribe("io.fabrica.*.deleted", rec)
        app = example_app(setup)
        c = app.client
        owner = c.create("Owner", name="o1", spec={"x": 1})
        deps = [c.create("Dependent", name=f"d{i}", owner=owner) for i in range(2)]
        leaves = [c.create("Leaf", name=f"l{i}{j}", owner=deps[i]) for i in range(2) for j in range(2)]
        other = c.create("Owner", name="o2")
        survivor = c.create("Dependent", name="keep", owner=other)
        for dep in deps:
            assert dep["metadata"]["ownerReferences"] == [
                {"kind": "Owner", "uid": owner.uid, "name": "o1", "controller": True}]
            assert c.get("Dependent", dep.uid)["metadata"]["ownerReferences"] == dep["metadata"]["ownerReferences"]
        assert leaves[3]["metadata"]["ownerReferences"] == [
            {"kind": "Dependent", "uid": deps[1].uid, "name": "d1", "controller": True}]

        assert c.delete("Owner", "o1") is None
        assert wait_until(lambda: [d.name for d in c.list("Dependent")] == ["keep"] and not c.list("Leaf"))
        assert c.get("Owner", "o2").uid == other.uid and c.get("Dependent", "keep").uid == survivor.uid
        rec.flush(app, "Marker")
        gone = [owner] + deps + leaves
        for obj in gone:
            events = rec.deleted(obj.uid)
            assert len(events) == 1, (obj.name, events)
            assert events[0]["type"] == f"io.fabrica.{obj.kind.lower()}.deleted"
            assert events[0]["data"]["resourceName"] == obj.name
            assert events[0]["data"]["resource"]["metadata"]["resourceVersion"] == events[0]["resourceversion"]
        rvs = [int(e["resourceversion"]) for e in rec.events if e["resourceuid"] in {o.uid for o in gone}]
        assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)

    def test_deep_ownership_chain_is_collected(self, example_app):
        app = example_app(plain_kinds("Link"))
        c = app.client
        prev = c.create("Link", name="l0")
        for i in range(1, 400):
            prev = c.create("Link", name=f"l{i}", owner=prev)
        raised = None
        try:
            c.delete("Link", "l0")
        except RecursionError as exc:       # keep pytest from rendering a 1,000-frame traceback
            raised = repr(exc)
        assert (raised, len(c.list("Link"))) == (None, 0)

    def test_dependent_with_finalizer_waits_for_it(self, example_app):
        app = example_app(plain_kinds("Owner", "Dependent"))
        c = app.client
        owner = c.create("Owner", name="o1")
        dep = c.create("Dependent", name="d1", owner=owner, finalizers=["example.com/drain"])
        c.delete("Owner", "o1")
        current = wait_until(lambda: c.get("Dependent", "d1") if c.get("Dependent", "d1").deleting else None)
        assert current and current.uid == dep.uid
        current["metadata"]["finalizers"] = []
        c.update(current)
        with pytest.raises(fabrica.NotFoundError):
            c.get("Dependent", "d1")

    def test_no_child_for_an_owner_that_is_gone_or_going(self, example_app):
        app = example_app(plain_kinds("Owner", "Dependent"))
        c = app.client
        going = c.create("Owner", name="going", finalizers=["example.com/hold"])
        stale_copy = c.get("Owner", "going")
        assert c.delete("Owner", "going").deleting
        for owner in (c.get("Owner", "going"), stale_copy):
            with pytest.raises(fabrica.ConflictError) as info:
                c.create("Dependent", name="orphan-a", owner=owner)
            assert info.value.status == 409
        gone = c.create("Owner", name="gone")
        c.delete("Owner", "gone")
        with pytest.raises(fabrica.ConflictError) as info:
            c.create("Dependent", name="orphan-b", owner=gone)
        assert info.value.status == 409
        status, _, body = call(app, "POST", "/dependents", {
            "metadata": {"name": "orphan-c", "ownerReferences": [{"kind": "Owner", "uid": gone.uid}]}, "spec": {}})
        assert status == 409, body
        status, _, body = call(app, "POST", "/dependents", {
            "metadata": {"name": "orphan-d", "ownerReferences": [{"kind": "Owner", "uid": going.uid}]},
            "spec": {}})
        assert status == 409, body
        assert c.list("Dependent") == []

    def test_owns_requeues_the_owner_on_a_child_status_change(self, example_app):
        calls: dict[str, int] = {}
        lock = threading.Lock()

        def reconcile(ctx, obj):
            with lock:
                calls[obj.name] = calls.get(obj.name, 0) + 1

        def setup(app):
            app.register("Parent", reconcile, owns=["Kid"])
            app.register("Kid")
        app = example_app(setup)
        c = app.client
        p1, p2 = c.create("Parent", name="p1"), c.create("Parent", name="p2")
        c.create("Kid", name="k1", owner=p1)
        c.create("Kid", name="loose")
        assert app.wait_idle(EXAMPLE_WAIT)
        n1, n2 = calls["p1"], calls["p2"]
        c.update_status("Kid", "k1", {"phase": "Up"})
        assert wait_until(lambda: calls["p1"] > n1), calls
        c.update_status("Kid", "loose", {"phase": "Up"})      # owned by nobody: nobody is re-queued
        assert app.wait_idle(EXAMPLE_WAIT)
        assert calls["p2"] == n2
        n1 = calls["p1"]
        c.delete("Kid", "k1")
        assert wait_until(lambda: calls["p1"] > n1), calls

    def test_watches_requeue_what_the_map_function_returns(self, example_app):
        calls: dict[str, int] = {}
        seen: list = []
        lock = threading.Lock()

        def reconcile(ctx, obj):
            with lock:
                calls[obj.name] = calls.get(obj.name, 0) + 1

        def targets(source):
            seen.append(source)
            target = source.spec.get("target")
            return [target] if target else []

        def setup(app):
            app.register("Watcher", reconcile, watches={"Source": targets})
            app.register("Source")
        app = example_app(setup)
        c = app.client
        w1, w2 = c.create("Watcher", name="w1"), c.create("Watcher", name="w2")
        assert app.wait_idle(EXAMPLE_WAIT)
        before = dict(calls)
        c.create("Source", name="s1", spec={"target": "w1"})       # by name
        assert wait_until(lambda: calls["w1"] > before["w1"]), calls
        assert app.wait_idle(EXAMPLE_WAIT)
        assert calls["w2"] == before["w2"]
        assert isinstance(seen[0], fabrica.Resource) and seen[0].name == "s1"
        before = dict(calls)
        c.patch("Source", "s1", {"target": w2.uid})                 # by uid
        assert wait_until(lambda: calls["w2"] > before["w2"]), calls
        assert app.wait_idle(EXAMPLE_WAIT)
        assert calls["w1"] == before["w1"]
        before = dict(calls)
        c.update_status("Source", "s1", {"seen": True})            # any change of a watched kind counts
        assert wait_until(lambda: calls["w2"] > before["w2"]), calls


class TestOrphanSweep:
    def test_orphans_left_by_a_crash_are_deleted_at_start(self, example_app, tmp_path):
        data = tmp_path / "shared"
        setup = plain_kinds("Owner", "Dependent", "Leaf")
        app = example_app(setup, data_dir=data)
        c = app.client
        owner = c.create("Owner", name="o1")
        dep = c.create("Dependent", name="d1", owner=owner)
        leaf = c.create("Leaf", name="l1", owner=dep)
        kept_owner = c.create("Owner", name="o2")
        kept_dep = c.create("Dependent", name="d2", owner=kept_owner)
        c.create("Dependent", name="free")
        app.stop()

        owner_file = data / app.kinds["Owner"].plural / f"{owner.uid}.json"
        assert owner_file.exists()
        owner_file.unlink()     # the owner's delete hit the disk, the cascade never ran

        rec = Recorder()

        def setup2(app2):
            setup(app2)
            app2.subscribe("io.fabrica.*.deleted", rec)
        app2 = example_app(setup2, data_dir=data)
        c2 = app2.client
        for kind, name in (("Dependent", "d1"), ("Leaf", "l1")):
            with pytest.raises(fabrica.NotFoundError):
                c2.get(kind, name)
        assert sorted(d.name for d in c2.list("Dependent")) == ["d2", "free"]
        assert c2.get("Dependent", "d2").uid == kept_dep.uid
        assert not (data / app2.kinds["Dependent"].plural / f"{dep.uid}.json").exists()
        assert not (data / app2.kinds["Leaf"].plural / f"{leaf.uid}.json").exists()
        assert rec.wait_for(lambda evs: {e["resourceuid"] for e in evs} >= {dep.uid, leaf.uid})

    def test_sweep_keeps_dependents_of_an_unregistered_owner_kind(self, example_app, tmp_path):
        data = tmp_path / "shared"
        app = example_app(plain_kinds("Owner", "Dependent"), data_dir=data)
        owner = app.client.create("Owner", name="o1")
        app.client.create("Dependent", name="d1", owner=owner)
        app.stop()
        app2 = example_app(plain_kinds("Dependent"), data_dir=data)     # served by an app without Owner
        assert (data / "owners" / f"{owner.uid}.json").exists()
        assert [d.name for d in app2.client.list("Dependent")] == ["d1"]


# -- the example scripts ----------------------------------------------------------------

class TestExampleScripts:
    def test_basic_crud_runs(self, tmp_path):
        for args in (["--data-dir", str(tmp_path / "crud")], []):
            env = {**os.environ, "TMPDIR": str(tmp_path)}
            env.pop("PYTHONPATH", None)
            done = subprocess.run([sys.executable, str(EXAMPLES / "basic_crud.py"), *args], cwd=str(tmp_path),
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stdout + done.stderr
            out = done.stdout
            for needle in ("create: Device switch-01", "update_status:", "stale update: 412",
                           "invalid create: 422", "get after delete: 404", "POST: Device router-01",
                           "duplicate POST: 409", "DELETE: gone"):
                assert needle in out, (needle, out)
            assert "Traceback" not in done.stderr
        assert list((tmp_path / "crud" / "devices").glob("*.json"))
        assert not (tmp_path / "data").exists()

    def test_quickstart_app_works(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        spec = importlib.util.spec_from_file_location("fabrica_quickstart_example", EXAMPLES / "quickstart.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        app = module.app
        assert isinstance(app, fabrica.Fabrica) and app.kinds["Greeting"].reconcile is module.reconcile
        app.configure_store(data_dir=str(tmp_path / "qs"), durable=False)
        with app:
            app.client.create("Greeting", name="hi", spec={"to": "you"})
            app.client.create("Greeting", name="anon")
            assert app.wait_idle(EXAMPLE_WAIT)
            hi, anon = app.client.get("Greeting", "hi"), app.client.get("Greeting", "anon")
            assert hi.status["message"] == "Hello, you" and anon.status["message"] == "Hello, world"
            assert hi.condition("Ready")["status"] == "True" and hi.condition("Ready")["reason"] == "Greeted"
            assert hi.status["observedGeneration"] == 1
        assert not (tmp_path / "data").exists()

    def test_quickstart_is_the_module_docstring_example(self):
        """The header's quick example (STYLE: "a quick example that a test actually runs") is quickstart.py."""
        after = fabrica.__doc__.split("::\n\n", 1)[1]
        assert after.startswith("    import fabrica")
        code = textwrap.dedent(after.split("\nRun it", 1)[0]).strip()
        assert code == (EXAMPLES / "quickstart.py").read_text().strip()

    def test_events_subscriber_follows_a_real_server(self, servers, tmp_path):
        s = servers(tmp_path / "data", "--no-fsync")        # the open server: /widgets appears at first create
        sub = subprocess.Popen([sys.executable, str(EXAMPLES / "events_subscriber.py"), "--server", s.url,
                                "--count", "3"], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        created = {}
        try:
            deadline = time.monotonic() + EXAMPLE_WAIT
            i = 0
            while sub.poll() is None and time.monotonic() < deadline:
                obj = s.ok("POST", "/widgets", {"name": f"w{i}", "n": i}, expect=201)
                created[obj["metadata"]["name"]] = int(obj["metadata"]["resourceVersion"])
                i += 1
                try:
                    sub.wait(0.05)      # a poll with a timeout: the subscriber may need a moment to connect
                except subprocess.TimeoutExpired:
                    pass
            out, err = sub.communicate(timeout=5)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(5)
        assert sub.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 3, out
        rvs = []
        for line in lines:
            m = re.fullmatch(r"io\.fabrica\.widget\.created (w\d+) rv=(\d+)", line)
            assert m, line
            assert created[m.group(1)] == int(m.group(2))
            rvs.append(int(m.group(2)))
        assert rvs == list(range(rvs[0], rvs[0] + 3))       # consecutive: nothing skipped

        # --since replays from the ring buffer; FABRICA_SERVER stands in for --server
        first = min(created.values())
        done = subprocess.run([sys.executable, str(EXAMPLES / "events_subscriber.py"), "--since", str(first),
                               "--count", "2", "--type", "io.fabrica.widget.*"], cwd=str(tmp_path),
                              env={**os.environ, "FABRICA_SERVER": s.url}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=EXAMPLE_WAIT)
        assert done.returncode == 0, done.stderr
        names = {rv: name for name, rv in created.items()}
        assert done.stdout.splitlines() == [f"io.fabrica.widget.created {names[first + k]} rv={first + k}"
                                            for k in (1, 2)]


###############################################################################
# First hour ##################################################################
###############################################################################

RACKS = ROOT / "examples" / "rack_reconciliation.py"


def start(argv, cwd, env=None) -> Server:
    """A started server process, ``python ARGV`` in ``cwd`` (see ``Server``)."""
    return Server(argv, cwd=cwd, env=env).start(30)


def stop(server: Server) -> None:
    """SIGTERM; the server exits 0."""
    assert server.stop() == 0, server.log()


def cli(url, *args, input=None, env=None, timeout=90):
    """``python fabrica.py ARGS`` against ``url`` (FABRICA_SERVER), stdout piped; never a traceback."""
    res = subprocess.run([sys.executable, str(FABRICA_PY), *args], capture_output=True, text=True, input=input,
                         timeout=timeout, env=dict(os.environ, FABRICA_SERVER=url, **(env or {})), cwd=ROOT)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def http_json(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as res:
        return json.loads(res.read())


@pytest.fixture(scope="module")
def racks(tmp_path_factory):
    """The rack example served on a fresh data dir; its URL."""
    tmp = tmp_path_factory.mktemp("racks")
    server = start([FABRICA_PY, "serve", RACKS, "--data-dir", tmp / "data", "--port", "0", "--no-fsync"], cwd=tmp)
    yield server.url
    stop(server)


TEMPLATE = {"kind": "RackTemplate", "metadata": {"name": "small", "labels": {"size": "s"}},
            "spec": {"chassisCount": 1, "chassisConfig": {"bladeCount": 1, "bladeConfig": {"nodeCount": 1}}}}
RACKS_YAML = """\
kind: RackTemplate
metadata: {name: small-y}
spec:
  chassisCount: 1
  chassisConfig: {bladeCount: 1, bladeConfig: {nodeCount: 1}}
---
kind: Rack
name: rack-y
templateUID: small-y
"""


# -- kubectl habits (SPEC §7) ----------------------------------------------------------------------

class TestApply:
    def test_apply_twice_is_created_then_unchanged_without_a_new_resource_version(self, racks, tmp_path):
        doc = tmp_path / "objects.json"
        doc.write_text(json.dumps([TEMPLATE, {"kind": "rack", "name": "rack-a", "templateUID": "small"}]))
        first = cli(racks, "apply", "-f", str(doc))
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == ["racktemplate/small created", "rack/rack-a created"]
        before = http_json(racks, "/racktemplates/small")["metadata"]["resourceVersion"]
        second = cli(racks, "apply", "-f", str(doc))
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == ["racktemplate/small unchanged", "rack/rack-a unchanged"]
        assert http_json(racks, "/racktemplates/small")["metadata"]["resourceVersion"] == before

    def test_apply_configures_what_differs(self, racks, tmp_path):
        doc = tmp_path / "one.json"
        changed = json.loads(json.dumps(TEMPLATE))
        changed["metadata"]["name"] = "small-c"
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c created\n"
        changed["spec"]["chassisCount"] = 2
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c configured\n"
        assert http_json(racks, "/racktemplates/small-c")["spec"]["chassisCount"] == 2
        changed["metadata"]["labels"] = {"size": "m"}
        doc.write_text(json.dumps(changed))
        assert cli(racks, "apply", "-f", str(doc)).stdout == "racktemplate/small-c configured\n"
        assert http_json(racks, "/racktemplates/small-c")["metadata"]["labels"] == {"size": "m"}

    def test_yaml_documents_from_stdin_and_a_folder_then_delete_f(self, racks, tmp_path):
        pytest.importorskip("yaml", reason="PyYAML (the yaml extra)")
        res = cli(racks, "apply", "-f", "-", input=RACKS_YAML)
        assert res.returncode == 0 and res.stdout.splitlines() == ["racktemplate/small-y created",
                                                                   "rack/rack-y created"], res.stderr
        folder = tmp_path / "dir"
        folder.mkdir()
        (folder / "a.yaml").write_text(RACKS_YAML)
        (folder / "notes.txt").write_text("not an object")
        assert cli(racks, "apply", "-f", str(folder)).stdout.splitlines() == [
            "racktemplate/small-y unchanged", "rack/rack-y unchanged"]
        gone = cli(racks, "delete", "-f", str(folder / "a.yaml"))
        assert gone.returncode == 0 and gone.stdout.splitlines() == ["racktemplate/small-y deleted",
                                                                     "rack/rack-y deleted"], gone.stderr
        assert cli(racks, "get", "rack", "rack-y").returncode == 1

    def test_an_object_without_kind_or_name_is_a_usage_error(self, racks, tmp_path):
        doc = tmp_path / "bad.json"
        doc.write_text(json.dumps({"kind": "Rack", "templateUID": "small"}))
        res = cli(racks, "apply", "-f", str(doc))
        assert res.returncode == 2 and "without a name" in res.stderr and res.stderr.count("\n") == 1
        doc.write_text(json.dumps({"name": "x"}))
        assert cli(racks, "apply", "-f", str(doc)).returncode == 2


@pytest.fixture(scope="module")
def two(racks):
    """The rack server with two templates labelled set=two."""
    for name in ("w1", "w2"):
        res = cli(racks, "racktemplate", "create", "--spec", json.dumps(
            {"name": name, "labels": {"set": "two"}, **TEMPLATE["spec"]}))
        assert res.returncode == 0, res.stderr
    return racks


class TestKubectlWordOrder:
    def test_get_plural_and_several_refs(self, two):
        listed = cli(two, "-oname", "get", "racktemplates", "-l", "set=two")
        assert listed.returncode == 0 and listed.stdout == "racktemplate/w1\nracktemplate/w2\n", listed.stderr
        both = json.loads(cli(two, "get", "racktemplate", "w1", "w2").stdout)
        assert [o["metadata"]["name"] for o in both] == ["w1", "w2"]
        slashed = cli(two, "-o", "name", "get", "racktemplate/w2")
        assert slashed.stdout == "racktemplate/w2\n"
        # the Fabrica order takes several refs, and none (= list), too
        assert cli(two, "-o", "name", "racktemplate", "get", "w1", "w2").stdout == "racktemplate/w1\nracktemplate/w2\n"
        assert "racktemplate/w1" in cli(two, "-oname", "racktemplate", "get").stdout

    def test_wide_adds_generation_observed_and_labels(self, two):
        res = cli(two, "-o", "wide", "get", "racktemplates", "-l", "set=two")
        header, *rows = res.stdout.splitlines()
        assert header.split()[-3:] == ["GENERATION", "OBSERVED", "LABELS"]
        assert rows[0].split()[0] == "w1" and rows[0].split()[-1] == "set=two"

    def test_name_output_with_no_match_prints_nothing(self, two):
        res = cli(two, "-o", "name", "get", "racks", "-l", "no=such")
        assert res.returncode == 0 and res.stdout == ""

    def test_delete_several(self, two):
        for name in ("d1", "d2"):
            cli(two, "racktemplate", "create", "--spec", json.dumps({"name": name, **TEMPLATE["spec"]}))
        res = cli(two, "delete", "racktemplate", "d1", "d2")
        assert res.returncode == 0 and res.stdout.splitlines() == ["racktemplate/d1 deleted",
                                                                   "racktemplate/d2 deleted"], res.stderr
        assert cli(two, "racktemplate", "get", "d1").returncode == 1

    def test_describe_shows_conditions_dependents_and_events(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "dt", **TEMPLATE["spec"]}))
        cli(racks, "rack", "create", "--spec", json.dumps({"name": "rack-d", "templateUID": "dt"}))
        assert cli(racks, "wait", "rack/rack-d", "--for=condition=Ready", "--timeout=60s").returncode == 0
        res = cli(racks, "describe", "rack", "rack-d")
        assert res.returncode == 0, res.stderr
        text = res.stdout
        assert "Name:         rack-d" in text and "Kind:         Rack" in text
        conditions = text[text.index("Conditions:"):text.index("Dependents:")]
        assert re.search(r"Ready\s+True\s+Provisioned", conditions), text
        dependents = text[text.index("Dependents:"):text.index("Events:")]
        assert "chassis/" in dependents, text
        events = text[text.index("Events:"):]
        assert re.search(r"\bcreated\b", events) and "condition Ready=True" in events, text
        # the route describe reads: one object's recent events, oldest first, nobody else's
        uid = http_json(racks, "/racks/rack-d")["metadata"]["uid"]
        evs = http_json(racks, "/racks/rack-d/events")
        assert evs and {e["resourceuid"] for e in evs} == {uid} and evs[0]["action"] == "created"
        assert len(http_json(racks, "/racks/rack-d/events?limit=1")) == 1
        assert "/racks/{ref}/events" in http_json(racks, "/openapi.json")["paths"]


class TestWait:
    def test_condition_met_exits_0_timeout_exits_1(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "wt", **TEMPLATE["spec"]}))
        cli(racks, "rack", "create", "--spec", json.dumps({"name": "rack-w", "templateUID": "wt"}))
        met = cli(racks, "wait", "rack/rack-w", "--for=condition=Ready", "--timeout=60s")
        assert met.returncode == 0 and met.stdout == "rack/rack-w condition met\n", met.stderr
        never = cli(racks, "wait", "rack", "rack-w", "--for", "condition=Ready=False", "--timeout", "300ms")
        assert never.returncode == 1 and never.stdout == ""
        assert "timed out" in never.stderr and "Ready is True" in never.stderr and never.stderr.count("\n") == 1

    def test_for_delete(self, racks):
        cli(racks, "racktemplate", "create", "--spec", json.dumps({"name": "wd", **TEMPLATE["spec"]}))
        still = cli(racks, "wait", "racktemplate/wd", "--for=delete", "--timeout=200ms")
        assert still.returncode == 1 and "still exists" in still.stderr
        assert cli(racks, "racktemplate", "delete", "wd").returncode == 0
        gone = cli(racks, "wait", "racktemplate/wd", "--for=delete", "--timeout=30s")
        assert gone.returncode == 0 and gone.stdout == "racktemplate/wd deleted\n"

    def test_bad_for_and_timeout_are_usage_errors(self, racks):
        bad_for = cli(racks, "wait", "rack/x", "--for=ready")
        assert bad_for.returncode == 2 and "--for wants condition=TYPE[=STATUS] or delete" in bad_for.stderr
        bad_timeout = cli(racks, "wait", "rack/x", "--for=delete", "--timeout=soon")
        assert bad_timeout.returncode == 2 and "--timeout wants a duration" in bad_timeout.stderr


# -- init and unknown commands ---------------------------------------------------------------------

class TestInit:
    def test_init_writes_a_project_whose_tests_pass(self, tmp_path):
        res = subprocess.run([sys.executable, str(FABRICA_PY), "init", "rack-svc", "--kind", "Rack",
                              "--kind", "RackTemplate"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        project = tmp_path / "rack-svc"
        assert sorted(p.name for p in project.iterdir()) == [".gitignore", "README.md", "app.py", "fabrica.py",
                                                             "test_app.py"]
        assert (project / "fabrica.py").read_bytes() == FABRICA_PY.read_bytes()
        assert 'app.register("Rack")' in (project / "app.py").read_text()
        readme = (project / "README.md").read_text()
        assert "python app.py" in readme and "python -m pytest -q" in readme
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                               capture_output=True, text=True, timeout=300,
                               env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
        assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout + tests.stderr

    def test_the_new_app_serves_with_python_app_py(self, tmp_path):
        subprocess.run([sys.executable, str(FABRICA_PY), "init", "svc"], cwd=tmp_path, check=True,
                       capture_output=True, timeout=60)
        proc = start(["app.py"], cwd=tmp_path / "svc", env={"FABRICA_PORT": "0"})
        try:
            assert "kinds: Example" in proc.ready_line
            url = proc.url
            assert cli(url, "example", "create", "--spec", '{"name": "e1"}').returncode == 0
            assert cli(url, "wait", "example/e1", "--for=condition=Ready", "--timeout=30s").returncode == 0
        finally:
            stop(proc)

    def test_init_refuses_a_non_empty_folder_and_a_bad_kind(self, tmp_path):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep.txt").write_text("mine")
        res = subprocess.run([sys.executable, str(FABRICA_PY), "init", "full"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "not an empty folder" in res.stderr
        assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
        bad = subprocess.run([sys.executable, str(FABRICA_PY), "init", "x", "--kind", "rack"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "CapWords" in bad.stderr and not (tmp_path / "x").exists()


class TestUnknownCommands:
    @pytest.mark.parametrize("argv", [["rack-svc"], ["add", "resource", "Rack"], ["generate"], ["typo", "list"],
                                      ["typo"]])
    def test_unknown_command_lists_the_commands(self, racks, argv):
        res = cli(racks, *argv)
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr.startswith(f"fabrica: unknown command {argv[0]!r}") and res.stderr.count("\n") == 1
        for command in ("serve", "init", "apply", "get", "describe", "wait"):
            assert command in res.stderr
        assert "invalid choice" not in res.stderr and "VERB" not in res.stderr

    def test_add_and_generate_say_what_to_do_instead(self, racks):
        assert "add a kind with `register` in app.py" in cli(racks, "generate").stderr

    def test_a_word_no_kind_is_spelled_like_needs_no_server(self):
        res = cli("http://127.0.0.1:1", "rack-svc")
        assert res.returncode == 2 and "unknown command 'rack-svc'" in res.stderr

    def test_version(self):
        res = cli("http://127.0.0.1:1", "version")
        assert res.returncode == 0 and re.fullmatch(r"fabrica \d+\.\d+\.\d+\S*\n", res.stdout)


# -- Starting up -----------------------------------------------------------------------------------

def quickstart_dir(tmp_path) -> Path:
    """A folder holding quickstart.py next to fabrica.py, as the README's Quick start has it."""
    shutil.copy(ROOT / "examples" / "quickstart.py", tmp_path / "quickstart.py")
    shutil.copy(FABRICA_PY, tmp_path / "fabrica.py")
    return tmp_path


def script_env(**variables):
    return hermetic_env(**variables)


class TestStartingUp:
    def test_python_quickstart_prints_one_ready_line_and_honours_fabrica_port(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc = start(["quickstart.py"], cwd=folder, env=script_env(FABRICA_PORT="0"))
        try:
            assert proc.port != 8080
            assert re.search(r"fabrica \S+ serving quickstart\.py: listening on http://127\.0\.0\.1:\d+ "
                             r"\(store: .*quickstart-data; kinds: Greeting\)", proc.ready_line), proc.ready_line
            assert http_json(proc.url, "/health")["status"] == "healthy"
        finally:
            stop(proc)

    def test_the_environment_overrides_the_data_dir_of_the_code(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc = start(["quickstart.py"], cwd=folder,
                     env=script_env(FABRICA_PORT="0", FABRICA_DATA_DIR=str(tmp_path / "elsewhere")))
        try:
            assert "elsewhere" in proc.ready_line
        finally:
            stop(proc)
        assert (tmp_path / "elsewhere").is_dir() and not (folder / "quickstart-data").exists()

    def test_a_taken_port_is_one_line_naming_the_address(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            res = subprocess.run([sys.executable, "quickstart.py"], cwd=folder, capture_output=True, text=True,
                                 timeout=60, env=script_env(FABRICA_PORT=str(port)))
            served = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--port", str(port), "--data-dir",
                                     str(tmp_path / "d2")], cwd=folder, capture_output=True, text=True, timeout=60)
        for out in (res, served):
            assert out.returncode == 1 and "Traceback" not in out.stderr
            assert f"127.0.0.1:{port}" in out.stderr and "FABRICA_PORT" in out.stderr
            assert out.stderr.strip().splitlines()[-1].startswith("fabrica:")

    def test_a_locked_data_dir_is_one_line_that_a_script_user_can_act_on(self, tmp_path):
        folder = quickstart_dir(tmp_path)
        proc = start(["quickstart.py"], cwd=folder, env=script_env(FABRICA_PORT="0"))
        try:
            res = subprocess.run([sys.executable, "quickstart.py"], cwd=folder, capture_output=True, text=True,
                                 timeout=60, env=script_env(FABRICA_PORT="0"))
        finally:
            stop(proc)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert "is locked by pid" in last and "FABRICA_DATA_DIR" in last and "Fabrica(data_dir=" in last

    def test_the_quickstart_and_the_rack_example_use_different_data_dirs(self):
        quick = (ROOT / "examples" / "quickstart.py").read_text()
        racks = RACKS.read_text()
        quick_dir = re.search(r'data_dir="([^"]+)"', quick).group(1)
        assert quick_dir not in racks and quick_dir.rstrip("/") != "./data"

    def test_serve_wsgi_server_flag_and_the_deprecated_alias(self, tmp_path):
        stop(start([FABRICA_PY, "serve", "--wsgi-server", "fabrica", "--port", "0", "--data-dir", tmp_path / "a"],
                   cwd=tmp_path))
        proc = start([FABRICA_PY, "serve", "--server", "fabrica", "--port", "0", "--data-dir", tmp_path / "b"],
                     cwd=tmp_path)
        stop(proc)
        deprecated = proc.lines[0]          # the first line, before the ready line
        assert "deprecated" in deprecated and "--wsgi-server" in deprecated

    def test_serve_help_has_defaults_and_the_environment(self):
        res = subprocess.run([sys.executable, str(FABRICA_PY), "serve", "--help"], capture_output=True, text=True,
                             timeout=60)
        text = " ".join(res.stdout.split())
        assert res.returncode == 0
        assert "FABRICA_PORT" in text and "FABRICA_WSGI_SERVER" in text and "(default: 8080)" in text
        assert "--wsgi-server" in text


# -- The open server -------------------------------------------------------------------------------

class TestOpenServer:
    def test_the_cli_creates_a_kind_the_open_server_does_not_have_yet(self, tmp_path):
        proc = start([FABRICA_PY, "serve", "--port", "0", "--data-dir", tmp_path / "d"], cwd=tmp_path)
        url = proc.url
        try:
            assert cli(url, "-o", "name", "get", "widgets").stdout == ""
            made = cli(url, "widget", "create", "--spec", '{"name": "w1", "size": 3}')
            assert made.returncode == 0, made.stderr
            assert json.loads(made.stdout)["kind"] == "Widget"
            assert cli(url, "-o", "name", "get", "widgets").stdout == "widget/w1\n"
        finally:
            stop(proc)

    def test_start_up_names_the_stored_kinds_the_app_does_not_register(self, tmp_path):
        """`serve --data-dir ./data` without the app serves the rack data without schema: it says so."""
        proc = start([FABRICA_PY, "serve", RACKS, "--port", "0", "--data-dir", tmp_path / "d"], cwd=tmp_path)
        made = cli(proc.url, "racktemplate", "create", "--spec", json.dumps({"name": "t1", **TEMPLATE["spec"]}))
        stop(proc)
        assert made.returncode == 0, made.stderr
        proc = start([FABRICA_PY, "serve", "--port", "0", "--data-dir", tmp_path / "d"], cwd=tmp_path)
        stop(proc)
        lines = proc.lines[:proc.lines.index(proc.ready_line)]      # what start-up said before it was ready
        warning = next((ln for ln in lines if "does not register" in ln), "")
        assert "WARNING" in warning and "RackTemplate" in warning, "".join(lines)


# -- Small things ----------------------------------------------------------------------------------

class TestSmallThings:
    def test_kinds_name_output_is_the_kind_names(self, racks):
        names = cli(racks, "kinds", "-o", "name").stdout.splitlines()
        assert "Rack" in names and not any("{" in n for n in names)

    def test_an_error_prints_its_message_once(self, racks):
        res = cli(racks, "racktemplate", "create", "--spec", '{"name": "s1", "status": {"phase": "x"}}')
        assert res.returncode == 1 and res.stderr.count("\n") == 1
        assert res.stderr.count("is not a spec field") == 1, res.stderr

    def test_cannot_connect_names_fabrica_server(self):
        res = cli("http://127.0.0.1:1", "get", "racks")
        assert res.returncode == 3 and "FABRICA_SERVER" in res.stderr


# -- README ----------------------------------------------------------------------------------------

def test_readme_kubectl_walkthrough_runs_as_written(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML (the yaml extra)")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The same walkthrough in kubectl's word order"):]
    block = section[section.index("```sh") + 5:]
    block = block[:block.index("```")].strip()
    heredoc = re.search(r"cat > racks\.yaml <<'EOF'\n(.*?)\nEOF\n", block, re.S)
    (tmp_path / "racks.yaml").write_text(heredoc.group(1) + "\n")
    proc = start([FABRICA_PY, "serve", RACKS, "--data-dir", tmp_path / "data", "--port", "0", "--no-fsync"],
                 cwd=tmp_path)
    url = proc.url
    try:
        outputs = []
        for line in block[heredoc.end():].splitlines():
            argv = line.split("#")[0].split()
            assert argv[:2] == ["python", "fabrica.py"], line
            res = subprocess.run([sys.executable, str(FABRICA_PY), *argv[2:]], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=90, env=dict(os.environ, FABRICA_SERVER=url))
            assert res.returncode == 0 and "Traceback" not in res.stderr, f"{line}\n{res.stderr}"
            outputs.append(res.stdout)
        assert outputs[0].splitlines() == ["racktemplate/standard created", "rack/rack-01 created"]
        assert outputs[4].splitlines() == ["racktemplate/standard unchanged", "rack/rack-01 unchanged"]
        assert "Dependents:" in outputs[3] and "chassis/" in outputs[3]
        assert wait_until(lambda: http_json(url, "/nodes") == [], timeout=30)
    finally:
        stop(proc)


# -- Writing an app --------------------------------------------------------------------------------

class TestRetryLogging:
    def test_one_traceback_per_failure_streak_then_one_line_per_retry(self, tmp_path, caplog):
        sys.path.insert(0, str(ROOT))
        try:
            import fabrica
        finally:
            sys.path.remove(str(ROOT))
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            raise ValueError("disk 'd1' is missing")

        caplog.set_level("ERROR", logger="fabrica.controller")
        with app:
            uid = app.client.create("Widget", name="w1").uid
            queue = app.controllers["Widget"].queue
            assert wait_until(lambda: queue.num_requeues(("Widget", uid)) >= 4, timeout=30)
        failures = [r for r in caplog.records if "w1" in r.getMessage() and "raised" in r.getMessage()]
        assert len(failures) >= 3
        assert failures[0].exc_info is not None
        assert all(r.exc_info is None for r in failures[1:])
        assert re.search(r"raised again \(attempt 2, next in [0-9.e-]+s\): disk 'd1' is missing",
                         failures[1].getMessage()), failures[1].getMessage()


class TestWiringMistakes:
    def test_owns_a_kind_never_registered(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))
        app.register("Cluster", lambda ctx, obj: None, owns=["Nope"])
        with pytest.raises(fabrica.ConfigurationError, match="'Nope' is no registered kind"):
            app.start()

    def test_owns_without_a_reconcile(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"))
        app.register("Disk")
        app.register("VM", owns=["Disk"])
        with pytest.raises(fabrica.ConfigurationError, match="has none"):
            app.start()


# -- Issue 14, the rest: status, discovery, metrics, the clients, the table ------------------------

class TestFailureReasons:
    """Ready=False tells by its reason and message whether a retry comes, and when (SPEC §5.3)."""

    @staticmethod
    def app(tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        @app.register("Widget")
        def reconcile(ctx, obj):
            mode = obj.spec.get("mode")
            if mode == "permanent":
                raise fabrica.PermanentError("spec.size must be even")
            if mode == "temporary":
                raise fabrica.TemporaryError("controller busy", delay=3600)
            if mode == "error":
                raise ValueError("disk 'd1' is missing")
            obj.status["phase"] = "Done"
        return app

    @pytest.mark.parametrize("mode, reason, message", [
        ("permanent", "ReconcilePermanentError", r"spec\.size must be even; not retried until the object changes"),
        ("temporary", "ReconcileTemporaryError", r"controller busy; retrying in 3600s"),
        ("error", "ReconcileError", r"disk 'd1' is missing; retrying in [0-9.]+s"),
    ])
    def test_each_failure_has_its_reason_and_says_what_comes_next(self, tmp_path, mode, reason, message):
        app = self.app(tmp_path)
        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"mode": mode})
            ready = wait_until(lambda: c.get("Widget", "w1").condition("Ready"), timeout=30)
            assert (ready["status"], ready["reason"]) == ("False", reason)
            assert re.fullmatch(message, ready["message"]), ready["message"]

    @pytest.mark.parametrize("mode", ["permanent", "temporary", "error"])
    def test_the_first_successful_run_clears_each_of_them(self, tmp_path, mode):
        app = self.app(tmp_path)
        with app:
            c = app.client
            c.create("Widget", name="w1", spec={"mode": mode})
            assert wait_until(lambda: c.get("Widget", "w1").condition("Ready"), timeout=30)
            c.patch("Widget", "w1", {"mode": "ok"})
            assert wait_until(lambda: c.get("Widget", "w1").status.get("phase") == "Done", timeout=30)
            ready = c.get("Widget", "w1").condition("Ready")
            assert (ready["status"], ready["reason"]) == ("True", "ReconcileSuccess")

    def test_a_finalizer_that_fails_for_good_says_so(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)

        def refuse(ctx, obj):
            raise fabrica.PermanentError("cannot release")
        app.register("Lease", finalize=refuse)
        with app:
            app.client.create("Lease", name="l1")
            app.client.delete("Lease", "l1")
            ready = wait_until(lambda: app.client.get("Lease", "l1").condition("Ready"), timeout=30)
            assert ready["reason"] == "ReconcilePermanentError"
            assert ready["message"] == "cannot release; not retried until the object changes"


class TestRoot:
    """GET /: a browser gets the dashboard, a JSON client gets discovery (SPEC §6.1, §11)."""

    BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

    @pytest.fixture
    def app(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget")
        return app

    def test_a_browser_gets_the_dashboard(self, app):
        status, headers, body = call(app, "GET", "/", headers={"Accept": self.BROWSER})
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"EventSource" in body and "Accept" in headers["vary"]
        status, headers, _ = call(app, "GET", "/docs", headers={"Accept": self.BROWSER})
        assert status == 200 and headers["content-type"].startswith("text/html")

    @pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
    def test_a_json_client_gets_the_discovery_document(self, app, accept):
        status, headers, body = call(app, "GET", "/", headers={"Accept": accept} if accept else None)
        assert status == 200 and headers["content-type"].startswith("application/json")
        assert body == call(app, "GET", "/apis")[2]
        assert [k["kind"] for k in body["kinds"]] == ["Widget"]

    def test_the_openapi_document_describes_both_answers(self, app):
        get = call(app, "GET", "/openapi.json")[2]["paths"]["/"]["get"]
        assert set(get["responses"]["200"]["content"]) == {"application/json", "text/html"}


class TestWhatHasAController:
    """A kind with a reconcile or a finalize has a controller: discovery, /health and /metrics agree."""

    @pytest.fixture
    def app(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Plain")
        app.register("Tag", finalize=lambda ctx, obj: None)
        app.register("Rack", lambda ctx, obj: obj.set_condition("Ready", False, reason="Waiting"))
        return app

    def test_discovery_and_health_name_a_finalize_only_kind(self, app):
        with app:
            kinds = {k["kind"]: k["controller"] for k in call(app, "GET", "/apis")[2]["kinds"]}
            assert kinds == {"Plain": False, "Tag": True, "Rack": True}
            assert set(call(app, "GET", "/health")[2]["workers"]) == {"Tag", "Rack"}

    def test_objects_not_ready_counts_only_kinds_with_a_controller(self, app):
        with app:
            for kind in ("Plain", "Tag", "Rack"):
                app.client.create(kind, name="x1")
            assert app.wait_idle(30)
            text = call(app, "GET", "/metrics")[2].decode()
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                       if line.startswith("fabrica_objects_not_ready{"))
        assert samples == {'fabrica_objects_not_ready{kind="Rack"}': "1", 'fabrica_objects_not_ready{kind="Tag"}': "1"}
        help_line = next(line for line in text.splitlines() if line.startswith("# HELP fabrica_objects_not_ready "))
        assert "with a controller" in help_line
        assert 'fabrica_objects{kind="Plain"} 1' in text


class TestUtf8Requests:
    """Query parameters and headers are the UTF-8 text the client sent; bytes that are not UTF-8 are a 400."""

    @pytest.fixture
    def app(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Widget", history=True)
        with app:
            app.client.create("Widget", name="w1")
            yield app

    @pytest.mark.parametrize("path, value, expected", [
        ("/events?kind=%C3%BC", "'ü'", 404),                  # no such kind
        ("/events?since=%C3%BC", "'ü'", 400),                 # not an event id
        ("/widgets?labelSelector=%C3%BC%3D1", "ü", 400),      # not a label key
        ("/widgets?limit=%C3%BC", "'ü'", 400),
        ("/widgets/w1/events?limit=%C3%BC", "'ü'", 400),
    ])
    def test_a_non_ascii_parameter_comes_back_as_sent(self, app, path, value, expected):
        status, _, body = call(app, "GET", path)
        message = body["error"]
        assert status == expected, body
        assert value in message and "Ã" not in message, message

    def test_a_non_ascii_header_comes_back_as_sent(self, app):
        status, _, body = call(app, "DELETE", "/widgets/w1", headers={"If-Match": '"ü"'.encode().decode("latin-1")})
        message = body["error"]
        assert status == 412 and "ü" in message and "Ã" not in message, message

    @pytest.mark.parametrize("path, headers", [
        ("/events?kind=%FF", None),
        ("/widgets?name=%FF", None),
        ("/widgets/w1?force=%FF", None),
        ("/widgets/w%FF1", None),                             # Bottle would drop the byte and find w1
        ("/events", {"Last-Event-ID": "\xff"}),
    ])
    def test_bytes_that_are_not_utf8_are_a_bad_request(self, app, path, headers):
        method = "DELETE" if "force" in path else "GET"
        status, _, body = call(app, method, path, headers=headers)
        assert status == 400, body
        assert "not valid UTF-8" in body["error"]
        assert app.client.get("Widget", "w1").name == "w1"


@pytest.fixture(scope="module")
def owners_url(tmp_path_factory):
    """A server of kinds Owner and Part on a fresh data dir; its URL."""
    tmp = tmp_path_factory.mktemp("owners")
    (tmp / "owners.py").write_text('import fabrica\napp = fabrica.Fabrica()\napp.register("Owner")\n'
                                   'app.register("Part")\n')
    server = start([FABRICA_PY, "serve", tmp / "owners.py", "--data-dir", tmp / "data", "--port", "0", "--no-fsync"],
                   cwd=tmp)
    yield server.url
    stop(server)


class TestOwnerArgument:
    """``owner=`` takes the object or a ``(kind, ref)`` tuple on both clients; anything else is a clear TypeError."""

    @pytest.fixture(params=["app.client", "Client"])
    def client(self, request, tmp_path):
        if request.param == "Client":
            with fabrica.Client(request.getfixturevalue("owners_url")) as client:
                yield client
            return
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Owner")
        app.register("Part")
        with app:
            yield app.client

    def test_a_kind_and_ref_tuple_names_the_owner(self, client, request):
        suffix = request.node.callspec.id.replace(".", "").lower()
        owner = client.create("Owner", name=f"own-{suffix}")
        by_name = client.create("Part", name=f"p1-{suffix}", owner=("Owner", owner.name))
        by_uid = client.create("Part", name=f"p2-{suffix}", owner=("Owner", owner.uid))
        client.create("Part", name=f"p3-{suffix}")
        for part in (by_name, by_uid):
            assert part.owner_references[0]["uid"] == owner.uid and part.owner_references[0]["controller"]
        expected = [f"p1-{suffix}", f"p2-{suffix}"]
        assert [p.name for p in client.list("Part", owner=("Owner", owner.name))] == expected
        assert [p.name for p in client.list("Part", owner=owner)] == expected

    def test_a_missing_owner_is_a_conflict_on_create_and_not_found_on_list(self, client):
        with pytest.raises(fabrica.ConflictError, match="does not exist"):
            client.create("Part", name="orphan", owner=("Owner", "nobody"))
        with pytest.raises(fabrica.NotFoundError):
            client.list("Part", owner=("Owner", "nobody"))

    @pytest.mark.parametrize("owner", ["own1", ("Owner",), ["Owner", "own1"], {"name": "own1"}, 42])
    def test_anything_else_is_a_type_error_that_says_what_to_pass(self, client, owner):
        with pytest.raises(TypeError, match=r"owner must be an object .* or a \(kind, ref\) tuple"):
            client.create("Part", name="bad", owner=owner)
        with pytest.raises(TypeError, match=r"owner must be an object .* or a \(kind, ref\) tuple"):
            client.list("Part", owner=owner)


class TestTerminalOutput:
    """What the server holds reaches the terminal one field per line, without control characters."""

    FORGED = "Ok\nforged-row   fake-1a2b3c4d   Ready   1s\x1b[31m\x9b2J\u2028"

    @pytest.fixture
    def url(self, owners_url, request):
        with fabrica.Client(owners_url) as client:
            name = "term-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.split("_", 1)[1])[:40].strip("-")
            obj = client.create("Part", name=name, annotations={"note": "a\nName:         forged"},
                                spec={"text": "x\x9b2J\u2028y"})
            client.update_status("Part", obj.uid, {"phase": self.FORGED, "conditions": [
                {"type": "Ready", "status": "False", "reason": "Broken", "message": "m\x1b]0;title\x07\nREADY"}]})
        return owners_url, name

    @staticmethod
    def assert_clean(text):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), repr(text)
        assert "forged-row" not in [line.split(" ")[0] for line in text.splitlines()]

    @pytest.mark.parametrize("wide", [[], ["-o", "wide"]])
    def test_get_prints_one_row_per_object(self, url, wide):
        base, name = url
        res = cli(base, "get", "part", name, "-o", "table", *wide)
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        rows = res.stdout.splitlines()
        assert len(rows) == 2 and rows[1].startswith(name) and "\\n" in rows[1] and "\\x1b" in rows[1], rows

    def test_json_output_escapes_what_a_terminal_acts_on(self, url):
        base, name = url
        res = cli(base, "get", "part", name, "-o", "json")
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        assert json.loads(res.stdout)["status"]["phase"] == self.FORGED

    def test_describe_keeps_each_field_on_its_line(self, url):
        base, name = url
        res = cli(base, "describe", "part", name)
        assert res.returncode == 0, res.stderr
        self.assert_clean(res.stdout)
        assert [line for line in res.stdout.splitlines() if line.startswith("Name:")] == [f"Name:         {name}"]
        assert not any(line.startswith("READY") for line in res.stdout.splitlines())


###############################################################################
# README ######################################################################
###############################################################################

def code_block_after(heading: str) -> list[str]:
    section = README[README.index(heading):]
    block = section[section.index("```sh") + 5:]
    return block[:block.index("```")].strip().splitlines()


def test_readme_starts_with_the_two_commands():
    first = README[README.index("```sh") + 5:]
    lines = first[:first.index("```")].strip().splitlines()
    assert lines == ["python -m pip install . && python fabrica.py serve examples/rack_reconciliation.py",
                     "python -m pip install -q '.[test]' && python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci.splitlines(), ".ci/run must run the README's test command verbatim"


@pytest.mark.parametrize("way", ["file", "sqlite"])
def test_rack_walkthrough_runs_as_written(tmp_path, servers, way):
    store = []
    if way == "sqlite":     # the README's second way to serve, its flags as written
        argv = shlex.split(code_block_after("The second way to serve")[0])
        assert argv[:4] == ["python", "fabrica.py", "serve", "examples/rack_reconciliation.py"], argv
        store = argv[4:]
    server = servers(tmp_path / "data", EXAMPLES / "rack_reconciliation.py", "--no-fsync", *store, cwd=tmp_path)
    assert (tmp_path / "data" / "app.db").is_file() == bool(store)    # the README's URL, relative to the folder
    env = dict(os.environ, FABRICA_SERVER=server.url)

    def get(path):
        return server.ok("GET", path)
    try:
        lines = [ln for ln in code_block_after("## The rack example, step by step")
                 if ln.startswith("python fabrica.py") and "serve" not in ln]
        assert len(lines) >= 8
        for line in lines:
            argv = shlex.split(line)
            res = subprocess.run([sys.executable, str(ROOT / "fabrica.py"), *argv[2:]], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"{line}\n{res.stderr}"
            assert "Traceback" not in res.stderr
            if "rack create" in line:
                assert wait_until(lambda: get("/racks/rack-01")["status"].get("phase") == "Ready", timeout=30)
            if "patch standard" in line:
                assert wait_until(lambda: get("/racks/rack-01")["status"].get("totalChassis") == 3, timeout=30)
            if "rack delete" in line:
                assert wait_until(lambda: get("/nodes") == [], timeout=30)
        assert get("/chassis") == []
    finally:
        assert server.stop() == 0


VENV_TEST = pytest.mark.skipif(not os.environ.get("CI") and not os.environ.get("FABRICA_VENV_TEST"),
                               reason="installs into a fresh venv (network); runs in CI (.ci/run sets "
                                      "FABRICA_VENV_TEST=1) or with FABRICA_VENV_TEST=1")


def fresh_venv(path, *requirements):
    """A new venv at `path` with `requirements` installed the way the README does it; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = str(path / "bin" / "python")
    res = subprocess.run([python, "-m", "pip", "install", "-q", *requirements], cwd=ROOT, timeout=900,
                         capture_output=True, text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert res.returncode == 0, res.stdout + res.stderr
    return python


@VENV_TEST
def test_first_readme_command_in_a_fresh_venv(tmp_path):
    python = fresh_venv(tmp_path / "venv", str(ROOT))
    work = tmp_path / "work"
    work.mkdir()
    server = Server.serve(None, EXAMPLES / "rack_reconciliation.py", cwd=work, python=python).start(30)
    try:
        assert server.ok("GET", "/health")["status"] == "healthy"
        assert "Rack" in server.ok("GET", "/health")["kinds"]
        assert (work / "data" / ".fabrica" / "lock").exists(), "the rack example serves ./data"
        res = subprocess.run([python, "-c", "import fabrica, bottle; print(fabrica.__version__)"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert res.returncode == 0 and res.stdout.strip()
    finally:
        assert server.stop() == 0


@VENV_TEST
def test_test_extra_resolves_to_a_working_set_in_a_fresh_venv(tmp_path):
    """The second README command's install, resolved afresh (newest versions within the test extra's bounds):
    the resolved set is consistent, and the plugin-sensitive tests pass on it with deprecations as errors."""
    python = fresh_venv(tmp_path / "venv", ".[test]")
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    res = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *OPENAPI_TESTS,
                          "test_fabrica.py::test_readme_starts_with_the_two_commands"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]

def readme_paragraph(containing: str) -> str:
    """The README paragraph (or list item) that holds ``containing``, its whitespace made single spaces."""
    text = README
    blocks = [" ".join(b.split()) for b in re.split(r"\n\s*\n|\n(?=- )", text)]
    [block] = [b for b in blocks if containing in b]
    return block


class TestTheReadmeSaysWhatHappens:
    """The README's claims next to finalizers and paging match what the server does."""

    def test_a_deletion_timestamp_in_a_body_is_ignored(self, widgets):
        status, _, obj = call(widgets, "POST", "/widgets", {"metadata": {"name": "w1", "finalizers": ["x.io/keep"]},
                                                            "spec": {}})
        assert status == 201
        status, _, live = call(widgets, "PUT", "/widgets/w1",
                               {"metadata": {"deletionTimestamp": "2020-01-01T00:00:00Z"}})
        assert status == 200 and live == obj
        status, _, deleting = call(widgets, "DELETE", "/widgets/w1")
        assert status == 202 and deleting["metadata"]["deletionTimestamp"] is not None
        status, _, same = call(widgets, "PUT", "/widgets/w1", {"metadata": {"deletionTimestamp": None}})
        assert status == 200 and same == deleting
        paragraph = readme_paragraph("Finalizers follow Kubernetes")
        assert "cannot be cleared" not in paragraph
        assert 'a PUT of `{"metadata": {"deletionTimestamp": null}}` answers 200 and changes nothing' in paragraph
        assert "server-managed, never taken from a body" in readme_paragraph("`deletionTimestamp` are server-managed")

    def test_the_continue_token_is_opaque(self, widgets):
        for name in ("w1", "w2"):
            assert call(widgets, "POST", "/widgets", {"name": name})[0] == 201
        token = call(widgets, "GET", "/widgets?limit=1")[1]["x-continue"]
        assert token not in (fabrica.base64.urlsafe_b64encode(b"w1").decode().rstrip("="), "w1")
        bullet = readme_paragraph("The continue token")
        assert "opaque" in bullet and "base64" not in bullet


###############################################################################
# Benchmarks ##################################################################
###############################################################################

def test_quick_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-install",
         "--only", "overhead.get,controller.storm", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("measurement"))
    assert [c.strip() for c in header.split("|")] == ["measurement", "fabrica", "baseline", "ratio", "target", "met?"]
    assert "GET one resource [builtin" in proc.stdout
    assert "reconciles per 100 updates of one key" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick"
    assert doc["machine"]["python"] and doc["machine"]["cores"]
    rows = {row["id"]: row for row in doc["rows"]}
    get, storm = rows["overhead.builtin.get"], rows["controller.storm"]
    assert get["na"] is None, get["na"]
    assert get["fabrica"] > 0 and get["baseline"] > 0 and get["ratio"] > 0
    assert storm["na"] is None, storm["na"]
    assert storm["raw"]["fabrica_converged"] is True
    assert doc["table"] in proc.stdout


###############################################################################
# Layout ######################################################################
###############################################################################

def _upward_references(source: str) -> list[str]:
    """Where a section of ``source`` uses what a later section defines, as ``line: [section] name (later)``.

    Counted: a module-level name (outside annotations, which are strings
    here), and a method or property of a later section's class used on a
    receiver known to be one: ``app``/``self.app``/``self._app`` (a
    Fabrica), a parameter annotated with the class, or ``self.x`` that
    ``__init__`` sets from such a parameter.
    """
    lines = source.splitlines()
    banners = [(i + 1, m.group(1).strip()) for i, line in enumerate(lines)
               if (m := re.match(r"^# (.*?)#{4,}$", line))]

    def section(lineno):
        return max((k for k, (ln, _) in enumerate(banners) if ln <= lineno), default=-1)
    tree = ast.parse(source)
    defined, methods, class_sec = {}, {}, {}
    for node in tree.body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        for name in names:
            defined.setdefault(name, section(node.lineno))
        if isinstance(node, ast.ClassDef):
            class_sec[node.name] = section(node.lineno)
            methods[node.name] = {b.name for b in node.body if isinstance(b, ast.FunctionDef)}
    receivers = {"app": "Fabrica", "self.app": "Fabrica", "self._app": "Fabrica"}
    found = set()

    def annotated(args):
        out = {}
        for a in args.args + args.kwonlyargs:
            if a.annotation is not None:
                cls = ast.unparse(a.annotation).split("|")[0].strip().strip("'\"")
                if cls in class_sec:
                    out[a.arg] = cls
        return out

    def check(node, sec, typed, local):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in local:
                later = defined.get(sub.id, -1)
                if later > sec:
                    found.add(f"{sub.lineno}: [{banners[sec][1]}] {sub.id} ({banners[later][1]})")
            elif isinstance(sub, ast.Attribute):
                cls = typed.get(ast.unparse(sub.value)) or receivers.get(ast.unparse(sub.value))
                if cls in class_sec and class_sec[cls] > sec and sub.attr in methods[cls]:
                    found.add(f"{sub.lineno}: [{banners[sec][1]}] {ast.unparse(sub)} ({banners[class_sec[cls]][1]})")

    def visit(node, sec, typed, local):
        if isinstance(node, ast.FunctionDef):
            inner = set(local) | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            for sub in (s for stmt in node.body for s in ast.walk(stmt)):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    inner.add(sub.id)
                elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    inner.add(sub.name)
                elif isinstance(sub, ast.alias):
                    inner.add((sub.asname or sub.name).split(".")[0])
                elif isinstance(sub, ast.ExceptHandler) and sub.name:
                    inner.add(sub.name)
            for expr in node.args.defaults + [d for d in node.args.kw_defaults if d] + node.decorator_list:
                check(expr, sec, typed, local)
            typed = {**typed, **annotated(node.args)}
            for stmt in node.body:
                visit(stmt, sec, typed, inner)
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                check(base, sec, typed, local)
            typed = dict(typed)
            for init in (b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "__init__"):
                params = annotated(init.args)
                for sub in ast.walk(init):
                    if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Name) and sub.value.id in params:
                        typed.update({ast.unparse(t): params[sub.value.id] for t in sub.targets
                                      if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"})
            for stmt in node.body:
                visit(stmt, sec, typed, local)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                check(node.value, sec, typed, local)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit(child, sec, typed, local)
                else:
                    check(child, sec, typed, local)
    for node in tree.body:
        if not (isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):    # runs last
            visit(node, section(node.lineno), {}, frozenset())
    return sorted(found, key=lambda text: int(text.split(":")[0]))


class TestFileLayout:
    def test_no_section_uses_what_a_later_section_defines(self):
        assert _upward_references(FABRICA_PY.read_text(encoding="utf-8")) == []

    def test_the_check_sees_a_call_up_the_file(self):
        source = textwrap.dedent('''
            # First ####
            def first(app: Second):
                app.method()
                return later_name

            # Second ####
            class Second:
                def method(self):
                    pass

            later_name = 1
            ''')
        found = _upward_references(source)
        assert [text.split(": ", 1)[1] for text in found] == \
            ["[First] app.method (Second)", "[First] later_name (Second)"], found
