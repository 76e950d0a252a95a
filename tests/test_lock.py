"""ConsulLock scenarios against a real Consul dev agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings, LockLost, LockTimeout, close_sessions, transport
from celery_consul_lock import lock as lock_module
from celery_consul_lock.consul import LOCK_FLAG, ConsulClient
from celery_consul_lock.testing import Proc, spawn

from .servers import ROOT, start_consul, wait_consul_ready, wait_for

pytestmark = pytest.mark.client


def session_ids(consul) -> set[str]:
    return {s["ID"] for s in consul.api("/v1/session/list")}


def test_acquire_release_writes_holder_json_and_fencing_token(settings, key, consul):
    lock = ConsulLock(key, settings=settings, name="nightly backup", value={"task_id": "t-1"})
    assert lock.acquire()
    try:
        raw = consul.api(f"/v1/kv/{key}?consistent")[0]
        assert raw["Flags"] == LOCK_FLAG and raw["Session"]
        assert lock.fencing_token == raw["ModifyIndex"]
        value = json.loads(__import__("base64").b64decode(raw["Value"]))
        assert value["name"] == "nightly backup" and value["pid"] == os.getpid() and value["task_id"] == "t-1"
        holder = ConsulLock.holder(key, settings=settings)
        assert holder.pid == os.getpid() and holder.extra == {"task_id": "t-1"} and holder.session == raw["Session"]
        assert lock.held
    finally:
        assert lock.release()
    assert ConsulLock.holder(key, settings=settings) is None
    assert not lock.held


def test_fencing_token_grows_with_each_acquisition(settings, key):
    lock = ConsulLock(key, settings=settings)
    tokens = []
    for _ in range(3):
        with lock:
            tokens.append(lock.fencing_token)
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


def test_its_owner_can_declare_the_lock_lost_and_still_release_the_key(settings, key):
    # A beat stepping down does this: held is false at once, the callbacks run, and the key
    # stays ours in Consul until the release frees it without a lock-delay.
    reasons = []
    lock = ConsulLock(key, settings=settings, on_lost=lambda _lock, why: reasons.append(why))
    assert lock.acquire() and lock.held
    token, sid = lock.fencing_token, lock.session_id
    lock.declare_lost("stepping down")
    assert not lock.held and lock.lost.is_set() and reasons == ["stepping down"]
    with pytest.raises(LockLost, match="stepping down"):
        lock.check()
    lock.declare_lost("again")  # already lost: nothing more happens
    assert reasons == ["stepping down"] and lock.lost_reason == "stepping down"
    assert ConsulLock.holder(key, settings=settings).session == sid
    assert lock.release()
    assert ConsulLock.holder(key, settings=settings) is None
    assert lock.session_id is None and lock.fencing_token == token  # the last acquisition's
    lock.declare_lost("after release")  # not held: nothing happens
    assert reasons == ["stepping down"]


def test_non_blocking_try_reports_the_holder_at_once(settings, key, tmp_path):
    holder = start_holder(settings, key, tmp_path)
    try:
        lock = ConsulLock(key, settings=settings)
        t0 = time.monotonic()
        assert lock.acquire(blocking=False) is False
        assert time.monotonic() - t0 < 1.0
        assert lock.last_holder.pid == holder.pid and lock.last_holder.name == "other-process"
    finally:
        holder.kill()


def test_blocking_wait_takes_the_lock_when_the_holder_releases(settings, key, tmp_path):
    holder = start_holder(settings, key, tmp_path, hold=1.5)
    try:
        lock = ConsulLock(key, settings=settings)
        assert lock.acquire(timeout=30)
        acquired_at = time.time()
        released = tmp_path / "released"
        wait_for(lambda: released.exists() and released.read_text(), 10, "the holder to note its release time")
        # A blocking query wakes on the release; a polling loop would not be this prompt.
        assert acquired_at - float(released.read_text()) < 0.5
        lock.release()
    finally:
        holder.kill()


def test_blocking_wait_gives_up_at_its_timeout(settings, key, tmp_path):
    holder = start_holder(settings, key, tmp_path)
    try:
        lock = ConsulLock(key, settings=settings, timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            lock.__enter__()
        assert 0.9 < time.monotonic() - t0 < 5
        assert "other-process" in str(info.value)
    finally:
        holder.kill()


def test_acquire_retries_through_lock_delay(settings, key, consul):
    client = ConsulClient(settings)
    sid = client.session_create("crashed holder", ttl=10, lock_delay=2, checks=["serfHealth"])
    assert client.kv_lock(key, sid, b"", exists=False).acquired
    client.session_destroy(sid)  # like a crash: the key is free but in lock-delay for 2 s
    lock = ConsulLock(key, settings=settings)
    assert lock.acquire(blocking=False) is False and lock.last_holder is None
    t0 = time.monotonic()
    assert lock.acquire(timeout=10)
    assert 0.5 < time.monotonic() - t0 < 5
    lock.release()
    client.close()


def test_lost_when_session_destroyed_behind_our_back(settings, key, consul):
    lock = ConsulLock(key, settings=settings.replace(ttl=10, lock_delay=3))
    reasons = []
    lock.on_lost(lambda _lock, reason: reasons.append(reason))
    assert lock.acquire()
    consul.api(f"/v1/session/destroy/{lock.session_id}", "PUT")
    wait_for(lock.lost.is_set, 10, "the lock to be reported lost")
    assert not lock.held and reasons and "session" in reasons[0]
    with pytest.raises(LockLost):
        lock.check()
    assert lock.release() is False
    # The next acquire works with a new session.
    assert lock.acquire(timeout=10) and lock.held
    lock.release()


def test_lost_when_key_deleted(settings, key, consul):
    lock = ConsulLock(key, settings=settings)
    assert lock.acquire()
    time.sleep(0.6)  # not an assertion: let the watcher start (it starts after WATCH_DELAY)
    consul.api(f"/v1/kv/{key}", "DELETE")
    wait_for(lock.lost.is_set, 10, "deletion to be noticed")
    assert lock.lost_reason == "the key was deleted"
    lock.release()


def test_self_fencing_when_the_agent_stops_answering(tmp_path):
    """A frozen agent: no renewal succeeds, so the lock is lost by the fencing deadline."""
    from .servers import start_consul, wait_consul_ready

    agent = start_consul(tmp_path, node="frozen")
    try:
        wait_consul_ready(agent)
        settings = ConsulSettings(address=agent.address, ttl=10, lock_delay=2, timeout=1)
        lock = ConsulLock("locks/fence/.lock", settings=settings)
        assert lock.acquire()
        agent.proc.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_for(lock.lost.is_set, 10, "self-fencing")
        lost_after = time.monotonic() - frozen_at
        # window min(10, 2) = 2 s, margin 0.5 s: lost at most 1.5 s after the last renewal.
        assert lost_after <= 2.0
        assert "self-fenced" in lock.lost_reason and not lock.held
    finally:
        agent.proc.signal(signal.SIGCONT)
        close_sessions()
        agent.stop()


def test_eight_threads_never_hold_at_once(settings, key):
    inside = []
    overlaps = []
    count = [0]
    mutex = threading.Lock()

    def worker():
        lock = ConsulLock(key, settings=settings)
        for _ in range(10):
            assert lock.acquire(timeout=60)
            with mutex:
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                count[0] += 1
            time.sleep(0.002)
            with mutex:
                inside.pop()
            lock.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert count[0] == 80 and overlaps == []


def test_two_lock_objects_sharing_a_session_exclude_each_other(settings, key):
    a, b = ConsulLock(key, settings=settings), ConsulLock(key, settings=settings)
    assert a.acquire()
    assert b.acquire(blocking=False) is False and b.last_holder.pid == os.getpid()
    a.release()
    assert b.acquire(blocking=False)
    b.release()


def test_200_cycles_use_one_session_and_close_removes_it(settings, key, consul):
    before = session_ids(consul)
    lock = ConsulLock(key, settings=settings)
    seen = set()
    for _ in range(200):
        assert lock.acquire()
        seen.add(lock.session_id)
        lock.release()
    assert len(seen) == 1 and session_ids(consul) - before == seen
    close_sessions()
    assert session_ids(consul) == before


def test_private_session_is_destroyed_after_release(settings, key, consul):
    before = session_ids(consul)
    lock = ConsulLock(key, settings=settings, private_session=True)
    with lock:
        assert len(session_ids(consul) - before) == 1
    assert session_ids(consul) == before


def test_process_exit_destroys_the_session_and_releases(settings, key, consul):
    before = session_ids(consul)
    code = f"""
from celery_consul_lock import ConsulLock
lock = ConsulLock({key!r}, address={settings.address!r}, lock_delay=1)
assert lock.acquire()
print("held", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "held" in out.stdout, out.stderr
    assert session_ids(consul) == before
    assert ConsulLock.holder(key, settings=settings) is None


def test_forked_child_uses_its_own_session(settings, key):
    lock = ConsulLock(key, settings=settings)
    assert lock.acquire()
    parent_sid = lock.session_id
    lock.release()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            child = ConsulLock(key, settings=settings)
            ok = child.acquire(timeout=10)
            os.write(w, json.dumps([ok, child.session_id]).encode())
            child.release()
            close_sessions()
        finally:
            os._exit(0)
    os.close(w)
    data = json.loads(os.read(r, 1000))
    os.waitpid(pid, 0)
    assert data[0] is True and data[1] != parent_sid
    # The parent's session survived the child.
    assert lock.acquire(blocking=False) and lock.session_id == parent_sid
    lock.release()


class _ChildLeaves(Exception):
    """Raised in a forked child to leave the parent's ``with`` block."""


@pytest.mark.parametrize("private_session", [False, True])
@pytest.mark.parametrize("leave", [_ChildLeaves, SystemExit])
def test_a_forked_child_leaving_the_with_block_never_releases_the_parents_key(settings, key, consul, leave, private_session):
    parent = os.getpid()
    lock = ConsulLock(key, settings=settings, private_session=private_session)

    def hold_and_fork() -> None:
        with lock:
            pid = os.fork()
            if pid == 0:
                raise leave()  # the child leaves the block: its __exit__ runs in the child
            _, status = os.waitpid(pid, 0)
            assert status == 0, f"the child failed: {status}"
            holder = ConsulLock.holder(key, settings=settings)
            assert holder is not None and holder.session == lock.session_id, holder
            assert lock.session_id in session_ids(consul) and lock.held
            assert not ConsulLock(key, settings=settings, private_session=True).acquire(blocking=False)

    try:
        hold_and_fork()
    except BaseException as exc:
        if os.getpid() != parent:  # the child: what interpreter exit runs, then out
            code = 0 if isinstance(exc, leave) else 1
            try:
                close_sessions()
            except BaseException:
                code = 1
            os._exit(code)
        raise
    assert ConsulLock.holder(key, settings=settings) is None


def start_holder(settings: ConsulSettings, key: str, tmp_path, hold: float = 3600) -> Proc:
    """Another process holding ``key`` for ``hold`` seconds, then releasing it."""
    script = textwrap.dedent(
        f"""
        import time
        from celery_consul_lock import ConsulLock
        lock = ConsulLock({key!r}, address={settings.address!r}, lock_delay=1, name="other-process")
        assert lock.acquire()
        open({str(tmp_path / "held")!r}, "w").close()
        time.sleep({hold})
        lock.release()
        open({str(tmp_path / "released")!r}, "w").write(repr(time.time()))
        time.sleep(3600)
        """
    )
    proc = spawn("holder", [sys.executable, "-c", script], tmp_path, cwd=ROOT)
    wait_for(lambda: (tmp_path / "held").exists(), 30, "the other process to hold the lock", procs=[proc])
    return proc


def test_requests_per_lock_one_write_each_way(settings, key, consul, monkeypatch):
    """What a lock costs the agent, counted on the wire: a key nobody has created is
    taken with one request (``check-not-exists`` + ``lock``), not a read and a write; a
    key this process has locked before also with one (``get`` + ``lock``); a key that
    exists but was never locked here is read (its flags checked) before it is written."""
    sent: list[str] = []
    original = transport.Connection.request

    def counting(self, method, target, body, headers, timeout):
        sent.append(f"{method} {target.split('?')[0]}")
        return original(self, method, target, body, headers, timeout)

    lock = ConsulLock(key, settings=settings)
    with lock:  # the session is created outside the count
        pass
    fresh = ConsulLock(f"{key}-fresh", settings=settings)
    monkeypatch.setattr(transport.Connection, "request", counting)

    def cycle(lock: ConsulLock) -> list[str]:
        sent.clear()
        assert lock.acquire(blocking=False)
        assert lock.release()
        return list(sent)

    txn, kv = "PUT /v1/txn", f"/v1/kv/{settings.full_key(key)}"
    assert cycle(fresh) == [txn, f"PUT /v1/kv/{settings.full_key(key)}-fresh"]
    assert cycle(lock) == [txn, f"PUT {kv}"]
    # Another process's first sight of an existing key: the create form fails without a
    # write, then the key is read, then taken.
    monkeypatch.setattr(lock_module, "_LOCK_KEYS", set())
    assert cycle(ConsulLock(key, settings=settings)) == [txn, f"GET {kv}", txn, f"PUT {kv}"]


def test_release_during_an_outage_frees_the_key_as_soon_as_consul_answers(tmp_path):
    """A release that fails while Consul is down (here: its only server killed, for longer
    than the session's fencing window) gives the session up. Once Consul answers again (the
    server restarted on its data), the key is released — no lock-delay for the next holder
    — and the session destroyed, from the background: the key is not left held until the
    TTL ends the session (up to 2 x TTL, then lock-delay), which after a leader election
    once stalled beat ticks for 25 s."""
    # raft_multiplier 1: the restarted server elects itself in about a second, not nine.
    agent = start_consul(tmp_path, dev=False, node="outage", hcl=["performance { raft_multiplier = 1 }"])
    try:
        wait_consul_ready(agent)
        settings = ConsulSettings(address=agent.address, ttl=10, lock_delay=3, timeout=0.5)
        key = "locks/outage/.lock"
        lock = ConsulLock(key, settings=settings)
        assert lock.acquire(blocking=False)
        sid = agent.api(f"/v1/kv/{key}")[0]["Session"]
        agent.proc.signal(signal.SIGKILL)
        agent.proc.popen.wait(10)
        assert lock.release() is False, "a release Consul never answered was reported as confirmed"
        agent.proc.restart()

        def freed() -> bool:
            if not agent.leader():
                return False
            entry = agent.api(f"/v1/kv/{key}?consistent")[0]
            return not entry.get("Session") and sid not in session_ids(agent)

        # Without the background release, Consul's new leader keeps the key until the
        # session's TTL runs out twice over (20 s); with it, about a second after election.
        wait_for(freed, 15, "the key released and its session destroyed once Consul answered again")
        # Freed by a release, not by the destroy (which would impose the 3 s lock-delay).
        other = ConsulLock(key, settings=settings, private_session=True)
        assert other.acquire(blocking=False), f"the key is not free: {other.last_holder or 'lock-delay'}"
        assert other.release()
    finally:
        agent.stop()
