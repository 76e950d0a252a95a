"""ConsulLeaderScheduler's shared state, driven in-process against a real Consul and Redis."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from celery import Celery

from celery_consul_lock.beat import ConsulLeaderScheduler
from celery_consul_lock.consul import ConsulClient

from .servers import wait_for


@pytest.fixture
def make_scheduler(consul, redis_server, request):
    made = []
    name = f"state-{request.node.name[-30:].replace('[', '-').replace(']', '')}"

    def make(every: float = 60.0, missed: str = "run-once") -> ConsulLeaderScheduler:
        app = Celery("state", set_as_current=False)
        app.conf.update(
            broker_url=redis_server.url,
            consul_lock_address=consul.address,
            consul_lock_beat_name=name,
            consul_lock_beat_missed=missed,
            beat_schedule={"job": {"task": "proj.noop", "schedule": every}},
        )
        scheduler = ConsulLeaderScheduler(app=app)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def lead(scheduler: ConsulLeaderScheduler) -> None:
    """Tick until elected (the first leader tick loads the state from Consul)."""
    wait_for(
        lambda: scheduler.tick() is not None and scheduler.election.is_leader() and scheduler.led_generation, 30, "election"
    )


def stored(consul, scheduler: ConsulLeaderScheduler) -> dict:
    _, entry = ConsulClient(scheduler.beat_config.settings).kv_get(scheduler.state.key("job"))
    return json.loads(entry.value)


def test_a_new_leader_continues_from_the_stored_state(make_scheduler, consul):
    first = make_scheduler()
    lead(first)
    first.schedule["job"].last_run_at -= timedelta(seconds=30)
    first.schedule["job"].total_run_count = 7
    first.sync()
    first.close()
    second = make_scheduler()
    lead(second)
    entry = second.schedule["job"]
    assert entry.total_run_count == 7 and stored(consul, second)["total_run_count"] == 7


def test_a_changed_schedule_starts_afresh(make_scheduler, consul):
    first = make_scheduler(every=60)
    lead(first)
    first.schedule["job"].total_run_count = 5
    first.sync()
    first.close()
    second = make_scheduler(every=30)  # the definition changed
    lead(second)
    assert second.schedule["job"].total_run_count == 0


def test_missed_ticks_skip_policy_resumes_from_now(make_scheduler, consul):
    first = make_scheduler(every=10)
    lead(first)
    first.schedule["job"].last_run_at -= timedelta(minutes=5)
    first.sync()
    first.close()
    second = make_scheduler(every=10, missed="skip")
    lead(second)
    entry = second.schedule["job"]
    assert (second.app.now() - entry.last_run_at).total_seconds() < 5  # not 5 minutes ago


def test_a_standby_writes_no_state(make_scheduler, consul):
    leader = make_scheduler()
    lead(leader)
    leader.sync()
    before = stored(consul, leader)
    standby = make_scheduler()
    for _ in range(5):
        standby.tick()
    standby.sync()
    standby.close()
    assert not standby.election.is_leader() and stored(consul, leader) == before


def test_leader_signals_fire_and_a_failing_receiver_breaks_nothing(make_scheduler):
    from celery_consul_lock.signals import beat_leader_elected, beat_leader_lost

    seen = []

    def record(sender, **kw):
        seen.append(kw)

    def broken(sender, **kw):
        raise RuntimeError("a broken metrics client")

    for signal in (beat_leader_elected, beat_leader_lost):
        signal.connect(record, weak=False)
        signal.connect(broken, weak=False)
    try:
        scheduler = make_scheduler()
        lead(scheduler)
        scheduler.close()
    finally:
        for signal in (beat_leader_elected, beat_leader_lost):
            signal.disconnect(record)
            signal.disconnect(broken)
    assert [sorted(set(k) - {"signal"}) for k in seen] == [
        ["fencing_token", "instance", "scheduler"],
        ["instance", "reason", "scheduler"],
    ]
    assert seen[0]["scheduler"] == scheduler.beat_config.name and seen[1]["reason"] == "stopped"


def test_closing_twice_leaves_the_election_once(make_scheduler, caplog):
    """Celery's beat closes its scheduler twice at SIGTERM (its handler syncs, then
    ``Service.start`` syncs again on the way out): the second close says nothing."""
    scheduler = make_scheduler()
    lead(scheduler)
    with caplog.at_level(logging.INFO, logger="celery_consul_lock"):
        scheduler.close()
        scheduler.close()
    left = [r.getMessage() for r in caplog.records if "left the election" in r.getMessage()]
    assert left == [f"beat {scheduler.election.instance}: left the election (released the leader lock)"]
