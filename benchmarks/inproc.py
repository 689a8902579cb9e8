"""In-process measurements for benchmarks/run.py; each mode prints one JSON line.

    python benchmarks/inproc.py MODE --dir D [options]

Modes:
  bare-writes   durable creates/s of a bare loop (temp+fsync+replace+dir fsync) with C threads;
                --variant per_write (the baseline), locked (one global lock held across the
                fsyncs, as fabrica's store does) or group (a group-commit prototype)
  store-writes  fabrica's store in process: app.client.create from C threads (no HTTP);
                --database-url URL for another store than the file store
  sqlite-bare-writes  durable inserts/s of a bare sqlite3 loop with C threads, each committing one
                row per transaction (WAL, synchronous=FULL, a busy timeout: fabrica's settings)
  controller    no-op reconciles/s with W workers vs a bare queue.Queue baseline
  ready         create->Ready latency under a background write load vs the baseline
  storm         reconciles per 100 updates of one key vs the baseline
  parse         read and json-parse every file of a data dir (start-up and memory baseline)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import fabrica  # noqa: E402
import seed  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values, p):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def wait_for(predicate, timeout: float, step: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# -- durable writes ----------------------------------------------------------------

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory, payload, sync=True):
    tmp = os.path.join(directory, f".tmp-{os.urandom(6).hex()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def per_write(directory, name, payload):
    """fabrica's recipe, one writer at a time per call: temp, fsync, replace, dir fsync."""
    tmp = _write_temp(directory, payload)
    os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)


class Locked:
    """The same recipe under one global lock held across both fsyncs (what FileStore does today)."""

    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, directory, name, payload):
        with self.lock:
            per_write(directory, name, payload)


class GroupCommit:
    """Group commit of the directory fsync (the prototype for FileStore).

    Each writer writes and fsyncs its own temp file with no lock held (the
    kernel's journal merges concurrent fsyncs), renames it, then waits for a
    directory fsync that *started after* its rename: the first waiter becomes
    the leader and fsyncs the directory once for every rename made so far;
    the others wait for it. One writer alone pays exactly what per_write
    pays; N concurrent writers share one directory fsync.
    """

    def __init__(self):
        self.cond = threading.Condition(threading.Lock())
        self.renamed = 0        # renames done (a counter, so each writer knows its ticket)
        self.synced = 0         # every rename with ticket <= synced is durable
        self.leader = False

    def __call__(self, directory, name, payload):
        tmp = _write_temp(directory, payload)
        with self.cond:
            os.replace(tmp, os.path.join(directory, name))
            self.renamed += 1
            ticket = self.renamed
            while self.synced < ticket:
                if self.leader:
                    self.cond.wait()
                    continue
                self.leader, upto = True, self.renamed
                self.cond.release()
                try:
                    _fsync_dir(directory)
                finally:
                    self.cond.acquire()
                    self.leader = False
                    self.synced = max(self.synced, upto)
                    self.cond.notify_all()


def timed_writes(args, make_writer, lead: float = 0.02) -> dict:
    """``args.conc`` threads write from a common start for ``args.duration`` s (or ``args.max_writes`` each).

    ``make_writer(t)`` runs in thread ``t`` before the start and returns ``(write, close)``: ``write(i)`` does the
    thread's i-th write; ``close()`` (or None) runs after its last. Returns writes/s, writes and seconds.
    """
    counts = [0] * args.conc
    start_at = time.perf_counter() + lead
    stop_at = start_at + args.duration

    def worker(t):
        write, close = make_writer(t)
        i = 0
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while time.perf_counter() < stop_at and i < args.max_writes:
            write(i)
            i += 1
        counts[t] = i
        if close is not None:
            close()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_at
    return {"writes_per_s": sum(counts) / elapsed, "writes": sum(counts), "seconds": elapsed}


def bare_writes(args) -> dict:
    directory = os.path.join(args.dir, "items")
    os.makedirs(directory, exist_ok=True)
    payload = fabrica._file_bytes(seed.make_object("Item", "item", 7))
    fn = {"per_write": per_write, "locked": Locked(), "group": GroupCommit()}[args.variant]
    return timed_writes(args, lambda t: (lambda i: fn(directory, f"item-{t:02x}{i:06x}.json", payload), None))


def store_writes(args) -> dict:
    app = fabrica.Fabrica(data_dir=args.dir, database_url=args.database_url)
    app.register("Item")
    app.start()
    try:
        return timed_writes(args, lambda t: (
            lambda i: app.client.create("Item", spec={"color": "red", "size": i}), None))
    finally:
        app.stop()


def sqlite_bare_writes(args) -> dict:
    """One row per transaction, one connection per thread: the physical limit of one commit per write."""
    import sqlite3
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "bare.db")
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, uid TEXT UNIQUE, doc TEXT)")
    setup.close()
    doc = json.dumps(seed.make_object("Item", "item", 7), separators=(",", ":"))

    def writer(t):
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")

        def write(i):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO items (uid, doc) VALUES (?, ?)", (f"item-{t:02x}{i:06x}", doc))
            conn.execute("COMMIT")
        return write, conn.close
    return timed_writes(args, writer, lead=0.05)


# -- controller --------------------------------------------------------------------

def _noop(ctx, obj):
    return None


class BareController:
    """The baseline of issue 3: a bare queue.Queue and W threads doing the same store read and status write."""

    def __init__(self, store, kind, reconcile, workers):
        self.store, self.kind, self.reconcile = store, kind, reconcile
        self.q = queue.Queue()
        self.count = 0
        self.on_ready = None
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def _run(self):
        store, kind = self.store, self.kind
        while True:
            uid = self.q.get()
            if uid is None:
                self.q.task_done()
                return
            try:
                stored = store.get(kind, uid)
                if stored is not None:
                    obj = fabrica.Resource(fabrica.deepcopy_json(stored))
                    self.reconcile(None, obj)
                    obj.status["observedGeneration"] = stored["metadata"]["generation"]
                    if obj.status != stored["status"]:
                        new = fabrica.deepcopy_json(stored)
                        new["status"] = fabrica.deepcopy_json(obj.status)
                        new["metadata"]["updatedAt"] = fabrica.utcnow()
                        try:
                            store.replace(new, stored["metadata"]["resourceVersion"])
                        except fabrica.ConflictError:
                            self.q.put(uid)       # re-read and retry, as a controller would
                    if self.on_ready is not None:
                        self.on_ready(uid)
                self.count += 1
            finally:
                self.q.task_done()

    def stop(self):
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join(10)


def controller(args) -> dict:
    """No-op reconciles/s: fabrica's controller vs the bare baseline, alternating passes over N objects."""
    app = fabrica.Fabrica(data_dir=args.dir)
    app.register("Item", _noop, workers=args.workers, resync=0)
    t0 = time.perf_counter()
    app.start()
    ctl = app.controllers["Item"]
    n = app.store.count("Item")
    uids = [o["metadata"]["uid"] for o in app.store.list("Item")]
    out = {"objects": n, "workers": args.workers}
    try:
        if not wait_for(lambda: ctl.reconciles >= n, 120):
            raise SystemExit("start-up reconciles did not finish")
        out["startup_pass_s"] = time.perf_counter() - t0
        app.wait_idle(30)
        bare = BareController(app.store, "Item", _noop, args.workers)
        fab_t, bare_t = [], []
        for _ in range(args.passes):
            before = ctl.reconciles
            t = time.perf_counter()
            ctl.resync("bench")
            if not wait_for(lambda: ctl.reconciles >= before + n, 120):
                raise SystemExit("a resync pass did not finish")
            fab_t.append(time.perf_counter() - t)
            app.wait_idle(30)
            t = time.perf_counter()
            for uid in uids:
                bare.q.put(uid)
            bare.q.join()
            bare_t.append(time.perf_counter() - t)
        bare.stop()
        out.update(fabrica_pass_s=fab_t, baseline_pass_s=bare_t,
                   fabrica_per_s=n / median(fab_t), baseline_per_s=n / median(bare_t))
    finally:
        app.stop()
    return out


def _set_ready(ctx, obj):
    obj.set_condition("Ready", True, reason="Reconciled")


def _background_writer(write_one, stop: threading.Event, counter: list):
    i = 0
    while not stop.is_set() and i < 100000:
        write_one(i)
        i += 1
    counter.append(i)


def ready(args) -> dict:
    """create->Ready latency under a background write load (a second writer thread updating other objects)."""
    out = {}
    # fabrica: the controller sets Ready; we observe the committed condition event.
    fdir, bdir = os.path.join(args.dir, "fabrica"), os.path.join(args.dir, "baseline")
    app = fabrica.Fabrica(data_dir=fdir)
    app.register("Item", _set_ready, workers=1, resync=0)
    app.register("Load")
    app.start()
    ready_at, cond = {}, threading.Condition()

    def on_ready(event):
        if event.get("data", {}).get("status") == "True":
            with cond:
                ready_at[event["data"]["resourceUID"]] = time.perf_counter()
                cond.notify_all()
    app.subscribe(f"{app.event_prefix}.condition.ready", on_ready)
    loads = [app.client.create("Load", name=f"load-{i}", spec={"n": 0}).uid for i in range(8)]
    stop, wrote = threading.Event(), []
    bg = threading.Thread(target=_background_writer, daemon=True, args=(
        lambda i: app.client.patch("Load", loads[i % len(loads)], {"n": i}), stop, wrote))
    lat = []
    try:
        bg.start()
        t_load = time.perf_counter()
        for k in range(args.count):
            t0 = time.perf_counter()
            uid = app.client.create("Item", spec={"k": k}).uid
            with cond:
                if not cond.wait_for(lambda: uid in ready_at, 30):
                    raise SystemExit(f"{uid} never became Ready")
            lat.append(ready_at[uid] - t0)
        stop.set()
        bg.join(30)
        out["fabrica_background_writes_per_s"] = wrote[0] / (time.perf_counter() - t_load) if wrote else None
    finally:
        stop.set()
        app.stop()
    out["fabrica_ms"] = [x * 1000 for x in lat]
    # baseline: the same FileStore, a bare queue.Queue and one thread doing the same read + status write.
    store = fabrica.FileStore(bdir)
    store.open({"Item": "items", "Load": "loads"})
    bare = BareController(store, "Item", _set_ready, 1)
    ready_b, cond_b = {}, threading.Condition()

    def mark(uid):
        with cond_b:
            ready_b[uid] = time.perf_counter()
            cond_b.notify_all()
    bare.on_ready = mark
    for i in range(8):
        store.create(fabrica.new_object("Load", f"load-{i}", f"load-{i:08x}", spec={"n": 0}))

    def bg_write(i):
        uid = f"load-{i % 8:08x}"
        cur = store.get("Load", uid)
        new = fabrica.deepcopy_json(cur)
        new["spec"]["n"] = i
        new["metadata"]["generation"] += 1
        new["metadata"]["updatedAt"] = fabrica.utcnow()
        store.replace(new, cur["metadata"]["resourceVersion"])
    stop, wrote = threading.Event(), []
    bg = threading.Thread(target=_background_writer, daemon=True, args=(bg_write, stop, wrote))
    lat = []
    try:
        bg.start()
        t_load = time.perf_counter()
        for k in range(args.count):
            t0 = time.perf_counter()
            uid = f"item-{k:08x}"
            store.create(fabrica.new_object("Item", uid, uid, spec={"k": k}))
            bare.q.put(uid)
            with cond_b:
                if not cond_b.wait_for(lambda: uid in ready_b, 30):
                    raise SystemExit(f"baseline {uid} never became Ready")
            lat.append(ready_b[uid] - t0)
        stop.set()
        bg.join(30)
        out["baseline_background_writes_per_s"] = wrote[0] / (time.perf_counter() - t_load) if wrote else None
    finally:
        stop.set()
        bare.stop()
        store.close()
    out["baseline_ms"] = [x * 1000 for x in lat]
    for side in ("fabrica", "baseline"):
        out[f"{side}_p50_ms"] = pct(out[f"{side}_ms"], 50)
        out[f"{side}_p99_ms"] = pct(out[f"{side}_ms"], 99)
        del out[f"{side}_ms"]
    return out


def storm(args) -> dict:
    """100 spec updates of one key as fast as one client can write them: how many reconciles run?"""
    app = fabrica.Fabrica(data_dir=os.path.join(args.dir, "fabrica"))
    app.register("Item", _set_ready, workers=1, resync=0)
    app.start()
    out = {"updates": args.updates}
    try:
        obj = app.client.create("Item", name="storm", spec={"n": 0})
        app.wait_idle(30)
        ctl = app.controllers["Item"]
        before = ctl.reconciles
        t0 = time.perf_counter()
        for i in range(1, args.updates + 1):
            app.client.patch("Item", "storm", {"n": i})
        out["fabrica_update_s"] = time.perf_counter() - t0
        if not app.wait_idle(60):
            raise SystemExit("the controller did not settle")
        out["fabrica_reconciles"] = ctl.reconciles - before
        final = app.client.get("Item", "storm")
        out["fabrica_converged"] = (final.status.get("observedGeneration") == final.generation
                                    and final.spec["n"] == args.updates)
        del obj
    finally:
        app.stop()
    # baseline: a queue.Queue gets one key per update event (no de-duplication), same read + status write.
    store = fabrica.FileStore(os.path.join(args.dir, "baseline"))
    store.open({"Item": "items"})
    bare = BareController(store, "Item", _set_ready, 1)
    try:
        uid = "item-00000001"
        store.create(fabrica.new_object("Item", "storm", uid, spec={"n": 0}))
        bare.q.put(uid)
        bare.q.join()
        before = bare.count
        for i in range(1, args.updates + 1):
            while True:
                cur = store.get("Item", uid)
                new = fabrica.deepcopy_json(cur)
                new["spec"]["n"] = i
                new["metadata"]["generation"] += 1
                try:
                    store.replace(new, cur["metadata"]["resourceVersion"])
                    break
                except fabrica.ConflictError:
                    continue
            bare.q.put(uid)
        bare.q.join()
        out["baseline_reconciles"] = bare.count - before
    finally:
        bare.stop()
        store.close()
    return out


def parse(args) -> dict:
    before = rss_bytes()
    t0 = time.perf_counter()
    data = seed.read_all(Path(args.dir))
    seconds = time.perf_counter() - t0
    return {"objects": len(data), "seconds": seconds, "rss_delta_bytes": rss_bytes() - before}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("bare-writes", "store-writes", "sqlite-bare-writes", "controller", "ready",
                                    "storm", "parse"))
    p.add_argument("--dir", required=True)
    p.add_argument("--conc", type=int, default=1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--max-writes", type=int, default=200000)
    p.add_argument("--variant", default="per_write", choices=("per_write", "locked", "group"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--database-url", default=None)
    args = p.parse_args()
    import logging
    logging.basicConfig(level=logging.ERROR)
    fn = {"bare-writes": bare_writes, "store-writes": store_writes, "sqlite-bare-writes": sqlite_bare_writes,
          "controller": controller, "ready": ready,
          "storm": storm, "parse": parse}[args.mode]
    print(json.dumps(fn(args)))


if __name__ == "__main__":
    main()
