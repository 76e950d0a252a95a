"""ConsulLock against the other tools that lock the same key: `consul lock` and curl scripts.

Every test runs the real tool (the `consul` binary, `curl`) as a child process against the
dev agent, on a key of its own in the `consul lock` layout (``PREFIX/.lock``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import urllib.error
from pathlib import Path

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings, LockConflict
from celery_consul_lock.consul import LOCK_FLAG
from celery_consul_lock.testing import spawn

from .servers import ConsulAgent, binaries, wait_for

pytestmark = pytest.mark.client

#: The flags the Go client and `consul lock -n N` (N > 1) write on a semaphore's keys.
SEMAPHORE_FLAG = 0xE0F69A2BAA414DE0


# -- helpers ------------------------------------------------------------------------------


def _consul_bin() -> str:
    return binaries()[0]


def _prefix(key: str) -> str:
    """`consul lock PREFIX` takes PREFIX/.lock."""
    assert key.endswith("/.lock"), key
    return key[: -len("/.lock")]


def _content(kv: dict | None) -> tuple | None:
    """What a key holds (its ModifyIndex may move on when a wrongly taken key is put back)."""
    return None if kv is None else (kv["Value"], kv["Flags"], kv.get("Session"), kv["CreateIndex"])


def _kv(agent: ConsulAgent, key: str) -> dict | None:
    """The key as Consul stores it (a consistent read), or None."""
    try:
        data = agent.api(f"/v1/kv/{key}?consistent")
    except urllib.error.HTTPError as exc:  # closed by http_json
        if exc.code == 404:
            return None
        raise
    return data[0] if data else None


def _consul_lock(agent: ConsulAgent, prefix: str, command: str, *options: str) -> list[str]:
    """argv of `consul lock`; it runs ``command`` with `sh -c`."""
    return [_consul_bin(), "lock", f"-http-addr={agent.address}", *options, prefix, command]


def _curl(*args: str) -> str:
    """curl as a shell script runs it: fail on HTTP errors, answer on stdout."""
    curl = shutil.which("curl")
    assert curl, "curl is not installed"
    done = subprocess.run([curl, "-sS", "--fail", *args], capture_output=True, text=True, timeout=15, start_new_session=True)
    assert done.returncode == 0, f"curl {args} failed ({done.returncode}): {done.stderr}"
    return done.stdout.strip()


# -- consul lock ------------------------------------------------------------------------


def test_consul_lock_cli_excludes_consul_lock_until_it_exits(
    consul: ConsulAgent, settings: ConsulSettings, key: str, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    cli = spawn("cli", _consul_lock(consul, _prefix(key), f"echo started > {shlex.quote(str(started))}; exec sleep 30"), tmp_path)
    try:
        wait_for(started.exists, 20, "the child of `consul lock` to start", procs=[cli])
        before = _kv(consul, key)
        assert before is not None and before["Session"] and before["Flags"] == LOCK_FLAG

        lock = ConsulLock(key, settings=settings)
        assert lock.acquire(blocking=False) is False
        assert not lock.held
        holder = lock.last_holder
        assert holder is not None
        assert holder.session == before["Session"]
        assert holder.session_name and "Consul lock" in holder.session_name and "exec sleep 30" in holder.session_name, holder
        assert holder.node  # the dev agent's node
        assert ConsulLock.holder(key, settings=settings) == holder
        assert _kv(consul, key) == before, "a failed acquire must not touch the key"

        # SIGTERM: `consul lock` stops its child, then releases the lock (no lock-delay).
        cli.signal(signal.SIGTERM)
        assert lock.acquire(timeout=20), f"ConsulLock did not get the key after `consul lock` exited: {_kv(consul, key)}"
        try:
            assert lock.held
            cli.popen.wait(10)
            entry = _kv(consul, key)
            assert entry is not None and entry["Session"] != before["Session"] and entry["Flags"] == LOCK_FLAG
            assert lock.fencing_token == entry["ModifyIndex"] > before["ModifyIndex"]
            assert lock.release()
        finally:
            lock.release()
    finally:
        cli.kill()


def test_consul_lock_cli_waits_for_consul_lock(consul: ConsulAgent, settings: ConsulSettings, key: str, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    argv = _consul_lock(consul, _prefix(key), f"touch {shlex.quote(str(ran))}", "-timeout=2s")
    lock = ConsulLock(key, settings=settings)
    assert lock.acquire(blocking=False)
    try:
        held = _kv(consul, key)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True)
        assert not ran.exists(), f"`consul lock` ran its command while ConsulLock held the key: {done.stdout}{done.stderr}"
        assert done.returncode != 0, done
        assert lock.held
        assert _kv(consul, key) == held, "`consul lock` changed the key it did not get"
        assert lock.release()
    finally:
        lock.release()

    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, start_new_session=True)
    assert done.returncode == 0, f"`consul lock` failed after ConsulLock released: {done.stdout}{done.stderr}"
    assert ran.exists()


# -- a curl script --------------------------------------------------------------------


def test_curl_script_and_consul_lock_exclude_each_other(consul: ConsulAgent, settings: ConsulSettings, key: str) -> None:
    base = consul.url
    sessions: list[str] = []

    def create_session(name: str) -> str:
        sid = json.loads(
            _curl("-X", "PUT", "--data-binary", json.dumps({"Name": name, "TTL": "15s"}), f"{base}/v1/session/create")
        )["ID"]
        sessions.append(sid)
        return sid

    def curl_acquire(sid: str) -> str:
        return _curl("-X", "PUT", "--data-binary", "backup by cron on host-a", f"{base}/v1/kv/{key}?acquire={sid}")

    try:
        # The script holds the key: plain body, no ?flags= (so Flags 0).
        script = create_session("nightly-backup.sh")
        assert curl_acquire(script) == "true"
        before = _kv(consul, key)
        assert before is not None and before["Session"] == script and before["Flags"] == 0

        lock = ConsulLock(key, settings=settings)
        assert lock.acquire(blocking=False) is False  # no LockConflict: flags 0 is a lock
        holder = lock.last_holder
        assert holder is not None
        assert holder.session == script
        assert holder.session_name == "nightly-backup.sh"
        assert holder.extra == {"value": "backup by cron on host-a"}
        assert holder.host is None and holder.pid is None
        assert _kv(consul, key) == before

        # The script releases: ConsulLock gets the key at once (no lock-delay after a release).
        assert _curl("-X", "PUT", f"{base}/v1/kv/{key}?release={script}") == "true"
        assert lock.acquire(timeout=10)
        try:
            entry = _kv(consul, key)
            assert entry is not None and entry["Session"] and entry["Session"] != script
            assert entry["Flags"] == LOCK_FLAG
            mine = ConsulLock.holder(key, settings=settings)
            assert mine is not None and mine.pid == os.getpid() and mine.session == entry["Session"]

            # Reverse: while ConsulLock holds the key, the script's acquire answers false.
            other = create_session("nightly-backup.sh (next run)")
            assert curl_acquire(other) == "false"
            assert _kv(consul, key) == entry
            assert lock.held
            assert lock.release()
        finally:
            lock.release()
        assert curl_acquire(other) == "true"
        assert _curl("-X", "PUT", f"{base}/v1/kv/{key}?release={other}") == "true"
    finally:
        for sid in sessions:
            _curl("-X", "PUT", f"{base}/v1/session/destroy/{sid}")


# -- keys that are not locks -----------------------------------------------------------


@pytest.mark.parametrize("blocking", [False, True], ids=["non-blocking", "blocking"])
def test_key_with_foreign_flags_raises_lock_conflict(
    consul: ConsulAgent, settings: ConsulSettings, key: str, blocking: bool
) -> None:
    value = json.dumps({"Limit": 2, "Holders": {}})
    assert consul.api(f"/v1/kv/{key}?flags={SEMAPHORE_FLAG}&cas=0", "PUT", json.loads(value)) is True
    before = _kv(consul, key)
    assert before is not None and before["Flags"] == SEMAPHORE_FLAG

    lock = ConsulLock(key, settings=settings)
    with pytest.raises(LockConflict) as info:
        lock.acquire(blocking=blocking, timeout=3)
    assert info.value.key == key and info.value.flags == SEMAPHORE_FLAG
    assert not lock.held
    assert _content(_kv(consul, key)) == _content(before), "the key with foreign flags was changed"


@pytest.mark.parametrize("used_before", [False, True], ids=["fresh-key", "key-used-before"])
def test_consul_semaphore_key_raises_lock_conflict(
    consul: ConsulAgent, settings: ConsulSettings, key: str, tmp_path: Path, used_before: bool
) -> None:
    """`consul lock -n 2 PREFIX` (a semaphore) keeps its state in PREFIX/.lock, without a
    session: ConsulLock must refuse that key, also when this process used it as a lock
    before (its `consul lock` user deleted it on exit, then the semaphore took the prefix)."""
    prefix = _prefix(key)
    if used_before:
        first = ConsulLock(key, settings=settings)
        assert first.acquire(blocking=False)
        assert first.release()
        # `consul lock PREFIX CMD` takes the key, runs CMD, then deletes the key on exit.
        done = subprocess.run(
            _consul_lock(consul, prefix, "true"), capture_output=True, text=True, timeout=30, start_new_session=True
        )
        assert done.returncode == 0, done
        assert _kv(consul, key) is None

    started = tmp_path / "started"
    args = _consul_lock(consul, prefix, f"echo started > {shlex.quote(str(started))}; exec sleep 30", "-n=2")
    cli = spawn("semaphore", args, tmp_path)
    lock = ConsulLock(key, settings=settings)
    try:
        wait_for(started.exists, 20, "the child of `consul lock -n=2` to start", procs=[cli])
        before = _kv(consul, key)
        assert before is not None and before["Flags"] == SEMAPHORE_FLAG and not before.get("Session")

        try:
            got = lock.acquire(blocking=False)
        except LockConflict as exc:
            conflict: LockConflict | None = exc
        else:
            conflict = None
        after = _kv(consul, key)
        assert conflict is not None, (
            f"acquire(blocking=False) returned {got} instead of raising LockConflict; "
            f"the semaphore's key went from {before} to {after}"
        )
        assert conflict.flags == SEMAPHORE_FLAG
        if used_before:
            # Repurposed after we used it: the acquire transaction took it, saw the flags and
            # put it back at once. The semaphore may have noticed and cleaned up after itself
            # (deleting the key); either way the key is not left taken by us.
            assert after is None or (after["Flags"] == SEMAPHORE_FLAG and not after.get("Session")), after
        else:
            # Never seen by this process: looked at before any write, never touched.
            assert after == before, "the semaphore's key was changed"
    finally:
        lock.release()
        cli.kill()
