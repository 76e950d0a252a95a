"""ConsulLock on a real three-server Consul cluster: a frozen agent, a killed leader.

The holder runs in this process; the contender is another process (a small Python script
run with this interpreter), because one process shares its session and its local lock
table between its locks. Both report times from ``time.time()`` on the same machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings

from .servers import ConsulAgent, ConsulCluster, wait_consul_ready, wait_for

pytestmark = pytest.mark.cluster

#: The contender: waits for the lock through its agent, prints JSON events, holds the lock
#: until a line arrives on stdin, then releases it. A ConsulLockError ends one acquire
#: call (as the Go client's Lock returns an error); the script reports it and waits again.
#: Its session has a 10 s fencing window (lock_delay=10), so that an election while it
#: holds the lock (e.g. when a frozen server rejoins) does not make it fence itself.
CONTENDER = r"""
import json, sys, time
from celery_consul_lock import ConsulLock, ConsulLockError, ConsulSettings, close_sessions

def say(event, t=None, **fields):
    print(json.dumps({"event": event, "t": time.time() if t is None else t, **fields}), flush=True)

address, key, wait, lock_delay = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
settings = ConsulSettings(address=address, ttl=10, lock_delay=lock_delay)
lock = ConsulLock(key, settings=settings)
deadline = time.monotonic() + wait
say("waiting")
acquired = False
while not acquired and time.monotonic() < deadline:
    try:
        acquired = lock.acquire(timeout=max(0.1, deadline - time.monotonic()))
    except ConsulLockError as exc:
        say("error", error=str(exc))
        time.sleep(0.5)
t = time.time()
if not acquired:
    say("timeout", t)
    sys.exit(1)
held = lock.held
try:
    token = lock.fencing_token
except ConsulLockError as exc:  # lost already (e.g. self-fenced)
    token, held = None, f"lost: {exc}"
holder = ConsulLock.holder(key, settings=settings)
say("acquired", t, session=holder.session if holder else None, pid=holder and holder.pid, token=token, held=held)
sys.stdin.readline()
say("released", ok=lock.release())
close_sessions()
"""


class Contender:
    """The contender script as a child process; its events are collected by a thread."""

    def __init__(self, agent: ConsulAgent, key: str, wait: float, log: Path, *, lock_delay: float = 10) -> None:
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CONTENDER, agent.address, key, str(wait), str(lock_delay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self.log = log
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def event(self, name: str, timeout: float) -> dict:
        def found() -> dict | None:
            event = next((e for e in self.events if e["event"] == name), None)
            if event is None and self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"contender exited ({self.proc.returncode})")
            return event

        try:
            return wait_for(found, timeout, f"the contender's {name!r} event")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events: {self.events}; stderr: {self.log.read_text()[-2000:]}") from None

    def errors(self) -> list[str]:
        return [e["error"] for e in self.events if e["event"] == "error"]

    def release(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("release\n")
        self.proc.stdin.flush()
        return self.event("released", 20)

    def __enter__(self) -> Contender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill it by pid (it leads its own process group) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        self._stderr.close()


# -- cluster helpers ------------------------------------------------------------------


def _followers(cluster: ConsulCluster) -> tuple[ConsulAgent, ConsulAgent, ConsulAgent]:
    leader = cluster.leader_agent()
    a, b = (agent for agent in cluster.agents if agent is not leader)
    return leader, a, b


def _get(agent: ConsulAgent, path: str) -> tuple[int, object]:
    """(HTTP status, decoded JSON or None); http_json closes an error answer."""
    try:
        return 200, agent.api(path)
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _kv(agent: ConsulAgent, key: str) -> dict | None:
    """The key (a consistent read), or None if it does not exist."""
    status, data = _get(agent, f"/v1/kv/{key}?consistent")
    assert status in (200, 404), f"reading {key} from {agent.node}: HTTP {status}"
    return data[0] if isinstance(data, list) and data else None


def _wait_contender_session(agent: ConsulAgent, contender: Contender) -> None:
    """The contender has created its session (so it is inside its acquire loop)."""

    def has_session() -> bool:
        sessions = agent.api(f"/v1/session/node/{agent.node}") or []
        return any(s["Name"].endswith(f" pid {contender.proc.pid}") for s in sessions)

    wait_for(has_session, 20, "the contender's session")


def _kill_server(agent: ConsulAgent) -> None:
    agent.proc.signal(signal.SIGKILL)
    agent.proc.popen.wait(10)


def _leader_other_than(agent: ConsulAgent, dead: ConsulAgent) -> str:
    """The leader ``agent`` knows, if it is not ``dead``."""
    leader = agent.leader()
    return "" if leader.startswith(dead.bind + ":") else leader


@contextmanager
def _restarting(cluster: ConsulCluster) -> Iterator[None]:
    """At the end, start every server that is not running again and wait for a healthy
    cluster, so later tests (in this file and others) still have three servers."""
    try:
        yield
    finally:
        cluster.heal()


# -- tests ----------------------------------------------------------------------------


def test_holder_behind_frozen_agent_fences_itself_before_the_contender_acquires(
    cluster: ConsulCluster, key: str, tmp_path: Path
) -> None:
    _, a, b = _followers(cluster)
    settings = ConsulSettings(address=a.address, ttl=10, lock_delay=3)
    assert settings.fence_window == 3
    lost: list[tuple[float, str]] = []
    holder = ConsulLock(key, settings=settings, on_lost=lambda lock, reason: lost.append((time.time(), reason)))
    assert holder.acquire(timeout=10)
    token = holder.fencing_token
    contender = Contender(b, key, 60, tmp_path / "contender.log")
    frozen = False
    try:
        _wait_contender_session(b, contender)
        assert not any(e["event"] == "acquired" for e in contender.events)
        assert holder.held

        t_freeze = time.time()
        a.proc.signal(signal.SIGSTOP)
        frozen = True
        acquired = contender.event("acquired", 60)
        assert lost, f"the holder never noticed it lost the lock; held={holder.held}"
        lost_at, reason = lost[0]
        # Self-fenced within the fencing window of the last contact (before the freeze), so
        # before any lock-delay that Consul can start after the freeze could end ...
        assert lost_at < t_freeze + settings.lock_delay, (lost_at - t_freeze, reason)
        assert "self-fenced" in reason, reason
        # ... and so before the contender got the lock.
        assert lost_at < acquired["t"], (lost_at - t_freeze, acquired["t"] - t_freeze)
        assert not holder.held
        assert acquired["held"] is True and acquired["token"] > token, (acquired, token)
        print(f"after the freeze: holder lost at +{lost_at - t_freeze:.2f} s, contender at +{acquired['t'] - t_freeze:.2f} s")

        a.proc.signal(signal.SIGCONT)
        frozen = False
        # The old holder's agent is back (it has a leader and can create sessions); the
        # cluster's full health (a voter again) is awaited by the next test.
        wait_consul_ready(a, timeout=60)
        before = _kv(b, key)
        assert before is not None and before["Session"] == acquired["session"]
        # The old holder releases: Consul refuses (not its session any more), nothing changes.
        assert holder.release() is False
        after = _kv(b, key)
        assert after == before, f"the old holder's release changed the key: {before} -> {after}"
        assert contender.release()["ok"] is True
        assert not (_kv(b, key) or {}).get("Session")
    finally:
        if frozen:
            a.proc.signal(signal.SIGCONT)
        contender.stop()
        holder.release()


def test_leader_killed_while_held_never_gives_two_holders(cluster: ConsulCluster, key: str, tmp_path: Path) -> None:
    """The holder keeps its lock through a leader election (its 10 s fencing window is
    longer than the election) and releases it ~2 s after the kill, once its agent knows
    the new leader; the contender gets it after that, never before."""
    leader, a, b = _followers(cluster)
    settings = ConsulSettings(address=a.address, ttl=10, lock_delay=10)
    lost: list[tuple[float, str]] = []
    holder = ConsulLock(key, settings=settings, on_lost=lambda lock, reason: lost.append((time.time(), reason)))
    assert holder.acquire(timeout=10)
    token = holder.fencing_token
    try:
        with _restarting(cluster), Contender(b, key, 60, tmp_path / "contender.log") as contender:
            _wait_contender_session(b, contender)
            _kill_server(leader)
            t_kill = time.time()
            time.sleep(2)  # the holder works on through the election for ~2 s ...
            # ... and releases once its agent knows the new leader (a release while the
            # agent still forwards to the dead leader: the next test).
            wait_for(lambda: _leader_other_than(a, leader), 30, "a new leader known to the holder's agent")
            held_at_release = holder.held
            t_release = time.time()
            released = holder.release()
            acquired = contender.event("acquired", 30)

            # The holder's interval ends when it stopped believing it held the lock.
            holder_end = min([t_release, *(t for t, _ in lost)])
            assert acquired["t"] > holder_end, (acquired["t"] - t_kill, holder_end - t_kill, lost)
            assert acquired["pid"] == contender.proc.pid and (acquired["token"] or 0) > token, (acquired, token)
            # Sessions and locks survive a leader change: the holder held the lock through
            # it, and its release reached Consul.
            assert held_at_release and not lost, lost
            assert released is True
            entry = _kv(b, key)
            assert entry is not None and entry["Session"] == acquired["session"]
            assert contender.release()["ok"] is True
            print(
                f"after the kill: holder released at +{t_release - t_kill:.2f} s, contender acquired at "
                f"+{acquired['t'] - t_kill:.2f} s; contender errors: {contender.errors()}"
            )
    finally:
        holder.release()


def test_release_during_leader_election_still_frees_the_key(cluster: ConsulCluster, key: str, tmp_path: Path) -> None:
    """The holder finishes right after the leader died, while its agent still forwards
    writes to the dead leader (followers notice only after a 1-2 s heartbeat timeout), so
    Consul answers the release with HTTP 500 at once. The key must still reach the
    contender: at the latest when the holder's session times out (2 x TTL, then the
    lock-delay), as release() promises when it cannot reach Consul."""
    leader, a, b = _followers(cluster)
    settings = ConsulSettings(address=a.address, ttl=10, lock_delay=10)
    holder = ConsulLock(key, settings=settings)
    assert holder.acquire(timeout=10)
    sid = (ConsulLock.holder(key, settings=settings) or pytest.fail("no holder")).session
    deadline = 2 * settings.ttl + settings.lock_delay + 5
    try:
        with _restarting(cluster), Contender(b, key, 60, tmp_path / "contender.log") as contender:
            _wait_contender_session(b, contender)
            _kill_server(leader)
            agent_leader = a.leader()
            t_release = time.time()
            released = holder.release()
            try:
                acquired = contender.event("acquired", deadline)
            except AssertionError:
                entry = _kv(b, key)
                _, info = _get(b, f"/v1/session/info/{sid}")
                raise AssertionError(
                    f"the key never reached the contender within {deadline:g} s of the holder's release "
                    f"(release() returned {released}; the holder's agent named {agent_leader!r} as leader "
                    f"when it released, the dead one being {leader.bind}). Now, "
                    f"{time.time() - t_release:.0f} s after the release, the key is held by session "
                    f"{(entry or {}).get('Session')} (the holder's: {sid}), which Consul still has: {info}"
                ) from None
            assert acquired["t"] > t_release
            assert acquired["pid"] == contender.proc.pid, acquired
            assert contender.release()["ok"] is True
    finally:
        holder.release()
