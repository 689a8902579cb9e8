"""Bus (SPEC §4), controller (SPEC §2, §5.1-§5.4) and owners/garbage collection (§3.0, §5.5), end to end.

Every wait polls a condition with a timeout; gates are threading.Events that
the harness releases at teardown, so a failing test never hangs the run.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import threading
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from hypothesis import given, settings, strategies as st

import fabrica

WAIT = 10.0          # generous upper bound for anything that should happen "soon"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        pause.wait(interval)


class Recorder:
    """A bus handler that keeps every event it gets."""

    def __init__(self):
        self.events: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, event):
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= n, timeout)

    def types(self) -> list[str]:
        with self._cond:
            return [e["type"] for e in self.events]


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


class FakeClock:
    """An injected clock: time moves only when a test says so."""

    def __init__(self, now: float = 0.0):
        self._lock = threading.Lock()
        self.now = now

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Harness:
    """Makes apps on one data dir and gates; stops and releases everything at teardown."""

    def __init__(self, tmp_path: Path):
        self.data_dir = tmp_path / "data"
        self.apps: list[fabrica.Fabrica] = []
        self.gates: list[threading.Event] = []

    def app(self, **options) -> fabrica.Fabrica:
        options.setdefault("durable", False)
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
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def reconciled(app, kind, name) -> bool:
    """The controller has caught up with the object's current generation."""
    obj = app.client.get(kind, name)
    return obj.status.get("observedGeneration") == obj.generation


def condition(obj, type_):
    return fabrica.Resource(obj).condition(type_)


###############################################################################
# Bus (SPEC §4)
###############################################################################

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


###############################################################################
# Controller (SPEC §2, §5.1-§5.4)
###############################################################################

class TestController:

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



###############################################################################
# Owners and garbage collection (SPEC §3.0 recovery rules, §5.5)
###############################################################################

def rest(app, method: str, path: str, body=None) -> tuple[int, object]:
    """One in-process request through ``app.wsgi``: (status, JSON body or None)."""
    environ: dict = {}
    setup_testing_defaults(environ)
    raw = b"" if body is None else json.dumps(body).encode()
    environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
                    "wsgi.input": io.BytesIO(raw), "CONTENT_LENGTH": str(len(raw)),
                    "CONTENT_TYPE": "application/json"})
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status[:3])
    data = b"".join(app.wsgi(environ, start_response))
    return seen["status"], (json.loads(data) if data else None)


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

    def test_every_reference_is_stored_typed_and_validated(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            c = app.client
            a, b = c.create("Owner", name="a"), c.create("Leaf", name="b")
            refs = [{"kind": "Owner", "uid": a.uid, "controller": True}, {"kind": "Leaf", "uid": b.uid}]
            status, body = rest(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
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
                status, body = rest(app, "POST", "/dependents",
                                    {"metadata": {"name": "x", "ownerReferences": value}})
                assert status == 422, (case, body)
                assert body["details"][0]["field"].startswith("metadata.ownerReferences"), (case, body)
            c.delete("Leaf", "b")
            status, body = rest(app, "POST", "/dependents", {"metadata": {"name": "x", "ownerReferences": refs}})
            assert status == 409 and b.uid in body["error"], body      # every owner must exist
        app = h.app()
        gc_kinds(app)
        with app:                                        # kept on disk, and b is gone: a still holds it
            assert app.client.get("Dependent", "d")["metadata"]["ownerReferences"] == want

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
            status, d = rest(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
            assert status == 201, d
            leaf = c.create("Leaf", name="l", owner=d)
            c.delete("Owner", "a")
            assert app.wait_idle(WAIT)
            assert c.get("Dependent", "d").uid == d["metadata"]["uid"] and c.get("Leaf", "l").uid == leaf.uid
            c.delete("Owner", "b")
            assert c.list("Dependent") == [] and c.list("Leaf") == []
            assert wait_until(lambda: len(deleted_uids(rec)) >= 4)
            assert sorted(deleted_uids(rec)) == sorted([a.uid, b.uid, d["metadata"]["uid"], leaf.uid])

    def test_the_start_up_sweep_keeps_a_dependent_while_one_owner_lives(self, h):
        app = h.app()
        gc_kinds(app)
        with app:
            a, b = app.client.create("Owner", name="a"), app.client.create("Owner", name="b")
            refs = [{"kind": "Owner", "uid": a.uid, "controller": True}, {"kind": "Owner", "uid": b.uid}]
            status, d = rest(app, "POST", "/dependents", {"metadata": {"name": "d", "ownerReferences": refs}})
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
            assert rest(app, "POST", "/dependents", {"metadata": {"name": "d2", "ownerReferences": refs}})[0] == 201
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
            assert rest(app, "POST", "/kids", {"metadata": {"name": "k", "ownerReferences": refs}})[0] == 201
            assert app.wait_idle(WAIT)
            before = {n: calls.count(n) for n in ("p1", "p2", "p3")}
            c.update_status("Kid", "k", {"phase": "Up"})
            assert wait_until(lambda: calls.count("p1") > before["p1"] and calls.count("p2") > before["p2"])
            assert app.wait_idle(WAIT)
            assert calls.count("p3") == before["p3"]
