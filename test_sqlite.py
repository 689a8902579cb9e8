"""The SQLite store (issue 16): what only it has. The shared store, REST, controller and crash suites run
on it through the store fixture; until that fixture lands, the conformance and kill -9 classes are reused
here as they are."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import fabrica
import test_core
from test_core import FABRICA_PY, ROOT, EventLog, Server, StoreConformance, assert_error, call, wait_until


def sqlite_url(path) -> str:
    return f"sqlite:///{path}"          # an absolute path: sqlite:////abs/app.db


def sqlite_app(db, **options) -> fabrica.Fabrica:
    app = fabrica.Fabrica(database_url=sqlite_url(db), **options)
    app.register("Rack")
    app.register("Chassis")
    return app


class _SQLiteMaker:
    def __init__(self, path, durable):
        self.path, self.durable, self.opened = path, durable, []
        self.data_dir = path.parent

    def __call__(self):
        self.close()
        store = fabrica.SQLiteStore(str(self.path), durable=self.durable)
        store.open({"Rack": "racks", "Chassis": "chassis"})
        self.opened.append(store)
        return store

    def close(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "sqlite-nofsync"])
def store_factory(request, tmp_path):
    maker = _SQLiteMaker(tmp_path / "store" / "app.db", request.param == "sqlite")
    yield maker
    maker.close()


file_store_factory = store_factory      # the reopen test of the conformance class runs on it too


class TestSQLiteConformance(StoreConformance):
    def test_file_layout_is_one_pretty_json_per_resource(self):
        pytest.skip("the file store's layout")


class _SQLiteServer(Server):
    """``serve --database-url sqlite:///<data_dir>/app.db`` (the URL wins over --data-dir)."""

    def __init__(self, data_dir, *args):
        super().__init__(data_dir, "--database-url", sqlite_url(os.path.join(str(data_dir), "app.db")), *args)


class TestKill9OnSQLite(test_core.TestKill9):
    @pytest.fixture
    def servers(self):
        started = []

        def start(data_dir, *args):
            os.makedirs(data_dir, exist_ok=True)
            server = _SQLiteServer(data_dir, *args).start()
            started.append(server)
            return server
        yield start
        for server in started:
            server.kill()


def serve(*args, timeout=10):
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
        done = serve("--database-url", "file:x.db?_loc=auto")
        assert done.returncode == 2 and "unknown parameter '_loc'" in done.stderr, done.stderr


class TestOneProcessPerDatabase:
    def test_second_store_in_process_is_refused(self, tmp_path):
        first = fabrica.SQLiteStore(str(tmp_path / "app.db"))
        first.open({})
        try:
            with pytest.raises(fabrica.StoreLockedError, match=rf"\b{os.getpid()}\b"):
                fabrica.SQLiteStore(str(tmp_path / "app.db")).open({})
        finally:
            first.close()
        again = fabrica.SQLiteStore(str(tmp_path / "app.db"))
        again.open({})          # released on close
        again.close()

    def test_second_serve_exits_naming_the_holder(self, tmp_path):
        first = _SQLiteServer(tmp_path).start()
        try:
            assert first.request("POST", "/widgets", {"name": "w"})[0] == 201
            started = time.monotonic()
            second = serve("--database-url", sqlite_url(tmp_path / "app.db"))
            assert time.monotonic() - started < 2.0
            assert second.returncode != 0 and re.search(rf"\b{first.proc.pid}\b", second.stderr), second.stderr
            assert "Traceback" not in second.stderr
            assert first.request("GET", "/widgets/w")[0] == 200
        finally:
            first.kill()


def _fabrica_db(path, n=200):
    with sqlite_app(path) as app:
        for i in range(n):
            assert call(app, "POST", "/racks", {"name": f"r{i}", "text": "x" * 200})[0] == 201


class TestNotAFabricaDatabase:
    """A file start-up cannot use is one clear line (the reason and the fix), never a traceback, and untouched."""

    def _refused(self, db, *words):
        before = db.read_bytes()
        done = serve("--database-url", sqlite_url(db))
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


class TestChangeFeed:
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


class TestWrites:
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

            def candidates(conn, kind, selector, name):
                rows = real(conn, kind, selector, name)
                seen.append(len(rows))
                return rows
            monkeypatch.setattr(fabrica.SQLiteStore, "_candidates", staticmethod(candidates))
            status, _, items = call(app, "GET", "/racks?labelSelector=group%3Dg7,tier!%3D0")
            assert status == 200 and [o["metadata"]["name"] for o in items] == \
                [f"r{i:03d}" for i in range(70, 80) if i % 3]
            assert seen == [10]         # the 10 rows of group=g7, not the 300 of the kind

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
