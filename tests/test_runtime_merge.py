"""How a leading ConsulLeaderScheduler merges the runtime schedule into its own, driven
in-process (ticks called by the test) against a real Consul dev agent and Redis."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest

from celery_consul_lock import ConsulSettings, EntryDefinition, RuntimeSchedule
from celery_consul_lock.beat import ConsulLeaderScheduler

from . import test_beat_state
from .servers import free_port, wait_for
from .test_beat_state import lead

#: The in-process scheduler fixture of test_beat_state, shared (its config entry: ``job``).
make_scheduler = test_beat_state.make_scheduler


@pytest.fixture
def scheduler(make_scheduler) -> ConsulLeaderScheduler:
    """A scheduler whose config entry ``job`` is due hourly, elected leader."""
    made = make_scheduler(every=3600.0)
    lead(made)
    return made


def store_of(scheduler: ConsulLeaderScheduler) -> RuntimeSchedule:
    return RuntimeSchedule(scheduler.beat_config.settings, scheduler.beat_config.name)


def tick_until(scheduler: ConsulLeaderScheduler, what: str, predicate) -> None:
    wait_for(lambda: scheduler.tick() is not None and predicate(), 5, what, interval=0)


def test_a_runtime_entry_shadowed_by_a_config_entry_of_its_name_is_ignored_with_a_warning(make_scheduler, caplog):
    scheduler = make_scheduler(every=3600.0)
    # Written before the config gained this name (a store without the app cannot tell).
    store_of(scheduler).save(EntryDefinition("job", "proj.other", 1.0))
    caplog.set_level(logging.WARNING, "celery_consul_lock.runtime")
    lead(scheduler)
    assert scheduler.schedule["job"].task == "proj.noop"
    assert "entry job is also in beat_schedule, which wins" in caplog.text


def test_an_args_edit_keeps_the_entrys_state_and_a_schedule_edit_restarts_it(scheduler):
    store = store_of(scheduler)
    store.save(EntryDefinition("rt", "proj.noop", 3600.0, args=(1,)))
    tick_until(scheduler, "the entry to be taken up", lambda: "rt" in scheduler.schedule)
    entry = scheduler.schedule["rt"]
    entry.last_run_at -= timedelta(minutes=10)
    entry.total_run_count = 4
    before = entry.last_run_at
    store.save(EntryDefinition("rt", "proj.noop", 3600.0, args=(2,), index=store.get("rt").index))
    tick_until(scheduler, "the args edit", lambda: scheduler.schedule["rt"].args == (2,))
    assert scheduler.schedule["rt"].last_run_at == before and scheduler.schedule["rt"].total_run_count == 4
    store.save(EntryDefinition("rt", "proj.noop", 1800.0, args=(2,), index=store.get("rt").index))
    tick_until(scheduler, "the schedule edit", lambda: scheduler.schedule["rt"].schedule.run_every.total_seconds() == 1800)
    assert scheduler.schedule["rt"].last_run_at > before and scheduler.schedule["rt"].total_run_count == 0


def test_a_disabled_config_entry_is_parked_and_comes_back_with_its_state(scheduler):
    scheduler.schedule["job"].total_run_count = 9
    store = RuntimeSchedule(scheduler.beat_config.settings, scheduler.beat_config.name, scheduler.app)
    store.disable("job")
    tick_until(scheduler, "the disable", lambda: "job" not in scheduler.schedule)
    store.enable("job")
    tick_until(scheduler, "the enable", lambda: "job" in scheduler.schedule)
    assert scheduler.schedule["job"].total_run_count == 9


def test_a_leader_that_cannot_read_the_runtime_schedule_does_not_spin(scheduler):
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


def test_a_beat_elected_while_paused_sends_nothing_until_resumed(make_scheduler):
    first = make_scheduler(every=0.2)
    store_of(first).pause(by="test")
    lead(first)
    first.max_interval = 0.2
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        first.tick()
    assert first.runtime.paused and first.schedule["job"].total_run_count == 0
    store_of(first).resume()
    tick_until(first, "a send after resume", lambda: first.schedule["job"].total_run_count >= 1)
