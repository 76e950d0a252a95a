"""Run an example project as a small cluster of real processes and record what happened.

:class:`ExampleCluster` starts, against a Consul agent and a Redis server it is given, M real
``celery worker`` processes and N ``celery beat`` processes of one example (Django or Flask),
all running the example's leader-elected scheduler; :func:`run_scenario` lets them run for a
while, stops the leading beat on cue (SIGKILL, SIGTERM), samples who holds the leader lock,
and returns an :class:`Observation`: every heartbeat run and skipped copy the workers recorded
(:mod:`example_project.records`), the failovers, the leader's tenures and each process's log.
`make demo` (example_project/demo.py) and tests/test_examples.py both use it.

Every process is started in its own process group and stopped by its pid — also when the
scenario fails or is interrupted (the cluster is a context manager).
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from celery_consul_lock.beat import STANDBY_POLL
from celery_consul_lock.election import DEFAULT_BEAT_LOCK_DELAY, DEFAULT_CHECK_TTL
from celery_consul_lock.lock import LOCK_DELAY_RETRY
from celery_consul_lock.testing import Proc, start_beat
from tests.servers import ROOT, http_json, wait_for
from tests.workers import Worker, start_worker, worker_env

from .records import RUNS, SKIPS

__all__ = [
    "CRASH_BOUND",
    "EXAMPLES",
    "FIRST_SEND",
    "HEARTBEAT_INTERVAL",
    "TERM_BOUND",
    "Example",
    "ExampleCluster",
    "Failover",
    "Observation",
    "Status",
    "run_scenario",
]

HERE = Path(__file__).resolve().parent
#: The examples' heartbeat entry runs every 2 s (their settings say so too).
HEARTBEAT_INTERVAL = 2.0
#: A crashed leader is replaced within BeatConfig.crash_failover_bound: check TTL + lock-delay
#: + the lock-delay poll (3.75 s at the beat defaults the examples use).
CRASH_BOUND = DEFAULT_CHECK_TTL + DEFAULT_BEAT_LOCK_DELAY + LOCK_DELAY_RETRY
#: A leader stopped with SIGTERM releases the lock: a standby leads at its next poll.
TERM_BOUND = STANDBY_POLL + 0.5
#: After it is elected, the new leader's scheduler sends at its next tick: one standby poll.
FIRST_SEND = STANDBY_POLL
#: How often the scenario looks at the leader lock (and redraws its progress).
SAMPLE_EVERY = 0.1
#: How long a worker or beat may take to start, and the in-flight ticks to drain at the end.
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 20.0


@dataclass(frozen=True)
class Example:
    """One example project: where it lives and how its processes are started."""

    #: "django" or "flask".
    name: str
    #: The project folder (put first on PYTHONPATH, the beats' working directory).
    project_dir: Path
    #: ``celery -A`` value.
    app: str
    #: ``celery beat -S`` value: the example's leader-elected scheduler.
    scheduler: str
    #: The election's name: the Celery app's main name (``consul_lock_beat_name`` default).
    beat_name: str
    #: Name of the heartbeat task (every HEARTBEAT_INTERVAL s).
    heartbeat: str
    #: Extra environment of every process.
    env: tuple[tuple[str, str], ...] = ()
    #: Command (relative to project_dir) run once before the processes start, if any.
    prepare: tuple[str, ...] = ()

    @property
    def scheduler_label(self) -> str:
        return self.scheduler.rpartition(":")[2] if ":" in self.scheduler else f"-S {self.scheduler}"


EXAMPLES: dict[str, Example] = {
    "django": Example(
        name="django",
        project_dir=HERE / "django_site",
        app="proj",
        scheduler="celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler",
        beat_name="proj",
        heartbeat="backups.tasks.heartbeat",
        env=(("DJANGO_SETTINGS_MODULE", "proj.settings"),),
        prepare=("manage.py", "migrate", "-v", "0"),
    ),
    "flask": Example(
        name="flask",
        project_dir=HERE / "flask_app",
        app="make_celery",
        scheduler="consul",
        beat_name="backup_app",
        heartbeat="backup_app.tasks.heartbeat",
    ),
}


@dataclass
class Member:
    """A beat or worker of the cluster, with its display name ("beat1", "worker2")."""

    name: str
    log: Path
    pid: int
    started: float
    stopped: float | None = None
    #: How it was stopped by the scenario ("SIGKILL", "SIGTERM"), None until then.
    how: str | None = None


@dataclass(frozen=True)
class Failover:
    """A leader the scenario stopped, and what followed."""

    at: float
    signal: str
    old: str
    #: The beat elected next, and when (by its log).
    new: str | None = None
    takeover: float | None = None
    #: When the first heartbeat sent by another beat than ``old`` ran.
    first_tick: float | None = None


@dataclass
class Observation:
    """Everything one scenario saw; times are epoch seconds."""

    example: Example
    started: float
    first_tick: float
    ended: float
    interval: float
    runs: list[dict]
    skips: list[dict]
    failovers: list[Failover]
    #: (time, beat name or None): who held the leader lock, sampled every SAMPLE_EVERY s.
    leader_samples: list[tuple[float, str | None]]
    beats: list[Member]
    workers: list[Member]
    logs: dict[str, Path] = field(default_factory=dict)

    def tenures(self) -> list[tuple[str, float, float]]:
        """(beat, from, to): the spans during which one beat held the leader lock."""
        spans: list[tuple[str, float, float]] = []
        for (t, who), nxt in zip(self.leader_samples, [*self.leader_samples[1:], (self.ended, None)], strict=True):
            if who is None:
                continue
            if spans and spans[-1][0] == who and abs(spans[-1][2] - t) < 1e-9:
                spans[-1] = (who, spans[-1][1], nxt[0])
            else:
                spans.append((who, t, nxt[0]))
        return spans


@dataclass(frozen=True)
class Status:
    """Progress of a running scenario, for a progress line."""

    elapsed: float
    duration: float
    leader: str | None
    ticks: int
    failovers: int
    next_event: str | None


class ExampleCluster:
    """Workers and beats of one example against a given Consul agent and Redis.

    Everything it starts is stopped by :meth:`stop` (by pid, SIGTERM then SIGKILL of the
    process group); use it as a context manager so that this also happens on errors and on
    Ctrl-C. Its keys in Consul live under a prefix of its own, so several runs can share an
    agent; its Redis database is emptied at start.
    """

    def __init__(self, example: Example, consul_address: str, redis_url: str, workdir: Path) -> None:
        self.example = example
        self.consul_address = consul_address
        self.redis_url = redis_url
        self.workdir = workdir
        self.key_prefix = f"demo-{uuid.uuid4().hex[:8]}/"
        self.beats: list[Member] = []
        self.workers: list[Member] = []
        self._beat_procs: dict[str, Proc] = {}
        self._worker_procs: dict[str, Worker] = {}
        self._worker_names: dict[str, str] = {}
        self._control = Celery("demo-control", broker=redis_url)
        self._redis = redis.Redis.from_url(redis_url)
        workdir.mkdir(parents=True, exist_ok=True)

    # -- processes ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return worker_env(
            self.redis_url,
            self.consul_address,
            PYTHONPATH=f"{self.example.project_dir}{os.pathsep}{ROOT}",
            CONSUL_LOCK_KEY_PREFIX=self.key_prefix,
            DJANGO_DB_PATH=str(self.workdir / "db.sqlite3"),
            **dict(self.example.env),
        )

    def prepare(self) -> None:
        """Empty the Redis database and run the example's one-off command (Django: migrate)."""
        self._redis.flushdb()
        if self.example.prepare:
            subprocess.run(
                [sys.executable, *self.example.prepare], cwd=self.example.project_dir, env=self.env(), check=True, timeout=120
            )

    def start_workers(self, n: int, concurrency: int = 2) -> None:
        """Start ``n`` workers, one after the other; returns once each answers a ping."""
        for _ in range(n):
            worker = start_worker(self._control, self.workdir, self.env(), concurrency=concurrency, app_path=self.example.app)
            name = f"worker{len(self.workers) + 1}"
            self._worker_procs[name] = worker
            self._worker_names[worker.name] = name
            self.workers.append(Member(name, worker.log, worker.pid, time.time()))

    def start_beats(self, n: int) -> None:
        """Start ``n`` beats of the example's leader-elected scheduler; returns once each has
        joined the election (its log says so)."""
        for _ in range(n):
            name = f"beat{len(self.beats) + 1}"
            example = self.example
            proc = start_beat(
                name, self.workdir, self.env(), app_path=example.app, scheduler=example.scheduler, cwd=example.project_dir
            )
            self._beat_procs[name] = proc
            self.beats.append(Member(name, proc.log, proc.pid, time.time()))
        for beat in self.beats:
            proc = self._beat_procs[beat.name]
            wait_for(
                lambda proc=proc: "joining the election" in proc.log_text(),
                START_TIMEOUT,
                f"{beat.name} to join the election",
                procs=[proc],
            )

    def stop_beat(self, name: str, sig: int) -> float:
        """Send ``sig`` to a beat by pid; returns when it was sent. Waits for the process to end."""
        proc = self._beat_procs[name]
        at = time.time()
        proc.signal(sig)
        proc.popen.wait(30)
        member = self.member(name)
        member.stopped, member.how = at, signal.Signals(sig).name
        return at

    def stop(self) -> None:
        """Stop every process still running: beats (the leader last), then workers."""
        now = time.time()
        leader = self.leader()
        for beat in sorted(self.beats, key=lambda b: b.name == leader):
            proc = self._beat_procs[beat.name]
            if proc.popen.poll() is None:
                proc.stop()
                beat.stopped = beat.stopped or now
        for member in self.workers:
            worker = self._worker_procs[member.name]
            if worker.popen.poll() is None:
                worker.stop()
                member.stopped = member.stopped or time.time()
        self._redis.close()
        self._control.close()

    def __enter__(self) -> ExampleCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def member(self, name: str) -> Member:
        return next(m for m in [*self.beats, *self.workers] if m.name == name)

    def running_beats(self) -> list[str]:
        return [b.name for b in self.beats if self._beat_procs[b.name].popen.poll() is None]

    def logs(self) -> dict[str, Path]:
        return {m.name: m.log for m in [*self.beats, *self.workers]}

    # -- what is going on ----------------------------------------------------------------------

    def leader(self) -> str | None:
        """The beat holding the leader lock now (by the instance id in the key's value)."""
        key = f"{self.key_prefix}locks/{self.example.beat_name}/beat/.lock"
        try:
            entries = http_json(f"http://{self.consul_address}/v1/kv/{key}", timeout=2)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        entry = (entries or [{}])[0]
        if not entry.get("Session") or not entry.get("Value"):
            return None
        return self.beat_of(json.loads(base64.b64decode(entry["Value"])).get("instance"))

    def beat_of(self, instance: str | None) -> str | None:
        """Our beat whose pid the instance id ``<host>-<pid>-<hex>`` names."""
        if not instance:
            return None
        pid = int(instance.rsplit("-", 2)[1])
        return next((b.name for b in self.beats if b.pid == pid), instance)

    def runs(self) -> list[dict]:
        """The heartbeat runs recorded so far, with ``beat`` and ``worker`` as display names."""
        out = []
        for raw in self._redis.lrange(RUNS, 0, -1):
            record = json.loads(raw)
            if record["task"] == self.example.heartbeat:
                record["beat"] = self.beat_of(record.get("instance"))
                record["worker"] = self._worker_names.get(record["worker"], record["worker"])
                out.append(record)
        return out

    def skips(self) -> list[dict]:
        out = []
        for raw in self._redis.lrange(SKIPS, 0, -1):
            record = json.loads(raw)
            record["worker"] = self._worker_names.get(record["worker"], record["worker"])
            out.append(record)
        return out

    def run_count(self) -> int:
        return int(self._redis.llen(RUNS))

    def drain(self) -> None:
        """Wait until the workers have taken every message sent (queue and unacked empty)."""
        wait_for(
            lambda: self._redis.llen("celery") == 0 and self._redis.hlen("unacked") == 0,
            DRAIN_TIMEOUT,
            "the workers to run the ticks already sent",
            interval=0.1,
        )


@contextmanager
def example_cluster(example: Example, consul_address: str, redis_url: str, workdir: Path) -> Iterator[ExampleCluster]:
    """An :class:`ExampleCluster`, prepared; stopped on the way out, whatever happens."""
    cluster = ExampleCluster(example, consul_address, redis_url, workdir)
    try:
        cluster.prepare()
        yield cluster
    finally:
        cluster.stop()


def run_scenario(
    cluster: ExampleCluster,
    *,
    beats: int,
    workers: int,
    duration: float,
    plan: list[tuple[float, int]],
    progress: Callable[[Status], None] | None = None,
) -> Observation:
    """Start ``workers`` workers and ``beats`` beats, run for ``duration`` seconds from the
    first heartbeat, and at each ``(fraction of duration, signal)`` of ``plan`` stop the beat
    that then holds the leader lock with that signal (waiting for one to hold it, if a
    failover is in progress). Then stop the beats, let the workers run what was sent, and
    return what was seen. Raises AssertionError (via wait_for) if nothing starts in time.
    """
    cluster.start_workers(workers)
    started = time.time()
    cluster.start_beats(beats)
    first = wait_for(cluster.runs, START_TIMEOUT, "the first heartbeat to run", interval=SAMPLE_EVERY)[0]["t"]
    pending = sorted((first + fraction * duration, sig) for fraction, sig in plan)
    samples: list[tuple[float, str | None]] = []
    stops: list[tuple[float, int, str]] = []
    while (now := time.time()) < first + duration:
        leader = cluster.leader()
        samples.append((now, leader))
        if pending and now >= pending[0][0] and leader is not None:
            _, sig = pending.pop(0)
            stops.append((cluster.stop_beat(leader, sig), sig, leader))
        if progress is not None:
            nxt = f"{signal.Signals(pending[0][1]).name} at {pending[0][0] - first:.0f} s" if pending else None
            progress(Status(now - first, duration, leader, cluster.run_count(), len(stops), nxt))
        time.sleep(SAMPLE_EVERY)  # pacing of the sampling loop
    ended = time.time()
    for beat in sorted(cluster.running_beats(), key=lambda b: b == cluster.leader()):
        cluster.stop_beat(beat, signal.SIGTERM)
    cluster.drain()
    runs, skips = cluster.runs(), cluster.skips()
    failovers = [_failover(at, sig, old, cluster.beats, runs) for at, sig, old in stops]
    return Observation(
        example=cluster.example,
        started=started,
        first_tick=first,
        ended=ended,
        interval=HEARTBEAT_INTERVAL,
        runs=runs,
        skips=skips,
        failovers=failovers,
        leader_samples=samples,
        beats=list(cluster.beats),
        workers=list(cluster.workers),
        logs=cluster.logs(),
    )


ELECTED_RE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/\w+\] beat \S+: elected leader", re.M)


def elected_times(log: Path) -> list[float]:
    """When a beat was elected, by its log (local time, to the millisecond)."""
    return [
        time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        for when, ms in ELECTED_RE.findall(log.read_text(errors="replace"))
    ]


def _failover(at: float, sig: int, old: str, beats: list[Member], runs: list[dict]) -> Failover:
    """The takeover after a stop: the first election of another beat after it (its log's time)."""
    elections = sorted((t, b.name) for b in beats if b.name != old for t in elected_times(b.log) if t > at)
    takeover, new = elections[0] if elections else (None, None)
    first = next((r["t"] for r in sorted(runs, key=lambda r: r["t"]) if r["t"] > at and r["beat"] != old), None)
    return Failover(at, signal.Signals(sig).name, old, new, takeover, first)
