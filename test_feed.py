"""The store's change feed (SPEC §3.0, §4): Change, changes(since), expiry, watch, derived events.

Issue 12 items 1 and 2. These move into test_fabrica.py's Stores / Bus sections once it lands.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

import fabrica

WAIT = 10.0
READY = {"type": "Ready", "status": "True", "reason": "R", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}


def wait_until(predicate, timeout=WAIT):
    pause = threading.Event()
    deadline = fabrica.time.monotonic() + timeout
    while not predicate():
        if fabrica.time.monotonic() > deadline:
            return False
        pause.wait(0.005)
    return True


@pytest.fixture(params=["memory", "file"])
def store_kind(request):
    return request.param


@pytest.fixture
def make_store(tmp_path, store_kind):
    opened = []

    def make(**options):
        if store_kind == "memory":
            store = fabrica.MemoryStore(**options)
        else:
            store = fabrica.FileStore(str(tmp_path / "data"), durable=False, **options)
        store.open({"Rack": "racks"})
        opened.append(store)
        return store
    yield make
    for store in opened:
        store.close()


def rack(name, spec=None, **meta):
    obj = fabrica.new_object("Rack", name, f"rack-{abs(hash(name)) % (1 << 32):08x}", spec=spec or {})
    obj["metadata"].update(meta)
    return obj


def updated(obj, *, spec=None, status=None, labels=None, generation=None):
    new = fabrica.deepcopy_json(obj)
    meta = new["metadata"]
    if spec is not None:
        new["spec"] = spec
        meta["generation"] += 1
    if status is not None:
        new["status"] = status
    if labels is not None:
        meta["labels"] = labels
    meta["updatedAt"] = fabrica.utcnow()
    return new


def write_history(store):
    """create, spec, status (a condition), labels, delete: every kind of change."""
    a = store.create(rack("a", {"v": 1}))
    b = store.replace(updated(a, spec={"v": 2}), a["metadata"]["resourceVersion"])
    c = store.replace(updated(b, status={"conditions": [READY]}), b["metadata"]["resourceVersion"], "patched")
    d = store.replace(updated(c, labels={"env": "prod"}), c["metadata"]["resourceVersion"])
    store.delete("Rack", d["metadata"]["uid"], d["metadata"]["resourceVersion"])
    return store


class TestChange:
    def test_every_write_is_one_change_in_order(self, make_store):
        store = write_history(make_store())
        changes = list(store.changes(0))
        assert [c.action for c in changes] == ["created", "updated", "patched", "updated", "deleted"]
        assert [c.resource_version for c in changes] == list(range(1, 6))
        assert [c.update_type for c in changes] == ["spec", "spec", "status", "metadata", "spec"]
        assert all(c.kind == "Rack" and c.uid == changes[0].uid for c in changes)
        assert [c.object["metadata"]["resourceVersion"] for c in changes] == [str(rv) for rv in range(1, 6)]
        # the object after; for the delete, its last state carrying the delete's resourceVersion
        assert changes[2].object["status"]["conditions"] == [READY]
        assert changes[4].object["metadata"]["labels"] == {"env": "prod"}

    def test_previous_is_what_events_need_of_the_object_before(self, make_store):
        changes = list(write_history(make_store()).changes(0))
        assert changes[0].previous is None
        assert changes[1].previous == {"generation": 1, "metadata": {}, "conditions": {}}
        assert changes[2].previous == {"generation": 2, "metadata": {}, "conditions": {}}
        assert changes[3].previous == {"generation": 2, "metadata": {"labels": {}}, "conditions": {"Ready": "True"}}
        assert changes[4].previous == {"generation": 2, "metadata": {}, "conditions": {"Ready": "True"}}

    def test_a_change_is_json_and_rebuilds_from_a_row(self, make_store):
        for change in write_history(make_store()).changes(0):
            row = json.loads(json.dumps(list(change)))
            assert fabrica.Change(*row) == change
            assert fabrica.Change(*row).update_type == change.update_type

    def test_time_is_the_write_time_and_a_delete_records_its_own_once(self, make_store):
        store = write_history(make_store())
        changes = list(store.changes(0))
        for change in changes[:4]:
            assert change.time == change.object["metadata"]["updatedAt"]
        assert fabrica._is_time(changes[4].time) and changes[4].time >= changes[3].time
        assert [c.time for c in store.changes(0)] == [c.time for c in changes]   # read twice: the same

    def test_make_change_is_the_one_rule(self):
        old = rack("x")
        old["metadata"]["resourceVersion"] = "7"
        old["status"] = {"conditions": [READY, {"type": "Other", "status": "False"}, "junk", {"type": 5}]}
        new = updated(old, labels={"a": "b"})
        new["metadata"]["finalizers"] = ["f"]
        new["metadata"]["resourceVersion"] = "8"
        change = fabrica.Store.make_change("patched", old, new)
        assert change == (8, "patched", new, {"generation": 1, "metadata": {"labels": {}, "finalizers": []},
                                              "conditions": {"Ready": "True", "Other": "False"}},
                          new["metadata"]["updatedAt"])
        assert change.update_type == "metadata"


class TestChangesSince:
    def test_since_yields_the_changes_after_a_position(self, make_store):
        store = write_history(make_store())
        assert [c.resource_version for c in store.changes(2)] == [3, 4, 5]
        assert [c.resource_version for c in store.changes()] == [1, 2, 3, 4, 5]
        assert list(store.changes(5)) == [] and list(store.changes(99)) == []

    def test_a_feed_starts_empty_and_older_positions_are_expired(self, tmp_path):
        first = fabrica.FileStore(str(tmp_path / "data"), durable=False)
        first.open({"Rack": "racks"})
        write_history(first)
        first.close()
        again = fabrica.FileStore(str(tmp_path / "data"), durable=False)
        again.open({"Rack": "racks"})
        try:
            start = again.resource_version
            assert start >= 5 and list(again.changes(start)) == [] and list(again.changes()) == []
            with pytest.raises(fabrica.ExpiredError) as caught:
                again.changes(4)        # raised when called, not when first iterated
            assert isinstance(caught.value, fabrica.GoneError) and caught.value.status == 410
        finally:
            again.close()

    def test_the_feed_is_bounded_in_count(self, make_store):
        store = make_store(feed_size=3)
        obj = store.create(rack("a"))
        for n in range(9):
            obj = store.replace(updated(obj, spec={"n": n}), obj["metadata"]["resourceVersion"])
        assert store.retained()[0] == 3
        # the newest change let go of is kept aside, so a resume from its own position still works
        assert [c.resource_version for c in store.changes(6)] == [7, 8, 9, 10]
        with pytest.raises(fabrica.ExpiredError):
            store.changes(5)

    def test_the_feed_is_bounded_in_bytes(self, make_store):
        store = make_store(feed_bytes=100_000)
        obj = store.create(rack("a", {"pad": "x" * 20_000}))
        for n in range(20):
            obj = store.replace(updated(obj, spec={"pad": "x" * 20_000, "n": n}), obj["metadata"]["resourceVersion"])
        count, held = store.retained()
        assert 0 < held <= 100_000 and 0 < count < 10
        kept = list(store.changes(21 - count))
        assert [c.resource_version for c in kept] == list(range(22 - count, 22))
        assert held >= sum(fabrica.json_size(c.object) for c in kept)
        with pytest.raises(fabrica.ExpiredError):
            store.changes(1)

    def test_a_failed_write_records_no_change(self, make_store):
        store = make_store()
        obj = store.create(rack("a"))
        with pytest.raises(fabrica.StaleError):
            store.replace(updated(obj, spec={"v": 2}), "999")
        with pytest.raises(fabrica.ConflictError):
            store.create(rack("a"))
        assert [c.action for c in store.changes(0)] == ["created"]


class TestWatch:
    def test_listeners_hear_every_commit_in_order_until_closed(self, make_store):
        store = make_store()
        heard, other = [], []
        handle = store.watch(lambda change, size: heard.append((change, size)))
        store.watch(lambda change, size: other.append(change.resource_version))
        write_history(store)
        assert [c for c, _ in heard] == list(store.changes(0))
        assert all(size == fabrica.json_size(c.object) for c, size in heard)
        handle.close()
        handle.close()
        store.create(rack("b"))
        assert len(heard) == 5 and other == [1, 2, 3, 4, 5, 6]

    def test_a_raising_listener_never_fails_the_write(self, make_store, caplog):
        store = make_store()
        heard = []

        def broken(change, size):
            raise RuntimeError("listener broke")
        store.watch(broken)
        store.watch(lambda change, size: heard.append(change.resource_version))
        obj = store.create(rack("a"))
        assert store.get("Rack", obj["metadata"]["uid"]) is obj and heard == [1]
        assert "listener broke" in caplog.text


class TestDerivedEvents:
    def test_events_are_a_pure_function_of_the_change(self, make_store):
        store = write_history(make_store())
        for change in store.changes(0):
            first = fabrica.change_events(change, prefix="io.x", source="/s")
            assert first == fabrica.change_events(fabrica.Change(*json.loads(json.dumps(list(change)))),
                                                  prefix="io.x", source="/s")
        patched = list(store.changes(2))[0]
        resource, ready = fabrica.change_events(patched, prefix="io.x", source="/s")
        assert resource["id"] == "evt-3" and resource["sequence"] == "3" and resource["type"] == "io.x.rack.patched"
        assert resource["source"] == f"/s/resources/Rack/{patched.uid}" and resource["time"] == patched.time
        assert resource["data"]["updateType"] == "status" and resource["data"]["resource"] is patched.object
        assert ready["id"] == "evt-3.1" and ready["type"] == "io.x.condition.ready"
        assert ready["data"]["previousStatus"] == "Unknown" and ready["data"]["status"] == "True"
        deleted = list(store.changes(4))[0]
        assert [e["type"] for e in fabrica.change_events(deleted)] == ["io.fabrica.rack.deleted"]

    def test_two_readers_of_one_feed_derive_identical_events(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, event_source="/here")
        app.register("Rack")
        live = []
        with app:
            app.subscribe("**", live.append)
            c = app.client
            c.create("Rack", name="a", spec={"v": 1})
            c.update_status("Rack", "a", {"conditions": [READY]})
            c.delete("Rack", "a")
            assert wait_until(lambda: len(live) == 4)
            resumed = [event for _, event in app.bus.since((0, 0))]
            again = [event for _, event in app.bus.since((0, 0))]
            from_feed = [e for change in app.store.changes(0)
                         for e in fabrica.change_events(change, prefix="io.fabrica", source="/here")]
        assert live == resumed == again == from_feed
        assert [e["id"] for e in live] == [f"evt-{n}" for n in (1, 2)] + ["evt-2.1", "evt-3"]
        assert live[-1]["time"] == live[-1]["data"]["changeTime"]      # the delete's time, recorded once

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
        got, changes = [], []
        sub = bus.subscribe("io.db.**", got.append)
        watcher = bus.subscribe_changes(changes.append)
        try:
            obj = fabrica.new_object("Rack", "a", "rack-0000000a")
            obj["metadata"]["resourceVersion"] = "1"
            obj["status"] = {"conditions": [READY]}
            change = fabrica.Store.make_change("created", None, obj)
            feed.append(change)
            store._announce(change, fabrica.json_size(obj))
            assert wait_until(lambda: len(got) == 2 and len(changes) == 1)
            assert changes == [change] and got == fabrica.change_events(change, prefix="io.db")
            assert [p for p, _ in bus.since((0, 0))] == [(1, 0), (1, 1)]
            assert [p for p, _ in bus.since((1, 0))] == [(1, 1)]
            assert bus.recent("Rack", "rack-0000000a") == got
            with pytest.raises(fabrica.GoneError):
                bus.since((-1, 0))
        finally:
            sub.close(WAIT)
            watcher.close(WAIT)
            bus.detach()


class TestResume:
    def test_a_resume_sends_the_events_the_live_stream_sent(self, tmp_path):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False)
        app.register("Rack")
        with app:
            tap = app.bus.tap("**")
            app.client.create("Rack", name="a")
            app.client.update_status("Rack", "a", {"conditions": [READY]})
            app.client.delete("Rack", "a")
            live = [tap.get(WAIT) for _ in range(4)]
            tap.close()
            assert [p for p, _ in app.bus.since((1, 0))] == [(2, 0), (2, 1), (3, 0)]
            assert [e for _, e in app.bus.since((2, 0))] == live[2:]
            assert [e for _, e in app.bus.since((2, 1))] == live[3:]
            assert app.bus.since((3, 0)) == []
            assert app.bus.recent("Rack", live[0]["resourceuid"]) == live


class TestLoadPath:
    """Issue 12 item 6: the start-up load reads with one os.read, takes canonical files as they are
    and sorts the names once; what it serves is unchanged."""

    def test_names_are_in_order_after_a_load(self, tmp_path):
        store = fabrica.FileStore(str(tmp_path / "data"), durable=False)
        store.open({"Rack": "racks"})
        names = [f"r{n}" for n in (5, 3, 9, 1, 7, 2, 8, 4, 6, 0)]
        for i, name in enumerate(names):        # uids in the opposite order of the names
            store.create(fabrica.new_object("Rack", name, f"rack-{0xffff - i:08x}"))
        store.close()
        again = fabrica.FileStore(str(tmp_path / "data"), durable=False)
        again.open({"Rack": "racks"})
        try:
            assert [o["metadata"]["name"] for o in again.list("Rack")] == sorted(names)
            page, total, more = again.query("Rack", after="r3", limit=2)
            assert [o["metadata"]["name"] for o in page] == ["r4", "r5"] and total == 10 and more == "r5"
            again.create(fabrica.new_object("Rack", "r10", "rack-00000001"))
            assert [o["metadata"]["name"] for o in again.list("Rack")][:3] == ["r0", "r1", "r10"]
        finally:
            again.close()

    def test_a_file_missing_keys_is_normalised_and_a_canonical_one_kept(self, tmp_path):
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
