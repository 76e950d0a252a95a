"""Connections per process stay bounded however many locks its threads or greenlets hold or
wait for (issue #16): requests share a pool of ``consul_lock_max_connections`` connections,
and one watcher per process follows every held key and every waiter (over at most
WATCH_QUERIES folders, see tests/test_watch_folders.py).

Scenarios against a real dev agent: 150 tasks of a real `celery worker -P threads -c 150`
(and `-P gevent -c 150`) each holding a distinct lock; several locks of this process lost one
at a time behind their back; a key in a new folder while the watcher waits on a narrower
one; 50 waiters in this process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from celery_consul_lock import ConsulLock
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.settings import DEFAULT_MAX_CONNECTIONS
from celery_consul_lock.watch import WATCH_DELAY, WATCH_QUERIES, watched

from .servers import wait_for
from .test_gevent import GREEN_ENV, agent_connections
from .test_task import runs
from .workers import wait_results

#: What a worker process may have open to its agent besides the pool: the renewers' client
#: (one connection in use, two at most), the watcher's, the agent watch's probe. The
#: watcher's: one per folder it reads, at most WATCH_QUERIES. The 150 keys here are all under
#: locks/, read as that one folder once many are followed; but while the first come due
#: (a slow burst of acquires, on a loaded machine) two or three of their own folders may be
#: read apart for a moment. Measured: pool 16 + renewal 1 + watcher 3 + agent watch 1 = 21.
OTHERS = 2 + WATCH_QUERIES + 1
#: Within this of a key being deleted or freed behind its holder's back, the holder knows
#: (the old per-lock watchers' tests allowed 10 s; the watcher reads at most every 0.2 s).
LOSS_BOUND = 5.0


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid`` in KiB (``VmRSS`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def port_of(consul) -> int:
    return int(consul.address.rsplit(":", 1)[1])


def hold_150_distinct_locks(proj, worker, r, consul, seconds: float = 8.0) -> None:
    """150 tasks each holding a lock of its own for ``seconds``: the worker's connections to
    its agent stay within the pool's bound throughout (sampled from the first send to the
    last result, and while all 150 hold), and every task runs to its end holding its lock.

    The first runs alone until its lock is followed, as when a burst of acquires is slow (a
    loaded machine): the watcher then reads that lock's folder, and the others come in
    folders outside it (under gevent that made acquires fail, see test_watch_folders)."""
    port = port_of(consul)
    idle_rss = rss_kib(worker.pid)
    results = [proj.green_keyed.delay(0, seconds + 2)]
    wait_for(lambda: runs(r), 30, "the first run to start", procs=[worker])
    time.sleep(WATCH_DELAY + 0.5)  # not an assertion: its lock is followed, alone, by now
    results += [proj.green_keyed.delay(n, seconds) for n in range(1, 150)]
    peak, while_all_hold, held_rss = 0, [], 0
    deadline = time.monotonic() + 180
    while not all(x.ready() for x in results):
        worker.check_alive()
        assert time.monotonic() < deadline, "the 150 runs did not finish within 180 s"
        connections = agent_connections(worker.pid, port)
        peak = max(peak, connections)
        kinds = [x["kind"] for x in runs(r)]
        if kinds.count("start") == 150 and "end" not in kinds:
            while_all_hold.append(connections)
            held_rss = max(held_rss, rss_kib(worker.pid))
        time.sleep(0.2)  # not an assertion: the sampling rate
    bound = DEFAULT_MAX_CONNECTIONS + OTHERS
    per_lock = (held_rss - idle_rss) / 150 if held_rss else float("nan")
    print(
        f"150 locks: peak connections to the agent {peak} (bound {bound}); while all 150 held: {while_all_hold}; "
        f"worker RSS {idle_rss} KiB idle -> {held_rss} KiB with all held: {per_lock:.0f} KiB per held lock "
        f"(its task's thread or greenlet included)"
    )
    values = wait_results(results, 30)
    assert sorted(values) == list(range(150)), values
    ends = [x for x in runs(r) if x["kind"] == "end"]
    assert len(ends) == 150 and all(x["held"] for x in ends), [x for x in ends if not x["held"]]
    assert while_all_hold, "the 150 runs never all held their lock at once (the machine too slow?)"
    assert peak <= bound, (peak, while_all_hold)
    log = worker.log_text()
    assert " lost: " not in log and "refused" not in log.lower(), log[-3000:]


def test_150_threads_holding_distinct_locks_keep_connections_within_the_pool(proj, workers, r, consul):
    (worker,) = workers(1, pool="threads", concurrency=150, env=dict(GREEN_ENV))
    hold_150_distinct_locks(proj, worker, r, consul)


def test_150_greenlets_holding_distinct_locks_keep_connections_within_the_pool(proj, workers, r, consul):
    (worker,) = workers(1, pool="gevent", concurrency=150, env=dict(GREEN_ENV))
    hold_150_distinct_locks(proj, worker, r, consul)


def test_one_watcher_tells_only_the_holding_lost_behind_its_back(settings, consul):
    # Settings of this test's own: a pool, a session and a watcher of their own, so that the
    # connections they add can be counted (earlier tests' pools stay open in this process).
    settings = settings.replace(max_connections=3)
    before = agent_connections(os.getpid(), port_of(consul))
    folder = f"locks/shared-watch-{uuid.uuid4().hex[:8]}"
    locks = [ConsulLock(f"{folder}/{n}/.lock", settings=settings) for n in range(8)]
    for lock in locks:
        assert lock.acquire(blocking=False)
    try:
        # Followed from WATCH_DELAY on, all over one query of their common folder.
        wait_for(lambda: watched(settings) == (f"{folder}/",), 5 + WATCH_DELAY, "the watcher to read the locks' folder")
        added = agent_connections(os.getpid(), port_of(consul)) - before
        # One deleted, one freed by its own session's ID from elsewhere: each lost with its
        # reason, within the bound; the other six stay held.
        deleted_at = time.monotonic()
        consul.api(f"/v1/kv/{locks[2].key}", "DELETE")
        wait_for(locks[2].lost.is_set, LOSS_BOUND, "the deleted key's holding to be lost")
        deleted_after = time.monotonic() - deleted_at
        freed_at = time.monotonic()
        consul.api(f"/v1/kv/{locks[5].key}?release={locks[5].session_id}", "PUT", {})
        wait_for(locks[5].lost.is_set, LOSS_BOUND, "the freed key's holding to be lost")
        freed_after = time.monotonic() - freed_at
        assert locks[2].lost_reason == "the key was deleted"
        assert "freed behind our back" in (locks[5].lost_reason or "")
        others = [lock for n, lock in enumerate(locks) if n not in (2, 5)]
        time.sleep(1.0)  # not an assertion: a late false loss would show by now
        assert all(lock.held and not lock.lost.is_set() for lock in others), [lock.lost_reason for lock in others]
        print(f"lost {deleted_after:.2f} s after the delete, {freed_after:.2f} s after the free; {added} connections added")
        # For 8 held locks: a pooled connection (one request at a time here), the renewer's
        # and the watcher's one query of their folder (per-lock watchers made it 8 more).
        assert added <= 3, added
    finally:
        for lock in locks:
            lock.release()


def test_a_key_in_another_folder_gets_a_query_of_its_own_at_once(settings, consul):
    base = f"locks/widen-{uuid.uuid4().hex[:8]}"
    narrow = ConsulLock(f"{base}/a/deep/.lock", settings=settings)
    wide = ConsulLock(f"{base}/b/.lock", settings=settings)
    assert narrow.acquire(blocking=False)
    try:
        wait_for(lambda: watched(settings) == (f"{base}/a/deep/",), 5 + WATCH_DELAY, "the watcher to read the first folder")
        # A blocking query over {base}/a/deep/ is in progress, and nothing changes there: it
        # would answer after WATCH_WAIT (60 s). The new key's folder is outside it: once
        # followed, it is read by a query of its own (not the two as their common {base}/).
        assert wide.acquire(blocking=False)
        folders = (f"{base}/a/deep/", f"{base}/b/")
        wait_for(lambda: watched(settings) == folders, 5 + WATCH_DELAY, f"the watcher to read {folders}")
        consul.api(f"/v1/kv/{wide.key}", "DELETE")
        wait_for(wide.lost.is_set, LOSS_BOUND, "the key in the new folder to be seen deleted")
        assert wide.lost_reason == "the key was deleted" and narrow.held
    finally:
        narrow.release()
        wide.release()


def test_fifty_waiters_share_the_watcher_and_each_gets_its_key(settings, consul):
    """50 threads wait for 50 keys held by another session: they wait on the process's
    watcher, not in 50 blocking queries, and each gets its key once it is released."""
    settings = settings.replace(max_connections=4)  # a pool of this test's own, and small
    before = agent_connections(os.getpid(), port_of(consul))
    folder = f"locks/waiters-{uuid.uuid4().hex[:8]}"
    keys = [f"{folder}/{n}/.lock" for n in range(50)]
    other = ConsulClient(settings)
    sid = other.session_create("the other holder", ttl=30, lock_delay=2, checks=[])
    for key in keys:
        assert other.kv_lock(key, sid, b'{"name":"other"}', exists=False).acquired
    got: dict[str, float] = {}
    errors: list[BaseException] = []

    def wait(key: str) -> None:
        lock = ConsulLock(key, settings=settings)
        try:
            if lock.acquire(timeout=60):
                got[key] = time.monotonic()
                lock.release()
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(key,), daemon=True) for key in keys]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: watched(settings) == (f"{folder}/",), 10, "the waiters to be followed by the watcher")
        time.sleep(1.0)  # not an assertion: let every waiter reach its wait
        added = agent_connections(os.getpid(), port_of(consul)) - before
        print(f"50 waiters: {added} connections added (the other holder's client included)")
        released_at = time.monotonic()
        for key in keys:
            assert other.kv_release(key, sid, b"")
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert sorted(got) == sorted(keys), sorted(set(keys) - set(got))
        slowest = max(got.values()) - released_at
        print(f"the last waiter got its key {slowest:.2f} s after the releases began")
        assert slowest < LOSS_BOUND
        # The pool (4), the renewer's, the watcher's and the other holder's client (one
        # blocking query per waiter made it 50 more).
        assert added <= 4 + 3, added
    finally:
        other.session_destroy(sid)
        other.close()


def test_a_pool_lends_each_connection_to_one_request_at_a_time_and_many_callers_wait_their_turn(settings, consul):
    """40 threads, a pool of 2: every request is answered, the process never has more than 2
    of the pool's connections open, and every connection is given back."""
    settings = settings.replace(max_connections=2)
    client = ConsulClient(settings, connections=2)
    before = agent_connections(os.getpid(), port_of(consul))
    peak, answers, errors = 0, [], []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, agent_connections(os.getpid(), port_of(consul)) - before)
            time.sleep(0.01)

    def reader(n: int) -> None:
        try:
            for _ in range(20):
                answers.append(client.kv_get(f"locks/pool-{n}/.lock")[1])
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=reader, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join(5)
    assert not errors and len(answers) == 40 * 20, errors[:3]
    assert 1 <= peak <= 2, peak
    assert client.connections_in_use() == 0
    client.close()


def test_an_interrupted_blocking_query_ends_at_once_and_the_next_request_goes_through(settings, consul):
    client = ConsulClient(settings)
    index, _ = client.kv_get("locks/interrupt-me/.lock")
    ended: list[BaseException] = []

    def block() -> None:
        try:
            client.kv_get("locks/interrupt-me/.lock", index=max(index, 1), wait=30)
        except BaseException as exc:
            ended.append(exc)

    t = threading.Thread(target=block, daemon=True)
    t.start()
    time.sleep(0.5)  # not an assertion: let the query reach the agent
    interrupted_at = time.monotonic()
    client.interrupt()
    t.join(5)
    assert ended and "interrupted" in str(ended[0]) and time.monotonic() - interrupted_at < 2, ended
    client.resume()
    assert client.kv_get("locks/interrupt-me/.lock")[1] is None
    client.close()


def test_greenlets_waiting_for_a_held_key_are_woken_by_the_watcher_when_it_is_released(proj, workers, consul):
    """Under gevent a waiter is a greenlet: the watcher, a real thread, wakes it through its
    hub. Five `on_held="wait"` runs wait for a key this test holds; each runs once it is free."""
    (worker,) = workers(1, pool="gevent", concurrency=10, env=dict(GREEN_ENV))
    holder = ConsulLock("locks/proj.retrying/.lock", address=consul.address, lock_delay=1)
    assert holder.acquire()
    try:
        results = [proj.waiting.delay() for _ in range(5)]
        wait_for(
            lambda: worker.log_text().count("Task proj.waiting[") >= 5, 30, "the worker to receive the five runs", procs=[worker]
        )
        time.sleep(1.0)  # not an assertion: let every run reach its wait
        assert not any(x.ready() for x in results)
        released_at = time.monotonic()
        assert holder.release()
        assert wait_results(results, 30) == ["ran"] * 5
        took = time.monotonic() - released_at
        print(f"five waiting greenlets ran within {took:.2f} s of the release")
        assert took < LOSS_BOUND + 5  # each run holds the key a moment, then the next takes it
    finally:
        holder.release()
