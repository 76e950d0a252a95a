"""`celery -A proj consul-lock status|release|check`, run as a user runs it: the `celery`
program of the virtualenv (the sub-command comes from the ``celery.commands`` entry point),
against the dev agent, with real beats, a real worker and a real `consul lock` holder.
(The ACL cases are in test_acl.py, next to the ACL agent.) The tests marked ``client`` run
again with py-consul.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings, Tick
from celery_consul_lock.command import SCRATCH
from celery_consul_lock.testing import spawn
from example_project.cluster import EXAMPLES, ExampleCluster, example_cluster

from .beats import Harness, ticks
from .servers import ROOT, ConsulAgent, WebServer, free_port, wait_for
from .test_interop import _consul_lock, _kv, _prefix
from .workers import worker_env


def consul_lock_cmd(
    env: dict[str, str], *args: str, stdin: str = "", app: str = "tests.proj.app", cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """``celery -A APP consul-lock ARGS`` in a child process; its exit code and output."""
    argv = [str(Path(sys.executable).parent / "celery"), "-A", app, "consul-lock", *args]
    return subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(consul: ConsulAgent) -> dict[str, str]:
    return worker_env("redis://127.0.0.1:1/0", consul.address)


# -- status -----------------------------------------------------------------------------------


def test_status_shows_the_leader_its_standby_held_locks_and_each_entrys_last_tick(
    harness: Harness, r, consul: ConsulAgent, key: str, tmp_path: Path
) -> None:
    consul.api("/v1/kv/celery-consul-lock/ticks/heartbeat", "DELETE")  # the entry's mark, from earlier tests
    # Another app's beat with an entry of the same name, under the same prefix: not ours to show.
    consul.api("/v1/kv/celery-consul-lock/beat/other-app/entries/heartbeat", "PUT", {"total_run_count": 999})
    harness.worker(consul.address)
    beats = [harness.beat(consul.address), harness.beat(consul.address)]
    harness.wait_joined()
    holder = spawn("consul-lock", _consul_lock(consul, _prefix(key), "exec sleep 60"), tmp_path)
    try:
        session = wait_for(lambda: (_kv(consul, key) or {}).get("Session"), 20, "`consul lock` to hold the key")
        records = harness.wait_ticks(lambda xs: len(xs) >= 2, 30, "2 ticks")
        env = harness.env(consul.address)
        done = consul_lock_cmd(env, "status", "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        text = consul_lock_cmd(env, "status")
        assert text.returncode == 0, text.stderr
    finally:
        holder.kill()
    records = ticks(r)
    last = records[-1]
    leader_beat = harness.by_instance(last["instance"])
    standby_beat = next(b for b in beats if b is not leader_beat)

    (beat,) = [b for b in status["beats"] if b["name"] == harness.beat_name]
    assert beat["leader"]["instance"] == leader_beat.instance and beat["leader"]["pid"] == leader_beat.pid
    assert beat["leader"]["fencing_token"] == last["token"], (beat, last)
    assert [s["instance"] for s in beat["standbys"]] == [standby_beat.instance]

    (held,) = [lock for lock in status["locks"] if lock["key"] == key]
    assert held["session"] == session and held["session_ttl"] == "15s" and held["node"], held
    assert held["fencing_token"] > 0 and held["age_seconds"] is None  # `consul lock` writes no value

    (entry,) = [e for e in status["entries"] if e["entry"] == "heartbeat"]
    assert entry["beat"] == harness.beat_name and entry["runs"] >= 2, entry
    completed = {Tick.parse(x["tick"]).epoch for x in records}
    assert entry["last_completed"] is not None
    assert Tick.parse(f"heartbeat@{entry['last_completed']}").epoch in completed, (entry, records)

    for shown in (leader_beat.instance, f"standby: {standby_beat.instance}", key, "heartbeat"):
        assert shown in text.stdout, f"{shown!r} missing from:\n{text.stdout}"


# -- release ----------------------------------------------------------------------------------


@pytest.mark.client
def test_release_shows_the_holder_asks_and_frees_only_by_destroying_its_session(
    consul: ConsulAgent, env: dict[str, str], key: str, tmp_path: Path
) -> None:
    holder = spawn("consul-lock", _consul_lock(consul, _prefix(key), "exec sleep 60"), tmp_path)
    try:
        session = wait_for(lambda: (_kv(consul, key) or {}).get("Session"), 20, "`consul lock` to hold the key")

        refused = consul_lock_cmd(env, "release", _prefix(key), stdin="n\n")
        assert refused.returncode == 1 and "not released" in refused.stderr, refused
        assert session[:8] in refused.stdout and "may still be running" in refused.stdout, refused.stdout
        assert (_kv(consul, key) or {}).get("Session") == session, "answering no must leave the lock alone"

        done = consul_lock_cmd(env, "release", key, "--yes")
        assert done.returncode == 0, done
        assert f"session {session} destroyed" in done.stdout, done.stdout
        assert consul.api(f"/v1/session/info/{session}") in (None, []), "the holder's session must be gone"
        assert not (_kv(consul, key) or {}).get("Session")
        # `consul lock` sees its lock gone, stops its child and exits.
        wait_for(lambda: not holder.alive(), 20, "`consul lock` to notice and exit")
    finally:
        holder.kill()


@pytest.mark.client
def test_release_lists_the_other_keys_the_session_frees(consul: ConsulAgent, env: dict[str, str], key: str) -> None:
    settings = ConsulSettings(address=consul.address, lock_delay=1)
    first, second = ConsulLock(key, settings=settings), ConsulLock(key.replace("/.lock", "-2/.lock"), settings=settings)
    assert first.acquire(blocking=False) and second.acquire(blocking=False)
    done = consul_lock_cmd(env, "release", key, "--yes")
    assert done.returncode == 0, done
    assert f"also frees: {second.key}" in done.stdout, done.stdout
    wait_for(lambda: first.lost.is_set() and second.lost.is_set(), 10, "both locks to see their session gone")
    assert not (_kv(consul, second.key) or {}).get("Session")


@pytest.mark.client
def test_release_of_a_key_nobody_holds_changes_nothing_and_says_so(consul: ConsulAgent, env: dict[str, str], key: str) -> None:
    consul.api(f"/v1/kv/{key}", "PUT", "a plain value")
    before = _kv(consul, key)
    done = consul_lock_cmd(env, "release", key, "--yes")
    assert done.returncode == 1 and f"{key!r} is not held by anyone" in done.stderr, done
    assert _kv(consul, key) == before


# -- check ------------------------------------------------------------------------------------


@pytest.mark.client
def test_check_passes_on_a_healthy_agent_and_leaves_nothing_behind(consul: ConsulAgent, env: dict[str, str]) -> None:
    sessions_before = {s["ID"] for s in consul.api("/v1/session/list")}
    done = consul_lock_cmd(env, "check")
    assert done.returncode == 0, done
    (line,) = done.stdout.splitlines()
    assert line.startswith("consul-lock check OK: http://" + consul.address), line
    for granted in ("session:write", "key:write on 'locks/'", "key:write on 'celery-consul-lock/'", "service:write"):
        assert granted in line, line
    assert not [k for k in consul.api("/v1/kv/?keys") if SCRATCH in k]
    assert not [s for s in consul.api("/v1/session/list") if s["ID"] not in sessions_before and SCRATCH in s["Name"]]
    assert not [s for s in consul.api("/v1/agent/services") if SCRATCH in s]


@pytest.mark.client
def test_check_fails_clearly_when_the_agent_is_unreachable() -> None:
    address = f"127.0.0.1:{free_port()}"
    done = consul_lock_cmd(worker_env("redis://127.0.0.1:1/0", address), "check")
    assert done.returncode == 1, done
    assert "check FAILED" in done.stderr and f"http://{address}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_check_and_status_fail_clearly_against_a_server_that_is_not_consul(web_server: WebServer) -> None:
    """``python -m http.server`` answers every request with an HTML error page: one line
    saying it is not a Consul agent, no traceback, and no 'nothing held' from status."""
    env = worker_env("redis://127.0.0.1:1/0", web_server.address)
    for args in (["check"], ["status"], ["status", "--json"]):
        done = consul_lock_cmd(env, *args)
        assert done.returncode == 1, (args, done)
        assert f"the server at http://{web_server.address} is not a Consul agent" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr) < 600, (args, done.stderr)
        assert done.stdout == "", (args, done.stdout)


@pytest.mark.client
def test_check_fails_clearly_on_an_invalid_setting(consul: ConsulAgent) -> None:
    done = consul_lock_cmd(worker_env("redis://127.0.0.1:1/0", consul.address, TEST_LOCK_DELAY="90"), "check")
    assert done.returncode == 1, done
    assert "invalid setting" in done.stderr and "consul_lock_lock_delay" in done.stderr and "90" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("options", "setting", "value"),
    [
        # The body has customer_id and region, not customer.
        ({"lock_key": "locks/report-{customer}/.lock"}, "proj.configured.lock_key", "'locks/report-{customer}/.lock'"),
        # Two positional parameters at most: {2} can never be filled.
        ({"lock_key": "locks/report-{2}/.lock"}, "proj.configured.lock_key", "'locks/report-{2}/.lock'"),
        ({"lock_key": "locks/report-{customer_id/.lock"}, "proj.configured.lock_key", "'locks/report-{customer_id/.lock'"),
        ({"lock_on_held": "queue"}, "proj.configured.lock_on_held", "'queue'"),
    ],
)
def test_check_fails_on_a_locked_tasks_bad_lock_options_naming_the_task_setting_and_value(
    consul: ConsulAgent, options: dict[str, str], setting: str, value: str
) -> None:
    env = worker_env("redis://127.0.0.1:1/0", consul.address, TEST_EXTRA_LOCK_OPTIONS=json.dumps(options))
    done = consul_lock_cmd(env, "check")
    assert done.returncode == 1, done
    assert "check FAILED: invalid setting" in done.stderr and f"{setting}={value} is invalid" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_check_accepts_key_templates_the_body_can_fill(consul: ConsulAgent) -> None:
    template = "locks/{task.name}/{region}-{customer_id}-{0}/.lock"
    env = worker_env("redis://127.0.0.1:1/0", consul.address, TEST_EXTRA_LOCK_OPTIONS=json.dumps({"lock_key": template}))
    done = consul_lock_cmd(env, "check", "--no-beat")
    assert done.returncode == 0, done
    assert "consul-lock check OK" in done.stdout, done.stdout


# -- against the example projects ---------------------------------------------------------------


def test_status_and_check_against_the_django_example(consul: ConsulAgent, redis_server, tmp_path: Path) -> None:
    redis_url = f"{redis_server.url.rpartition('/')[0]}/9"
    example = EXAMPLES["django"]
    with example_cluster(example, consul.address, redis_url, tmp_path) as cluster:
        cluster.start_workers(1)
        cluster.start_beats(2)
        wait_for(lambda: len(cluster.runs()) >= 2, 60, "2 heartbeats of the example")
        env = cluster.env()
        checked = consul_lock_cmd(env, "check", app=example.app, cwd=example.project_dir)
        done = consul_lock_cmd(env, "status", "--json", app=example.app, cwd=example.project_dir)
        leader = cluster.member(wait_for(cluster.leader, 10, "a leader"))
    assert checked.returncode == 0 and f"beat {example.beat_name!r}" in checked.stdout, checked
    assert "locked tasks: 3" in checked.stdout, checked.stdout  # found by Django's autodiscovery
    assert done.returncode == 0, done
    status = json.loads(done.stdout)
    assert status["key_prefix"] == cluster.key_prefix
    (beat,) = status["beats"]
    assert beat["name"] == example.beat_name and beat["leader"]["pid"] == leader.pid, (beat, leader)
    assert len(beat["standbys"]) == 1, beat
    entries = {e["entry"]: e for e in status["entries"]}
    assert entries["heartbeat"]["last_completed"], entries  # the mark the example's heartbeat advances
    assert "nightly-backup" in entries, entries  # from CELERY_BEAT_SCHEDULE, not run yet


def test_check_against_the_flask_example(consul: ConsulAgent, redis_server, tmp_path: Path) -> None:
    example = EXAMPLES["flask"]
    cluster = ExampleCluster(example, consul.address, redis_server.url, tmp_path)
    done = consul_lock_cmd(cluster.env(), "check", app=example.app, cwd=example.project_dir)
    assert done.returncode == 0, done
    assert f"key:write on '{cluster.key_prefix}locks/'" in done.stdout and "locked tasks: 3" in done.stdout, done.stdout
