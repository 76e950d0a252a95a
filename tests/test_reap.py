"""Reaping (celery_consul_lock.reap) against a real Consul dev agent, real `consul lock`
holders and real workers: free lock keys leave KV after their keep time, never while held,
without a waiter missing a release; the fencing token keeps growing across a removed key;
the beat leader's sweep cleans the state of removed entries and keeps cron marks."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_consul_lock import ConsulLock, ConsulSemaphore, ConsulSettings, reap
from celery_consul_lock.consul import LOCK_FLAG, ConsulClient, kv_set
from celery_consul_lock.reap import CLOCK_KEY, CLOCK_SAMPLES, EntryCleanup, IndexClock, sweep
from celery_consul_lock.testing import spawn, start_beat
from celery_consul_lock.ticks import MARKS_PREFIX

from .servers import ROOT, ConsulAgent, start_consul, wait_for
from .test_command import consul_lock_cmd
from .test_gevent import GREEN_ENV
from .test_interop import _consul_bin, _kv
from .test_semaphore import cli
from .test_task import runs
from .workers import wait_results, worker_env


@pytest.fixture
def prefix() -> str:
    """This test's own key prefix: every key it counts is under it."""
    return f"reap-{uuid.uuid4().hex[:8]}/"


def _settings(consul: ConsulAgent, prefix: str, reap_after: float, **kw) -> ConsulSettings:
    return ConsulSettings(address=consul.address, lock_delay=2.0, key_prefix=prefix, reap_after=reap_after, **kw)


def _keys(consul: ConsulAgent, prefix: str) -> list[str]:
    try:
        return consul.api(f"/v1/kv/{prefix}?keys") or []
    except urllib.error.HTTPError as exc:  # 404: no key under the prefix
        if exc.code == 404:
            return []
        raise


def _value(consul: ConsulAgent, key: str) -> dict:
    return json.loads(base64.b64decode(_kv(consul, key)["Value"]))


# -- the keep time, the release record, the fencing token ---------------------------------------


def test_a_released_key_keeps_its_record_for_its_keep_time_then_leaves_and_its_token_keeps_growing(consul, prefix):
    settings = _settings(consul, prefix, reap_after=1.0)
    lock = ConsulLock("locks/a/.lock", settings=settings, value={"task_id": "t-1"})
    long = ConsulLock("locks/b/.lock", settings=settings, keep_released=4.0)  # a task's lock_cooldown of 4 s
    assert lock.acquire() and long.acquire()
    first = lock.fencing_token
    released = time.time()
    assert lock.release() and long.release()
    key, long_key = prefix + "locks/a/.lock", prefix + "locks/b/.lock"
    value = _value(consul, key)
    assert value["released_at"] and value["task_id"] == "t-1"
    assert released + 1.0 <= value["keep_until"] <= time.time() + 1.01
    assert released + 4.0 <= _value(consul, long_key)["keep_until"] <= time.time() + 4.01

    # Within the keep time the next acquirer reads the record (what duplicate deliveries and
    # cooldowns rely on).
    assert lock.acquire()
    assert lock.previous["released_at"] == value["released_at"]
    second = lock.fencing_token
    assert lock.release()
    kept_until = _value(consul, key)["keep_until"]

    wait_for(lambda: _kv(consul, key) is None, 20, "the released key to be removed by its releaser")
    assert time.time() >= kept_until - 0.05
    assert _kv(consul, long_key) is not None, "removed before the keep time its lock asked for"
    wait_for(lambda: _kv(consul, long_key) is None, 20, "the longer-kept key to be removed")

    # Created again: the token is larger than every earlier one (a Raft index), although
    # the key's LockIndex starts over.
    assert lock.acquire()
    try:
        raw = _kv(consul, key)
        assert lock.fencing_token > second > first
        assert raw["LockIndex"] == 1 and raw["ModifyIndex"] == lock.fencing_token
    finally:
        lock.release()


def test_a_lock_delay_outlives_the_removal_of_its_key(consul, prefix):
    # A holder's session ends (destroyed: an invalidation), so Consul keeps the key from
    # everyone for its lock-delay (3 s); a sweep with reap_after 0 removes the free key at
    # once, and still nobody can take it before the lock-delay ends.
    settings = _settings(consul, prefix, reap_after=0.0)
    client = ConsulClient(settings)
    key = prefix + "locks/delayed/.lock"
    sid = client.session_create("holder", ttl=0, lock_delay=3, checks=[])
    assert client.kv_lock(key, sid, b"{}", exists=False).acquired
    client.session_destroy(sid)
    freed = time.monotonic()
    assert key in sweep(client, settings).removed
    client.close()
    lock = ConsulLock("locks/delayed/.lock", settings=settings)
    assert not lock.acquire(blocking=False) and lock.last_holder is None  # refused: lock-delay
    assert lock.acquire(timeout=10)
    assert time.monotonic() - freed >= 3.0 - 0.1
    lock.release()


def test_the_index_clock_dates_a_write_by_the_first_sample_at_or_after_it_and_stays_small():
    # Pure logic: samples every 10 s for a day with reap_after 600 s (horizon 1,200 s).
    clock = IndexClock()
    for n in range(8640):
        clock = clock.with_sample(100 + n, 1000.0 + 10 * n, 600.0) or clock
    now = 1000.0 + 10 * 8639
    assert len(clock.samples) <= CLOCK_SAMPLES + 2
    # A write newer than every sample cannot be dated; one at or below a sample is dated by
    # the first such sample, at most horizon / CLOCK_SAMPLES (20 s) + one interval late.
    assert clock.written_by(100 + 8640) is None
    assert now - 600 <= clock.written_by(100 + 8639 - 60) <= now - 600 + 20 + 10
    # Older than the horizon: dated by the one sample kept from before it (old enough).
    assert clock.written_by(100) <= now - 1200
    # Never backwards: a sample with an index not above the newest one is not taken.
    assert clock.with_sample(100, now + 1000, 600.0) is None


def test_a_released_key_is_removed_by_its_releaser_after_its_agent_was_frozen(tmp_path):
    # The agent is frozen (SIGSTOP) from before the key's keep time ends until after it: the
    # releaser's reads time out (timeout 1 s), it tries again later, and removes the key once
    # the agent answers; nobody sweeps here.
    agent = start_consul(tmp_path / "agent")
    try:
        agent.wait_ready()
        settings = ConsulSettings(address=agent.address, lock_delay=2.0, reap_after=1.0, timeout=1.0)
        lock = ConsulLock("locks/frozen/.lock", settings=settings)
        assert lock.acquire() and lock.release()
        due = _value(agent, "locks/frozen/.lock")["keep_until"]
        agent.proc.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: time.time() > due + 2.5, 10, "the keep time to end while the agent is frozen")
        finally:
            agent.proc.signal(signal.SIGCONT)
        wait_for(lambda: _kv(agent, "locks/frozen/.lock") is None, 20, "the releaser to remove it", procs=[agent.proc])
    finally:
        agent.stop()


def test_a_full_reaper_queue_leaves_further_releases_to_the_sweep_and_says_so_once(monkeypatch, caplog):
    # Pure logic (the keys are due in an hour: the reaper's thread only waits).
    monkeypatch.setattr(reap, "REAP_QUEUE_MAX", 2)
    reaper, settings, later = reap.Reaper(), ConsulSettings(), time.time() + 3600
    for n in range(4):
        reaper.later(settings, f"locks/q{n}/.lock", later)
    reaper.later(settings, "locks/q0/.lock", later + 1)  # queued already: its time moves on
    assert reaper.pending() == 2
    warnings = [r for r in caplog.records if "the sweep removes the rest" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


# -- contention -------------------------------------------------------------------------------------

WAITER = textwrap.dedent(
    """
    import json, random, sys, time
    from celery_consul_lock import ConsulLock, ConsulSettings
    address, prefix, key, rounds, out = sys.argv[1:6]
    settings = ConsulSettings(address=address, lock_delay=2.0, key_prefix=prefix, reap_after=0)
    lock = ConsulLock(key, settings=settings)
    with open(out, "a") as f:
        for _ in range(int(rounds)):
            if not lock.acquire(timeout=60):
                sys.exit(3)
            start = time.monotonic()
            time.sleep(0.02)
            f.write(json.dumps({"token": lock.fencing_token, "start": start, "end": time.monotonic(),
                                "recreated": lock.previous is None}) + "\\n")
            f.flush()
            lock.release()
            time.sleep(random.random() / 10)  # the key is often free between holds: then it goes
    """
)


def _sweeping(settings: ConsulSettings, stop: threading.Event, removed: list[str]) -> threading.Thread:
    """A thread that sweeps the prefix back to back until ``stop``, collecting what it removed."""

    def run() -> None:
        client = ConsulClient(settings)
        while not stop.is_set():
            removed.extend(sweep(client, settings).removed)
        client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_waiters_get_the_key_while_it_is_removed_between_their_holds(consul, prefix, tmp_path):
    # Keep time 0: every release is followed at once by a removal (by its releaser) racing
    # the waiters' acquires, and a sweep runs back to back beside them.
    settings = _settings(consul, prefix, reap_after=0.0)
    out, rounds = tmp_path / "holds.jsonl", 15
    stop, removed = threading.Event(), []
    sweeper = _sweeping(settings, stop, removed)
    waiters = [
        subprocess.Popen(
            [sys.executable, "-c", WAITER, consul.address, prefix, "locks/contended/.lock", str(rounds), str(out)], cwd=ROOT
        )
        for _ in range(3)
    ]
    try:
        codes = [w.wait(timeout=120) for w in waiters]
    finally:
        stop.set()
        sweeper.join(10)
        for w in waiters:
            w.kill()
    assert codes == [0, 0, 0], "a waiter missed a release (it timed out waiting for a free key)"
    holds = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda h: h["start"])
    assert len(holds) == 3 * rounds
    for before, after in itertools.pairwise(holds):
        assert before["end"] <= after["start"], f"two holders at once: {before} {after}"
        assert before["token"] < after["token"], f"the fencing token went back: {before} {after}"
    # The key really was removed between holds, and created again by the next acquire.
    assert sum(h["recreated"] for h in holds) >= 5, holds


def test_a_consul_lock_holder_never_sees_its_key_removed(consul, prefix, tmp_path):
    # `consul lock -verbose` says "Lock lost" and kills its child when its key is deleted or
    # taken while it holds it (and still exits 0); eight of them in a row, each child saying
    # when it completed, while sweeps run back to back with keep time 0 and one of our locks
    # contends for the same key.
    settings = _settings(consul, prefix, reap_after=0.0)
    key = "locks/shared/.lock"
    one = f"{_consul_bin()} lock -verbose -http-addr={consul.address} {prefix}locks/shared 'sleep 0.3; echo child-done'"
    loop = f"for i in 1 2 3 4 5 6 7 8; do {one} || exit $?; done"
    stop, removed = threading.Event(), []
    sweeper = _sweeping(settings, stop, removed)
    holder = spawn("consul-locks", ["sh", "-c", loop], tmp_path)
    ours = ConsulLock(key, settings=settings)
    acquired = 0
    try:
        while holder.alive():
            if ours.acquire(timeout=2):
                acquired += 1
                time.sleep(0.05)
                ours.release()
            time.sleep(0.05)
        code = holder.wait(30)
    finally:
        stop.set()
        sweeper.join(10)
        holder.stop()
    log = holder.log_text()
    assert code == 0 and "Lock lost" not in log and log.count("child-done") == 8, log
    assert acquired >= 1 and prefix + key in removed, (acquired, removed)


def test_a_paused_holders_key_is_removed_only_by_the_rule_for_keys_freed_without_a_record(consul, prefix, tmp_path):
    # The holder's session has a TTL of 10 s and no checks: paused (SIGSTOP), Consul ends its
    # session within 2 x TTL and frees the key, with the holder's value and no keep time.
    holder_script = textwrap.dedent(
        """
        import sys, time
        from celery_consul_lock import ConsulLock, ConsulSettings
        address, prefix = sys.argv[1:3]
        settings = ConsulSettings(address=address, lock_delay=1.0, ttl=10, session_checks=[], key_prefix=prefix,
                                  reap_after=2.0)
        lock = ConsulLock("locks/paused/.lock", settings=settings)
        assert lock.acquire(timeout=10)
        print("held", lock.fencing_token, flush=True)
        while lock.held:
            time.sleep(0.05)
        print("lost:", lock.lost_reason, flush=True)
        print("released:", lock.release(), flush=True)
        """
    )
    settings = _settings(consul, prefix, reap_after=2.0)
    key = prefix + "locks/paused/.lock"
    holder = spawn("holder", [sys.executable, "-c", holder_script, consul.address, prefix], tmp_path, cwd=ROOT)
    try:
        wait_for(lambda: "held" in holder.log_text(), 20, "the holder to take the key", procs=[holder])
        holder.signal(signal.SIGSTOP)
        wait_for(lambda: not (_kv(consul, key) or {}).get("Session"), 40, "Consul to end the paused holder's session")
        assert "keep_until" not in _value(consul, key)
        client = ConsulClient(settings)
        first_at = time.time()  # the first sweep dates the key no earlier than this
        first = sweep(client, settings)
        assert key not in first.removed and first.kept.get("recently freed") == 1, first
        wait_for(lambda: key in sweep(client, settings).removed, 20, "a sweep to remove the key freed without a record")
        assert time.time() - first_at >= 2.0, "removed before reap_after had passed since it was seen free"
        client.close()
        holder.signal(signal.SIGCONT)
        wait_for(lambda: "released:" in holder.log_text(), 30, "the holder to notice its loss and release", procs=[holder])
        log = holder.log_text()
        assert "lost:" in log and "released: False" in log, log
        assert _kv(consul, key) is None, "the late release created the key again"
    finally:
        holder.stop()


# -- 2,000 distinct keys ----------------------------------------------------------------------------


def test_two_thousand_distinct_keys_leave_a_bounded_kv(consul, prefix, workers, proj):
    # 200 runs of a task with a templated key (locks/noop-{n}/.lock) through a real worker,
    # and 1,800 locks taken and released directly: with a keep time of 1 s, the releasers
    # remove every key, and KV ends with nothing under the prefix.
    workers(1, env={"TEST_KEY_PREFIX": prefix, "TEST_REAP_AFTER": "1"}, concurrency=4)
    results = [proj.app.tasks["proj.locked_noop"].delay(n) for n in range(200)]
    settings = _settings(consul, prefix, reap_after=1.0)

    def lock_range(start: int) -> None:
        for n in range(start, 2000, 8):
            lock = ConsulLock(f"locks/direct-{n}/.lock", settings=settings)
            assert lock.acquire(timeout=10)
            lock.release()

    threads = [threading.Thread(target=lock_range, args=(200 + i,)) for i in range(8)]
    most = 0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        most = max(most, len(_keys(consul, prefix)))
        time.sleep(0.5)
    assert wait_results(results, timeout=60) == list(range(200))
    wait_for(lambda: not _keys(consul, prefix), 45, "every released key to be removed", interval=0.5)
    print(f"most keys seen at once under the prefix: {most}")


def test_a_gevent_worker_removes_its_released_keys_while_a_task_blocks_its_process(consul, prefix, workers, proj, r):
    # The releaser's reaper is a real OS thread: it removes keys whose keep time (4 s) ends
    # while a task body blocks the whole gevent process (no greenlet runs meanwhile).
    env = {**GREEN_ENV, "TEST_KEY_PREFIX": prefix, "TEST_REAP_AFTER": "4"}
    workers(1, pool="gevent", concurrency=20, env=env)
    assert wait_results([proj.app.tasks["proj.locked_noop"].delay(n) for n in range(20)], timeout=60) == list(range(20))
    noop_keys = [k for k in _keys(consul, prefix) if "/noop-" in k]
    assert len(noop_keys) == 20
    due = min(_value(consul, k)["keep_until"] for k in noop_keys)
    blocked = proj.app.tasks["proj.blocking"].delay(9)
    start = wait_for(lambda: next((x for x in runs(r) if x["kind"] == "start" and x["task"] == "blocking"), None), 20, "the body")
    assert start["t"] < due, "the block began after the keys were due: nothing proven"
    wait_for(lambda: not [k for k in _keys(consul, prefix) if "/noop-" in k], 10, "the keys to be removed during the block")
    assert not [x for x in runs(r) if x["kind"] == "end"], "the block ended before the keys were removed"
    blocked.get(timeout=30)


def test_a_forked_child_starts_with_an_empty_reaper_queue(consul, prefix):
    settings = _settings(consul, prefix, reap_after=3600.0)
    lock = ConsulLock("locks/forked/.lock", settings=settings)
    assert lock.acquire() and lock.release()
    assert reap._REAPER.pending() >= 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its parent still removes what it queued
        try:
            os.write(write, str(reap._REAPER.pending()).encode())
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 100) == b"0"
    os.waitpid(pid, 0)
    assert reap._REAPER.pending() >= 1


# -- the beat's entries -----------------------------------------------------------------------------


#: A tick mark's value as a completed run leaves it (see ticks.Mark).
MARK = {"due": "2026-01-01T00:00:00", "epoch": 1.0, "task_id": "t-1", "open": {}, "done": [1.0]}


def _put_marks(consul: ConsulAgent, prefix: str, marks: dict[str, dict]) -> None:
    """Write the tick marks ``marks`` (entry -> value) under ``prefix``."""
    client = ConsulClient(ConsulSettings(address=consul.address))
    for name, value in marks.items():
        assert client.kv_put(prefix + MARKS_PREFIX + name, json.dumps(value).encode())
    client.close()


def test_the_sweep_removes_the_state_and_mark_of_removed_entries_and_keeps_cron_marks(consul, prefix):
    settings = _settings(consul, prefix, reap_after=1.0)
    state_prefix = f"{prefix}celery-consul-lock/beat/proj/entries/"
    marks = prefix + MARKS_PREFIX
    leader = ConsulLock("locks/proj/beat/.lock", settings=settings)
    assert leader.acquire()
    state = {"last_run_at": "2026-01-01T00:00:00+00:00", "total_run_count": 3, "definition": "x", "token": 1}
    task_mark = {"due": "2026-01-01T00:00:00", "epoch": 1.0, "task_id": "t-1", "open": {}, "done": [1.0]}
    cron_mark = {**task_mark, "task_id": None, "runner": "celery-consul-lock run on host pid 1"}
    writes = {
        state_prefix + "kept": state,  # an entry the beat has
        marks + "kept": task_mark,
        state_prefix + "gone": state,  # removed from the schedule
        marks + "gone": task_mark,
        state_prefix + "shared": state,  # removed, but a cron line shares its mark
        marks + "shared": cron_mark,
        marks + "cron-only": {"open": {"1.0": 1.0}, "runner": "celery-consul-lock run on host pid 1"},
        marks + "late": {**task_mark, "beat": "proj"},  # a late retry's mark, its state removed before
        state_prefix + "foreign": state,  # removed here, but its mark is another beat's now
        marks + "foreign": {**task_mark, "beat": "other-beat"},
    }
    client = ConsulClient(settings)
    puts = [kv_set(k, json.dumps(v).encode()) for k, v in writes.items()]
    assert client.kv_fenced(leader.key, leader.session_id, puts, action="writing a beat's state").ok
    cleanup = EntryCleanup(state_prefix, lambda: {"kept"}, lambda: (leader.key, leader.session_id), beat="proj")
    try:
        first = sweep(client, settings, entries=cleanup)
        assert first.removed == [], "removed before reap_after passed since their last write"
        # A sweeper that does not hold the leader lock removes nothing.
        other = ConsulLock("locks/other/.lock", settings=settings, private_session=True)
        assert other.acquire()
        deposed = EntryCleanup(state_prefix, lambda: {"kept"}, lambda: (leader.key, other.session_id), beat="proj")
        time.sleep(1.2)  # past reap_after since the first sweep's clock sample
        assert sweep(client, settings, entries=deposed).removed == []
        other.release()
        done = sweep(client, settings, entries=cleanup)
        assert sorted(done.removed) == sorted(
            [state_prefix + "gone", marks + "gone", state_prefix + "shared", marks + "late", state_prefix + "foreign"]
        )
        left = set(_keys(consul, prefix))
        assert {state_prefix + "kept", marks + "kept", marks + "shared", marks + "cron-only", prefix + CLOCK_KEY} <= left
        assert marks + "foreign" in left
    finally:
        client.close()
        leader.release()


def test_a_slot_opened_by_the_cron_wrapper_names_it_and_the_sweep_keeps_that_mark(consul, prefix):
    # The wrapper's command fails: its slot stays open in the mark, which names the wrapper
    # (runner) although no slot completed. A beat once had an entry of that name: the sweep
    # removes the beat's state of it, never the mark.
    wrapper = str(Path(sys.executable).parent / "celery-consul-lock")
    argv = [wrapper, "run", "--every", "3600", "--key", "locks/nightly", "--key-prefix", prefix, "--", "false"]
    done = subprocess.run(argv, env={**os.environ, "CONSUL_HTTP_ADDR": consul.address}, capture_output=True, timeout=60)
    assert done.returncode == 1, done.stderr
    mark_key = prefix + MARKS_PREFIX + "nightly"
    mark = _value(consul, mark_key)
    assert mark["open"] and mark["runner"].startswith("celery-consul-lock run on "), mark
    settings = _settings(consul, prefix, reap_after=0.0)
    state_key = f"{prefix}celery-consul-lock/beat/proj/entries/nightly"
    leader = ConsulLock("locks/proj/beat/.lock", settings=settings)
    assert leader.acquire()
    client = ConsulClient(settings)
    try:
        assert client.kv_put(state_key, b'{"last_run_at": null, "total_run_count": 1}')
        cleanup = EntryCleanup(f"{prefix}celery-consul-lock/beat/proj/entries/", set, lambda: (leader.key, leader.session_id))
        assert sweep(client, settings, entries=cleanup).removed == [state_key]
        assert _value(consul, mark_key) == mark
    finally:
        client.close()
        leader.release()


def test_the_sweep_removes_only_the_marks_naming_its_beat_of_entries_it_no_longer_has(consul, prefix):
    # A scheduler that keeps no state in Consul (the persistent one, Django's): its sweep
    # goes by the beat each mark names.
    settings = _settings(consul, prefix, reap_after=1.0)
    marks = prefix + MARKS_PREFIX
    writes = {
        "kept": {**MARK, "beat": "proj"},  # an entry the beat has
        "gone": {**MARK, "beat": "proj"},  # removed from its schedule
        "unnamed": MARK,  # an older version's mark: nobody can tell whose
        "elsewhere": {**MARK, "beat": "other-beat"},
        "shared": {**MARK, "beat": None},  # two beats wrote it
        "cron": {**MARK, "beat": "proj", "runner": "celery-consul-lock run on host pid 1"},
    }
    _put_marks(consul, prefix, writes)
    client = ConsulClient(settings)
    leader = ConsulLock("locks/proj/beat/.lock", settings=settings)
    assert leader.acquire()
    cleanup = EntryCleanup(None, lambda: {"kept"}, lambda: (leader.key, leader.session_id), beat="proj")
    try:
        assert sweep(client, settings, entries=cleanup).removed == [], "removed before reap_after since its last write"
        time.sleep(1.2)  # past reap_after since the first sweep's clock sample
        unsure = EntryCleanup(None, lambda: None, lambda: (leader.key, leader.session_id), beat="proj")
        assert sweep(client, settings, entries=unsure).removed == [], "removed while the beat could not tell its entries"
        assert sweep(client, settings, entries=cleanup, dry_run=True).removed == [marks + "gone"]
        assert _kv(consul, marks + "gone") is not None
        assert sweep(client, settings, entries=cleanup).removed == [marks + "gone"]
        assert {marks + name for name in writes if name != "gone"} <= set(_keys(consul, prefix))
    finally:
        client.close()
        leader.release()


def test_the_beat_leader_sweeps_free_keys_and_removed_entries(harness, consul, prefix):
    # A free key left by a process that is gone (no keep time: its session ended), and the
    # state of two entries, one no longer in the schedule, all written before the beat
    # starts: its sweeper (every 0.5 s here) removes the key and the removed entry's state
    # once reap_after (1 s) has passed, and keeps the state of the entry it has (sent once
    # an hour here, so nothing rewrites that state meanwhile).
    harness.extra_env.update(TEST_KEY_PREFIX=prefix, TEST_REAP_AFTER="1", TEST_REAP_INTERVAL="0.5", TEST_BEAT_INTERVAL="3600")
    state_prefix = f"{prefix}celery-consul-lock/beat/{harness.beat_name}/entries/"
    settings = _settings(consul, prefix, reap_after=1.0)
    client = ConsulClient(settings)
    leftover = prefix + "locks/left-over/.lock"
    assert client.kv_put(leftover, b'{"host": "gone"}', flags=LOCK_FLAG)
    for entry in ("removed-entry", "heartbeat"):
        assert client.kv_put(state_prefix + entry, b'{"last_run_at": null, "total_run_count": 1}')
    client.close()
    beat = harness.beat(consul.address)
    wait_for(lambda: _kv(consul, leftover) is None, 30, "the leader's sweep to remove the left-over key", procs=[beat])
    wait_for(lambda: _kv(consul, state_prefix + "removed-entry") is None, 30, "the removed entry's state to go", procs=[beat])
    assert _kv(consul, state_prefix + "heartbeat") is not None, "the state of an entry the beat has was removed"


def _follow_named_mark(consul: ConsulAgent, key: str, beat: str, procs) -> KeyWrites:
    """Wait for the mark at ``key`` to name ``beat`` (written by a run of that beat's tick),
    then follow its writes from there: from before its last one."""

    def named() -> bool:
        return _kv(consul, key) is not None and _value(consul, key).get("beat") == beat

    wait_for(named, 60, f"{key} to name the beat {beat}", procs=procs)
    return KeyWrites(consul, key)


class KeyWrites:
    """Follows one key from a thread (polled every 0.05 s) from before its last write until
    it is removed: when its ModifyIndex was last seen changing, and when it was gone."""

    def __init__(self, consul: ConsulAgent, key: str) -> None:
        self.consul, self.key = consul, key
        self.index: int | None = None
        self.last_write = self.gone_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            kv = _kv(self.consul, self.key)
            if kv is None:
                self.gone_at = time.monotonic()
                return
            if kv["ModifyIndex"] != self.index:
                self.index, self.last_write = kv["ModifyIndex"], time.monotonic()

    def wait_removed(self, reap_after: float, timeout: float, procs) -> None:
        """Wait for the removal; fail if it came less than ``reap_after`` after the last write."""
        try:
            wait_for(lambda: self.gone_at, timeout, f"the sweep to remove {self.key}", procs=procs)
        finally:
            self._stop.set()
        quiet = self.gone_at - self.last_write
        assert quiet >= reap_after - 0.2, f"removed {quiet:.2f} s after its last write (reap_after {reap_after})"


def test_a_persistent_scheduler_beat_removes_the_marks_of_entries_gone_from_beat_schedule(
    consul, prefix, workers, redis_server, tmp_path
):
    # A LeaderPersistentScheduler beat runs entry "old-entry" (every 1 s): its runs' marks
    # name the beat. Restarted with only "heartbeat" (every hour: not sent meanwhile), its
    # sweep (every 0.5 s) removes old-entry's mark once unwritten for reap_after (2 s); the
    # mark of the entry it has, an unnamed mark and another beat's stay, though older.
    beat_name, reap_after = f"ps-{uuid.uuid4().hex[:6]}", 2.0
    marks = prefix + MARKS_PREFIX
    common = {
        "TEST_KEY_PREFIX": prefix,
        "TEST_REAP_AFTER": str(reap_after),
        "TEST_REAP_INTERVAL": "0.5",
        "TEST_BEAT_NAME": beat_name,
    }
    (worker,) = workers(1, env=common)
    _put_marks(
        consul, prefix, {"heartbeat": {**MARK, "beat": beat_name}, "unnamed": MARK, "elsewhere": {**MARK, "beat": "other"}}
    )
    beat_env = worker_env(redis_server.url, consul.address, **common)
    scheduler = "celery_consul_lock.beat:LeaderPersistentScheduler"
    first = start_beat(
        "first",
        tmp_path,
        {**beat_env, "TEST_BEAT_ENTRY": "old-entry", "TEST_BEAT_INTERVAL": "1"},
        app_path="tests.proj.app",
        scheduler=scheduler,
        cwd=ROOT,
    )
    try:
        writes = _follow_named_mark(consul, marks + "old-entry", beat_name, [first, worker])
    finally:
        first.stop()
    second = start_beat(
        "second", tmp_path, {**beat_env, "TEST_BEAT_INTERVAL": "3600"}, app_path="tests.proj.app", scheduler=scheduler, cwd=ROOT
    )
    try:
        wait_for(lambda: "elected leader" in second.log_text(), 60, "the second beat to lead", procs=[second])
        writes.wait_removed(reap_after, 60, [second, worker])
        assert {marks + n for n in ("heartbeat", "unnamed", "elsewhere")} <= set(_keys(consul, prefix))
    finally:
        second.stop()


DJANGO_ORM = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    from django_celery_beat.models import IntervalSchedule, PeriodicTask
    action, name = sys.argv[1:3]
    if action == "add-disabled":
        every, _ = IntervalSchedule.objects.get_or_create(every=3600, period=IntervalSchedule.SECONDS)
        PeriodicTask.objects.create(name=name, task="proj.heartbeat", interval=every, enabled=False)
    else:
        assert PeriodicTask.objects.filter(name=name).delete()[0] == 1
    """
)


def test_a_django_database_scheduler_beat_removes_the_marks_of_deleted_periodic_tasks(
    consul, prefix, workers, redis_server, tmp_path
):
    # django-celery-beat's LeaderDatabaseScheduler runs "heartbeat" (every 1 s, from
    # CELERY_BEAT_SCHEDULE); a disabled periodic task and an unnamed mark exist beside it.
    # Once "heartbeat" is deleted from the database (as the admin does), the leader's sweep
    # removes its mark after reap_after (2 s); the disabled task's mark stays, and so does
    # the unnamed one.
    beat_name, reap_after = f"dj-{uuid.uuid4().hex[:6]}", 2.0
    marks = prefix + MARKS_PREFIX
    (worker,) = workers(1, env={"TEST_KEY_PREFIX": prefix, "TEST_REAP_AFTER": str(reap_after)})
    env = worker_env(
        redis_server.url,
        consul.address,
        TEST_SQLITE=str(tmp_path / "db.sqlite3"),
        DJANGO_SETTINGS_MODULE="tests.djproj.settings",
        TEST_BEAT_NAME=beat_name,
        TEST_CONSUL_LOCK_KEY_PREFIX=prefix,
        TEST_CONSUL_LOCK_REAP_AFTER=str(reap_after),
        TEST_CONSUL_LOCK_BEAT_REAP_INTERVAL="0.5",
    )
    subprocess.run([sys.executable, "-m", "django", "migrate", "-v", "0"], env=env, cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-c", DJANGO_ORM, "add-disabled", "disabled-entry"], env=env, cwd=ROOT, check=True)
    _put_marks(consul, prefix, {"disabled-entry": {**MARK, "beat": beat_name}, "unnamed": MARK})
    scheduler = "celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler"
    beat = start_beat("dj", tmp_path, env, app_path="tests.djproj.celery_app", scheduler=scheduler, cwd=ROOT)
    try:
        writes = _follow_named_mark(consul, marks + "heartbeat", beat_name, [beat, worker])
        subprocess.run([sys.executable, "-c", DJANGO_ORM, "delete", "heartbeat"], env=env, cwd=ROOT, check=True)
        writes.wait_removed(reap_after, 60, [beat, worker])
        assert {marks + "disabled-entry", marks + "unnamed"} <= set(_keys(consul, prefix))
        assert "could not read the periodic tasks" not in beat.log_text()
    finally:
        beat.stop()


# -- semaphores --------------------------------------------------------------------------------------

SEMAPHORE_HOLDER = textwrap.dedent(
    """
    import sys, time
    from celery_consul_lock import ConsulSemaphore, ConsulSettings
    address, prefix, flag = sys.argv[1:4]
    settings = ConsulSettings(address=address, lock_delay=1.0, ttl=10, key_prefix=prefix)
    shared = ConsulSemaphore("sem/shared", 2, settings=settings, name="doomed")
    alone = ConsulSemaphore("sem/alone", 1, settings=settings, name="doomed")
    assert shared.acquire(timeout=10) and alone.acquire(timeout=10)
    open(flag, "w").close()
    time.sleep(3600)
    """
)


def test_a_sigkilled_semaphore_holders_contender_keys_and_emptied_lock_are_swept_and_live_ones_stay(consul, prefix, tmp_path):
    # A process holds a slot of "sem/shared" (limit 2, beside a live holder here) and of
    # "sem/alone" (limit 1), and is SIGKILLed: Consul ends its session by its TTL, freeing its
    # contender keys. Nobody takes the semaphores again. A sweep removes both dead contender
    # keys once reap_after (1 s) has passed since then, and "sem/alone"'s .lock (no live
    # holder, no contender left); the live holder's contender key and "sem/shared"'s .lock stay.
    settings = _settings(consul, prefix, reap_after=1.0)
    live = ConsulSemaphore("sem/shared", 2, settings=settings)
    holder = spawn(
        "holder", [sys.executable, "-c", SEMAPHORE_HOLDER, consul.address, prefix, str(tmp_path / "held")], tmp_path, cwd=ROOT
    )
    client = ConsulClient(settings)
    try:
        wait_for(lambda: (tmp_path / "held").exists(), 30, "the holder to take its slots", procs=[holder])
        assert live.acquire(timeout=10)
        dead = [k for k in _keys(consul, prefix) if k.rsplit("/", 1)[1] not in (".lock", live.session_id)]
        assert len(dead) == 2, _keys(consul, prefix)
        holder.kill()
        wait_for(lambda: not any((_kv(consul, k) or {}).get("Session") for k in dead), 45, "Consul to end the killed session")
        first = sweep(client, settings)
        assert first.removed == [], "removed before reap_after since its session ended"
        assert first.kept.get("recently freed") == 2 and first.kept.get("held", 0) >= 2, first.kept
        alone_lock = f"{prefix}sem/alone/.lock"
        done = wait_for(lambda: sweep(client, settings).removed, 20, "a sweep to remove the dead contender keys")
        assert sorted(done) == sorted([*dead, alone_lock]), done
        left = set(_keys(consul, prefix))
        assert {f"{prefix}sem/shared/.lock", f"{prefix}sem/shared/{live.session_id}"} <= left
        assert not [k for k in left if k.startswith(f"{prefix}sem/alone/")]
        assert live.held and live.check() is None
        # The semaphores work on: "sem/alone" starts afresh, "sem/shared" counts one holder.
        again = ConsulSemaphore("sem/alone", 1, settings=settings, private_session=True)
        assert again.acquire(blocking=False) and again.release()
        assert [h.session for h in ConsulSemaphore.holders("sem/shared", settings=settings)] == [live.session_id]
    finally:
        client.close()
        live.release()
        holder.stop()


def _dead_holder(consul: ConsulAgent, settings: ConsulSettings, prefix: str, limit: int = 1) -> str:
    """A holder of ``prefix`` whose session ends: its contender key stays, free, and .lock
    lists it. Returns the contender key."""
    dead = ConsulSemaphore(prefix, limit, settings=settings, private_session=True)
    assert dead.acquire(timeout=10)
    key = dead.fence_key
    consul.api(f"/v1/session/destroy/{dead.session_id}", "PUT")  # as a TTL's end does
    wait_for(lambda: not _kv(consul, key).get("Session"), 10, "the contender key to lose its session")
    return key


class ListThen(ConsulClient):
    """A client that runs ``then`` once right after its next prefix listing answered: to put
    another client's write between a sweep's read and its deletes."""

    then: Callable[[], None] | None = None

    def kv_list(self, prefix: str, **kw) -> tuple[int, list]:
        answer = super().kv_list(prefix, **kw)
        then, self.then = self.then, None
        if then is not None:
            then()
        return answer


def test_an_admission_between_the_sweeps_read_and_its_deletes_keeps_its_slot(consul, prefix):
    # The sweep reads the semaphore with only a dead holder (reap_after 0: its key may go at
    # once); then a contender is admitted (its .lock check-and-set wins); then the sweep
    # deletes: the dead key goes, .lock's delete fails its check-and-set and the slot stays.
    settings = _settings(consul, prefix, reap_after=0.0)
    dead_key = _dead_holder(consul, settings, "sem/raced")
    lock_key = f"{prefix}sem/raced/.lock"
    sem = ConsulSemaphore("sem/raced", 1, settings=settings)
    client = ListThen(settings)
    client.then = lambda: sem.acquire(timeout=10) or pytest.fail("the contender was not admitted")
    try:
        report = sweep(client, settings)
        assert sem.held and dead_key in report.removed and lock_key not in report.removed, report
        assert json.loads(base64.b64decode(_kv(consul, lock_key)["Value"]))["Holders"] == {sem.session_id: True}
        assert _kv(consul, sem.fence_key)["Session"] == sem.session_id
        assert sweep(client, settings).removed == [] and sem.held and sem.check() is None
    finally:
        client.close()
        sem.release()


def test_a_sweep_between_an_admissions_read_and_its_write_makes_it_retry_and_take_the_slot(consul, prefix):
    # The contender reads the semaphore (a dead holder listed); a sweep removes the dead key
    # and .lock; the contender's transaction then fails its .lock check-and-set, it reads
    # again and is admitted into a .lock created afresh.
    settings = _settings(consul, prefix, reap_after=0.0)
    dead_key = _dead_holder(consul, settings, "sem/raced")
    lock_key = f"{prefix}sem/raced/.lock"
    swept: list[list[str]] = []

    class SweptBeforeWriting(ConsulSemaphore):
        def _enter(self, client, session, sid, state, holders):
            if not swept:
                swept.append(sweep(ConsulClient(settings), settings).removed)
            return super()._enter(client, session, sid, state, holders)

    sem = SweptBeforeWriting("sem/raced", 1, settings=settings)
    try:
        assert sem.acquire(timeout=10)
        assert sorted(swept[0]) == sorted([dead_key, lock_key]), swept
        assert json.loads(base64.b64decode(_kv(consul, lock_key)["Value"]))["Holders"] == {sem.session_id: True}
        assert sem.held and _kv(consul, dead_key) is None
    finally:
        sem.release()


def test_consul_lock_semaphore_holders_never_see_their_keys_removed(consul, prefix, tmp_path):
    # Two loops of four `consul lock -n 2 -verbose` runs each (the Go client's semaphore: it
    # writes its contender key, then .lock by check-and-set; `Release` leaves an empty .lock)
    # while sweeps run back to back with reap_after 0, beside a dead holder of ours: every
    # run completes without "Lock lost", the sweeps remove the dead key and emptied .lock
    # keys between the runs, and at the end nothing of the semaphore is left.
    settings = _settings(consul, prefix, reap_after=0.0)
    dead_key = _dead_holder(consul, settings, "sem/cli", limit=2)
    one = " ".join(shlex.quote(a) for a in cli(consul, f"{prefix}sem/cli", 2, "sleep 0.3; echo child-done", "-verbose"))
    loop = f"for i in 1 2 3 4; do {one} || exit $?; sleep 0.$((RANDOM % 3)); done"
    stop, removed = threading.Event(), []
    sweeper = _sweeping(settings, stop, removed)
    loops = [spawn(f"cli-loop{i}", ["bash", "-c", loop], tmp_path) for i in range(2)]
    try:
        codes = [p.wait(90) for p in loops]
    finally:
        stop.set()
        sweeper.join(10)
        for p in loops:
            p.stop()
    logs = [p.log_text() for p in loops]
    assert codes == [0, 0] and all("Lock lost" not in t and t.count("child-done") == 4 for t in logs), logs
    lock_key = f"{prefix}sem/cli/.lock"
    assert dead_key in removed and lock_key in removed, removed
    client = ConsulClient(settings)
    sweep(client, settings)
    client.close()
    assert not [k for k in _keys(consul, prefix) if k.startswith(f"{prefix}sem/cli/")]


# -- the command --------------------------------------------------------------------------------------


def test_the_reap_command_prints_what_it_removes_and_its_dry_run_removes_nothing(consul, prefix):
    settings = _settings(consul, prefix, reap_after=3600.0)
    client = ConsulClient(settings)
    due, kept = prefix + "locks/due/.lock", prefix + "locks/kept/.lock"
    assert client.kv_put(due, json.dumps({"released_at": "x", "keep_until": time.time() - 1}).encode(), flags=LOCK_FLAG)
    assert client.kv_put(kept, json.dumps({"released_at": "x", "keep_until": time.time() + 3600}).encode(), flags=LOCK_FLAG)
    held = ConsulLock("locks/held/.lock", settings=settings)
    assert held.acquire()
    client.close()
    env = worker_env("redis://127.0.0.1:1/0", consul.address, TEST_KEY_PREFIX=prefix)
    try:
        dry = consul_lock_cmd(env, "reap", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"would remove {due}" in dry.stdout and kept not in dry.stdout, dry.stdout
        assert _kv(consul, due) is not None
        done = consul_lock_cmd(env, "reap")
        assert done.returncode == 0, done.stderr
        assert f"removed {due}" in done.stdout and "1 held" in done.stdout and "1 in keep time" in done.stdout, done.stdout
        assert _kv(consul, due) is None and _kv(consul, kept) is not None and _kv(consul, prefix + "locks/held/.lock")
    finally:
        held.release()
