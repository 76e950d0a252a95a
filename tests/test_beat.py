"""The leader-elected beat (``celery beat -S consul``) in real processes: several `celery beat`
instances, one real worker, Redis, and a Consul dev agent or the three-server cluster.

The beat entry "heartbeat" (TEST_BEAT_INTERVAL=1) runs proj.heartbeat every second, which
records its tick id and the sending beat's instance in the Redis list "runs". With Celery's
"run once" semantics the ticks that fell due while nobody led are collapsed into one late run
(whose tick id is the first missed due time), and the next due time is computed from that
run's send time. So "no duplicate, no missing tick" is checked as: the observed tick ids are
unique and strictly increasing, consecutive ids are >= 1 s apart, and they are about 1 s apart
(and so are the runs) except around a failover, where the gap is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import socket
import threading
import time

import pytest

from celery_consul_lock import Tick

from .beats import Beat, Harness, skips
from .servers import free_port, wait_for

ENTRY = "heartbeat"
#: A crashed leader is replaced within check TTL + lock-delay + 0.25 s (3.75 s by default),
#: plus a standby poll and the send; a stopped one releases the lock at once.
CRASH_BOUND = 6.0
TERM_BOUND = 2.0
#: Consecutive tick ids / runs outside a failover: about 1 s apart (each due time is the
#: previous send time + 1 s, so they drift by a few ms per tick; ids of whole seconds then
#: step by 2 now and then).
STEADY_ID_GAP = 2.0
STEADY_RUN_GAP = 2.0
#: Records of the old leader may land this long after it was killed (a message in flight).
IN_FLIGHT = 0.5


def forget_tick_mark(agent) -> None:
    """Start from no tick mark: the mark of "heartbeat" is shared by every test on a cluster."""
    agent.api(f"/v1/kv/celery-consul-lock/ticks/{ENTRY}", "DELETE")


# -- what the worker recorded ------------------------------------------------------------------


def due(record: dict) -> float:
    return Tick.parse(record["tick"]).epoch


def check_ticks(records: list[dict], failovers: list[float], bound: float) -> list[tuple[float, float]]:
    """The tick rules (see the module doc); returns the (id gap, run gap) pairs, rounded, that
    are wider than the steady ones.

    A pair of consecutive runs belongs to a failover at time f when the later run happened
    in [f, f + bound + 2.5]: the first run after a takeover is the collapsed late tick (id
    about 1 s after the previous one), the big id gap comes with the next.
    """
    ids = [x["tick"] for x in records]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    assert not dups, f"tick ids ran more than once: {dups}\n{records}"
    assert all(x["tick"] and x["tick"].startswith(f"{ENTRY}@") for x in records), records
    gaps = []
    for a, b in itertools.pairwise(records):
        id_gap, run_gap = due(b) - due(a), b["t"] - a["t"]
        where = f"{a['tick']} (run {a['t']:.2f} by {a['instance']}) -> {b['tick']} (run {b['t']:.2f} by {b['instance']})"
        assert id_gap >= 1 - 1e-3, f"tick ids not increasing by >= 1 s: {where}"
        if any(f <= b["t"] <= f + bound + 2.5 for f in failovers):
            assert id_gap <= bound + 2 and run_gap <= bound + 1.5, f"failover gap over {bound} s: {where}"
            if id_gap > STEADY_ID_GAP or run_gap > STEADY_RUN_GAP:
                gaps.append((round(id_gap, 2), round(run_gap, 2)))
        else:
            assert id_gap <= STEADY_ID_GAP and run_gap <= STEADY_RUN_GAP, f"gap outside a failover: {where}"
    return gaps


def first_from_other(records: list[dict], old: str, after: float) -> dict | None:
    return next((x for x in records if x["t"] > after and x["instance"] != old), None)


def leader_of(h: Harness, n: int = 3, timeout: float = 25) -> Beat:
    """Wait for ``n`` ticks; the beat that sent the last one."""
    records = h.wait_ticks(lambda xs: len(xs) >= n, timeout, f"{n} ticks")
    return h.by_instance(records[-1]["instance"])


def seconds_since(when: float | None, start: float) -> str:
    return "?" if when is None else f"{when - start:.2f} s"


def report(what: str, value: object) -> None:
    print(f"\n[beat-failover] {what}: {value}")


# -- a beat that cannot reach Consul -----------------------------------------------------------


class Forwarder:
    """A TCP forwarder from a local port to an agent: "Consul appears on this address"."""

    def __init__(self, port: int, target: str) -> None:
        host, _, tport = target.rpartition(":")
        self.target = (host, int(tport))
        self.server = socket.create_server(("127.0.0.1", port))
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def test_a_beat_that_cannot_reach_consul_sends_nothing_and_says_so_once(harness, r, consul):
    port = free_port()
    beat = harness.beat(f"127.0.0.1:{port}")
    harness.wait_joined()
    started = time.monotonic()
    wait_for(lambda: "cannot take part in the election" in beat.log_text(), 5, "the beat to report Consul unreachable")
    # Absence cannot be waited for: watch the beat for 5 s in all (it retries at 0.5, 1, 2 s...).
    time.sleep(max(0.0, started + 5 - time.monotonic()))
    text = beat.log_text()
    assert text.count("cannot take part in the election") == 1, text
    assert "Sending due task" not in text and "elected leader" not in text, text
    assert r.llen("celery") == 0, "a beat without Consul sent a message"

    # Consul appears on that address: the beat is elected without a restart, and sends.
    forwarder = Forwarder(port, consul.address)
    try:
        wait_for(lambda: "elected leader" in beat.log_text(), 25, "the beat to be elected once Consul is reachable")
        wait_for(lambda: r.llen("celery") >= 1, 10, "the beat to send a tick")
    finally:
        beat.stop()
        forwarder.close()


# -- the cluster scenarios -----------------------------------------------------------------------


def start_three(h: Harness, cluster) -> None:
    """A worker and three beats, beat i talking to server i."""
    forget_tick_mark(cluster.agents[0])
    h.worker(cluster.agents[0].address)
    for agent in cluster.agents:
        h.beat(agent.address)
    h.wait_joined()


def takeover_after(h: Harness, old: str, event: float, timeout: float) -> dict:
    """The first run sent by another beat than ``old`` after ``event``."""
    records = h.wait_ticks(lambda xs: first_from_other(xs, old, event), timeout, f"a tick from another beat than {old}")
    found = first_from_other(records, old, event)
    assert found is not None
    return found


@pytest.mark.cluster
def test_beats_started_at_the_same_instant_elect_exactly_one_leader(harness, r, cluster):
    forget_tick_mark(cluster.agents[0])
    harness.worker(cluster.agents[0].address)
    for agent in cluster.agents:  # back to back: all three are up within a few ms
        harness.beat(agent.address)
    first = harness.wait_ticks(bool, 25, "the first tick")[0]
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= first["t"] + 5, 20, "5 s of ticks")
    harness.wait_joined()
    assert {x["instance"] for x in records} == {first["instance"]}, records
    elected = [b.name for b in harness.beats if "elected leader" in b.log_text()]
    assert elected == [harness.by_instance(first["instance"]).name], elected
    check_ticks(records, [], 0)
    assert len(records) >= 5, records


def stop_the_leader(h: Harness, cluster, sig: signal.Signals, timeout: float) -> tuple[Beat, int, float, dict]:
    """Three beats and a worker; once they tick, signal the leader with ``sig``. Returns the
    old leader, its log's size before the signal, when it was sent, and the first run sent
    by another beat after it."""
    start_three(h, cluster)
    leader = leader_of(h)
    offset = leader.log_size()
    at = time.time()
    leader.signal(sig)
    return leader, offset, at, takeover_after(h, leader.instance, at, timeout)


@pytest.mark.cluster
def test_leader_sigkill_a_standby_takes_over_within_the_crash_bound(harness, r, cluster):
    leader, _, killed, takeover = stop_the_leader(harness, cluster, signal.SIGKILL, 15)
    old = leader.instance
    gap = takeover["t"] - killed
    report("SIGKILL: kill -> first run sent by the new leader", f"{gap:.2f} s")
    report("SIGKILL: kill -> new leader elected", seconds_since(harness.by_instance(takeover["instance"]).elected_at(), killed))
    assert gap <= CRASH_BOUND, f"the first tick of the new leader ran {gap:.2f} s after the kill"
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= takeover["t"] + 4, 15, "4 s of ticks from the new leader")
    assert not [x for x in records if x["instance"] == old and x["t"] > killed + IN_FLIGHT], records
    assert {x["instance"] for x in records if x["t"] > killed + IN_FLIGHT} == {takeover["instance"]}, records
    report("SIGKILL: wide (tick-id gap, run gap) pairs", check_ticks(records, [killed], CRASH_BOUND))


@pytest.mark.cluster
def test_leader_sigterm_releases_and_a_standby_sends_at_once(harness, r, cluster):
    leader, offset, stopped, takeover = stop_the_leader(harness, cluster, signal.SIGTERM, 10)
    old = leader.instance
    gap = takeover["t"] - stopped
    report("SIGTERM: signal -> first run sent by the new leader", f"{gap:.2f} s")
    report(
        "SIGTERM: signal -> new leader elected", seconds_since(harness.by_instance(takeover["instance"]).elected_at(), stopped)
    )
    assert gap <= TERM_BOUND, f"the first tick of the new leader ran {gap:.2f} s after SIGTERM"
    code = leader.popen.wait(5)
    assert code in (0, -signal.SIGTERM), f"the old leader exited with {code}"
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= takeover["t"] + 4, 15, "4 s of ticks from the new leader")
    assert not [x for x in records if x["instance"] == old and x["t"] > stopped + IN_FLIGHT], records
    report("SIGTERM: wide (tick-id gap, run gap) pairs", check_ticks(records, [stopped], TERM_BOUND))
    # The takeover within TERM_BOUND (< the lock-delay a destroyed session would impose)
    # shows that the lock was released; the old leader's log should say so too.
    tail = leader.log_text(offset)
    assert re.search(r"releas|leaving the election|stepping down|stopped leading", tail, re.I), (
        f"the old leader's log says nothing about releasing the leader lock after SIGTERM "
        f"(takeover {gap:.2f} s later); its log after the signal: {tail!r}"
    )


@pytest.mark.cluster
def test_a_leader_paused_past_its_lease_sends_nothing_when_it_resumes(harness, r, cluster):
    leader, _, paused, takeover = stop_the_leader(harness, cluster, signal.SIGSTOP, 15)
    old = leader.instance
    report("SIGSTOP: stop -> first run sent by the new leader", f"{takeover['t'] - paused:.2f} s")
    time.sleep(max(0.0, paused + 11 - time.time()))  # the scenario: paused for more than 10 s
    offset = leader.log_size()
    resumed = time.time()
    leader.signal(signal.SIGCONT)
    wait_for(lambda: "lost leadership" in leader.log_text(offset), 10, "the resumed beat to log that it lost leadership")
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= resumed + 5, 15, "5 s of ticks after SIGCONT")
    assert not [x for x in records if x["instance"] == old and x["t"] > paused + IN_FLIGHT], records
    assert {x["instance"] for x in records if x["t"] > paused + IN_FLIGHT} == {takeover["instance"]}, records
    stale = [s for s in skips(r) if s["reason"] == "stale-leader"]
    assert not stale, f"the resumed beat sent ticks (the worker dropped them as stale): {stale}"
    assert leader.alive(), "the resumed beat exited"
    report("SIGSTOP: wide (tick-id gap, run gap) pairs", check_ticks(records, [paused], CRASH_BOUND))


SKEW = "+7s"


@pytest.mark.cluster
def test_a_beat_with_a_skewed_clock_takes_over_without_duplicates(harness, r, cluster):
    forget_tick_mark(cluster.agents[0])
    harness.worker(cluster.agents[0].address)
    first = harness.beat(cluster.agents[0].address)
    harness.wait_joined()
    harness.wait_ticks(lambda xs: len(xs) >= 2, 25, "ticks from the first beat")
    skewed = harness.beat(cluster.agents[1].address, skew=SKEW)
    harness.beat(cluster.agents[2].address)
    harness.wait_joined()
    assert leader_of(harness, 4) is first
    # Kill the normal-clock leaders until the skewed beat leads.
    kills: list[float] = []
    leader = first
    while leader is not skewed:
        kills.append(time.time())
        old = leader.instance
        leader.signal(signal.SIGKILL)
        takeover = takeover_after(harness, old, kills[-1], 15)
        leader = harness.by_instance(takeover["instance"])
        report(f"skew: kill -> first run sent by {leader.name} (skew {leader.skew})", f"{takeover['t'] - kills[-1]:.2f} s")
        assert takeover["t"] - kills[-1] <= CRASH_BOUND
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= takeover["t"] + 5, 20, "5 s of ticks from the skewed beat")
    mine = [x for x in records if x["instance"] == skewed.instance]
    # After its first (collapsed) run, the skewed beat's tick ids are due times on its clock.
    skew = float(SKEW.rstrip("s"))
    assert all(skew - 1.5 < due(x) - x["t"] < skew + 1.5 for x in mine[1:]), mine
    # The runs keep the crash bound; the tick ids jump by the skew at the takeover.
    run_gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(records)]
    assert max(run_gaps) <= CRASH_BOUND + 1, run_gaps
    report("skew: wide (tick-id gap, run gap) pairs", check_ticks(records, kills, CRASH_BOUND + skew))


def leader_key_holder(h: Harness, agent) -> str:
    """Who holds the beat's leader key, as the session's name says ("-" for nobody)."""
    try:
        entry = agent.api(f"/v1/kv/locks/{h.beat_name}/beat/.lock") or [{}]
        sid = entry[0].get("Session")
        if not sid:
            return "-"
        info = agent.api(f"/v1/session/info/{sid}") or [{}]
        return f"{sid[:8]} {info[0].get('Name', '?')}"
    except OSError as exc:
        return f"? ({exc.__class__.__name__})"


#: Ticks go on within a Consul leader election (a few seconds) plus the crash bound.
RAFT_BOUND = 10.0


@pytest.mark.cluster
def test_consul_raft_leader_killed_ticks_continue_without_duplicates(harness, r, cluster):
    """Last in the file: the cluster stays degraded (2 of 3 servers, still a quorum)."""
    server = cluster.leader_agent()
    followers = [a for a in cluster.agents if a is not server]
    forget_tick_mark(followers[0])
    harness.worker(followers[0].address)
    for agent in followers:
        harness.beat(agent.address)
    harness.wait_joined()
    leader_of(harness)
    killed = time.time()
    server.proc.signal(signal.SIGKILL)
    holders: list[str] = []  # who held the leader key, once a second

    def sample(xs: list[dict]) -> bool:
        elapsed = time.time() - killed
        if len(holders) <= elapsed:
            holders.append(f"+{elapsed:.0f}s {leader_key_holder(harness, followers[0])}")
        return xs[-1]["t"] >= killed + 12

    records = harness.wait_ticks(sample, 45, "ticks for 12 s after the server kill")
    report("raft: new server leader", cluster.leader_agent().node)
    report("raft: leader key holders after the kill", holders)
    senders = sorted({harness.by_instance(x["instance"]).name for x in records if x["t"] > killed})
    report("raft: beats that sent after the kill", senders)
    runs_after = [x for x in records if x["t"] > killed - 1]
    longest = max((b["t"] - a["t"], a["tick"], b["tick"]) for a, b in itertools.pairwise(runs_after))
    report("raft: longest run gap after the kill", longest)
    assert longest[0] <= RAFT_BOUND, (
        f"no tick ran for {longest[0]:.1f} s after the Consul leader was killed ({longest[1]} -> {longest[2]}); "
        f"holder of the beat's leader key, once a second: {holders}"
    )
    report("raft: wide (tick-id gap, run gap) pairs", check_ticks(records, [killed], RAFT_BOUND))
