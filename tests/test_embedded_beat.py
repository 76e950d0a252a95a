"""`celery worker -B --scheduler consul`: the leader-elected beat embedded in real workers.

Consul's standard topology: three servers, and one client agent per simulated node on its own
loopback address (127.0.0.31-33), each worker (prefork, 2 processes, its embedded beat) on its
own node's agent. Celery runs the embedded beat as a child process forked from the worker
(billiard), so each node runs one beat of the election. The entry "heartbeat" runs every
second and records its tick id and sending beat (tests/proj); the tick rules are those of
tests/test_beat.py (every tick id once, in order, late by at most the failover's bound).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from celery_consul_lock.beat import BeatConfig, embedded_beat_problem

from .beats import Harness, instance_pid, ticks
from .servers import ConsulAgent, ConsulCluster, have_loopback_aliases, start_client_agent, wait_consul_ready, wait_for
from .test_beat import CRASH_BOUND, IN_FLIGHT, check_ticks, due, first_from_other, forget_tick_mark, report
from .workers import Worker, start_worker

#: Release -> election of the next leader: well under the beat's lock-delay (1.5 s).
HANDOVER_BOUND = 1.0
#: Seconds after the last worker answered ping before the tick rules are checked (see steady).
STARTUP = 3.0
#: Signal -> the new leader's first tick, at a warm or cold shutdown. Celery stops the
#: embedded beat after the consumer (and, cold, the pool): the old leader sends until then,
#: so no tick waits; the next leads at once after its release (HANDOVER_BOUND).
SHUTDOWN_BOUND = 5.0
#: What a worker logs when its embedded beat is not leader-elected (embedded_beat_problem).
NOT_ELECTED = "which is not leader-elected"
RELEASED = "left the election (released the leader lock)"
#: The key every run of the heartbeat task locks (ConsulLockedTask's default key).
HEARTBEAT_KEY = "locks/proj.heartbeat/.lock"


@dataclass
class Node:
    """One simulated node: its client agent and its worker with the embedded beat."""

    name: str
    agent: ConsulAgent
    worker: Worker

    def beat_instance(self) -> str | None:
        """The instance id of this worker's embedded beat, from the worker's log."""
        for line in self.worker.log_text().splitlines():
            if ": joining the election for " in line:
                return line.split("beat ", 1)[1].split(":", 1)[0]
        return None

    def alive(self) -> bool:
        return self.worker.popen.poll() is None


class EmbeddedBeats:
    """Nodes of ``worker -B --scheduler consul`` on ``cluster``, for one test."""

    def __init__(self, harness: Harness, cluster: ConsulCluster, workdir: Path) -> None:
        self.h, self.cluster, self.workdir = harness, cluster, workdir
        self.nodes: list[Node] = []
        self.agents: list[ConsulAgent] = []
        self.started = 0.0

    def start(self, n: int) -> EmbeddedBeats:
        forget_tick_mark(self.cluster.agents[0])
        suffix = uuid.uuid4().hex[:4]
        for i in range(n):
            self.agents.append(start_client_agent(self.workdir, self.cluster, f"127.0.0.{31 + i}", f"emb{i}-{suffix}"))
        for agent in self.agents:
            wait_consul_ready(agent, timeout=60)
        for i, agent in enumerate(self.agents):
            args = ["-B", "--scheduler", "consul", "-s", str(self.workdir / f"schedule-{i}")]
            worker = start_worker(self.h.proj.app, self.workdir, self.h.env(agent.address), concurrency=2, extra_args=args)
            self.h.workers.append(worker)  # the harness stops it (and its process group)
            self.nodes.append(Node(agent.node, agent, worker))
        self.started = time.time()
        return self

    def steady(self, records: list[dict]) -> list[dict]:
        """The records once every worker runs: while the later workers start (CPU-bound on
        two cores), a tick received by a new worker can run a second or two late and after
        the next one. Those are checked for duplicates only (by the caller)."""
        ids = [x["tick"] for x in records]
        assert len(ids) == len(set(ids)), f"tick ids ran more than once: {sorted(i for i in ids if ids.count(i) > 1)}"
        return [x for x in records if x["t"] >= self.started + STARTUP]

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()

    def check_alive(self, *, except_: tuple[Node, ...] = ()) -> None:
        """Fail at once if a worker we did not stop has exited."""
        for node in self.nodes:
            if node not in except_:
                node.worker.check_alive()

    def by_instance(self, instance: str) -> Node:
        for node in self.nodes:
            if node.beat_instance() == instance:
                return node
        raise AssertionError(f"no worker's embedded beat is {instance!r}")

    def leader(self, n: int = 3) -> Node:
        """Wait for the first ``n`` ticks; the node whose beat sent the last one."""

        def enough(xs: list[dict]) -> bool:
            self.check_alive()
            return len(xs) >= n

        records = self.h.wait_ticks(enough, 30, f"{n} ticks")
        return self.by_instance(records[-1]["instance"])

    def takeover(self, old: Node, event: float, timeout: float, *, gone: tuple[Node, ...]) -> dict:
        """The first tick sent by another node's beat than ``old``'s after ``event``."""
        instance = old.beat_instance()

        def taken(xs: list[dict]) -> bool:
            self.check_alive(except_=gone)
            return first_from_other(xs, instance, event) is not None

        found = first_from_other(
            self.h.wait_ticks(taken, timeout, f"a tick from another beat than {old.name}'s"), instance, event
        )
        assert found is not None
        return found

    def between_runs(self, r) -> None:
        """Return right after a tick has run and released its task key: a kill now hits no
        run of the heartbeat. (A run killed mid-body holds its key until Consul ends its
        session, within 2T + D, and ticks due meanwhile are skipped as held: the failure
        mode of a killed lock holder, tested elsewhere, not the beat failover tested here.)"""
        count = len(ticks(r))
        self.h.wait_ticks(lambda xs: len(xs) > count, 10, "the next tick")
        agent = self.cluster.agents[0]

        def free() -> bool:
            entry = agent.api(f"/v1/kv/{HEARTBEAT_KEY}") or [{}]
            return not entry[0].get("Session")

        wait_for(free, 0.8, "the heartbeat's key to be released after its run", interval=0.01)

    def elections(self) -> int:
        return sum(node.worker.log_text().count(": elected leader of ") for node in self.nodes)


@pytest.fixture
def embedded(harness: Harness, cluster: ConsulCluster, tmp_path: Path):
    if not have_loopback_aliases():
        pytest.fail("needs 127.0.0.31-33 on the loopback interface")
    beats = EmbeddedBeats(harness, cluster, tmp_path)
    try:
        yield beats
    finally:
        harness.stop()
        beats.stop()


def log_time(text: str, marker: str) -> float | None:
    """When the last line containing ``marker`` was logged (local time, to the millisecond)."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): [^\]]*\] .*" + re.escape(marker), text, re.M)
    if not stamps:
        return None
    when, ms = stamps[-1]
    return time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def released_at(node: Node) -> float:
    """When ``node``'s beat released the leader lock, by its log."""
    when = log_time(node.worker.log_text(), RELEASED)
    assert when is not None, f"{node.name}'s beat never released the leader lock:\n{node.worker.log_text()[-3000:]}"
    return when


def shut_down_the_leader(embedded: EmbeddedBeats, leader: Node, sig: signal.Signals) -> dict:
    """Signal the leading node's worker to shut down; the first tick another node's beat
    sends, which must come within SHUTDOWN_BOUND (the beat released the lock)."""
    at = time.time()
    leader.worker.popen.send_signal(sig)
    takeover = embedded.takeover(leader, at, 10, gone=(leader,))
    gap = takeover["t"] - at
    report(f"embedded {sig.name}: signal -> first tick of the new leader", f"{gap:.2f} s")
    assert gap <= SHUTDOWN_BOUND, f"the first tick of the new leader ran {gap:.2f} s after {sig.name}"
    return takeover


def handover(old: Node, new: Node) -> float:
    """Seconds from the old beat's release of the leader lock to the new leader's election,
    by their logs. Under the lock-delay (1.5 s), it proves the lock was released, not freed
    by the end of the old session (which would have kept the next leader out for d)."""
    elected = log_time(new.worker.log_text(), ": elected leader of ")
    assert elected is not None
    return elected - released_at(old)


def no_ticks_from(records: list[dict], node: Node, instance: str | None, after: float) -> None:
    """No tick due after ``after`` was sent by ``node``'s beat. (Judged by the tick's due time,
    about its send time, not by when it ran: a message the stopping worker had taken is put
    back to the queue and runs later on another worker, as it should.)"""
    late = [x for x in records if x["instance"] == instance and due(x) > after + IN_FLIGHT]
    assert not late, f"the beat of {node.name} sent ticks after it should have stopped: {late}"


@pytest.mark.cluster
def test_one_embedded_beat_leads_a_warm_shutdown_hands_over_at_once_and_a_crash_within_the_bound(embedded, r):
    # 1. Three workers with -B --scheduler consul: exactly one embedded beat is elected.
    embedded.start(3)
    first = embedded.leader()
    records = embedded.h.wait_ticks(lambda xs: len(xs) >= 4, 20, "4 ticks")
    assert {x["instance"] for x in records} == {first.beat_instance()}, records
    assert embedded.elections() == 1, [n.worker.log_text()[-2000:] for n in embedded.nodes]
    for node in embedded.nodes:
        text = node.worker.log_text()
        assert "leaves the election when that worker ends" in text and NOT_ELECTED not in text, text[-3000:]

    # 2. Warm shutdown (SIGTERM) of the leader's worker: its beat releases the lock, and
    #    another node's beat sends the next tick at once (no lock-delay).
    takeover = shut_down_the_leader(embedded, first, signal.SIGTERM)
    assert first.worker.popen.wait(30) == 0
    second = embedded.by_instance(takeover["instance"])
    took = handover(first, second)
    report("embedded SIGTERM: release -> new leader elected", f"{took:.3f} s")
    assert took <= HANDOVER_BOUND

    # 3. The new leader's worker is SIGKILLed with its whole process group (its node's
    #    processes die at once): the third node's beat leads within the crash bound.
    embedded.h.wait_ticks(lambda xs: xs[-1]["t"] >= takeover["t"] + 3, 15, "3 s of ticks from the second leader")
    embedded.between_runs(r)
    killed = time.time()
    os.killpg(second.worker.pid, signal.SIGKILL)
    takeover2 = embedded.takeover(second, killed, 20, gone=(first, second))
    gap2 = takeover2["t"] - killed
    bound = BeatConfig.from_app(embedded.h.proj.app).crash_failover_bound
    report("embedded SIGKILL of the node: kill -> first tick of the new leader", f"{gap2:.2f} s (crash bound {bound:g} s)")
    assert gap2 <= CRASH_BOUND, f"the first tick of the new leader ran {gap2:.2f} s after the kill"
    third = embedded.by_instance(takeover2["instance"])
    assert third not in (first, second)

    # 4. Every due tick ran exactly once across both failovers.
    records = embedded.h.wait_ticks(lambda xs: xs[-1]["t"] >= takeover2["t"] + 4, 15, "4 s of ticks from the third leader")
    no_ticks_from(records, first, first.beat_instance(), released_at(first))
    no_ticks_from(records, second, second.beat_instance(), killed)
    gaps = check_ticks(embedded.steady(records), [released_at(first), killed], CRASH_BOUND)
    report("embedded: wide (tick-id gap, run gap) pairs", gaps)


@pytest.mark.cluster
def test_a_cold_shutdown_hands_over_at_once_and_a_worker_killed_alone_takes_its_beat_with_it(embedded, r):
    embedded.start(3)
    first = embedded.leader()

    # 1. Cold shutdown (SIGQUIT): Celery terminates the embedded beat, which releases.
    takeover = shut_down_the_leader(embedded, first, signal.SIGQUIT)
    first.worker.popen.wait(30)
    second = embedded.by_instance(takeover["instance"])
    took = handover(first, second)
    report("embedded SIGQUIT: release -> new leader elected", f"{took:.3f} s")
    assert took <= HANDOVER_BOUND

    # 2. SIGKILL of the leader's worker process alone (the OOM killer's choice, or `kill -9
    #    <pid>`): its pool processes die with it (Celery), and its embedded beat is told by
    #    the kernel (PR_SET_PDEATHSIG) and leaves the election as at a warm shutdown, instead
    #    of leading on as an orphan.
    embedded.h.wait_ticks(lambda xs: xs[-1]["t"] >= takeover["t"] + 3, 15, "3 s of ticks from the second leader")
    instance = second.beat_instance()
    assert instance is not None
    beat_pid = instance_pid(instance)
    embedded.between_runs(r)
    killed = time.time()
    second.worker.popen.send_signal(signal.SIGKILL)
    takeover2 = embedded.takeover(second, killed, 15, gone=(first, second))
    gap2 = takeover2["t"] - killed
    report("embedded SIGKILL of the worker alone: kill -> first tick of the new leader", f"{gap2:.2f} s")
    # The orphan releases as it leaves (about 1 s measured); on a loaded machine its exit can
    # come later, and Consul's crash bound is what is promised.
    assert gap2 <= CRASH_BOUND, f"the first tick of the new leader ran {gap2:.2f} s after the worker was killed"

    def beat_gone() -> bool:
        try:
            os.kill(beat_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{beat_pid}/stat") as f:  # a zombie until its (dead) parent is reaped
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_for(beat_gone, 10, f"the orphaned embedded beat (pid {beat_pid}) to exit")

    records = embedded.h.wait_ticks(lambda xs: xs[-1]["t"] >= takeover2["t"] + 4, 15, "4 s of ticks from the third leader")
    no_ticks_from(records, first, first.beat_instance(), released_at(first))
    no_ticks_from(records, second, instance, killed)
    gaps = check_ticks(embedded.steady(records), [released_at(first), killed], CRASH_BOUND)
    report("embedded cold/alone: wide (tick-id gap, run gap) pairs", gaps)


def test_worker_dash_s_consul_is_the_state_db_not_the_scheduler_and_the_worker_says_so(proj, consul, redis_server, tmp_path):
    from .workers import worker_env

    env = worker_env(redis_server.url, consul.address, TEST_BEAT_INTERVAL="1", TEST_BEAT_NAME=f"b-{uuid.uuid4().hex[:6]}")
    args = ["-B", "-S", "consul", "-s", str(tmp_path / "schedule")]
    worker = start_worker(proj.app, tmp_path, env, concurrency=1, extra_args=args, cwd=tmp_path)
    try:
        wait_for(lambda: NOT_ELECTED in worker.log_text(), 30, "the worker's warning", procs=[worker])
        text = worker.log_text()
        assert "-S consul was taken as the worker's state database" in text and "Use --scheduler consul" in text, text
        # It is indeed Celery's own scheduler: it never joins the election.
        wait_for(lambda: "Sending due task heartbeat" in worker.log_text(), 20, "the embedded beat to send")
        assert "joining the election" not in worker.log_text()
    finally:
        worker.stop()
    assert any(p.name.startswith("consul") for p in tmp_path.iterdir()), "no state database file named consul"


def test_embedded_beat_problem_names_the_cause_only_where_the_package_is_used(proj):
    app = proj.app
    stock = "celery.beat:PersistentScheduler"
    assert "-S consul was taken as the worker's state database" in (embedded_beat_problem(app, stock, "consul") or "")
    assert "no leader-elected scheduler was given" in (embedded_beat_problem(app, stock, None) or "")
    assert embedded_beat_problem(app, "consul", "consul") is None
    assert embedded_beat_problem(app, "celery_consul_lock.beat:LeaderPersistentScheduler", None) is None
    assert embedded_beat_problem(app, "no_such_module:Scheduler", None) is None  # the beat reports that itself
    # An app without ConsulLockedTask tasks (the tasks are all the function looks at): not
    # ours to judge, unless -S names our scheduler.
    plain = SimpleNamespace(tasks={"celery.backend_cleanup": object()})
    assert embedded_beat_problem(plain, stock, None) is None
    assert embedded_beat_problem(plain, stock, "consul") is not None
