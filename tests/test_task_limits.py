"""lock_limit, lock_cooldown and on_held="fail" in real `celery worker` processes (two
workers x four prefork processes, shared by the module's tests), over real Redis and Consul."""

from __future__ import annotations

import json
import time

import pytest
import redis

from celery_consul_lock import ConsulSemaphore, ConsulSettings, is_skipped

from .servers import wait_for
from .workers import start_worker, wait_results, worker_env


@pytest.fixture(scope="module")
def proj(redis_server, consul, tmp_path_factory):
    """tests/proj with two workers of four processes each, for the whole module."""
    from .proj import app as proj_module

    proj_module.app.conf.broker_url = redis_server.url
    proj_module.app.conf.result_backend = redis_server.url
    redis.Redis.from_url(redis_server.url).flushdb()
    workdir = tmp_path_factory.mktemp("limits")
    env = worker_env(redis_server.url, consul.address)
    started = []
    try:
        for _ in range(2):
            started.append(start_worker(proj_module.app, workdir, env, concurrency=4))
        yield proj_module
    finally:
        for w in started:
            w.stop()
            print(w.log_text()[-4000:])


@pytest.fixture
def r(proj, redis_server):
    store = redis.Redis.from_url(redis_server.url)
    store.delete("runs", "skips")
    return store


def records(r, name: str) -> list[dict]:
    return [json.loads(x) for x in r.lrange(name, 0, -1)]


def spans(r, task: str) -> list[tuple[float, float]]:
    runs = records(r, "runs")
    starts = {x["id"]: x["t"] for x in runs if x["kind"] == "start" and x["task"] == task}
    ends = {x["id"]: x["t"] for x in runs if x["kind"] == "end"}
    return sorted((starts[i], ends[i]) for i in starts if i in ends)


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def test_lock_limit_2_never_runs_more_than_two_and_with_wait_runs_every_call(proj, r):
    results = [proj.limited.apply_async((1.0,), headers={"consul_lock": {"on_held": "wait"}}) for _ in range(10)]
    values = wait_results(results, 120)
    assert values == ["done"] * 10, values
    runs = spans(r, "limited")
    assert len(runs) == 10
    assert most_at_once(runs) == 2, runs  # eight processes were free: the limit held them back


def test_lock_limit_2_skips_calls_that_find_both_slots_taken(proj, r):
    results = [proj.limited.delay(1.5) for _ in range(8)]
    values = wait_results(results, 120)
    done = [v for v in values if v == "done"]
    skipped = [v for v in values if is_skipped(v)]
    assert len(done) + len(skipped) == 8 and len(done) >= 2 and skipped, values
    assert {v["reason"] for v in skipped} == {"held"}
    assert all(v["key"] == "locks/proj.limited/.lock" and v["holder_task_id"] for v in skipped)
    assert most_at_once(spans(r, "limited")) <= 2


def test_a_semaphore_held_with_another_limit_fails_the_run_naming_both(proj, r, settings: ConsulSettings):
    with ConsulSemaphore("locks/proj.limited", 3, settings=settings):
        result = proj.limited.delay(0.1)
        result.get(timeout=30, propagate=False)
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "SemaphoreLimitConflict", result.result
    assert "limit 3" in str(result.result) and "limit=2" in str(result.result)
    assert spans(r, "limited") == []


def test_on_held_fail_raises_lock_held_naming_the_key_and_holder(proj, r):
    first = proj.backup.delay(3.0)
    wait_for(lambda: spans_started(r, "backup"), 30, "the first backup to start")
    second = proj.backup.apply_async((0.1,), headers={"consul_lock": {"on_held": "fail"}})
    second.get(timeout=30, propagate=False)
    assert second.state == "FAILURE"
    assert type(second.result).__name__ == "LockHeld"
    assert "locks/proj.backup/.lock" in str(second.result) and "proj.backup" in str(second.result)
    assert first.get(timeout=30) == "done"


def spans_started(r, task: str) -> bool:
    return any(x["kind"] == "start" and x["task"] == task for x in records(r, "runs"))


def test_cooldown_skips_runs_on_any_worker_until_it_has_passed(proj, r):
    assert proj.cooled.delay().get(timeout=30) == "done"
    ended = max(e for _, e in spans(r, "cooled"))
    # Further calls within the 4 s cooldown, on whichever of the eight processes they run,
    # are skipped; the skipped runs do not restart the cooldown. (Calls sent at the same
    # moment may also find the key held by another's cooldown check: skipped as "held".)
    values = [proj.cooled.delay().get(timeout=30) for _ in range(4)]
    assert all(is_skipped(v) and v["reason"] == "cooldown" for v in values), values
    assert [s["reason"] for s in records(r, "skips")] == ["cooldown"] * 4
    assert time.time() < ended + 4, "the skips were not within the cooldown (a slow machine?)"
    wait_for(lambda: time.time() > ended + 4.2, 10, "the cooldown to pass")
    assert proj.cooled.delay().get(timeout=30) == "done"
    assert len(spans(r, "cooled")) == 2
