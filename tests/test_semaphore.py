"""ConsulSemaphore scenarios against a real Consul dev agent, and against the real
`consul lock -n N PREFIX` (the Go client's semaphore) on the same prefix, both ways."""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error

import pytest

from celery_consul_lock import (
    ConsulLock,
    ConsulSemaphore,
    InvalidSetting,
    LockConflict,
    LockLost,
    LockTimeout,
    SemaphoreConflict,
    SemaphoreLimitConflict,
)
from celery_consul_lock.consul import SEMAPHORE_FLAG
from celery_consul_lock.testing import spawn

from .servers import ROOT, binaries, wait_for
from .test_interop import _kv

pytestmark = pytest.mark.client


@pytest.fixture
def prefix(key: str) -> str:
    """A semaphore prefix of this test's own (its coordination key is PREFIX/.lock)."""
    return key[: -len("/.lock")]


def stored(consul, prefix: str) -> dict | None:
    """PREFIX/.lock's JSON as Consul stores it (flags checked), or None."""
    kv = _kv(consul, f"{prefix}/.lock")
    if kv is None:
        return None
    assert kv["Flags"] == SEMAPHORE_FLAG and not kv.get("Session"), kv
    return json.loads(base64.b64decode(kv["Value"]))


def keys_under(consul, prefix: str) -> list[str]:
    try:
        return sorted(consul.api(f"/v1/kv/{prefix}/?keys") or [])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


def cli(consul, prefix: str, limit: int, command: str, *options: str) -> list[str]:
    """argv of `consul lock -n LIMIT PREFIX COMMAND`."""
    return [binaries()[0], "lock", f"-http-addr={consul.address}", f"-n={limit}", *options, prefix, command]


# -- slots -------------------------------------------------------------------------------


def test_limit_holders_are_admitted_and_the_next_is_refused_with_the_holders(settings, prefix, consul):
    sems = [ConsulSemaphore(prefix, 3, settings=settings, name=f"report-{i}") for i in range(4)]
    try:
        for sem in sems[:3]:
            assert sem.acquire(blocking=False) and sem.held
        # One process, three holders: each on its own session (the recipe counts sessions).
        sids = {sem.session_id for sem in sems[:3]}
        assert len(sids) == 3
        assert stored(consul, prefix) == {"Limit": 3, "Holders": dict.fromkeys(sorted(sids), True)}
        assert keys_under(consul, prefix) == sorted([f"{prefix}/.lock", *(f"{prefix}/{s}" for s in sids)])
        contender = _kv(consul, f"{prefix}/{sems[0].session_id}")
        assert contender["Session"] == sems[0].session_id and contender["Flags"] == SEMAPHORE_FLAG

        assert sems[3].acquire(blocking=False) is False and not sems[3].held
        assert sorted(h.name for h in sems[3].last_holders) == ["report-0", "report-1", "report-2"]
        assert all(h.pid == os.getpid() for h in sems[3].last_holders)
        assert sorted(h.name for h in ConsulSemaphore.holders(prefix, settings=settings)) == ["report-0", "report-1", "report-2"]

        assert sems[1].release() is True
        assert sems[3].acquire(blocking=False) and sems[3].held
        state = ConsulSemaphore.state(prefix, settings=settings)
        assert state.limit == 3 and len(state.holders) == 3 and sems[1].session_id is None
    finally:
        for sem in sems:
            sem.release()
    # The last to leave deletes .lock, as `consul lock` does: no stale limit stays behind.
    assert keys_under(consul, prefix) == []


def test_blocking_acquire_takes_the_slot_when_a_holder_releases(settings, prefix):
    holder = ConsulSemaphore(prefix, 1, settings=settings)
    waiter = ConsulSemaphore(prefix, 1, settings=settings)
    assert holder.acquire()
    got: list[float] = []
    thread = threading.Thread(target=lambda: got.append(time.monotonic()) if waiter.acquire(timeout=20) else None)
    thread.start()
    time.sleep(0.5)  # not an assertion: let the waiter block on the prefix
    assert not got
    released_at = time.monotonic()
    holder.release()
    thread.join(25)
    assert got and got[0] - released_at < 3, "the waiter did not get the slot soon after the release"
    assert waiter.held
    waiter.release()


def test_blocking_acquire_gives_up_at_its_timeout_and_the_context_manager_raises(settings, prefix):
    with ConsulSemaphore(prefix, 1, settings=settings, name="first"):
        t0 = time.monotonic()
        assert ConsulSemaphore(prefix, 1, settings=settings).acquire(timeout=1.5) is False
        assert 1.4 < time.monotonic() - t0 < 6
        with pytest.raises(LockTimeout) as info, ConsulSemaphore(prefix, 1, settings=settings, timeout=0.5):
            pass
        assert "first" in str(info.value)


def test_a_limit_that_disagrees_with_the_stored_one_is_refused_and_nothing_is_written(settings, prefix, consul):
    with ConsulSemaphore(prefix, 2, settings=settings):
        before = keys_under(consul, prefix), stored(consul, prefix)
        other = ConsulSemaphore(prefix, 3, settings=settings)
        with pytest.raises(SemaphoreLimitConflict) as info:
            other.acquire(blocking=False)
        assert (info.value.stored, info.value.requested) == (2, 3)
        assert "limit 2" in str(info.value) and "limit=3" in str(info.value)
        assert (keys_under(consul, prefix), stored(consul, prefix)) == before
        assert not other.held
    # Once every holder left, .lock is gone and another limit is accepted.
    with ConsulSemaphore(prefix, 3, settings=settings):
        assert stored(consul, prefix)["Limit"] == 3


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
def test_a_bad_limit_is_refused_naming_it(settings, prefix, limit):
    with pytest.raises(InvalidSetting) as info:
        ConsulSemaphore(prefix, limit, settings=settings)
    assert info.value.setting == "limit" and info.value.value == limit


def test_a_lock_and_a_semaphore_on_one_prefix_refuse_each_other(settings, prefix, consul):
    key = f"{prefix}/.lock"
    with ConsulLock(key, settings=settings):
        before = _kv(consul, key)
        with pytest.raises(SemaphoreConflict) as info:
            ConsulSemaphore(prefix, 2, settings=settings).acquire(blocking=False)
        assert isinstance(info.value, LockConflict) and "not a semaphore" in str(info.value)
        assert _kv(consul, key) == before and keys_under(consul, prefix) == [key]
    consul.api(f"/v1/kv/{key}", "DELETE")
    with ConsulSemaphore(prefix, 2, settings=settings):
        before = _kv(consul, key)
        with pytest.raises(LockConflict):
            ConsulLock(key, settings=settings).acquire(blocking=False)
        assert _kv(consul, key)["Value"] == before["Value"]


# -- losing a slot ----------------------------------------------------------------------


def test_a_holder_whose_session_is_destroyed_loses_its_slot_and_the_next_gets_it(settings, prefix, consul):
    sem = ConsulSemaphore(prefix, 1, settings=settings)
    reasons: list[str] = []
    sem.on_lost(lambda _sem, reason: reasons.append(reason))
    assert sem.acquire()
    consul.api(f"/v1/session/destroy/{sem.session_id}", "PUT")
    # Another contender prunes the dead holder at once (its contender key has no session).
    other = ConsulSemaphore(prefix, 1, settings=settings.replace(lock_delay=1), private_session=True)
    assert other.acquire(timeout=10)
    wait_for(sem.lost.is_set, 10, "the semaphore to be reported lost")
    assert not sem.held and reasons
    with pytest.raises(LockLost):
        sem.check()
    assert sem.release() is False
    assert other.held and other.release()


def test_a_holder_removed_from_the_holders_is_told_by_its_watcher(settings, prefix, consul):
    sem = ConsulSemaphore(prefix, 2, settings=settings)
    assert sem.acquire()
    time.sleep(0.6)  # not an assertion: let the watcher start (it starts after WATCH_DELAY)
    kv = _kv(consul, f"{prefix}/.lock")
    body = json.dumps({"Limit": 2, "Holders": {}})
    assert consul.api(f"/v1/kv/{prefix}/.lock?cas={kv['ModifyIndex']}&flags={SEMAPHORE_FLAG}", "PUT", json.loads(body))
    wait_for(sem.lost.is_set, 10, "the removal to be noticed")
    assert sem.lost_reason == "we were removed from the semaphore's holders"
    sem.release()


def test_a_sigkilled_holder_process_frees_its_slot_when_its_session_ends(settings, prefix, tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from celery_consul_lock import ConsulSemaphore
        sem = ConsulSemaphore({prefix!r}, 1, address={settings.address!r}, ttl=10, name="doomed")
        assert sem.acquire()
        open({str(tmp_path / "held")!r}, "w").close()
        time.sleep(3600)
        """
    )
    proc = spawn("holder", [sys.executable, "-c", script], tmp_path, cwd=ROOT)
    try:
        wait_for(lambda: (tmp_path / "held").exists() or not proc.alive(), 30, "the other process to hold a slot")
        proc.check_alive()
        sem = ConsulSemaphore(prefix, 1, settings=settings)
        assert sem.acquire(blocking=False) is False and sem.last_holder and sem.last_holder.name == "doomed"
        proc.kill()
        t0 = time.monotonic()
        # The killed session ends by its TTL (Consul waits up to 2 x TTL); no lock-delay:
        # the next holder writes a contender key of its own.
        assert sem.acquire(timeout=40), "the dead holder's slot was never freed"
        assert time.monotonic() - t0 < 2 * 10 + 5
        sem.release()
    finally:
        proc.kill()


# -- `consul lock -n N` -----------------------------------------------------------------


def test_cli_holders_fill_the_slots_and_ours_gets_the_one_freed(settings, prefix, consul, tmp_path):
    procs = []
    try:
        for i in range(3):
            cmd = f"echo started > {shlex.quote(str(tmp_path / f'cli{i}'))}; exec sleep 60"
            procs.append(spawn(f"cli{i}", cli(consul, prefix, 3, cmd), tmp_path))
        wait_for(lambda: all((tmp_path / f"cli{i}").exists() for i in range(3)), 30, "three `consul lock -n 3` children")
        sem = ConsulSemaphore(prefix, 3, settings=settings)
        assert sem.acquire(blocking=False) is False
        assert len(sem.last_holders) == 3
        assert all(h.session_name and "Consul lock" in h.session_name for h in sem.last_holders), sem.last_holders
        with pytest.raises(SemaphoreLimitConflict):
            ConsulSemaphore(prefix, 2, settings=settings).acquire(blocking=False)

        procs[0].signal(signal.SIGTERM)  # `consul lock` releases its slot on SIGTERM
        assert sem.acquire(timeout=20), f"no slot after a CLI holder exited: {stored(consul, prefix)}"
        holders = stored(consul, prefix)["Holders"]
        assert len(holders) == 3 and sem.session_id in holders
        sem.release()
    finally:
        for p in procs:
            p.kill()


def test_our_holders_fill_slots_and_the_cli_gets_only_the_rest(settings, prefix, consul, tmp_path):
    ours = [ConsulSemaphore(prefix, 3, settings=settings) for _ in range(2)]
    cli_proc = None
    try:
        for sem in ours:
            assert sem.acquire(blocking=False)
        cmd = f"echo started > {shlex.quote(str(tmp_path / 'third'))}; exec sleep 60"
        cli_proc = spawn("third", cli(consul, prefix, 3, cmd), tmp_path)
        wait_for((tmp_path / "third").exists, 30, "`consul lock -n 3` to take the third slot")
        assert len(stored(consul, prefix)["Holders"]) == 3

        # Full: a fourth, from the CLI, waits and gives up without running its command.
        ran = tmp_path / "fourth"
        argv = cli(consul, prefix, 3, f"touch {shlex.quote(str(ran))}", "-timeout=2s")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True)
        assert done.returncode != 0 and not ran.exists(), done
        # A CLI with another limit is refused by the CLI too.
        done = subprocess.run(cli(consul, prefix, 5, "true", "-timeout=2s"), capture_output=True, text=True, timeout=30)
        assert done.returncode != 0 and "limit conflict" in done.stdout + done.stderr, done

        assert ours[0].release()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True)
        assert done.returncode == 0 and ran.exists(), done
        assert ours[1].held
    finally:
        for sem in ours:
            sem.release()
        if cli_proc is not None:
            cli_proc.kill()


# -- status ------------------------------------------------------------------------------


def test_status_lists_each_semaphore_with_its_limit_and_live_holders(settings, prefix, consul, tmp_path):
    from celery import Celery

    from celery_consul_lock.command import collect_status, render_status

    app = Celery("status", set_as_current=False)
    app.conf.consul_lock_address = consul.address
    ours = ConsulSemaphore(prefix, 3, settings=settings, name="nightly-report", value={"task_id": "t-1"})
    started = tmp_path / "started"
    proc = spawn("cli", cli(consul, prefix, 3, f"echo started > {shlex.quote(str(started))}; exec sleep 60"), tmp_path)
    try:
        wait_for(started.exists, 30, "`consul lock -n 3` to take a slot")
        assert ours.acquire(blocking=False)
        status = collect_status(app)
        text = render_status(status)
    finally:
        ours.release()
        proc.kill()
    (sem,) = [s for s in status["semaphores"] if s["prefix"] == prefix]
    assert sem["limit"] == 3 and len(sem["holders"]) == 2
    assert {h["task_id"] for h in sem["holders"]} == {"t-1", None}
    assert any(h["name"] and "Consul lock" in h["name"] for h in sem["holders"]), sem
    # Contender keys are slots, not locks: they are not listed among the held locks.
    assert not [lock for lock in status["locks"] if lock["key"].startswith(f"{prefix}/")]
    assert f"{prefix}  2/3" in text and "nightly-report" in text, text


@pytest.mark.parametrize(
    "exc", [SemaphoreConflict("locks/x/.lock", 0x2DDCCBC058A50C18), SemaphoreLimitConflict("locks/x/.lock", 2, 3)]
)
def test_semaphore_errors_pickle_and_keep_their_message(exc):
    import pickle

    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and str(again) == str(exc) and again.args == exc.args


def test_a_refused_second_holder_in_one_process_leaves_no_session_behind(settings, prefix, consul):
    first = ConsulSemaphore(prefix, 2, settings=settings)
    assert first.acquire(blocking=False)
    try:
        before = {s["ID"] for s in consul.api("/v1/session/list")}
        with pytest.raises(SemaphoreLimitConflict):  # its own session was made for it, then refused
            ConsulSemaphore(prefix, 3, settings=settings).acquire(blocking=False)
        wait_for(lambda: {s["ID"] for s in consul.api("/v1/session/list")} <= before, 10, "the refused holder's session to go")
    finally:
        first.release()
