from __future__ import annotations

import io
import itertools
import json
import random
import sys
import threading
import time
import wsgiref.util

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule)

import fabrica
from fabrica import WorkQueue

NO_BUCKET = dict(qps=1e12, burst=10**9)  # bucket never delays: isolates the per-key backoff


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    assert q.add_rate_limited(K(2)) == pytest.approx(0.005)   # per key
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
        deadline = time.monotonic() + 2
        while len(q._due_changed._waiters) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
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


# -- controller semantics through an app: finalizers (SPEC §5.6), Stalled (SPEC §5.3) ---------

WAIT = 10.0
HOLD = "example.com/hold"


def _wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.005)
    return True


def _call(app, method, path, body=None):
    """One in-process request through app.wsgi -> (status, decoded JSON or None)."""
    environ = {}
    wsgiref.util.setup_testing_defaults(environ)
    path_info, _, query = path.partition("?")
    raw = b"" if body is None else json.dumps(body).encode()
    environ.update(REQUEST_METHOD=method, PATH_INFO=path_info, QUERY_STRING=query, CONTENT_TYPE="application/json",
                   CONTENT_LENGTH=str(len(raw)), **{"wsgi.input": io.BytesIO(raw)})
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"] = int(status.split()[0])
    data = b"".join(app.wsgi(environ, start_response))
    return seen["status"], (json.loads(data) if data else None)


@pytest.fixture
def run_app(tmp_path):
    """run_app(register=None, **options) -> a started app on tmp_path/data; every app is stopped at teardown."""
    apps = []

    def run(register=None, **options):
        app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, **options)
        if register is not None:
            register(app)
        apps.append(app)
        return app.start()
    yield run
    for app in reversed(apps):
        app.stop(timeout=5)


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

    def _leave_deleting(self, run_app):
        """A first run whose finalize never succeeds: t-gone and t-held stay deleting; t-live stays live."""
        refused = set()

        def refuse(ctx, obj):
            refused.add(obj.name)
            raise fabrica.PermanentError("cannot release")
        app = run_app(lambda a: a.register("Thing", finalize=refuse))
        c = app.client
        c.create("Thing", name="t-gone")
        c.create("Thing", name="t-held", finalizers=[HOLD])
        c.create("Thing", name="t-live")
        for name in ("t-gone", "t-held"):
            assert c.delete("Thing", name).deleting
        assert _wait_until(lambda: refused == {"t-gone", "t-held"}) and app.wait_idle(WAIT)
        stamps = {name: c.get("Thing", name)["metadata"]["deletionTimestamp"] for name in ("t-gone", "t-held")}
        assert fabrica.FINALIZER in c.get("Thing", "t-gone").finalizers
        app.stop()
        return stamps

    @pytest.mark.parametrize("served", ["without finalize", "open server"])
    def test_restart_without_a_finalize_function_releases_its_finalizer(self, run_app, served):
        stamps = self._leave_deleting(run_app)
        if served == "open server":
            app = run_app(open=True)
        else:
            app = run_app(lambda a: a.register("Thing"))
        # t-gone waited only for fabrica's finalizer, which nothing handles now: deleted at start-up
        assert _call(app, "GET", "/things/t-gone")[0] == 404
        status, held = _call(app, "GET", "/things/t-held")
        assert status == 200 and held["metadata"]["finalizers"] == [HOLD]
        assert held["metadata"]["deletionTimestamp"] == stamps["t-held"]
        status, live = _call(app, "GET", "/things/t-live")
        assert status == 200 and live["metadata"]["finalizers"] == []
        assert _call(app, "DELETE", "/things/t-live")[0] == 200
        # the user's finalizer removed through PUT: the last one, so the object goes
        status, _ = _call(app, "PUT", "/things/t-held", {"metadata": {"finalizers": []}})
        assert status == 200 and _call(app, "GET", "/things/t-held")[0] == 404
        assert app.wait_idle(WAIT) and _call(app, "GET", "/things")[1] == []

    def test_a_kind_that_gains_finalize_puts_it_on_existing_objects(self, run_app):
        app = run_app(lambda a: a.register("Thing"))
        app.client.create("Thing", name="t1")
        app.client.create("Thing", name="t2", finalizers=[HOLD])
        assert app.client.delete("Thing", "t2").deleting
        app.stop()

        fin = FinalizeLog()
        app = run_app(lambda a: a.register("Thing", finalize=fin))
        assert app.client.get("Thing", "t1").finalizers == [fabrica.FINALIZER]
        # no new finalizer once deletion has begun (Kubernetes): t2 keeps only its own
        assert app.client.get("Thing", "t2").finalizers == [HOLD]
        status, obj = _call(app, "DELETE", "/things/t1")
        assert status == 202 and obj["metadata"]["deletionTimestamp"]
        assert _wait_until(lambda: _call(app, "GET", "/things/t1")[0] == 404)
        assert app.wait_idle(WAIT) and fin.calls == [("t1", True)]

    def test_delete_applies_the_kinds_rule_to_fabricas_finalizer(self, run_app):
        fin = FinalizeLog()

        def register(app):
            app.register("Thing", finalize=fin)
            app.register("Widget")
        app = run_app(register)
        store = app.store

        def smuggle(kind, name, finalizers):
            """Store finalizers past the write path, as an older version of a kind would have left them."""
            obj = app.client.get(kind, name)
            obj["metadata"]["finalizers"] = finalizers
            store.replace(dict(obj), obj.resource_version)

        app.client.create("Widget", name="w1")
        smuggle("Widget", "w1", [fabrica.FINALIZER])
        assert _call(app, "DELETE", "/widgets/w1")[0] == 200       # nothing handles it: not waited for
        app.client.create("Widget", name="w2")
        smuggle("Widget", "w2", [HOLD, fabrica.FINALIZER])
        status, obj = _call(app, "DELETE", "/widgets/w2")
        assert status == 202 and obj["metadata"]["finalizers"] == [HOLD]

        app.client.create("Thing", name="t1")
        smuggle("Thing", "t1", [])
        status, obj = _call(app, "DELETE", "/things/t1")         # finalize still runs
        assert status == 202 and obj["metadata"]["finalizers"] == [fabrica.FINALIZER]
        assert _wait_until(lambda: _call(app, "GET", "/things/t1")[0] == 404)
        assert fin.names() == ["t1"]

    def test_user_finalizers_follow_kubernetes(self, run_app):
        app = run_app(lambda a: a.register("Widget"))
        status, obj = _call(app, "POST", "/widgets", {"metadata": {"name": "w1", "finalizers": [
            "example.com/a", "example.com/b", fabrica.FINALIZER]}, "spec": {}})
        assert status == 201 and obj["metadata"]["finalizers"] == ["example.com/a", "example.com/b"]
        status, obj = _call(app, "DELETE", "/widgets/w1")
        assert status == 202
        stamp, rv = obj["metadata"]["deletionTimestamp"], obj["metadata"]["resourceVersion"]
        status, again = _call(app, "DELETE", "/widgets/w1")        # idempotent: nothing written
        assert status == 202 and again == obj

        for added in (["example.com/a", "example.com/b", "example.com/c"], ["example.com/a", fabrica.FINALIZER]):
            status, body = _call(app, "PUT", "/widgets/w1", {"metadata": {"finalizers": added}})
            assert status == 422 and body["details"][0]["field"] == "metadata.finalizers", body
        assert _call(app, "GET", "/widgets/w1")[1]["metadata"]["resourceVersion"] == rv

        status, obj = _call(app, "PUT", "/widgets/w1", {"metadata": {"finalizers": ["example.com/b"],
                                                                     "deletionTimestamp": None}})
        assert status == 200 and obj["metadata"]["finalizers"] == ["example.com/b"]
        assert obj["metadata"]["deletionTimestamp"] == stamp           # cannot be cleared
        current = app.client.get("Widget", "w1")
        current["metadata"]["finalizers"] = []
        app.client.update(current)
        assert _call(app, "GET", "/widgets/w1")[0] == 404

    def test_a_finalize_kind_keeps_its_finalizer_until_deletion(self, run_app):
        fin = FinalizeLog()
        app = run_app(lambda a: a.register("Thing", finalize=fin))
        app.client.create("Thing", name="t1", finalizers=[HOLD])
        status, obj = _call(app, "PUT", "/things/t1", {"metadata": {"finalizers": []}, "spec": {"a": 1}})
        assert status == 200 and obj["metadata"]["finalizers"] == [fabrica.FINALIZER], obj
        assert _call(app, "DELETE", "/things/t1")[0] == 202
        assert _wait_until(lambda: _call(app, "GET", "/things/t1")[0] == 404) and fin.names() == ["t1"]

    def test_a_finalize_that_succeeds_clears_its_recorded_failure(self, run_app):
        fin = FinalizeLog(RuntimeError("lease busy"))
        app = run_app(lambda a: a.register("Thing", finalize=fin))
        app.client.create("Thing", name="t1", finalizers=[HOLD])
        app.client.delete("Thing", "t1")
        assert _wait_until(lambda: app.client.get("Thing", "t1").finalizers == [HOLD]) and app.wait_idle(WAIT)
        obj = app.client.get("Thing", "t1")
        assert fin.names() == ["t1", "t1"] and obj.deleting
        ready = obj.condition("Ready")
        assert ready is not None and ready["status"] == "True" and ready["reason"] == "ReconcileSuccess", obj.status


class TestStalledClears:
    """Stalled=True from a run that overran ``timeout`` goes with the next run that completes in time."""

    @pytest.mark.parametrize("recorded", ["while the run hangs", "after the run returned"])
    def test_stalled_is_removed_even_when_the_late_run_changed_nothing(self, run_app, monkeypatch, recorded):
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
        app = run_app(lambda a: a.register("Widget", reconcile, timeout=0.4), clock=clock)
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
