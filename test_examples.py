"""The examples (SPEC §8) and the behaviour they lean on: owners and garbage
collection (§5.5), finalizers and deletion (§5.6).

The rack example runs end to end against a real ``python fabrica.py serve``
subprocess on port 0, including SIGKILL in the middle of building a big tree
and a restart on the same data dir. Finalizer and garbage-collection tests run
in process. Every wait polls a condition with a timeout; the only fixed pauses
are the ones that pick a kill moment.
"""
from __future__ import annotations

import functools
import http.client
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

import fabrica

ROOT = Path(__file__).resolve().parent
FABRICA_PY = ROOT / "fabrica.py"
EXAMPLES = ROOT / "examples"
RACK_APP = EXAMPLES / "rack_reconciliation.py"
RACK_LABEL = "example.fabrica.io/rack"
WAIT = 15.0
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
PLURAL = {"Rack": "racks", "RackTemplate": "racktemplates", "Chassis": "chassis", "Blade": "blades",
          "Node": "nodes", "BMC": "bmcs"}
CHILD_KINDS = ("Chassis", "Blade", "Node", "BMC")


# -- helpers -------------------------------------------------------------------

def wait_until(predicate, timeout: float = WAIT, interval: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (the last value)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(interval)


def call(app, method: str, path: str, body=None, headers=None):
    """One in-process request through ``app.wsgi``: (status, lower-case headers, JSON or None)."""
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
        seen["headers"] = {k.lower(): v for k, v in response_headers}

    result = app.wsgi(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    assert b"Traceback" not in data, data
    return seen["status"], seen["headers"], (json.loads(data) if data else None)


class Recorder:
    """A bus handler keeping every event; ``flush`` proves earlier events were delivered."""

    def __init__(self):
        self.events: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, event):
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.events), timeout)

    def deleted(self, uid: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("action") == "deleted" and e.get("resourceuid") == uid]

    def flush(self, app, kind: str) -> None:
        """Create and delete a sentinel and wait for its event: every earlier event has arrived (FIFO)."""
        marker = app.client.create(kind)
        app.client.delete(kind, marker.uid)
        assert self.wait_for(lambda evs: any(e.get("resourceuid") == marker.uid for e in evs)), \
            "the sentinel event never arrived"


class Server:
    """``python fabrica.py serve ...`` as a subprocess on port 0; the port is read from its stderr log."""

    def __init__(self, data_dir, *args: str):
        self.data_dir = str(data_dir)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._conn: http.client.HTTPConnection | None = None

    def start(self, timeout: float = 15.0) -> Server:
        self.lines, self.port, self._conn = [], None, None
        found = threading.Event()
        cmd = [sys.executable, str(FABRICA_PY), "serve", *self.args, "--data-dir", self.data_dir, "--port", "0"]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")

        def pump(stream):
            for line in stream:
                self.lines.append(line)
                match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
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

    def request(self, method: str, path: str, body=None, headers=None):
        """One request on a kept-alive connection: (status, headers, JSON or None)."""
        headers = dict(headers or {})
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers.setdefault("Content-Type", "application/json")
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                res = self._conn.getresponse()
                data = res.read()
                break
            except (http.client.HTTPException, OSError):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        assert b"Traceback" not in data, data
        return res.status, res.headers, (json.loads(data) if data else None)

    def ok(self, method: str, path: str, body=None, expect=(200,)):
        status, _, value = self.request(method, path, body)
        assert status in expect, f"{method} {path} -> {status} {value}"
        return value

    def count(self, kind: str) -> int:
        """How many objects of a kind exist (X-Total-Count of a one-item page: cheap to poll)."""
        status, headers, _ = self.request("GET", f"/{PLURAL[kind]}?limit=1")
        assert status == 200
        return int(headers["X-Total-Count"])

    def kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


@pytest.fixture
def servers():
    """``servers(data_dir, *args)`` starts a server; every one still running is killed at teardown."""
    started: list[Server] = []

    def start(data_dir, *args):
        server = Server(data_dir, *args).start()
        started.append(server)
        return server
    yield start
    for server in started:
        server.kill()


# -- the rack example over HTTP -----------------------------------------------------

def template_body(name: str, chassis: int, blades: int, nodes: int, mode: str = "shared") -> dict:
    return {"name": name, "chassisCount": chassis,
            "chassisConfig": {"bladeCount": blades, "bladeConfig": {"nodeCount": nodes, "bmcMode": mode}}}


def rack_children(server: Server, kind: str, rack_uid: str) -> list[dict]:
    return server.ok("GET", f"/{PLURAL[kind]}?labelSelector={RACK_LABEL}={rack_uid}")


def wait_rack(server: Server, name: str, predicate, timeout: float = WAIT) -> dict:
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


@pytest.fixture(scope="class")
def rack_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("rack"), str(RACK_APP), "--no-fsync").start()
    yield server
    server.kill()


class TestRackExample:
    def test_shared_tree_scale_up_down_and_delete(self, rack_server):
        s = rack_server
        tmpl = s.ok("POST", "/racktemplates", template_body("standard", 2, 4, 2), expect=(201,))
        assert tmpl["spec"]["chassisConfig"]["bladeConfig"] == {"nodeCount": 2, "bmcMode": "shared"}
        rack = s.ok("POST", "/racks", {"name": "rack-01", "templateUID": "standard"}, expect=(201,))
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
        tmpl = s.ok("POST", "/racktemplates", template_body("by-uid", 1, 2, 3), expect=(201,))
        assert tmpl["metadata"]["uid"].startswith("rktmpl-")
        s.ok("POST", "/racks", {"name": "rack-uid", "templateUID": tmpl["metadata"]["uid"], "location": "dc1"},
             expect=(201,))
        rack = wait_rack(s, "rack-uid", ready_with(1))
        check_tree(s, rack, 1, 2, 3)

    def test_dedicated_bmcs_are_owned_by_nodes(self, rack_server):
        s = rack_server
        s.ok("POST", "/racktemplates", template_body("dedicated", 1, 2, 4, "dedicated"), expect=(201,))
        s.ok("POST", "/racks", {"name": "rack-ded", "templateUID": "dedicated"}, expect=(201,))
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
        s.ok("POST", "/racks", {"name": "rack-late", "templateUID": "late"}, expect=(201,))
        rack = wait_rack(s, "rack-late", lambda r: r["status"].get("phase") == "Error")
        ready = [c for c in rack["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "False" and ready[0]["reason"] == "TemplateNotFound", ready
        assert "late" in ready[0]["message"]
        assert not rack_children(s, "Chassis", rack["metadata"]["uid"])
        # creating the template re-queues the rack (watches), no rack write needed
        s.ok("POST", "/racktemplates", template_body("late", 2, 1, 1), expect=(201,))
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
        s.ok("POST", "/racktemplates", template_body("big", c, b, n), expect=(201,))
        rack = s.ok("POST", "/racks", {"name": "rack-big", "templateUID": "big"}, expect=(201,))
        assert wait_until(lambda: s.count(kind) >= at_least, interval=0.001), f"no {kind} appeared"
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
def make_app(tmp_path):
    """``make_app(setup)`` builds a started app; gates in ``make_app.gates`` are released at teardown."""
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
    def env(self, make_app):
        gate = threading.Event()
        make_app.gates.append(gate)
        fin = Finalizer(gate)
        rec = Recorder()

        def setup(app):
            app.register("Thing", finalize=fin.finalize, workers=3)    # several may block at once
            app.register("Widget")
            app.subscribe("io.fabrica.**", rec)
        app = make_app(setup)
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
        assert fin.entered.wait(WAIT)
        assert fin.calls[0][1:] == ("t1", True)     # finalize sees ctx.deleting
        status, _, got = call(app, "GET", "/things/t1")
        assert status == 200 and got["metadata"]["deletionTimestamp"] == stamp

        # no write can take the deletion back: deletionTimestamp is server-managed
        for body in ({"metadata": {"name": "t1", "deletionTimestamp": None}, "spec": {"size": 2}},
                     {"name": "t1", "size": 3, "deletionTimestamp": None}):
            status, _, _ = call(app, "PUT", "/things/t1", body)
            assert status in (200, 409, 422)
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
        assert app.wait_idle(WAIT)
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
        assert app.wait_idle(WAIT)
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
        assert app.wait_idle(WAIT)
        assert [o.name for o in app.client.list("Thing")] == []
        assert list((Path(app.data_dir) / "things").glob("*.json")) == []
        rec.flush(app, "Widget")
        assert len(rec.deleted(uid4)) == 1

    def test_only_finalize_runs_while_deleting(self, make_app):
        reconciled: list[str] = []
        gate = threading.Event()
        make_app.gates.append(gate)
        fin = Finalizer(gate)

        def setup(app):
            app.register("Both", lambda ctx, obj: reconciled.append(obj.name), finalize=fin.finalize)
        app = make_app(setup)
        app.client.create("Both", name="b1")
        assert app.wait_idle(WAIT) and reconciled == ["b1"]
        app.client.delete("Both", "b1")
        assert fin.entered.wait(WAIT)
        app.client.patch("Both", "b1", {"x": 1})            # a spec change while deleting: still no reconcile
        app.client.update_status("Both", "b1", {"phase": "Draining"})
        gate.set()
        assert wait_until(lambda: not app.client.list("Both"))
        assert app.wait_idle(WAIT)
        assert reconciled == ["b1"]

    def test_finalize_may_be_any_callable(self, make_app):
        def release(what, ctx, obj):
            raise RuntimeError(f"cannot release {what}")

        def setup(app):
            app.register("Lease", finalize=functools.partial(release, "the lease"))
        app = make_app(setup)
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
    def test_owner_references_and_cascade(self, make_app):
        rec = Recorder()

        def setup(app):
            plain_kinds("Owner", "Dependent", "Leaf", "Marker")(app)
            app.subscribe("io.fabrica.*.deleted", rec)
        app = make_app(setup)
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

    def test_deep_ownership_chain_is_collected(self, make_app):
        app = make_app(plain_kinds("Link"))
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

    def test_dependent_with_finalizer_waits_for_it(self, make_app):
        app = make_app(plain_kinds("Owner", "Dependent"))
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

    def test_no_child_for_an_owner_that_is_gone_or_going(self, make_app):
        app = make_app(plain_kinds("Owner", "Dependent"))
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

    def test_owns_requeues_the_owner_on_a_child_status_change(self, make_app):
        calls: dict[str, int] = {}
        lock = threading.Lock()

        def reconcile(ctx, obj):
            with lock:
                calls[obj.name] = calls.get(obj.name, 0) + 1

        def setup(app):
            app.register("Parent", reconcile, owns=["Kid"])
            app.register("Kid")
        app = make_app(setup)
        c = app.client
        p1, p2 = c.create("Parent", name="p1"), c.create("Parent", name="p2")
        c.create("Kid", name="k1", owner=p1)
        c.create("Kid", name="loose")
        assert app.wait_idle(WAIT)
        n1, n2 = calls["p1"], calls["p2"]
        c.update_status("Kid", "k1", {"phase": "Up"})
        assert wait_until(lambda: calls["p1"] > n1), calls
        c.update_status("Kid", "loose", {"phase": "Up"})      # owned by nobody: nobody is re-queued
        assert app.wait_idle(WAIT)
        assert calls["p2"] == n2
        n1 = calls["p1"]
        c.delete("Kid", "k1")
        assert wait_until(lambda: calls["p1"] > n1), calls

    def test_watches_requeue_what_the_map_function_returns(self, make_app):
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
        app = make_app(setup)
        c = app.client
        w1, w2 = c.create("Watcher", name="w1"), c.create("Watcher", name="w2")
        assert app.wait_idle(WAIT)
        before = dict(calls)
        c.create("Source", name="s1", spec={"target": "w1"})       # by name
        assert wait_until(lambda: calls["w1"] > before["w1"]), calls
        assert app.wait_idle(WAIT)
        assert calls["w2"] == before["w2"]
        assert isinstance(seen[0], fabrica.Resource) and seen[0].name == "s1"
        before = dict(calls)
        c.patch("Source", "s1", {"target": w2.uid})                 # by uid
        assert wait_until(lambda: calls["w2"] > before["w2"]), calls
        assert app.wait_idle(WAIT)
        assert calls["w1"] == before["w1"]
        before = dict(calls)
        c.update_status("Source", "s1", {"seen": True})            # any change of a watched kind counts
        assert wait_until(lambda: calls["w2"] > before["w2"]), calls


class TestOrphanSweep:
    def test_orphans_left_by_a_crash_are_deleted_at_start(self, make_app, tmp_path):
        data = tmp_path / "shared"
        setup = plain_kinds("Owner", "Dependent", "Leaf")
        app = make_app(setup, data_dir=data)
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
        app2 = make_app(setup2, data_dir=data)
        c2 = app2.client
        for kind, name in (("Dependent", "d1"), ("Leaf", "l1")):
            with pytest.raises(fabrica.NotFoundError):
                c2.get(kind, name)
        assert sorted(d.name for d in c2.list("Dependent")) == ["d2", "free"]
        assert c2.get("Dependent", "d2").uid == kept_dep.uid
        assert not (data / app2.kinds["Dependent"].plural / f"{dep.uid}.json").exists()
        assert not (data / app2.kinds["Leaf"].plural / f"{leaf.uid}.json").exists()
        assert rec.wait_for(lambda evs: {e["resourceuid"] for e in evs} >= {dep.uid, leaf.uid})

    def test_sweep_keeps_dependents_of_an_unregistered_owner_kind(self, make_app, tmp_path):
        data = tmp_path / "shared"
        app = make_app(plain_kinds("Owner", "Dependent"), data_dir=data)
        owner = app.client.create("Owner", name="o1")
        app.client.create("Dependent", name="d1", owner=owner)
        app.stop()
        app2 = make_app(plain_kinds("Dependent"), data_dir=data)     # served by an app without Owner
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
            assert app.wait_idle(WAIT)
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
            deadline = time.monotonic() + WAIT
            i = 0
            while sub.poll() is None and time.monotonic() < deadline:
                obj = s.ok("POST", "/widgets", {"name": f"w{i}", "n": i}, expect=(201,))
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
                              capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        names = {rv: name for name, rv in created.items()}
        assert done.stdout.splitlines() == [f"io.fabrica.widget.created {names[first + k]} rv={first + k}"
                                            for k in (1, 2)]
