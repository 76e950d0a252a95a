"""How a leading ConsulLeaderScheduler merges the runtime schedule into its own, driven
in-process (ticks called by the test) against a real Consul dev agent and Redis."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

import pytest
from celery import Celery

from celery_consul_lock import ConsulSettings, EntryDefinition, RuntimeSchedule
from celery_consul_lock.beat import ConsulLeaderScheduler

from .servers import free_port, wait_for


@pytest.fixture
def make(consul, redis_server):
    made = []
    name = f"merge-{uuid.uuid4().hex[:8]}"

    def make_scheduler() -> ConsulLeaderScheduler:
        app = Celery("merge", set_as_current=False)
        app.conf.update(
            broker_url=redis_server.url,
            consul_lock_address=consul.address,
            consul_lock_beat_name=name,
            beat_schedule={"config-job": {"task": "merge.config", "schedule": 3600.0}},
        )
        app.task(name="merge.config", shared=False)(lambda: None)
        app.task(name="merge.runtime", shared=False)(lambda *a, **k: None)
        scheduler = ConsulLeaderScheduler(app=app)
        made.append(scheduler)
        return scheduler

    yield make_scheduler
    for scheduler in made:
        scheduler.close()


def lead(scheduler: ConsulLeaderScheduler) -> None:
    wait_for(lambda: scheduler.tick() is not None and scheduler.election.is_leader() and scheduler.runtime, 30, "election")


def store_of(scheduler: ConsulLeaderScheduler) -> RuntimeSchedule:
    return RuntimeSchedule(scheduler.beat_config.settings, scheduler.beat_config.name)


def tick_until(scheduler: ConsulLeaderScheduler, what: str, predicate) -> None:
    wait_for(lambda: scheduler.tick() is not None and predicate(), 5, what, interval=0)


def test_a_runtime_entry_shadowed_by_a_config_entry_of_its_name_is_ignored_with_a_warning(make, caplog):
    scheduler = make()
    # Written before the config gained this name (a store without the app cannot tell).
    store_of(scheduler).save(EntryDefinition("config-job", "merge.runtime", 1.0))
    caplog.set_level(logging.WARNING, "celery_consul_lock.runtime")
    lead(scheduler)
    assert scheduler.schedule["config-job"].task == "merge.config"
    assert "entry config-job is also in beat_schedule, which wins" in caplog.text


def test_an_args_edit_keeps_the_entrys_state_and_a_schedule_edit_restarts_it(make):
    scheduler = make()
    lead(scheduler)
    store = store_of(scheduler)
    store.save(EntryDefinition("job", "merge.runtime", 3600.0, args=(1,)))
    tick_until(scheduler, "the entry to be taken up", lambda: "job" in scheduler.schedule)
    entry = scheduler.schedule["job"]
    entry.last_run_at -= timedelta(minutes=10)
    entry.total_run_count = 4
    before = entry.last_run_at
    store.save(EntryDefinition("job", "merge.runtime", 3600.0, args=(2,), index=store.get("job").index))
    tick_until(scheduler, "the args edit", lambda: scheduler.schedule["job"].args == (2,))
    assert scheduler.schedule["job"].last_run_at == before and scheduler.schedule["job"].total_run_count == 4
    store.save(EntryDefinition("job", "merge.runtime", 1800.0, args=(2,), index=store.get("job").index))
    tick_until(scheduler, "the schedule edit", lambda: scheduler.schedule["job"].schedule.run_every.total_seconds() == 1800)
    assert scheduler.schedule["job"].last_run_at > before and scheduler.schedule["job"].total_run_count == 0


def test_a_disabled_config_entry_is_parked_and_comes_back_with_its_state(make):
    scheduler = make()
    lead(scheduler)
    scheduler.schedule["config-job"].total_run_count = 9
    store = RuntimeSchedule(scheduler.beat_config.settings, scheduler.beat_config.name, scheduler.app)
    store.disable("config-job")
    tick_until(scheduler, "the disable", lambda: "config-job" not in scheduler.schedule)
    store.enable("config-job")
    tick_until(scheduler, "the enable", lambda: "config-job" in scheduler.schedule)
    assert scheduler.schedule["config-job"].total_run_count == 9


def test_a_leader_that_cannot_read_the_runtime_schedule_does_not_spin(make, consul):
    scheduler = make()
    lead(scheduler)
    runtime = scheduler.runtime
    # From now on the reads go to an address where nothing listens (a refused connection).
    runtime.store.settings = ConsulSettings(address=f"127.0.0.1:{free_port()}", timeout=1)
    runtime._stale = True  # a change was signalled
    scheduler.max_interval = 0.5  # each tick sleeps at most this long when nothing wakes it
    started, ticks = time.monotonic(), 0
    while time.monotonic() - started < 2:
        scheduler.tick()
        ticks += 1
    assert ticks <= 5, f"{ticks} ticks in 2 s: the loop spins while the read fails"
    assert runtime._stale
