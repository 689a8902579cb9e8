"""WorkQueue as a queue.Queue (SPEC §5.1): the stdlib API on client-go semantics, wake-ups, and a stress test."""
from __future__ import annotations

import itertools
import queue
import random
import sys
import threading
import time

import pytest

from fabrica import WorkQueue

WAIT = 10.0
NO_BUCKET = dict(qps=1e12, burst=10**9)  # bucket never delays: isolates the per-key backoff


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def K(i):
    return ("Widget", f"uid-{i}")


def wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.001)
    return True


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
