"""ConsulLockedTask in real `celery worker` processes, over a real Redis and Consul."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from celery_consul_lock import TICK_HEADER, ConsulSettings, Tick, is_skipped
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.testing import consul_binary, spawn, start_beat
from celery_consul_lock.ticks import read_mark

from .servers import start_consul, wait_consul_ready, wait_for
from .workers import ROOT, wait_results, worker_env


def runs(r) -> list[dict]:
    return [json.loads(x) for x in r.lrange("runs", 0, -1)]


def intervals(records: list[dict], **match) -> list[tuple[float, float, str]]:
    starts = {x["id"]: x["t"] for x in records if x["kind"] == "start" and all(x.get(k) == v for k, v in match.items())}
    ends = {x["id"]: x["t"] for x in records if x["kind"] == "end"}
    return sorted((starts[i], ends[i], i) for i in starts if i in ends)


def assert_no_overlap(spans: list[tuple[float, float, str]]) -> None:
    for (s1, e1, a), (s2, e2, b) in itertools.pairwise(spans):
        assert s2 >= e1, f"runs {a} [{s1}, {e1}] and {b} [{s2}, {e2}] overlap"


def test_fifty_concurrent_sends_never_overlap_and_skips_are_reported(proj, workers, r):
    workers(2, concurrency=4)
    results = [proj.backup.delay(1.0) for _ in range(50)]
    values = wait_results(results, 120)
    executed = [v for v in values if v == "done"]
    skipped = [v for v in values if is_skipped(v)]
    assert len(executed) + len(skipped) == 50 and executed
    spans = intervals(runs(r), task="backup")
    assert len(spans) == len(executed)
    assert_no_overlap(spans)
    # Each skip names the run that held the lock, and the skip signal fired for each.
    ran_ids = {s[2] for s in spans}
    assert all(v["reason"] == "held" and v["holder_task_id"] in ran_ids for v in skipped)
    assert r.llen("skips") == len(skipped)


def test_skips_while_consul_lock_cli_holds_the_key(proj, workers, consul, tmp_path):
    workers(1, concurrency=1)
    flag = tmp_path / "started"
    args = [consul_binary(), "lock", f"-http-addr={consul.address}", "locks/proj.backup", f"touch {flag}; sleep 60"]
    cli = spawn("consul-lock", args, tmp_path)
    try:
        wait_for(flag.exists, 30, "consul lock to run its child", procs=[cli])
        value = proj.backup.delay(0.1).get(timeout=30)
        assert is_skipped(value) and value["reason"] == "held"
        assert "Consul lock" in value["holder"], value
    finally:
        cli.stop(timeout=30)  # SIGTERM: it releases the key
    assert proj.backup.delay(0.1).get(timeout=30) == "done"


def test_skips_while_a_curl_script_holds_the_key(proj, workers, consul):
    workers(1, concurrency=1)
    url = consul.url
    sid = json.loads(
        subprocess.check_output(
            ["curl", "-sS", "-X", "PUT", f"{url}/v1/session/create", "-d", '{"Name": "cron-backup", "TTL": "30s"}']
        )
    )["ID"]
    try:
        got = subprocess.check_output(
            ["curl", "-sS", "-X", "PUT", f"{url}/v1/kv/locks/proj.backup/.lock?acquire={sid}", "-d", "cron on web1"]
        )
        assert got.strip() == b"true"
        value = proj.backup.delay(0.1).get(timeout=30)
        assert is_skipped(value) and "cron on web1" in value["holder"] and "cron-backup" not in (value["holder_task_id"] or "")
    finally:
        # As a careful script does: release, then destroy (a destroy alone puts the key
        # behind the session's 15 s lock-delay for the tests that follow).
        subprocess.check_output(["curl", "-sS", "-X", "PUT", f"{url}/v1/kv/locks/proj.backup/.lock?release={sid}"])
        subprocess.check_output(["curl", "-sS", "-X", "PUT", f"{url}/v1/session/destroy/{sid}"])


def send_tick(proj, tick: Tick, seconds: float = 0.2):
    return proj.ticked.apply_async((seconds,), headers={TICK_HEADER: str(tick)})


def test_a_tick_runs_once_even_when_sent_again_after_it_finished(proj, workers, r, consul):
    workers(1, concurrency=2)
    due = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
    tick = Tick.of("nightly", due)
    assert send_tick(proj, tick).get(timeout=30) == str(tick)
    time.sleep(2)  # not an assertion: the scenario, a copy arriving 2 s after the run
    again = send_tick(proj, tick).get(timeout=30)
    assert is_skipped(again) and again["reason"] == "duplicate-tick"
    newer = Tick.of("nightly", due + timedelta(minutes=1))
    assert send_tick(proj, newer).get(timeout=30) == str(newer)
    older = send_tick(proj, tick).get(timeout=30)
    assert is_skipped(older) and older["reason"] == "duplicate-tick"
    starts = [x for x in runs(r) if x["kind"] == "start"]
    assert [x["tick"] for x in starts] == [str(tick), str(newer)]
    settings = ConsulSettings(address=consul.address)
    assert read_mark(ConsulClient(settings), settings, "nightly").epoch == newer.epoch


def test_worker_killed_mid_run_runs_the_tick_again_exactly_once(proj, workers, r, consul):
    (worker,) = workers(1, concurrency=1, env={"TEST_TTL": "10", "TEST_LOCK_DELAY": "2"})
    tick = Tick.of("killed", datetime(2026, 11, 26, 4, 0, tzinfo=timezone.utc))
    result = send_tick(proj, tick, seconds=3)
    first = wait_for(lambda: [x for x in runs(r) if x["kind"] == "start"], 30, "the first run to start")[0]
    # SIGKILL the pool process running the body (not the main worker process).
    os.kill(first["pid"], signal.SIGKILL)
    assert result.get(timeout=90) == str(tick)
    records = runs(r)
    ends = [x for x in records if x["kind"] == "end"]
    assert len(ends) == 1 and ends[0]["tick"] == str(tick)
    assert len([x for x in records if x["kind"] == "start"]) == 2
    settings = ConsulSettings(address=consul.address)
    assert read_mark(ConsulClient(settings), settings, "killed").epoch == tick.epoch
    assert "waiting up to" in worker.log_text()


def worker_behind_a_stopped_agent(workers, tmp_path, **env: str):
    """A worker whose agent ran when it started and is stopped now: (that agent, the worker)."""
    agent = start_consul(tmp_path / "down", node="down")
    try:
        wait_consul_ready(agent)
        (worker,) = workers(1, concurrency=1, consul_address=agent.address, env=env)
    finally:
        agent.stop()
    return agent, worker


def test_consul_down_fail_closed_refuses_and_fail_open_runs(proj, workers, r, tmp_path):
    """Without requeues (consul_lock_requeue_max=0) and the agent watch, fail closed fails
    the run at once, as before either existed."""
    agent, worker = worker_behind_a_stopped_agent(workers, tmp_path, TEST_REQUEUE_MAX="0", TEST_AGENT_WATCH="false")
    closed = proj.backup.delay(0.1)
    closed.get(timeout=30, propagate=False)
    assert closed.state == "FAILURE"
    assert f"http://{agent.address}" in str(closed.result) and "unreachable" in str(closed.result)
    assert runs(r) == []
    opened = proj.backup.apply_async((0.1,), headers={"consul_lock": {"fail_policy": "open"}})
    assert opened.get(timeout=30) == "done"
    assert len([x for x in runs(r) if x["kind"] == "end"]) == 1
    assert "WITHOUT its lock" in worker.log_text()


def test_consul_down_requeues_without_eating_retries_then_fails_past_its_bound(proj, workers, r, tmp_path):
    """Without the agent watch the worker takes its own copies back: each run sends one more
    (counted in the consul_lock_requeue header, not in Celery's retries) until the bound."""
    _, worker = worker_behind_a_stopped_agent(workers, tmp_path, TEST_REQUEUE_MAX="3", TEST_AGENT_WATCH="false")
    result = proj.retrying.delay()  # max_retries=2: three requeues would exceed it if they counted
    result.get(timeout=30, propagate=False)
    assert result.state == "FAILURE" and "unreachable" in str(result.result), (result.state, result.result)
    assert runs(r) == []
    log = worker.log_text()
    for n in (1, 2, 3):
        assert f"sent back to the queue for another worker (requeue {n} of at most 3; no agent watch in this worker)" in log
    assert "requeue 4 of" not in log
    assert "fails: Consul is unreachable and it was requeued 3 times already (at most 3)" in log
    assert "MaxRetriesExceeded" not in log


def test_a_run_whose_agent_is_down_is_handed_back_and_runs_once_the_agent_answers(proj, workers, r, tmp_path):
    """The agent dies between two of the watch's probes (10 s apart here) and the worker at
    once takes a message: the run wakes the watch, which stops the worker consuming, then
    sends its copy back. The copy waits in the queue (no other worker) until the agent
    answers and the worker consumes again, then runs once. (A worker whose agent is down
    when it starts takes nothing until it answers: tests/test_startup.py.)"""
    agent = start_consul(tmp_path / "down", node="down")
    try:
        wait_consul_ready(agent)
        (worker,) = workers(1, concurrency=1, consul_address=agent.address, env={"TEST_AGENT_PROBE_INTERVAL": "10"})
        agent.proc.kill()  # at once: the message below is taken long before the next probe
        result = proj.backup.delay(0.1)
        handed = "(requeue 1 of at most 100; this worker stopped consuming"
        wait_for(lambda: handed in worker.log_text(), 20, "the run to hand its message back")
        agent.proc.restart()
        wait_consul_ready(agent)
        assert result.get(timeout=45) == "done"
    finally:
        agent.stop()
    log = worker.log_text()
    down = f"Consul agent at http://{agent.address} is unreachable (connection refused): this worker stops consuming from celery"
    up = f"Consul agent at http://{agent.address} answers again after"
    assert log.count(down) == 1 and log.count(up) == 1 and log.count("sent back to the queue") == 1, log[-3000:]
    assert log.index(down) < log.index(handed) < log.index(up)
    assert len([x for x in runs(r) if x["kind"] == "end"]) == 1


def test_keys_from_arguments_lock_per_customer(proj, workers, r):
    workers(1, concurrency=4)
    a1, b, a2 = proj.report.delay(1, 1.5), proj.report.delay(2, 1.5), proj.report.delay(1, 1.5)
    values = wait_results([a1, b, a2], 60)
    assert values[1] == "report 2"
    assert sorted(map(is_skipped, [values[0], values[2]])) == [False, True]
    spans1 = intervals(runs(r), customer=1)
    spans2 = intervals(runs(r), customer=2)
    assert len(spans1) == 1 and len(spans2) == 1
    # Different customers ran at the same time.
    assert spans1[0][0] < spans2[0][1] and spans2[0][0] < spans1[0][1]


@pytest.mark.parametrize(("pool", "concurrency", "runs_n"), [("prefork", 2, 1000), ("threads", 4, 300), ("solo", 1, 300)])
def test_pools_share_one_session_per_process_and_leak_none(proj, workers, consul, pool, concurrency, runs_n):
    before = {s["ID"] for s in consul.api("/v1/session/list")}
    (worker,) = workers(1, pool=pool, concurrency=concurrency)
    values = wait_results([proj.locked_noop.delay(i) for i in range(runs_n)], 300)
    assert values == list(range(runs_n))
    during = {s["ID"] for s in consul.api("/v1/session/list")} - before
    assert 1 <= len(during) <= (concurrency if pool == "prefork" else 1)
    worker.stop()
    wait_for(lambda: {s["ID"] for s in consul.api("/v1/session/list")} == before, 30, "the worker's sessions to be destroyed")


def test_django_database_scheduler_two_instances_one_dispatches(proj, workers, r, consul, redis_server, tmp_path):
    """django-celery-beat's DatabaseScheduler, leader-elected: two beats on one SQLite file."""
    env = worker_env(
        redis_server.url,
        consul.address,
        TEST_SQLITE=str(tmp_path / "db.sqlite3"),
        DJANGO_SETTINGS_MODULE="tests.djproj.settings",
        TEST_BEAT_NAME=f"dj-{uuid.uuid4().hex[:6]}",
    )
    subprocess.run([sys.executable, "-m", "django", "migrate", "-v", "0"], env=env, cwd=ROOT, check=True)
    workers(1, concurrency=2)
    two_beats_one_dispatches(
        "tests.djproj.celery_app", "celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler", env, tmp_path, r
    )


def test_persistent_scheduler_leader_elected_two_instances_one_dispatches(proj, workers, r, consul, redis_server, tmp_path):
    """Celery's default PersistentScheduler, leader-elected: each beat has its own file."""
    env = worker_env(redis_server.url, consul.address, TEST_BEAT_INTERVAL="1", TEST_BEAT_NAME=f"ps-{uuid.uuid4().hex[:6]}")
    workers(1, concurrency=2)
    two_beats_one_dispatches("tests.proj.app", "celery_consul_lock.beat:LeaderPersistentScheduler", env, tmp_path, r)


def two_beats_one_dispatches(app_path: str, scheduler: str, env: dict[str, str], tmp_path, r) -> None:
    """Start two beats of ``scheduler``: exactly one is elected and sends, each tick once; the
    standby neither sends nor writes its schedule."""
    beats = []
    try:
        for i in range(2):
            beats.append(start_beat(f"beat{i}", tmp_path, env, app_path=app_path, scheduler=scheduler, cwd=ROOT))
        wait_for(lambda: len([x for x in runs(r) if x["kind"] == "tick"]) >= 5, 60, "five heartbeats", procs=beats)
        ticks = [x for x in runs(r) if x["kind"] == "tick"]
        assert len({x["instance"] for x in ticks}) == 1
        assert len({x["tick"] for x in ticks}) == len(ticks)
        logs = [b.log_text() for b in beats]
        assert len([log for log in logs if "elected leader" in log]) == 1
        standby = next(log for log in logs if "elected leader" not in log)
        assert "standing by" in standby and "Sending due task" not in standby and "Writing entries" not in standby
    finally:
        for b in beats:
            b.stop()


@pytest.mark.parametrize("task_name", ["guarded", "checked"])
def test_lock_lost_mid_run_raises_in_the_body(proj, workers, r, consul, task_name):
    workers(1, concurrency=1)
    result = getattr(proj, task_name).delay(30)
    start = wait_for(lambda: [x for x in runs(r) if x["kind"] == "start"], 30, "the run to start")[0]
    time.sleep(1.0)  # not an assertion: let the lock's watcher start (it starts after 0.5 s)
    consul.api(f"/v1/kv/{start['key']}", "DELETE")
    result.get(timeout=30, propagate=False)
    assert result.state == "FAILURE" and "LockLost" in type(result.result).__name__ + repr(result.result)
    assert start["key"] in str(result.result) and "deleted" in str(result.result), result.result  # the key and why
    assert not [x for x in runs(r) if x["kind"] == "end"]


def test_on_held_retry_counts_against_max_retries_then_fails(proj, workers, r, consul):
    from celery_consul_lock import ConsulLock

    workers(1, concurrency=1)
    holder = ConsulLock("locks/proj.retrying/.lock", address=consul.address, lock_delay=1)
    assert holder.acquire()
    try:
        result = proj.retrying.delay()
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE" and "LockHeld" in type(result.result).__name__
        assert runs(r) == []
        # With the lock free, it runs.
        holder.release()
        assert proj.retrying.delay().get(timeout=30) == "ran"
    finally:
        holder.release()


def test_on_held_wait_runs_once_the_holder_releases(proj, workers, r, consul):
    import threading

    from celery_consul_lock import ConsulLock

    workers(1, concurrency=1)
    holder = ConsulLock("locks/proj.retrying/.lock", address=consul.address, lock_delay=1)
    assert holder.acquire()
    timer = threading.Timer(2.0, holder.release)
    timer.start()
    try:
        t0 = time.monotonic()
        assert proj.waiting.delay().get(timeout=30) == "ran"
        assert time.monotonic() - t0 >= 1.5
    finally:
        timer.join()
        holder.release()


def test_messages_from_a_deposed_leader_are_dropped(proj, workers, r):
    """A message its leader sent after a newer leader was elected is dropped; tokens are per
    scheduler (see tests/test_redelivery.py for messages sent before, arriving after)."""
    workers(1, concurrency=1)
    leader = "consul_lock_leader"
    elected = time.time()
    header = {"scheduler": "s1", "token": 50, "instance": "b", "sent_at": elected + 0.1, "elected_at": elected}
    newer = proj.backup.apply_async((0.05,), headers={leader: header})
    assert newer.get(timeout=30) == "done"
    header = {"scheduler": "s1", "token": 40, "instance": "a", "sent_at": elected + 0.2, "elected_at": elected - 60}
    older = proj.backup.apply_async((0.05,), headers={leader: header})
    value = older.get(timeout=30)
    assert is_skipped(value) and value["reason"] == "stale-leader"
    header = {"scheduler": "s2", "token": 1, "instance": "c", "sent_at": elected + 0.3, "elected_at": elected - 60}
    other = proj.backup.apply_async((0.05,), headers={leader: header})
    assert other.get(timeout=30) == "done"  # tokens are per scheduler
    assert len([x for x in runs(r) if x["kind"] == "end"]) == 2
