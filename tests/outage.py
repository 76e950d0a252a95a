"""A worker's Consul agent killed and restarted while scheduled ticks stream in.

The standard topology: three Consul servers, and one client agent per simulated node on its
own loopback address, each `celery worker` (prefork, 2 processes) on its own node's agent. A
thread in this process plays the beat: about every ``interval`` seconds it sends
``proj.heartbeat`` with a tick id of one entry, as the leader-elected beat does. Each run of
a tick is recorded in Redis by the task (``tests/proj/app.py``), with the pool process that
ran it. Used by tests/test_agent_outage.py and bench/agent_outage.py.
"""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis

from celery_consul_lock import TICK_HEADER, Tick

from .servers import ConsulAgent, ConsulCluster, start_client_agent, wait_consul_ready
from .workers import Worker, start_worker, worker_env

#: What the sick worker logs once when its agent stops answering, and once when it answers.
DOWN_LINE = "is unreachable (connection refused): this worker stops consuming"
UP_LINE = "answers again after"


@dataclass
class Node:
    """One simulated node: its client agent and the worker that talks to it."""

    name: str
    agent: ConsulAgent
    worker: Worker | None = None

    def pool_pids(self) -> set[int]:
        assert self.worker is not None
        return set(self.worker.children())


class TickSender:
    """Sends ticks of ``entry`` at their due times, ``interval`` s apart on average (a daemon
    thread). The spacing varies (0.5-1.5 x interval): ticks exactly as far apart as Redis's
    1 s BRPOP cycle lock onto one worker, which would then draw every tick."""

    def __init__(self, task: Any, entry: str, interval: float) -> None:
        self.task, self.entry, self.interval = task, entry, interval
        self.random = random.Random(entry)
        self.sent: list[tuple[str, float]] = []  # (tick id, due epoch)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tick-sender", daemon=True)

    def start(self) -> TickSender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the tick sender failed: {self.error!r}")

    def _run(self) -> None:
        due = math.ceil(time.time()) + self.interval
        try:
            while not self._stop.wait(max(0.0, due - time.time())):
                tick = Tick.of(self.entry, datetime.fromtimestamp(due, timezone.utc))
                self.task.apply_async(headers={TICK_HEADER: str(tick)})
                self.sent.append((str(tick), tick.epoch))
                due += self.interval * self.random.uniform(0.5, 1.5)
        except BaseException as exc:
            self.error = exc


@dataclass
class Outcome:
    """What one run of the scenario did, tick by tick."""

    sent: list[tuple[str, float]]
    #: tick id -> its run records ({"pid", "t", "retries", "requeues", ...})
    runs: dict[str, list[dict]]
    #: pool pid -> node name
    owner: dict[int, str]
    killed_at: float | None = None
    restarted_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> list[str]:
        return [tick for tick, _ in self.sent if not self.runs.get(tick)]

    @property
    def doubled(self) -> list[str]:
        return [tick for tick, _ in self.sent if len(self.runs.get(tick, [])) > 1]

    def lateness(self) -> list[float]:
        """Seconds from each tick's due time to its (first) run."""
        return [min(x["t"] for x in self.runs[tick]) - due for tick, due in self.sent if self.runs.get(tick)]

    def node_of(self, tick: str) -> str | None:
        runs = self.runs.get(tick)
        return self.owner.get(runs[0]["pid"]) if runs else None

    def resumed_after(self, node: str) -> float | None:
        """Seconds from the agent's restart to ``node``'s first run of a tick after it."""
        if self.restarted_at is None:
            return None
        after = self.restarted_at
        starts = [x["t"] for xs in self.runs.values() for x in xs if x["t"] > after and self.owner.get(x["pid"]) == node]
        return min(starts) - self.restarted_at if starts else None

    def ticks_due(self, start: float, end: float) -> list[str]:
        return [tick for tick, due in self.sent if start <= due <= end]

    def summary(self) -> str:
        late = self.lateness()
        med = statistics.median(late) if late else float("nan")
        requeued = sum(1 for xs in self.runs.values() for x in xs if x.get("requeues"))
        resumed = self.notes.get("resumed_after")
        return (
            f"{len(self.sent)} ticks sent, {len(self.lost)} lost, {len(self.doubled)} doubled, "
            f"late median {med:.3f} s max {max(late, default=float('nan')):.3f} s, {requeued} ran from a requeued copy"
            + (f"; the sick worker ran its first tick {resumed:.1f} s after its agent's restart" if resumed else "")
        )


class OutageScenario:
    """Two nodes (client agent + worker each) on ``cluster``; kill one node's agent mid-stream."""

    def __init__(
        self,
        cluster: ConsulCluster,
        proj: Any,
        redis_url: str,
        workdir: Path,
        interval: float = 1.0,
        sick_env: dict[str, str] | None = None,
    ) -> None:
        self.cluster, self.proj, self.redis_url, self.workdir = cluster, proj, redis_url, workdir
        self.interval = interval
        #: Extra environment of the sick node's worker (e.g. TEST_AGENT_PROBE_INTERVAL).
        self.sick_env = sick_env or {}
        self.nodes: list[Node] = []
        self.r = redis.Redis.from_url(redis_url)

    def start(self) -> OutageScenario:
        for i, name in enumerate(("node-a", "node-b")):
            agent = start_client_agent(self.workdir, self.cluster, f"127.0.0.{21 + i}", name)
            self.nodes.append(Node(name, agent))
        for node in self.nodes:
            wait_consul_ready(node.agent, timeout=60)
        for node in self.nodes:
            extra = self.sick_env if node is self.sick else {}
            env = worker_env(self.redis_url, node.agent.address, **extra)
            node.worker = start_worker(self.proj.app, self.workdir, env, concurrency=2)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            if node.worker is not None:
                node.worker.stop()
        for node in self.nodes:
            node.agent.stop()
        self.r.close()

    @property
    def sick(self) -> Node:
        return self.nodes[0]

    @property
    def healthy(self) -> Node:
        return self.nodes[1]

    def check_alive(self, dead_agent: Node | None = None) -> None:
        """Fail at once if a process died (other than the agent we killed)."""
        for node in self.nodes:
            assert node.worker is not None
            node.worker.check_alive()
            if node is not dead_agent:
                node.agent.proc.check_alive()
        for agent in self.cluster.agents:
            agent.proc.check_alive()

    def records(self, entry: str) -> dict[str, list[dict]]:
        runs: dict[str, list[dict]] = {}
        for raw in self.r.lrange("runs", 0, -1):
            x = json.loads(raw)
            if x["kind"] == "tick" and (x.get("tick") or "").startswith(entry + "@"):
                runs.setdefault(x["tick"], []).append(x)
        return runs

    def run(self, *, before: float, outage: float | None, after: float, resumed_runs: int = 2) -> Outcome:
        """Stream ticks for ``before`` s, kill the sick node's agent for ``outage`` s (None: no
        outage, a baseline), restart it, and stream on for at least ``after`` s and until the
        sick worker has run ``resumed_runs`` ticks due after the restart."""
        entry = f"outage-{uuid.uuid4().hex[:8]}"
        sender = TickSender(self.proj.heartbeat, entry, self.interval).start()
        killed_at = restarted_at = None
        try:
            self._stream(sender, before)
            if outage is not None:
                self.sick.agent.proc.signal(signal.SIGKILL)
                self.sick.agent.proc.popen.wait(10)
                killed_at = time.time()
                self._stream(sender, outage, dead_agent=self.sick)
                self.sick.agent.proc.restart()
                restarted_at = time.time()
            self._stream(sender, after)
            if outage is not None and resumed_runs:
                sick_pids = self.sick.pool_pids()

                def resumed() -> bool:
                    self.check_alive()
                    sender.check()
                    runs = self.records(entry)
                    due = dict(sender.sent)
                    return resumed_runs <= sum(
                        1 for tick, xs in runs.items() if due.get(tick, 0) > (restarted_at or 0) and xs[0]["pid"] in sick_pids
                    )

                if not _poll(resumed, 60):
                    raise AssertionError(f"the sick worker ran no {resumed_runs} ticks within 60 s of its agent's restart")
        finally:
            sender.stop()

        def all_ran() -> bool:
            self.check_alive()
            runs = self.records(entry)
            return all(runs.get(tick) for tick, _ in sender.sent) and self.r.llen("celery") == 0

        _poll(all_ran, 60)  # a tick that has not run by then is reported as lost by the outcome
        owner = {pid: node.name for node in self.nodes for pid in node.pool_pids()}
        outcome = Outcome(sender.sent, self.records(entry), owner, killed_at, restarted_at)
        outcome.notes["resumed_after"] = outcome.resumed_after(self.sick.name)
        return outcome

    def _stream(self, sender: TickSender, seconds: float, dead_agent: Node | None = None) -> None:
        """Let ticks flow for ``seconds``, checking every process meanwhile (not an assertion)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_alive(dead_agent)
            sender.check()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))


def _poll(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False). Unlike
    servers.wait_for, an exception (a process died) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
