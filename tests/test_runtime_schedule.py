"""The runtime schedule with real processes: two `celery beat -S consul` and one worker of
tests/proj (started once for the module), edited from Python and from `celery consul-lock
schedule` while they run. Every assertion comes from the runs the worker recorded (the
``proj.echo`` task records its tick id, arguments and its message's send time)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import redis

from celery_consul_lock import ConsulSettings, EntryConflict, EntryDefinition, RuntimeSchedule
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.entries import once

from .beats import Harness
from .servers import ROOT, wait_for

ECHO = "proj.echo"


@pytest.fixture(scope="module")
def topo(consul, redis_server, tmp_path_factory):
    """Two beats (the config entry ``heartbeat`` due every second) and one worker."""
    from .proj import app as proj

    proj.app.conf.broker_url = proj.app.conf.result_backend = redis_server.url
    redis.Redis.from_url(redis_server.url).flushdb()
    h = Harness(proj, redis_server.url, tmp_path_factory.mktemp("runtime-schedule"))
    try:
        h.worker(consul.address)
        h.beat(consul.address)
        h.beat(consul.address)
        h.wait_joined()
        h.wait_ticks(lambda xs: True, 30, "the first heartbeat")
        yield h
    finally:
        h.stop()
        print(h.logs())


@pytest.fixture
def store(topo, consul) -> RuntimeSchedule:
    return RuntimeSchedule(ConsulSettings(address=consul.address), topo.beat_name, topo.proj.app)


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def runs(r: redis.Redis, entry: str) -> list[dict]:
    return [x for x in (json.loads(v) for v in r.lrange("runs", 0, -1)) if x["kind"] == "echo" and x["entry"] == entry]


def wait_runs(topo: Harness, r: redis.Redis, entry: str, n: int, timeout: float) -> list[dict]:
    def enough() -> list[dict] | None:
        for beat in topo.beats:
            if beat.popen.poll() is not None and beat.name != "killed":
                raise AssertionError(f"{beat.name} exited:\n{beat.log_text()[-2000:]}")
        xs = runs(r, entry)
        return xs if len(xs) >= n else None

    return wait_for(enough, timeout, f"{n} runs of {entry} (have {len(runs(r, entry))})", interval=0.05)


def once_each(xs: list[dict]) -> None:
    ticks = [x["tick"] for x in xs]
    assert len(ticks) == len(set(ticks)), f"a tick id ran twice: {ticks}"


def cli(topo: Harness, consul, *args: str) -> subprocess.CompletedProcess:
    env = topo.env(consul.address)
    cmd = [sys.executable, "-m", "celery", "-A", "tests.proj.app", "consul-lock", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def quiet_after(r: redis.Redis, entry: str, since: float, settle: float) -> None:
    """No message of ``entry`` sent after ``since`` ran within ``settle`` seconds."""
    time.sleep(settle)  # a window in which sends would show; the assertion is on send times
    late = [x for x in runs(r, entry) if x["sent_at"] and x["sent_at"] > since]
    assert not late, f"{entry} sent after the write returned: {late}"


def test_an_added_entry_runs_within_a_second_plus_its_interval_and_each_tick_once(topo, consul, r):
    out = cli(topo, consul, "schedule", "add", "rt-add", "--task", ECHO, "--every", "1", "--args", "[7]")
    returned = time.time()
    assert out.returncode == 0, out.stderr
    first, *_ = wait_runs(topo, r, "rt-add", 1, 10)
    # Due one interval after the leader took it up, which the watch does within milliseconds;
    # the rest is the worker's pick-up on a loaded 2-core machine.
    assert first["sent_at"] - returned < 1 + 1.5, first
    xs = wait_runs(topo, r, "rt-add", 4, 10)
    assert all(x["args"] == [7] for x in xs)
    once_each(xs)
    listed = json.loads(cli(topo, consul, "schedule", "list", "--json").stdout)
    row = next(e for e in listed["entries"] if e["name"] == "rt-add")
    assert row["source"] == "runtime" and row["enabled"] and row["task"] == ECHO and row["schedule"] == "every 1s"
    assert row["runs"] >= 1 and row["next_due"] is not None and row["last_run"] is not None
    heartbeat = next(e for e in listed["entries"] if e["name"] == "heartbeat")
    assert heartbeat["source"] == "config" and heartbeat["enabled"]
    assert cli(topo, consul, "schedule", "remove", "rt-add").returncode == 0


@pytest.mark.parametrize("config_interval", ["30", ""], ids=["config-entry-30s", "empty-beat-schedule"])
def test_a_fresh_beat_with_an_empty_runtime_folder_takes_up_an_added_entry_at_once(
    topo, consul, r, tmp_path, config_interval
):
    """A beat just elected, its runtime folder empty and nothing sent yet, must not sleep
    until its next config entry (30 s) or beat_max_loop_interval (300 s) before taking up an
    added entry: the first run comes one interval after the save (the module's worker runs it)."""
    fresh = Harness(topo.proj, topo.redis_url, tmp_path, extra_env={"TEST_BEAT_INTERVAL": config_interval})
    try:
        beat = fresh.beat(consul.address)
        wait_for(lambda: "loaded the schedule state" in beat.log_text(), 30, "the fresh beat to lead", procs=[beat])
        time.sleep(0.5)  # setup: its first leading tick has returned (the beat is asleep in its loop)
        store = RuntimeSchedule(ConsulSettings(address=consul.address), fresh.beat_name, topo.proj.app)
        assert store.snapshot(consistent=True).entries == {}
        name = f"rt-fresh-{config_interval or 'none'}"
        store.save(EntryDefinition(name, ECHO, 3))
        saved = time.time()
        (first,) = wait_runs(topo, r, name, 1, 3 + 10)
        # One interval after the save, plus pick-up and the worker on a loaded machine; the
        # bug made it 30 s (the config entry's next due time) or 300 s.
        assert first["sent_at"] - saved < 3 + 5, first
        assert beat.popen.poll() is None, beat.log_text()[-2000:]
    finally:
        fresh.stop()


def test_changing_args_keeps_the_timing_and_concurrent_edits_let_one_win(topo, store, r):
    store.save(EntryDefinition("rt-args", ECHO, 4, args=(1,)))
    first = wait_runs(topo, r, "rt-args", 1, 15)[0]
    wait_for(lambda: time.time() > first["t"] + 2, 5, "midway to the next run")
    read = store.get("rt-args")
    outcomes: list[str] = []

    def edit(n: int) -> None:
        try:
            store.save(EntryDefinition("rt-args", ECHO, 4, args=(n,), index=read.index))
            outcomes.append(str(n))
        except EntryConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=edit, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [int(o) for o in outcomes if o != "conflict"]
    assert outcomes.count("conflict") == 1
    second = wait_runs(topo, r, "rt-args", 2, 10)[1]
    assert second["args"] == [winner]
    # Timing kept: due one interval after the first run (a restart would make it 4 s after the edit).
    assert second["sent_at"] - first["sent_at"] < 4 + 1.0, (first, second)
    store.save(EntryDefinition("rt-args", ECHO, 1.5, args=(winner,), index=store.get("rt-args").index))
    changed = time.time()
    third = wait_runs(topo, r, "rt-args", 3, 10)[2]
    assert third["sent_at"] - changed >= 1.5 - 0.2, "a changed schedule restarts the interval"
    store.remove("rt-args")


def test_disable_stops_sends_once_it_returns_and_enable_resumes(topo, store, r):
    store.save(EntryDefinition("rt-toggle", ECHO, 0.5))
    wait_runs(topo, r, "rt-toggle", 2, 10)
    store.disable("rt-toggle")
    disabled = time.time()
    quiet_after(r, "rt-toggle", disabled, 2.5)
    before = len(runs(r, "rt-toggle"))
    store.enable("rt-toggle")
    xs = wait_runs(topo, r, "rt-toggle", before + 2, 10)
    once_each(xs)
    store.remove("rt-toggle")
    removed = time.time()
    quiet_after(r, "rt-toggle", removed, 2.0)


def test_a_config_entry_can_be_disabled_and_enabled_at_runtime_but_not_removed(topo, consul, r):
    out = cli(topo, consul, "schedule", "remove", "heartbeat")
    assert out.returncode == 3 and "can be disabled at runtime, not removed" in out.stderr
    out = cli(topo, consul, "schedule", "disable", "heartbeat")
    assert out.returncode == 0, out.stderr
    disabled = time.time()
    time.sleep(2.5)
    late = [x for x in (json.loads(v) for v in r.lrange("runs", 0, -1)) if x["kind"] == "tick" and x["t"] > disabled + 1.0]
    assert not late, f"heartbeat ran after being disabled: {late}"
    assert cli(topo, consul, "schedule", "enable", "heartbeat").returncode == 0
    enabled = time.time()
    topo.wait_ticks(lambda xs: any(x["t"] > enabled for x in xs), 10, "heartbeat after enable")


def test_pause_stops_every_send_and_resume_runs_a_missed_tick_once(topo, consul, store, r):
    store.save(EntryDefinition("rt-pause", ECHO, 1))
    wait_runs(topo, r, "rt-pause", 1, 10)
    out = cli(topo, consul, "pause", "--by", "test")
    paused = time.time()
    assert out.returncode == 0, out.stderr
    status = cli(topo, consul, "status")
    assert "PAUSED since" in status.stdout and "by test" in status.stdout, status.stdout
    quiet_after(r, "rt-pause", paused, 2.5)
    before = len(runs(r, "rt-pause"))
    resumed = time.time()  # the CLI's write lands within its run; sends may precede its exit
    assert cli(topo, consul, "resume").returncode == 0
    xs = wait_runs(topo, r, "rt-pause", before + 1, 10)
    after = [x for x in xs if x["sent_at"] > resumed]
    assert after, xs
    # run-once: one late run for every tick missed while paused, then the interval again.
    late = [x for x in after if x["sent_at"] - resumed < 0.9]
    assert len(late) <= 1, after
    once_each(xs)
    store.remove("rt-pause")


def test_run_now_sends_one_extra_run_with_its_own_tick_id(topo, consul, store, r):
    store.save(EntryDefinition("rt-now", ECHO, 3600, kwargs={"k": "v"}))
    out = cli(topo, consul, "schedule", "run", "rt-now")
    assert out.returncode == 0, out.stderr
    tick = out.stdout.split("(tick ")[1].rstrip(")\n")
    (x,) = wait_runs(topo, r, "rt-now", 1, 10)
    assert x["tick"] == tick and x["kwargs"] == {"k": "v"}
    time.sleep(1.5)
    assert len(runs(r, "rt-now")) == 1
    assert store.snapshot(consistent=True).runs == []  # the request was deleted once sent
    store.remove("rt-now")


def test_a_one_off_entry_runs_once_and_disables_itself(topo, store, r):
    at = datetime.now(timezone.utc) + timedelta(seconds=2)
    store.save(EntryDefinition("rt-once", ECHO, once(at)))
    (x,) = wait_runs(topo, r, "rt-once", 1, 15)
    assert x["tick"] == f"rt-once@{at.strftime('%Y-%m-%dT%H:%M:%S')}.{at.microsecond // 1000:03d}Z"
    wait_for(lambda: not store.get("rt-once").enabled, 5, "the one-off entry to disable itself")
    time.sleep(1.5)
    assert len(runs(r, "rt-once")) == 1
    store.remove("rt-once")


BAD_INPUT = [
    ("rt-bad", ["--task", "proj.no_such_task", "--every", "1"], "task='proj.no_such_task'"),
    ("rt-bad", ["--task", ECHO, "--every", "0"], "every=0.0"),
    ("rt-bad", ["--task", ECHO, "--every", "-3"], "every='-3'"),
    ("rt-bad", ["--task", ECHO, "--every", "5 minutes"], "every='5 minutes'"),
    ("rt-bad", ["--task", ECHO, "--every", "soon"], "every='soon'"),
    ("rt-bad", ["--task", ECHO, "--crontab", "61 * * * *"], "crontab='61 * * * *'"),
    ("rt-bad", ["--task", ECHO, "--crontab", "* * *"], "crontab='* * *'"),
    ("rt-bad", ["--task", ECHO, "--at", "tomorrow"], "at='tomorrow'"),
    ("rt-bad", ["--task", ECHO, "--every", "1", "--args", "[1,"], "args='[1,'"),
    ("rt-bad", ["--task", ECHO, "--every", "1", "--kwargs", "{x}"], "kwargs='{x}'"),
    ("rt-bad", ["--task", ECHO], "schedule=None"),
    ("rt-bad", ["--task", ECHO, "--every", "1", "--at", "2030-01-01T00:00:00"], "schedule="),
    ("bad name!", ["--task", ECHO, "--every", "1"], "name='bad name!'"),
    ("a/b", ["--task", ECHO, "--every", "1"], "name='a/b'"),
]


def test_every_bad_input_exits_2_naming_field_and_value_and_writes_nothing(topo, consul, store):
    failures = []
    with ThreadPoolExecutor(2) as pool:  # two commands at a time: half the wall time on 2 cores
        outs = pool.map(lambda bad: cli(topo, consul, "schedule", "add", bad[0], *bad[1]), BAD_INPUT)
        for (name, args, named), out in zip(BAD_INPUT, outs, strict=True):
            if out.returncode != 2 or named not in out.stderr or "nothing was written" not in out.stderr:
                failures.append((name, args, out.returncode, out.stderr[-300:]))
    assert not failures, failures
    assert store.snapshot(consistent=True).entries == {}


def test_add_takes_durations_and_refuses_an_existing_name_unless_replace(topo, consul, store):
    out = cli(topo, consul, "schedule", "add", "rt-dup", "--task", ECHO, "--every", "5m", "--args", "[1]")
    assert out.returncode == 0, out.stderr
    assert store.get("rt-dup").schedule.run_every == timedelta(minutes=5)
    out = cli(topo, consul, "schedule", "add", "rt-dup", "--task", ECHO, "--every", "90s", "--args", "[2]")
    assert out.returncode == 3, out
    assert "'rt-dup'" in out.stderr and "already exists; give --replace" in out.stderr and "nothing was written" in out.stderr
    kept = store.get("rt-dup")
    assert kept.args == (1,) and kept.schedule.run_every == timedelta(minutes=5), kept
    out = cli(topo, consul, "schedule", "add", "rt-dup", "--task", ECHO, "--every", "300", "--args", "[2]", "--replace")
    assert out.returncode == 0, out.stderr
    replaced = store.get("rt-dup")
    assert replaced.args == (2,) and replaced.schedule.run_every == timedelta(minutes=5), replaced
    store.remove("rt-dup")


def test_resume_when_not_paused_says_so(topo, consul, store):
    assert store.paused() is None
    out = cli(topo, consul, "resume")
    assert out.returncode == 0 and out.stdout.strip() == "not paused: the beats were already sending", out


def test_the_leader_sigkilled_with_runtime_entries_is_replaced_and_they_keep_running(topo, store, r):
    store.save(EntryDefinition("rt-failover", ECHO, 1, args=("f",)))
    store.save(EntryDefinition("rt-once-before", ECHO, once(datetime.now(timezone.utc))))
    xs = wait_runs(topo, r, "rt-failover", 2, 10)
    wait_runs(topo, r, "rt-once-before", 1, 10)
    wait_for(lambda: not store.get("rt-once-before").enabled, 5, "the one-off entry to disable itself")
    leader = topo.by_instance(xs[-1]["instance"])
    store.save(EntryDefinition("rt-once-after", ECHO, once(datetime.now(timezone.utc) + timedelta(seconds=8))))
    leader.signal(signal.SIGKILL)
    leader.name = "killed"
    killed = time.time()
    n = len(xs)
    after = wait_runs(topo, r, "rt-failover", n + 3, 20)
    new = [x for x in after if x["instance"] != leader.instance]
    assert new and new[0]["sent_at"] - killed < 3.75 + 1.5 + 1.0, (killed, new[:1])
    assert all(x["args"] == ["f"] for x in after)
    once_each(after)
    # The state moved with the leadership: the new leader's run count goes on from the old one's.
    _, kv = ConsulClient(store.settings).kv_get(f"celery-consul-lock/beat/{topo.beat_name}/entries/rt-failover")
    assert json.loads(kv.value)["total_run_count"] >= len(after) - 1 > len(new), kv.value
    # One-off entries across the failover: the one the old leader ran is not run again; the one
    # due after it runs once, on the new leader, and disables itself there.
    (late,) = wait_runs(topo, r, "rt-once-after", 1, 20)
    assert late["instance"] != leader.instance
    wait_for(lambda: not store.get("rt-once-after").enabled, 5, "the one-off entry to disable itself")
    time.sleep(1.5)
    assert len(runs(r, "rt-once-before")) == 1 and len(runs(r, "rt-once-after")) == 1
    for name in ("rt-failover", "rt-once-before", "rt-once-after"):
        store.remove(name)
