"""The runtime schedule's store (celery_consul_lock.entries) against a real Consul dev agent:
the KV layout, check-and-set conflicts, config-entry rules, and every bad input refused with
the field and value named and nothing written."""

from __future__ import annotations

import json
import pickle
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from celery.schedules import crontab, schedule, solar

from celery_consul_lock import EntryConflict, EntryNotFound, InvalidEntry
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.entries import EntryDefinition, RuntimeSchedule, ScheduleWatch, once, schedule_from_json


@pytest.fixture
def app(consul):
    app = Celery("entries", set_as_current=False)
    app.conf.update(
        consul_lock_address=consul.address,
        consul_lock_beat_name=f"entries-{uuid.uuid4().hex[:8]}",
        beat_schedule={"nightly": {"task": "entries.job", "schedule": crontab(minute=0, hour=3)}},
        timezone="Europe/Berlin",
    )

    @app.task(name="entries.job", shared=False)
    def job(n: int = 0) -> int:
        return n

    return app


@pytest.fixture
def store(app) -> RuntimeSchedule:
    return RuntimeSchedule.from_app(app)


def raw(store: RuntimeSchedule) -> dict[str, dict]:
    """Every key under the runtime schedule's folder, as JSON."""
    client = ConsulClient(store.settings)
    try:
        return {kv.key[len(store.prefix) :]: json.loads(kv.value or b"{}") for kv in client.kv_keys(store.prefix)}
    finally:
        client.close()


def test_an_entry_is_stored_under_the_beat_name_and_read_back_with_its_index(store, app):
    saved = store.save(EntryDefinition("every-5", "entries.job", 5, args=(1,), options={"queue": "q1"}))
    assert store.prefix == f"celery-consul-lock/beat/{app.conf.consul_lock_beat_name}/schedule/"
    assert raw(store) == {
        "entries/every-5": {
            "name": "every-5",
            "source": "runtime",
            "task": "entries.job",
            "schedule": {"every": 5.0},
            "args": [1],
            "kwargs": {},
            "options": {"queue": "q1"},
            "enabled": True,
        }
    }
    got = store.get("every-5")
    assert got.index == saved.index and got.schedule.run_every == timedelta(seconds=5) and got.args == (1,)


@pytest.mark.parametrize(
    "sched, stored",
    [
        (schedule(timedelta(minutes=2)), {"every": 120.0}),
        (crontab(minute="*/15", hour="1-5", day_of_week="mon-fri"), {"crontab": "*/15 1-5 * * mon-fri"}),
        (solar("sunset", 52.5, 13.4), {"solar": "sunset", "lat": 52.5, "lon": 13.4}),
        (once(datetime(2030, 1, 1, 3, tzinfo=timezone.utc)), {"at": "2030-01-01T03:00:00+00:00"}),
    ],
)
def test_every_kind_of_schedule_round_trips(store, sched, stored):
    store.save(EntryDefinition("job", "entries.job", sched))
    assert raw(store)["entries/job"]["schedule"] == stored
    back = store.get("job").schedule
    assert type(back) is type(sched) and repr(back) == repr(sched)


def test_a_naive_one_off_time_is_in_the_apps_timezone(store, app):
    sched = schedule_from_json({"at": "2030-07-01T03:00:00"}, app)
    assert sched.at == datetime(2030, 7, 1, 1, tzinfo=timezone.utc)  # Berlin is UTC+2 in summer


def test_a_stale_save_gets_a_conflict_and_changes_nothing(store):
    first = store.save(EntryDefinition("job", "entries.job", 10))
    a, b = store.get("job"), store.get("job")
    assert first.index == a.index
    store.save(EntryDefinition("job", "entries.job", 10, args=(1,), index=a.index))
    with pytest.raises(EntryConflict, match="changed by someone else since it was read"):
        store.save(EntryDefinition("job", "entries.job", 10, args=(2,), index=b.index))
    assert store.get("job").args == (1,)
    with pytest.raises(EntryConflict, match="already exists"):
        store.save(EntryDefinition("job", "entries.job", 99))
    assert store.get("job").args == (1,)
    replaced = store.save(EntryDefinition("job", "entries.job", 99), replace_existing=True)
    assert store.get("job").schedule.run_every == timedelta(seconds=99) and replaced.index == store.get("job").index


def test_concurrent_saves_of_one_read_let_exactly_one_win(store):
    store.save(EntryDefinition("job", "entries.job", 10))
    read = store.get("job")
    outcomes: list[str] = []

    def edit(n: int) -> None:
        try:
            store.save(EntryDefinition("job", "entries.job", 10, args=(n,), index=read.index))
            outcomes.append(f"won {n}")
        except EntryConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if o.startswith("won")]
    assert len(won) == 1 and outcomes.count("conflict") == 5
    assert store.get("job").args == (int(won[0].split()[1]),)


def test_enable_disable_and_remove_of_runtime_entries(store):
    store.save(EntryDefinition("job", "entries.job", 10))
    store.disable("job")
    assert store.get("job").enabled is False
    store.enable("job")
    assert store.get("job").enabled is True
    store.remove("job")
    assert raw(store) == {}
    for action in (store.enable, store.disable, store.remove, store.run_now):
        with pytest.raises(EntryNotFound, match="no runtime schedule entry named 'job'"):
            action("job")


def test_a_config_entry_can_be_disabled_enabled_and_run_but_not_changed_or_removed(store):
    with pytest.raises(EntryConflict, match="is defined in beat_schedule"):
        store.save(EntryDefinition("nightly", "entries.job", 10))
    with pytest.raises(EntryConflict, match="can be disabled at runtime, not removed"):
        store.remove("nightly")
    assert raw(store) == {}
    store.disable("nightly")
    assert raw(store) == {"entries/nightly": {"name": "nightly", "source": "config", "enabled": False}}
    store.enable("nightly")
    assert raw(store) == {}
    tick = store.run_now("nightly")
    (key, request), *_ = raw(store).items()
    assert key.startswith("run/nightly.") and tick == f"nightly@{request['requested_at'][:23]}Z"


def test_pause_and_resume_are_one_key(store):
    assert store.paused() is None
    store.pause(by="deploy 42")
    assert store.paused()["by"] == "deploy 42" and store.snapshot().paused is not None
    store.resume()
    assert store.paused() is None and raw(store) == {}


BAD = [
    ({"name": "has space"}, "name", "has space"),
    ({"name": "a/b"}, "name", "a/b"),
    ({"name": ""}, "name", ""),
    ({"name": "x" * 201}, "name", "x" * 201),
    ({"task": "no.such.task"}, "task", "no.such.task"),
    ({"schedule": 0}, "every", 0.0),
    ({"schedule": -5}, "every", -5.0),
    ({"schedule": "often"}, "schedule", "often"),
    ({"args": {"a": 1}}, "args", {"a": 1}),
    ({"kwargs": [1]}, "kwargs", [1]),
    ({"kwargs": {"when": datetime(2030, 1, 1)}}, "kwargs", {"when": datetime(2030, 1, 1)}),
    ({"options": {"countdown": 5}}, "options", "countdown"),
    ({"options": {"queue": 5}}, "queue", 5),
    ({"options": {"expires": 0}}, "expires", 0),
    ({"enabled": "yes"}, "enabled", "yes"),
]


@pytest.mark.parametrize("change, field, value", BAD, ids=[f"{b[1]}={b[2]!r}"[:40] for b in BAD])
def test_a_bad_field_is_named_with_its_value_and_nothing_is_written(store, change, field, value):
    entry = EntryDefinition(**{"name": "job", "task": "entries.job", "schedule": 10, **change})
    with pytest.raises(InvalidEntry) as info:
        store.save(entry)
    assert (info.value.field, info.value.value) == (field, value)
    assert f"{field}={value!r}" in str(info.value)
    assert raw(store) == {}


@pytest.mark.parametrize(
    "data, field",
    [
        ({"crontab": "61 * * * *"}, "crontab"),
        ({"crontab": "* * *"}, "crontab"),
        ({"crontab": "*/0 * * * *"}, "crontab"),
        ({"at": "tomorrow"}, "at"),
        ({"solar": "noonish", "lat": 0, "lon": 0}, "solar"),
        ({"solar": "sunset", "lat": 91, "lon": 0}, "lat"),
        ({"every": 5, "crontab": "* * * * *"}, "schedule"),
    ],
)
def test_schedules_that_do_not_parse_are_refused(data, field):
    with pytest.raises(InvalidEntry) as info:
        schedule_from_json(data)
    assert info.value.field == field


def test_errors_pickle(store):
    for exc in (InvalidEntry("every", 0, "bad"), EntryConflict("b", "n", "why"), EntryNotFound("b", "n")):
        assert str(pickle.loads(pickle.dumps(exc))) == str(exc)


def test_the_watch_wakes_on_every_change_within_a_blocking_query(store):
    watch = ScheduleWatch(store)
    watch.start()
    try:
        assert watch.changed.wait(5)  # the first answer
        watch.changed.clear()
        store.save(EntryDefinition("job", "entries.job", 10))
        assert watch.changed.wait(2), "an added entry did not wake the watch"
        watch.changed.clear()
        store.pause()
        assert watch.changed.wait(2), "a pause did not wake the watch"
    finally:
        watch.stop()


def test_the_consul_django_alias_names_the_leader_elected_database_scheduler():
    from celery.utils.imports import load_extension_class_names
    from kombu.utils.imports import symbol_by_name

    aliases = dict(load_extension_class_names("celery.beat_schedulers"))
    assert aliases["consul-django"] == "celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler"
    assert aliases["consul"] == "celery_consul_lock.beat:ConsulLeaderScheduler"
    assert symbol_by_name("consul", aliases=aliases).__name__ == "ConsulLeaderScheduler"
