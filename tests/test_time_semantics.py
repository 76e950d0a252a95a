"""Time semantics of periodic entries, on a simulated clock (pure logic: Celery's own
schedules, our tick ids): a crontab entry in a non-UTC timezone across the spring-forward and
fall-back transitions, one-off entries, solar entries' tick ids, run-now copies."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from celery import Celery
from celery.beat import ScheduleEntry
from celery.schedules import crontab, solar

from celery_consul_lock.beat import tick_of
from celery_consul_lock.entries import NEVER, once
from celery_consul_lock.ticks import Tick, crontab_tick

BERLIN = ZoneInfo("Europe/Berlin")
UTC = timezone.utc


@pytest.fixture
def app() -> Celery:
    app = Celery("time", set_as_current=False)
    app.conf.timezone = "Europe/Berlin"
    return app


def fire_times(app: Celery, spec: dict, start: datetime, days: float) -> list[datetime]:
    """When a leader that ticks every 20 s sends the crontab entry (UTC): ``is_due`` on a
    simulated clock, ``last_run_at`` moved to the send as Celery's ``reserve`` does."""
    clock = {"now": start}
    sched = crontab(nowfun=lambda: clock["now"], app=app, **spec)
    entry = ScheduleEntry(name="nightly", task="t", schedule=sched, last_run_at=start, app=app)
    fired = []
    t = start
    while t < start + timedelta(days=days):
        clock["now"] = t
        if entry.is_due()[0]:
            fired.append(t)
            entry.last_run_at = t
        t += timedelta(seconds=20)
    return fired


@pytest.mark.parametrize(
    "start, local, ticks",
    [
        pytest.param(
            # 2026-03-29 02:00 CET -> 03:00 CEST in Berlin: 02:30 does not exist that night.
            datetime(2026, 3, 27, 11, tzinfo=UTC),
            ["03-28 02:30 CET", "03-29 03:30 CEST", "03-30 02:30 CEST"],
            ["2026-03-28T01:30:00Z", "2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"],
            id="spring-forward: once, at 03:30 CEST",
        ),
        pytest.param(
            # 2026-10-25 03:00 CEST -> 02:00 CET: 02:30 comes twice (00:30 and 01:30 UTC).
            datetime(2026, 10, 23, 10, tzinfo=UTC),
            ["10-24 02:30 CEST", "10-25 02:30 CEST", "10-26 02:30 CET"],
            ["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"],
            id="fall-back: once, at the first 02:30",
        ),
    ],
)
def test_a_0230_daily_crontab_in_berlin_runs_once_on_each_transition_night(app, start, local, ticks):
    fired = fire_times(app, {"minute": 30, "hour": 2}, start, 3)
    assert [f.astimezone(BERLIN).strftime("%m-%d %H:%M %Z") for f in fired] == local
    assert [str(crontab_tick("nightly", f)) for f in fired] == [f"nightly@{t}" for t in ticks]


def test_an_hourly_crontab_runs_every_real_hour_in_spring_and_skips_the_repeated_hour_in_fall(app):
    spring = fire_times(app, {"minute": 0}, datetime(2026, 3, 28, 23, 30, tzinfo=UTC), 0.2)
    fall = fire_times(app, {"minute": 0}, datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 0.2)
    as_utc = [[f.strftime("%H:%M") for f in fired] for fired in (spring, fall)]
    # Spring: 01:00 CET, then 03:00 CEST (02:00 does not exist), 04:00 ...: every real hour once.
    # Fall: 02:00 CEST, then 03:00 CET: the repeated 02:00 (CET) is taken as already run.
    assert as_utc == [["00:00", "01:00", "02:00", "03:00", "04:00"], ["00:00", "02:00", "03:00", "04:00"]]
    assert len({crontab_tick("h", f) for f in spring + fall}) == len(spring + fall)


def test_a_one_off_entry_is_due_once_at_its_time_with_that_time_as_tick_id():
    at = datetime(2030, 1, 1, 3, 0, 0, 250000, tzinfo=UTC)
    clock = {"now": at - timedelta(seconds=5)}
    sched = once(at, nowfun=lambda: clock["now"])
    entry = ScheduleEntry(name="migrate", task="t", schedule=sched, last_run_at=NEVER)
    due, wait = entry.is_due()
    assert not due and wait == pytest.approx(5)
    clock["now"] = at + timedelta(seconds=1)
    assert entry.is_due()[0] and str(tick_of(entry)) == "migrate@2030-01-01T03:00:00.250Z"
    entry.last_run_at = clock["now"]  # sent: what a new leader loads from the state after a failover
    clock["now"] = at + timedelta(days=3)
    assert not entry.is_due()[0]


def test_a_solar_entrys_tick_id_is_the_events_time_to_the_second_whenever_it_is_sent(app):
    last = datetime(2026, 6, 20, 12, tzinfo=UTC)
    clock = {"now": last}
    sched = solar("sunset", 52.52, 13.40, nowfun=lambda: clock["now"], app=app)
    event = last + sched.remaining_estimate(last)
    ids = set()
    for late in (0.0, 0.4, 7.0):  # beats sending the event at slightly different moments
        clock["now"] = event + timedelta(seconds=late)
        entry = ScheduleEntry(name="lights", task="t", schedule=sched, last_run_at=last, app=app)
        assert entry.is_due()[0]
        ids.add(str(tick_of(entry)))
    rounded = (event + timedelta(milliseconds=500)).replace(microsecond=0)
    assert ids == {f"lights@{rounded.strftime('%Y-%m-%dT%H:%M:%S')}Z"}
    assert 19 <= event.astimezone(UTC).hour <= 20  # a Berlin midsummer sunset, in UTC


def test_a_run_now_copy_carries_its_own_tick_id():
    entry = ScheduleEntry(name="report", task="t", schedule=crontab(minute=0), last_run_at=NEVER)
    entry.consul_lock_tick = Tick.of("report", datetime(2026, 11, 30, 11, 5, 1, 123000, tzinfo=UTC))
    assert str(tick_of(entry)) == "report@2026-11-30T11:05:01.123Z"
