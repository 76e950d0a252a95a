"""Exactly once through duplicate deliveries, retries, late messages and forks, with real
`celery worker` processes (issue 12): a copy of a message whose run is alive is skipped, a
copy of one that died runs, a retry of a failed tick runs even after a later tick completed,
a message is judged stale by when its leader sent it, and a forked child never touches the
parent's lock."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from celery_consul_lock import TICK_HEADER, ConsulLock, ConsulSettings, Tick, is_skipped
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.ticks import read_mark

from .servers import wait_for
from .test_task import runs


def skips(r) -> list[dict]:
    return [json.loads(x) for x in r.lrange("skips", 0, -1)]


def starts(r, **match) -> list[dict]:
    return [x for x in runs(r) if x["kind"] == "start" and all(x.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_second_delivery_of_a_live_run_is_skipped_and_the_body_runs_once(proj, workers, r, pool):
    (worker,) = workers(1, concurrency=2, pool=pool)
    task_id = str(uuid.uuid4())
    first = proj.backup.apply_async((2.0,), task_id=task_id)
    wait_for(lambda: starts(r, id=task_id), 30, "the first delivery to start")
    proj.backup.apply_async((2.0,), task_id=task_id)  # the same message, delivered again
    skip = wait_for(lambda: [s for s in skips(r) if s["task_id"] == task_id], 30, "the copy to be skipped")
    assert skip[0]["reason"] == "duplicate-delivery", skip
    assert first.get(timeout=30) == "done"
    end = wait_for(lambda: [x for x in runs(r) if x["kind"] == "end"], 30, "the live run to end")[0]
    assert skip[0]["t"] < end["t"], "the copy waited for the live run instead of being skipped at once"
    # A copy arriving after the run finished finds the run's release in the key: skipped too.
    late = proj.backup.apply_async((2.0,), task_id=task_id)
    wait_for(lambda: len(skips(r)) >= 2, 30, "the late copy to be skipped")
    assert [s["reason"] for s in skips(r)] == ["duplicate-delivery", "duplicate-delivery"]
    assert late.get(timeout=30) == "done"  # a duplicate stores no result: the run's stands
    assert len(starts(r, id=task_id)) == 1, runs(r)
    assert "duplicate delivery" in worker.log_text()
    # Another message (another task id) is still skipped as "held" while a run holds the key.
    other = proj.backup.apply_async((1.0,))
    wait_for(lambda: starts(r, id=other.id), 30, "another message to start")
    third = proj.backup.apply_async((0.1,))
    value = third.get(timeout=30)
    assert is_skipped(value) and value["reason"] == "held", value


def test_a_duplicate_under_on_held_wait_is_skipped_at_once_too(proj, workers, r):
    """The same-message rules come before lock_on_held: with "wait", a copy of a live run is
    still a duplicate, skipped at once with no result of its own (not a "held" skip after
    the wait)."""
    workers(1, concurrency=2)
    task_id, wait = str(uuid.uuid4()), {"consul_lock": {"on_held": "wait", "wait_timeout": 1}}
    first = proj.backup.apply_async((2.0,), task_id=task_id, headers=wait)
    wait_for(lambda: starts(r, id=task_id), 30, "the first delivery to start")
    proj.backup.apply_async((2.0,), task_id=task_id, headers=wait)
    skip = wait_for(lambda: [s for s in skips(r) if s["task_id"] == task_id], 30, "the copy to be skipped")
    assert skip[0]["reason"] == "duplicate-delivery", skip
    assert first.get(timeout=30) == "done"
    assert len(starts(r, id=task_id)) == 1


def test_a_copy_on_another_host_waits_for_the_live_run_and_then_is_skipped(proj, workers, r):
    """The holder runs on another host, whose liveness this host cannot see: the copy waits
    for the key; the key's value after the release says this message's run finished."""
    (here,) = workers(1, concurrency=1, extra_args=["-Q", "here"])
    workers(1, concurrency=1, extra_args=["-Q", "there"], hostname="another-host")
    task_id = str(uuid.uuid4())
    proj.backup.apply_async((2.5,), task_id=task_id, queue="there")
    wait_for(lambda: starts(r, id=task_id), 30, "the run on the other host to start")
    proj.backup.apply_async((2.5,), task_id=task_id, queue="here")
    skip = wait_for(lambda: [s for s in skips(r) if s["task_id"] == task_id], 30, "the copy to be skipped")
    assert skip[0]["reason"] == "duplicate-delivery", skip
    assert [x["kind"] for x in runs(r) if x.get("id") == task_id] == ["start", "end"]
    assert "on another host" in here.log_text()


def test_a_countdown_message_outliving_the_visibility_timeout_runs_once(proj, workers, r):
    """Redis gives a reserved, unacked message to another worker once the visibility timeout
    (here 2 s) passes: a countdown of 8 s makes both workers hold it and run it at its ETA.
    One runs the body; every other copy is a duplicate delivery."""
    env = {"TEST_VISIBILITY_TIMEOUT": "2"}
    workers(2, concurrency=1, env=env)
    result = proj.backup.apply_async((2.0,), countdown=8)
    wait_for(lambda: [x for x in runs(r) if x["kind"] == "end"], 40, "the run to end")
    wait_for(lambda: [s for s in skips(r) if s["task_id"] == result.id], 20, "a copy to be skipped")
    assert result.get(timeout=10) == "done"
    assert len(starts(r, id=result.id)) == 1, runs(r)
    assert {s["reason"] for s in skips(r)} == {"duplicate-delivery"}, skips(r)


def test_a_redelivery_of_a_run_that_died_runs_it(proj, workers, r, consul):
    """The same message's run died holding the key (same host, its pid gone): the copy waits
    for the session to free the key and runs the body (the redelivery the lock must not eat)."""
    (worker,) = workers(1, concurrency=2, env={"TEST_TTL": "10", "TEST_LOCK_DELAY": "1"})
    task_id = str(uuid.uuid4())
    proj.backup.apply_async((30.0,), task_id=task_id)
    first = wait_for(lambda: starts(r, id=task_id), 30, "the first run to start")[0]
    os.kill(first["pid"], signal.SIGKILL)
    proj.backup.apply_async((0.1,), task_id=task_id)
    wait_for(lambda: [x for x in runs(r) if x["kind"] == "end" and x["id"] == task_id], 60, "the redelivery to run")
    assert len(starts(r, id=task_id)) == 2
    assert "its run died holding" in worker.log_text()
    assert not [s for s in skips(r) if s["task_id"] == task_id]


def send_tick(proj, task, tick: Tick, **options):
    return task.apply_async(headers={TICK_HEADER: str(tick)}, **options)


@pytest.mark.parametrize("task_name", ["flaky_tick", "autoretry_tick"])
def test_a_failed_ticks_retry_runs_after_a_later_tick_completed(proj, workers, r, consul, task_name):
    workers(1, concurrency=2, env={"TEST_RETRY_COUNTDOWN": "3"})
    task = getattr(proj, task_name)
    entry = f"flaky-{uuid.uuid4().hex[:6]}"
    due = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
    t1, t2 = Tick.of(entry, due), Tick.of(entry, due + timedelta(seconds=3))
    send_tick(proj, task, t1)
    wait_for(lambda: starts(r, tick=str(t1)), 30, "the first tick's first attempt")
    # The next tick completes before the first one's retry arrives (its retries field
    # says it is a retry: make it complete at once by sending it as a retry).
    task.apply_async(headers={TICK_HEADER: str(t2)}, retries=1)
    wait_for(lambda: [x for x in runs(r) if x["kind"] == "end" and x["tick"] == str(t2)], 30, "the later tick to complete")
    ended = wait_for(
        lambda: [x for x in runs(r) if x["kind"] == "end" and x["tick"] == str(t1)], 30, "the failed tick's retry to complete"
    )
    assert len(ended) == 1
    assert not [s for s in skips(r) if s["reason"] == "duplicate-tick"], skips(r)
    settings = ConsulSettings(address=consul.address)
    # The body's end is on record just before the worker records the tick in its mark.

    def recorded():
        mark = read_mark(ConsulClient(settings), settings, entry)
        return None if mark.open else mark

    mark = wait_for(recorded, 10, "the retry's tick recorded")
    assert mark.epoch == t2.epoch and set(mark.done) == {t1.epoch, t2.epoch}
    # A copy of either tick now is a duplicate.
    for tick in (t1, t2):
        value = send_tick(proj, task, tick, retries=1).get(timeout=30)
        assert is_skipped(value) and value["reason"] == "duplicate-tick", value


def test_a_late_tick_that_never_ran_runs_and_its_copy_does_not(proj, workers, r, consul):
    """A backlog or countdown message of an older tick that never started, arriving after a
    later tick completed, runs (it is not a copy); a copy of it afterwards is skipped."""
    workers(1, concurrency=1)
    entry = f"late-{uuid.uuid4().hex[:6]}"
    due = datetime(2026, 11, 26, 5, 0, tzinfo=timezone.utc)
    early, later = Tick.of(entry, due), Tick.of(entry, due + timedelta(minutes=1))
    assert send_tick(proj, proj.ticked, later).get(timeout=30) == str(later)
    assert send_tick(proj, proj.ticked, early).get(timeout=30) == str(early)
    again = send_tick(proj, proj.ticked, early).get(timeout=30)
    assert is_skipped(again) and again["reason"] == "duplicate-tick"
    assert [x["tick"] for x in starts(r)] == [str(later), str(early)]


def leader_header(token: int, sent_at: float, elected_at: float) -> dict:
    leader = {"scheduler": "s1", "token": token, "instance": f"i{token}", "sent_at": sent_at, "elected_at": elected_at}
    return {"consul_lock_leader": leader}


def test_a_message_is_judged_stale_by_when_its_leader_sent_it_not_by_arrival(proj, workers, r):
    workers(1, concurrency=1)
    elected_newer = 1_000_000.0
    newer = proj.backup.apply_async((0.05,), headers=leader_header(50, elected_newer + 1, elected_newer))
    assert newer.get(timeout=30) == "done"
    # Sent by the previous leader while it led (a retry, a countdown, a backlog): runs.
    before = proj.backup.apply_async((0.05,), headers=leader_header(40, elected_newer - 3, 900_000.0))
    assert before.get(timeout=30) == "done"
    # Sent by the previous leader after the newer one was elected: dropped.
    after = proj.backup.apply_async((0.05,), headers=leader_header(40, elected_newer + 0.5, 900_000.0))
    value = after.get(timeout=30)
    assert is_skipped(value) and value["reason"] == "stale-leader", value
    assert len([x for x in runs(r) if x["kind"] == "end"]) == 2


def test_a_forked_child_never_releases_the_parents_task_lock(proj, workers, r, consul):
    workers(1, concurrency=2)
    result = proj.forking.apply_async((1.5,))
    wait_for(lambda: starts(r, id=result.id), 30, "the forking body to start")
    other = proj.forking.apply_async((0.1,))
    value = other.get(timeout=30)
    assert is_skipped(value) and value["reason"] == "held", value  # the key stayed held
    assert result.get(timeout=30) == "kept", runs(r)
    kinds = Counter(x["kind"] for x in runs(r) if x.get("id") == result.id)
    assert kinds == {"start": 1, "end": 1}, runs(r)
    assert ConsulLock.holder("locks/proj.forking/.lock", settings=ConsulSettings(address=consul.address)) is None


def test_retries_sent_before_a_beat_failover_run_after_the_new_leaders_ticks(harness, r, consul):
    """Every tick's first attempt retries 3 s later. The leader is stopped (SIGTERM): the
    retries of its last ticks arrive after the new leader's ticks, which have completed by
    then. Each must still run, once: not dropped as a deposed leader's message (it was sent
    while its leader led), nor skipped because a later tick completed."""
    consul.api("/v1/kv/celery-consul-lock/ticks/heartbeat", "DELETE")
    harness.extra_env = {"TEST_BEAT_TASK": "proj.flaky_tick", "TEST_RETRY_COUNTDOWN": "3"}
    harness.worker(consul.address)
    for _ in range(2):
        harness.beat(consul.address)
    harness.wait_joined()

    def first_attempts() -> list[dict]:
        return [x for x in starts(r) if x["retries"] == 0]

    records = wait_for(lambda: len(first_attempts()) >= 3 and first_attempts(), 40, "three ticks sent")
    leader = harness.by_instance(records[-1]["instance"])
    stopped = time.time()
    leader.signal(signal.SIGTERM)
    new = wait_for(
        lambda: [x for x in first_attempts() if x["instance"] != leader.instance and x["t"] > stopped], 30, "a new leader's tick"
    )[0]
    # Before the stop, the old leader sent ticks whose retries were still due.
    pending = [x["tick"] for x in first_attempts() if x["instance"] == leader.instance and x["t"] > stopped - 3]
    assert pending, first_attempts()

    # A few more ticks from the new leader, then no more ticks: every tick sent must complete.
    wait_for(lambda: len([x for x in first_attempts() if x["t"] > new["t"]]) >= 2, 20, "more ticks of the new leader")
    for beat in harness.beats:
        beat.stop()
    sent = {x["tick"] for x in first_attempts()}

    def missing() -> set[str]:
        return sent - {x["tick"] for x in runs(r) if x["kind"] == "end"}

    try:
        wait_for(lambda: not missing(), 40, "every tick sent to complete")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {sorted(missing())} never completed; skips {skips(r)}; runs {runs(r)}") from None
    ends = Counter(x["tick"] for x in runs(r) if x["kind"] == "end")
    assert all(n == 1 for n in ends.values()), ends
    assert all(tick in ends for tick in pending), (pending, ends)
    assert not [s for s in skips(r) if s["reason"] in ("stale-leader", "duplicate-tick")], skips(r)


def test_an_acks_late_redelivery_sent_before_a_beat_failover_runs_after_the_new_leaders_ticks(harness, r, consul):
    """The leader is stopped while a worker process runs one of its ticks, and that process is
    killed: the tick's message is redelivered (acks_late) after the new leader's ticks have
    completed, waits for the dead run's session, and runs once."""
    consul.api("/v1/kv/celery-consul-lock/ticks/heartbeat", "DELETE")
    harness.extra_env = {"TEST_BEAT_TASK": "proj.slow_tick", "TEST_TTL": "10", "TEST_LOCK_DELAY": "1"}
    harness.worker(consul.address)
    for _ in range(2):
        harness.beat(consul.address)
    harness.wait_joined()

    def running() -> list[dict]:
        ended = {x["id"] for x in runs(r) if x["kind"] == "end"}
        return [x for x in starts(r) if x["id"] not in ended]

    wait_for(lambda: [x for x in runs(r) if x["kind"] == "end"], 40, "a tick to complete")
    victim = wait_for(lambda: running(), 20, "a tick running")[-1]
    leader = harness.by_instance(victim["instance"])
    leader.signal(signal.SIGTERM)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.time()

    def done(tick: str) -> bool:
        return any(x["kind"] == "end" and x["tick"] == tick for x in runs(r))

    wait_for(
        lambda: [x for x in starts(r) if x["instance"] != leader.instance and x["t"] > killed and done(x["tick"])],
        30,
        "a tick of the new leader to complete",
    )
    wait_for(lambda: done(victim["tick"]), 60, "the killed tick's redelivery to complete")
    assert len(starts(r, tick=victim["tick"])) == 2
    ends = Counter(x["tick"] for x in runs(r) if x["kind"] == "end")
    assert all(n == 1 for n in ends.values()), ends
    assert not [s for s in skips(r) if s["reason"] in ("stale-leader", "duplicate-tick")], skips(r)


def test_a_retry_that_finds_another_run_holding_the_key_waits_instead_of_being_skipped(proj, workers, r, consul):
    """A first attempt is skipped while another run holds the key (the overlap rule); a retry
    of a message is how that message gets done, so it waits for the key instead."""
    (worker,) = workers(1, concurrency=1)
    settings = ConsulSettings(address=consul.address, lock_delay=1)
    holder = ConsulLock("locks/proj.backup/.lock", settings=settings, private_session=True)
    assert holder.acquire()
    try:
        first = proj.backup.apply_async((0.1,)).get(timeout=30)
        assert is_skipped(first) and first["reason"] == "held", first
        retry = proj.backup.apply_async((0.1,), retries=1)
        wait_for(lambda: "is attempt (1, 0) of its message" in worker.log_text(), 20, "the retry to wait for the key")
        assert not starts(r) and retry.state == "PENDING"
    finally:
        holder.release()
    assert retry.get(timeout=30) == "done"
    assert len(starts(r)) == 1


def test_a_message_rejected_with_requeue_runs_on_its_next_delivery(proj, workers, r):
    """Reject(requeue=True) puts the same message back (same task id, same attempt): the key
    is released as unfinished, so the next delivery is not taken for a duplicate."""
    workers(1, concurrency=1)
    result = proj.rejecting.apply_async()
    assert result.get(timeout=30) == "ran"
    assert [x["kind"] for x in runs(r)] == ["start", "start", "end"]
    assert not skips(r)
