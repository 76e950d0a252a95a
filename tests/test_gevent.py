"""ConsulLockedTask in a real `celery worker -P gevent -c 50`, over a real Redis and Consul.

Under the gevent pool every task body is a greenlet of one process, and ``threading``,
``socket`` and ``time`` are monkey-patched. The session renewer and the process's watcher run on
real OS threads (celery_consul_lock/native.py), so a body that never yields cannot starve
them, and abort_on_lock_lost throws into the body's own greenlet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import pytest

from celery_consul_lock import is_skipped
from celery_consul_lock.settings import DEFAULT_MAX_CONNECTIONS
from celery_consul_lock.watch import WATCH_QUERIES

from .servers import ROOT, wait_for
from .test_command import consul_lock_cmd
from .test_task import assert_no_overlap, intervals, runs
from .workers import wait_results, worker_env

#: TTL 10 s and lock-delay 2 s: the fencing window is 2 s (renewals every 0.5 s), so a
#: renewer starved for more than 1.5 s shows as a lost lock, and Consul ends a session
#: that nobody renews within 2 x TTL = 20 s.
GREEN_ENV = {"TEST_TTL": "10", "TEST_LOCK_DELAY": "2"}
#: How long after the key is freed the aborted body must have ended (its result stored).
#: Alone it ends within 0.5 s; the rest is room for a loaded machine.
ABORT_BOUND = 5.0


def gevent_worker(workers, concurrency: int = 50, **kw):
    (worker,) = workers(1, pool="gevent", concurrency=concurrency, env=dict(GREEN_ENV), **kw)
    return worker


def alive(worker) -> None:
    worker.check_alive()


def agent_connections(pid: int, port: int) -> int:
    """TCP connections of process ``pid`` to ``port`` (its sockets' inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                count += 1
    return count


@pytest.mark.parametrize("how", ["consul-lock release", "session destroy"])
def test_abort_on_lock_lost_throws_into_the_right_greenlet_when_the_key_is_freed(proj, workers, r, consul, how):
    worker = gevent_worker(workers)
    # Other greenlets of the same process hold locks of their own meanwhile (without abort),
    # until the test says "go" (the release command can take seconds on a loaded machine).
    others = [proj.green_keyed.delay(n, 60.0, until="others-go") for n in range(5)]
    result = proj.guarded.delay(60)

    def started():
        alive(worker)
        return [x for x in runs(r) if x["kind"] == "start" and x["task"] == "guarded"]

    (start,) = wait_for(started, 30, "the guarded run to start")
    wait_for(lambda: len([x for x in runs(r) if x["kind"] == "start"]) == 6, 30, "every run to start")
    if how == "consul-lock release":
        done = consul_lock_cmd(worker_env("redis://127.0.0.1:1/0", consul.address), "release", start["key"], "--yes")
        assert done.returncode == 0, done
    else:
        session = consul.api(f"/v1/kv/{start['key']}")[0]["Session"]
        consul.api(f"/v1/session/destroy/{session}", "PUT")
    freed = time.monotonic()
    wait_for(result.ready, ABORT_BOUND, f"the body to be aborted within {ABORT_BOUND} s", procs=[worker])
    took = time.monotonic() - freed
    assert result.state == "FAILURE" and type(result.result).__name__ == "LockLostAbort", (result.state, result.result)
    assert not [x for x in runs(r) if x["kind"] == "end" and x["task"] == "guarded"]
    r.set("others-go", 1)
    # The abort hit only its own greenlet: the others ran on to their end (their lock was
    # lost with the shared session, which their `held` shows).
    assert wait_results(others, 30) == list(range(5))
    ends = [x for x in runs(r) if x["kind"] == "end" and x["task"] == "green_keyed"]
    assert len(ends) == 5 and not any(x["held"] for x in ends), ends
    log = worker.log_text()
    assert "lock locks/proj.guarded/.lock lost" in log and "instead of 1" not in log, log[-3000:]
    print(f"{how}: aborted {took:.2f} s after the key was freed")


def test_a_body_blocking_without_yielding_keeps_its_lock_and_no_other_worker_runs_the_key(proj, workers, r, consul):
    """25 s in a call that never yields to gevent (the whole process blocked): the renewer,
    a real thread, keeps the session alive, so the key stays ours and a second worker's
    copies are skipped as held throughout."""
    worker = gevent_worker(workers)
    first = proj.blocking.delay(25.0)
    start = wait_for(lambda: [x for x in runs(r) if x["kind"] == "start"], 30, "the blocking run to start")[0]
    assert start["pid"] == worker.pid
    session = start["session"]
    # Started now, so that it cannot have taken the first run: it takes the copies (the
    # gevent worker, blocked, fetches nothing meanwhile).
    (other,) = workers(1, pool="threads", concurrency=2, env=dict(GREEN_ENV))
    copies, holders = [], set()
    while not first.ready():
        alive(worker)
        alive(other)
        entry = consul.api("/v1/kv/locks/blocking/.lock")
        # The body records its end before its lock is released: a read made before the end
        # is on record was made while the body ran, and must show the key held.
        if not [x for x in runs(r) if x["kind"] == "end" and x["id"] == first.id]:
            holders.add(entry[0].get("Session") if entry else None)
        copies.append(proj.blocking.delay(0.0))
        wait_for(lambda: first.ready() or copies[-1].ready(), 30, "the copy to be decided")
        if not first.ready():
            time.sleep(1.0)  # not an assertion: pace the copies
    assert first.get(timeout=5) == "finished"
    values = wait_results(copies, 60)
    (end,) = [x for x in runs(r) if x["kind"] == "end" and x["id"] == first.id]
    assert end["held"] is True and end["lost"] is None and end["session"] == session, end
    assert holders == {session}, holders
    # Each copy that the first run's lock turned away was skipped as held, by the first
    # run; a copy that came after its release ran (after it: no overlap).
    ran = [v for v in values if v == "finished"]
    skipped = [v for v in values if is_skipped(v)]
    assert len(ran) + len(skipped) == len(values) and len(skipped) >= 10, values
    assert all(v["reason"] == "held" and v["holder_task_id"] == first.id for v in skipped), skipped
    assert_no_overlap(intervals(runs(r), task="blocking"))
    assert " lost: " not in worker.log_text()


def test_fifty_greenlets_lock_distinct_keys_and_one_shared_key_without_overlap(proj, workers, r, consul):
    before = {s["ID"] for s in consul.api("/v1/session/list")}
    concurrency = 50
    worker = gevent_worker(workers, concurrency=concurrency)
    port = int(consul.address.rsplit(":", 1)[1])
    # Two calls per distinct key (they contend), and as many calls of the one shared key.
    keyed = [proj.green_keyed.delay(n % 30, 2.0) for n in range(60)]
    shared = [proj.green_shared.delay(n, 0.3) for n in range(40)]
    peak = 0
    pending = keyed + shared
    deadline = time.monotonic() + 180
    while not all(x.ready() for x in pending):
        alive(worker)
        assert time.monotonic() < deadline, "the runs did not finish within 180 s"
        peak = max(peak, agent_connections(worker.pid, port))
        time.sleep(0.2)  # not an assertion: the sampling rate
    keyed_values, shared_values = wait_results(keyed, 10), wait_results(shared, 10)
    records = runs(r)
    by_key = defaultdict(list)
    for x in records:
        if x["kind"] == "start":
            by_key[x["key"]].append(x["id"])
    assert len(by_key) == 31, sorted(by_key)
    for key in by_key:
        assert_no_overlap(intervals(records, key=key))
    # Every run accounted for: it ran to its end holding its lock, or was skipped as held.
    for values, task in ((keyed_values, "green_keyed"), (shared_values, "green_shared")):
        ran = [v for v in values if isinstance(v, int)]
        skipped = [v for v in values if is_skipped(v)]
        assert len(ran) + len(skipped) == len(values) and ran, (task, values)
        assert all(v["reason"] == "held" for v in skipped), skipped
        ends = [x for x in records if x["kind"] == "end" and x["task"] == task]
        assert len(ends) == len(ran) and all(x["held"] for x in ends)
    assert len({v for v in keyed_values if isinstance(v, int)}) == 30  # every key ran at least once
    during = {s["ID"] for s in consul.api("/v1/session/list")} - before
    assert len(during) == 1, during  # one session for the whole worker, shared by its greenlets
    # Connections: the pool the greenlets share (consul_lock_max_connections), the renewers'
    # (two at most), the watcher's (one per folder it reads: while the first locks come due
    # their folders may be read apart, up to WATCH_QUERIES, before they merge into locks/) and
    # the agent watch's; not one per greenlet or held lock.
    bound = DEFAULT_MAX_CONNECTIONS + 2 + WATCH_QUERIES + 1
    print(f"peak connections to the agent: {peak} (bound {bound})")
    assert 0 < peak <= bound, peak
    worker.stop()
    wait_for(lambda: {s["ID"] for s in consul.api("/v1/session/list")} == before, 30, "the worker's session to be destroyed")
    assert json.dumps(records)  # records are JSON, for the failure message


# -- logging from the real threads ------------------------------------------------------------

#: The start of a child process patched by gevent, as a worker is: ``where(record)`` says
#: whether a record was emitted on the main OS thread (the hub's). The handler, made after the
#: patching like a worker's, has a gevent lock.
GREEN_CHILD = """
from gevent import monkey
monkey.patch_all()
import json, logging, os, time
import gevent
from celery_consul_lock import native

real_ident = monkey.get_original("_thread", "get_ident")
main_thread = real_ident()
records = []


class Where(logging.StreamHandler):
    def emit(self, record):
        records.append({"message": record.getMessage(), "main": real_ident() == main_thread})
        super().emit(record)  # a write, as a worker's handlers do (the GIL is let go meanwhile)


def until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return predicate()


logging.getLogger("celery_consul_lock").addHandler(Where(open(os.devnull, "w")))
logging.getLogger("celery_consul_lock").setLevel(logging.INFO)
"""


def run_green_child(script: str) -> dict:
    """Run GREEN_CHILD + ``script`` in a child Python; the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", GREEN_CHILD + textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_real_threads_logging_at_once_under_gevent_both_go_on_and_every_record_is_emitted_on_the_hub():
    """Two real threads that log at the same time through a handler with a gevent lock: the
    one left waiting for that lock was never woken (gevent's lost wake-up between two threads
    without a hub). native.log hands their records to the hub, so both run on, and nothing is
    emitted on a real thread."""
    out = run_green_child(
        """
        finished = []

        def spam(n):
            for i in range(500):
                native.log(logging.getLogger("celery_consul_lock.test"), logging.INFO, "thread %s line %s", n, i)
            finished.append(n)

        gevent.sleep(0)  # the main hub exists before the threads, as in a worker
        for n in range(2):
            native.start_thread(spam, (n,), "spam")
        until(lambda: len(finished) == 2 and len(records) == 1000, 30)
        print(json.dumps({"finished": sorted(finished), "records": len(records), "off_hub": sum(not r["main"] for r in records)}))
        """
    )
    assert out == {"finished": [0, 1], "records": 1000, "off_hub": 0}, out


def test_the_watcher_and_the_renewer_report_a_destroyed_session_through_the_hub(consul, key):
    """A destroyed session: the renewer (a real thread) reports it, and the lock's loss is
    reported by the watcher (another real thread) or through the session. Every record is
    emitted on the hub's thread, where no two real threads meet on a handler's gevent lock
    (that left a lost lock's abort undelivered, see the test above)."""
    out = run_green_child(
        f"""
        from celery_consul_lock import ConsulLock
        from celery_consul_lock.consul import ConsulClient

        lock = ConsulLock({key!r}, address={consul.address!r}, ttl=10, lock_delay=2)
        assert lock.acquire()
        sid = lock.session_id
        ConsulClient(lock.settings).session_destroy(sid)
        wanted = ("lock {key} lost: ", "session " + sid + " lost: ")
        until(lambda: all(any(r["message"].startswith(w) for r in records) for w in wanted), 30)
        print(json.dumps({{"lost": lock.lost.is_set(), "records": records}}))
        """
    )
    messages = [r["message"] for r in out["records"]]
    assert out["lost"], messages
    assert any(m.startswith(f"lock {key} lost: ") for m in messages), messages
    assert any(m.startswith("session ") and " lost: " in m for m in messages), messages
    assert all(r["main"] for r in out["records"]), out["records"]
