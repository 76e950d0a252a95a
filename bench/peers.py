"""Side by side with the tools users pick instead, under the same faults, in one run.

Run: ``make bench-peers`` or ``.venv-bench/bin/python bench/peers.py [--quick] [--json FILE]
[--plots DIR]`` (the bench environment has the peers and matplotlib; they are never
dependencies of the package).

Starts one Consul *server* agent with a data directory (not ``-dev``) and one Redis, on free
ports from the ``.servers`` binaries, and measures every system against them, each at its
documented defaults and at its best documented tuning (``bench/peers_app.py``: TUNING,
printed at the start):

beat HA      celery-consul-lock (``-S consul``), redbeat (``-S redbeat.RedBeatScheduler``),
             single-beat (``single-beat celery beat``): three instances, a job every 2 s
             recording each run (its send time and sending instance). Rounds in turn:
             SIGKILL of the leader's process group (a crash), SIGTERM to the leader (a
             stop), SIGSTOP of the leader's process group past its lease, then SIGCONT.
             The stopped instance is replaced by a fresh one after each round. The three
             systems run at the same time (a thread each), so the machine's load is the
             same for all; their variants one after the other.
             *takeover*: signal -> another instance holds the leader lock (polled every
             20 ms in Consul or Redis); *dispatch*: signal -> the first run sent by another
             instance. *duplicated*: a run sent less than half an interval after the
             previous one (or, ours, a tick id run twice); *missed*: in each gap between
             consecutive runs, round(gap / interval) - 1 (a tick more than half an interval
             late counts as missed, as the schedule then runs one time fewer).
task locks   ConsulLockedTask, celery-once (QueueOnce), celery-singleton (Singleton), and a
             plain task as the baseline, on two workers (3 prefork processes each):
             *added latency*: a no-op's send call (the peers lock there) plus its time in
             the worker from prerun to postrun (ours locks there, the peers unlock there),
             one at a time at a paced rate, the systems taking turns task by task; median
             minus the baseline's; *burst*: N no-ops sent at once, tasks/s;
             *stuck*: each system's task holding its lock runs on worker A, which is
             SIGKILLed (its whole process group) 1 s into the runs; each task is then sent every
             0.25 s for worker B until one runs: kill -> that run's start. A lock that
             outlives the wait by far (a timeout of an hour, no expiry) is confirmed stuck
             for 5 s and its remaining TTL read from Redis (stuck = 5 s + TTL; never
             without one); *duplicates*: the same task (1 s body) sent by three processes
             at the same instant, runs beyond one per trial.
curl script  the same job from "cron" on 3 nodes, each node running bench/curl_lock.sh
             (session create, ``PUT ?acquire=``, job if ``true``, release, session destroy,
             one curl each) against ConsulLockedTask with the beat's tick id header: two
             nodes fire at once, the third late, after the first holder released;
             duplicated runs over the ticks.

The targets (issue 18): 0 duplicated and 0 missed ticks in every beat scenario; the lowest
median crash takeover at defaults; a killed holder's lock stuck less than any peer's at
defaults; our added latency as a ratio to the fastest peer's (reported). Exits 0 when the
run completed (a missed target is reported, not an error), 1 when it failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for path in (str(ROOT), str(BENCH)):
    if path not in sys.path:
        sys.path.insert(0, path)

import redis  # noqa: E402
from common import save, start_server_agent, write_json  # noqa: E402

from celery_consul_lock.testing import Proc, spawn  # noqa: E402
from tests.servers import ConsulAgent, start_redis, wait_for  # noqa: E402
from tests.workers import Worker, start_worker, worker_env  # noqa: E402

NAMES = ("celery-consul-lock", "redbeat", "single-beat", "celery-once", "celery-singleton", "curl-script")
OURS, REDBEAT, SINGLE_BEAT, ONCE, SINGLETON, CURL = NAMES
BEAT_SYSTEMS = (OURS, REDBEAT, SINGLE_BEAT)
TASK_SYSTEMS = (OURS, ONCE, SINGLETON)
VARIANTS = ("defaults", "tuned")
KINDS = ("crash", "stop", "pause")  # SIGKILL, SIGTERM, SIGSTOP past the lease
INTERVAL = 2.0
POLL = 0.02
#: A stuck lock confirmed for this long before its remaining TTL is read (defaults of an hour
#: or no expiry at all), rather than waited out.
CONFIRM_STUCK = 5.0
#: How often the stuck case sends the task again for worker B.
RESEND = 0.25


@dataclass
class Plan:
    """How many rounds of everything; ``--quick`` runs the same cases, fewer times."""

    crash: int = 10
    stop: int = 10
    pause: int = 3
    cap: float = 60.0  # longest wait for a takeover before a round is recorded as censored
    stuck_cap: float = 70.0  # longest wait for a killed holder's lock (ours: <= 2 TTL + lock-delay = 45 s)
    paced: int = 100  # tasks per system and round, one at a time
    rate: float = 20.0  # tasks/s of the paced phase
    burst: int = 200
    rounds: int = 3  # rounds of paced + burst, systems in rotating order
    stuck: int = 3  # kills per system and variant
    dup_trials: int = 10
    ticks: int = 100  # curl-script case


QUICK = Plan(crash=1, stop=1, pause=1, cap=15.0, paced=40, burst=100, rounds=1, stuck=1, dup_trials=3, ticks=20)


# ---- processes -------------------------------------------------------------------------------


def signal_group(pid: int, sig: int) -> None:
    """``sig`` to the process group led by ``pid`` (SIGSTOP / SIGCONT: the harness's Proc
    stops and kills, but does not pause)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def bench_env(redis_url: str, consul: str, **extra: str) -> dict[str, str]:
    env = worker_env(redis_url, consul, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(ROOT)])
    return env


def venv_bin(name: str) -> str | None:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


# ---- what is installed -------------------------------------------------------------------------


def availability() -> dict[str, str | None]:
    """System -> None when it can run here, else why not."""
    out: dict[str, str | None] = dict.fromkeys(NAMES)
    for name, module in ((REDBEAT, "redbeat"), (ONCE, "celery_once"), (SINGLETON, "celery_singleton")):
        try:
            __import__(module)
        except ImportError as exc:
            out[name] = f"not installed in this environment ({exc}); run `make bench-peers`"
    if venv_bin("single-beat") is None:
        out[SINGLE_BEAT] = "the single-beat command is not installed; run `make bench-peers`"
    if shutil.which("curl") is None:
        out[CURL] = "curl is not installed"
    return out


# ---- beat HA ---------------------------------------------------------------------------------


@dataclass
class Instance:
    """One beat instance: the harness's process (its own process group) and its start time."""

    n: int
    proc: Proc
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.alive()

    def text(self) -> str:
        return self.proc.log_text()


@dataclass
class BeatRound:
    kind: str
    t_signal: float
    takeover: float | None  # None: no takeover within the cap (censored)
    dispatch: float | None
    lock_ttl_at_signal: float | None = None  # the old leader's lock, when it can be read (Redis)


@dataclass
class BeatFleet:
    """Three instances of one system in one variant, and how to read who holds its lock."""

    system: str
    variant: str
    tmp: Path
    redis_url: str
    agent: ConsulAgent
    r: redis.Redis
    instances: list[Instance] = field(default_factory=list)

    @property
    def runs_key(self) -> str:
        return f"runs:{self.system}:{self.variant}"

    @property
    def lease(self) -> float:
        """How long the lock outlives a crashed leader, at most (s), by the settings."""
        import peers_app

        s = peers_app.settings(self.system, self.variant)
        if self.system == OURS:
            conf = s["conf"]
            return conf["consul_lock_beat_check_ttl"] + conf["consul_lock_beat_lock_delay"] + 0.25
        if self.system == REDBEAT:
            return float(s["conf"]["redbeat_lock_timeout"]) + float(s["conf"]["beat_max_loop_interval"])
        lock = int(s["env"]["SINGLE_BEAT_LOCK_TIME"])
        return 2 * lock + int(s["env"]["SINGLE_BEAT_HEARTBEAT_INTERVAL"])  # a new leader's first lock is 2x

    def lock_key(self) -> str:
        if self.system == OURS:
            return f"locks/peers-{self.variant}/beat/.lock"
        if self.system == REDBEAT:
            return f"redbeat-{self.variant}::lock"
        return f"SINGLE_BEAT_peers-{self.variant}"

    def holder(self) -> str | None:
        """Who holds the leader lock now (opaque), or None."""
        if self.system == OURS:
            try:
                found = self.agent.api(f"/v1/kv/{self.lock_key()}")
            except OSError:  # 404: no key
                return None
            return (found or [{}])[0].get("Session")
        raw = self.r.get(self.lock_key())
        if raw is None:
            return None
        if self.system == SINGLE_BEAT:  # "<fence token>:<host identifier>:<child pid>"; the token moves
            return raw.decode().split(":")[1]
        return raw.decode()

    def lock_ttl(self) -> float | None:
        if self.system == OURS:
            return None
        ms = self.r.pttl(self.lock_key())
        return ms / 1000 if ms >= 0 else None

    def command(self, n: int) -> tuple[list[str], dict[str, str]]:
        import peers_app

        env = bench_env(
            self.redis_url,
            self.agent.address,
            BENCH_SYSTEM=self.system,
            BENCH_VARIANT=self.variant,
            BENCH_RUNS_KEY=self.runs_key,
            BENCH_INTERVAL=f"{INTERVAL:g}",
        )
        beat = [sys.executable, "-m", "celery", "-A", "peers_app", "beat", "-l", "INFO", "--pidfile="]
        beat += ["-s", str(self.tmp / f"sched-{self.system}-{self.variant}-{n}")]
        if self.system == OURS:
            return [*beat, "-S", "consul"], env
        if self.system == REDBEAT:
            return [*beat, "-S", "redbeat.RedBeatScheduler"], env
        env.update(peers_app.settings(SINGLE_BEAT, self.variant)["env"])
        env.update(
            SINGLE_BEAT_REDIS_SERVER=self.redis_url,
            SINGLE_BEAT_IDENTIFIER=f"peers-{self.variant}",
            SINGLE_BEAT_HOST_IDENTIFIER=f"sb{n}",
            SINGLE_BEAT_LOG_LEVEL="info",
        )
        return [str(venv_bin("single-beat")), *beat], env

    def start(self) -> Instance:
        n = len(self.instances)
        args, env = self.command(n)
        log = self.tmp / f"beat-{self.system}-{self.variant}-{n}.log"
        inst = Instance(n, spawn(log.stem, args, self.tmp, cwd=BENCH, env=env, log=log), time.time())
        self.instances.append(inst)
        return inst

    def ready(self, inst: Instance) -> bool:
        """Up and able to take over: ours joined the election, redbeat's beat started (it
        then waits on the lock), single-beat polls the lock from its start."""
        if not inst.alive():
            raise AssertionError(f"{self.system} instance {inst.n} exited:\n{inst.text()[-2000:]}")
        if self.system == OURS:
            return "joining the election" in inst.text()
        if self.system == REDBEAT:
            return "beat: Starting" in inst.text()
        return time.time() - inst.started > 1.5

    def running(self) -> list[Instance]:
        return [i for i in self.instances if i.alive()]

    def runs(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.runs_key, 0, -1)]

    def stop_all(self) -> None:
        for inst in self.instances:
            inst.proc.stop(5.0)


def beat_round(fleet: BeatFleet, kind: str, cap: float) -> BeatRound:
    """One fault of the leader; returns its takeover and dispatch times."""
    # Every instance but the replacement started at the end of the previous round is up (that
    # one joins while this round runs: waiting for it too would double the run time).
    for inst in fleet.running()[:-1]:
        wait_for(lambda inst=inst: fleet.ready(inst), 60, f"{fleet.system} instance {inst.n} to be up")
    time.sleep(random.uniform(0, INTERVAL))  # a random point of the tick cycle

    def recent_leader() -> Instance | None:
        runs = fleet.runs()
        if not runs or time.time() - (runs[-1]["sent"] or 0) > 2 * INTERVAL + 1.5:
            return None
        return next((i for i in fleet.running() if i.pid == runs[-1]["pgrp"]), None)

    leader = wait_for(recent_leader, 60, f"a recent run sent by a running {fleet.system} instance", interval=0.05)
    old = wait_for(fleet.holder, 10, f"{fleet.system}'s leader lock to be held")
    seen = len(fleet.runs())
    ttl = fleet.lock_ttl()
    t0 = time.time()
    if kind == "crash":
        leader.proc.kill()
    elif kind == "stop":
        os.kill(leader.pid, signal.SIGTERM)
    else:
        signal_group(leader.pid, signal.SIGSTOP)

    takeover = dispatch = None
    deadline = t0 + cap
    while time.time() < deadline and (takeover is None or dispatch is None):
        if takeover is None:
            now = fleet.holder()
            if now is not None and now != old:
                takeover = time.time() - t0
        if dispatch is None:
            later = [x["sent"] for x in fleet.runs()[seen:] if x["pgrp"] != leader.pid and x["sent"] >= t0]
            if later:
                dispatch = min(later) - t0
        time.sleep(POLL)
    if kind == "pause":  # past the lease, then let it go on and see what it sends
        time.sleep(max(0.0, t0 + fleet.lease + 1.0 - time.time()) if takeover is not None else 0.0)
        signal_group(leader.pid, signal.SIGCONT)
        time.sleep(2 * INTERVAL + 1.0)
    leader.proc.stop(5.0)
    fleet.start()
    return BeatRound(kind, t0, takeover, dispatch, ttl)


def gaps(runs: list[dict], cuts: tuple[float, ...] = ()) -> tuple[int, int, list[tuple[float, float, str]]]:
    """(duplicated, missed, [(gap start, gap end, what)]) over runs in send order (see the
    module doc). A gap across one of ``cuts`` (a fleet restarted by the benchmark) ends there."""
    sent = sorted((x["sent"], x.get("tick")) for x in runs if x.get("sent") is not None)
    dup = missed = 0
    events: list[tuple[float, float, str]] = []
    ticks = collections.Counter(t for _, t in sent if t)
    for (a, _), (b, _) in itertools.pairwise(sent):
        b = min([b, *(c for c in cuts if a < c < b)])
        if b - a < INTERVAL / 2:
            dup += 1
            events.append((a, b, "dup"))
        else:
            m = max(0, round((b - a) / INTERVAL) - 1)
            missed += m
            events += [(a, b, "missed")] * m
    dup = max(dup, sum(c - 1 for c in ticks.values()))
    return dup, missed, events


def by_kind(events: list[tuple[float, float, str]], rounds: list[BeatRound]) -> dict[str, dict[str, int]]:
    """Each duplicated or missed tick counted against the fault that caused it: the round
    whose signal falls inside its gap, else the latest round signalled before the gap."""
    out = {k: {"duplicates": 0, "missed": 0} for k in KINDS}
    for a, b, what in events:
        inside = [r for r in rounds if a <= r.t_signal <= b]
        before = [r for r in rounds if r.t_signal < a]
        culprit = inside[0] if inside else (before[-1] if before else None)
        if culprit is not None:
            out[culprit.kind]["duplicates" if what == "dup" else "missed"] += 1
    return out


def run_beat(fleet: BeatFleet, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Every round of one system and variant; its row of the results."""
    long_lease = fleet.lease > plan.cap
    if long_lease:  # e.g. redbeat at its defaults (25 min): one crash and one stop, censored
        kinds = ["crash", "stop"]
    else:
        kinds = []
        for i in range(max(plan.crash, plan.stop)):
            kinds += (["crash"] if i < plan.crash else []) + (["stop"] if i < plan.stop else [])
        step = max(1, len(kinds) // max(1, plan.pause))
        for j in range(plan.pause):
            kinds.insert(min(len(kinds), (j + 1) * step + j), "pause")
    rounds: list[BeatRound] = []
    for _ in range(3):
        fleet.start()
    t_begin = time.time()
    cuts: list[float] = []
    for i, kind in enumerate(kinds):
        if long_lease and i > 0:  # a fresh fleet: the crashed leader's lock holds for the lease
            cuts.append(time.time())
            fleet.stop_all()
            fleet.r.delete(fleet.lock_key())
            for _ in range(3):
                fleet.start()
        rnd = beat_round(fleet, kind, plan.cap)
        rounds.append(rnd)
        take = "none within the cap" if rnd.takeover is None else f"{rnd.takeover:6.3f} s"
        disp = "-" if rnd.dispatch is None else f"{rnd.dispatch:6.3f} s"
        log(f"    {fleet.system:18} {fleet.variant:8} {i + 1:2d} {kind:6} takeover {take}  dispatch {disp}")
    time.sleep(INTERVAL + 1.0)
    fleet.stop_all()
    runs = [x for x in fleet.runs() if x["sent"] and x["sent"] >= t_begin]
    dup, missed, events = gaps(runs, tuple(cuts))
    per_kind = by_kind(events, rounds)
    row: dict[str, Any] = {
        "rounds": [r.__dict__ for r in rounds],
        "runs": len(runs),
        "duplicates": dup,
        "missed": missed,
        "by_kind": per_kind,
        "lease_s": fleet.lease,
        "censored_at_s": plan.cap if long_lease else None,
    }
    for kind in KINDS:
        mine = [r for r in rounds if r.kind == kind]
        row[f"{kind}_takeover_s"] = [r.takeover if r.takeover is not None else plan.cap for r in mine]
        row[f"{kind}_dispatch_s"] = [r.dispatch for r in mine if r.dispatch is not None]
        row[f"{kind}_censored"] = sum(1 for r in mine if r.takeover is None)
        if fleet.system != OURS:
            row[f"{kind}_lock_ttl_at_signal_s"] = [r.lock_ttl_at_signal for r in mine]
    return row


def run_beats(systems: list[str], ctx: dict[str, Any], plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """The systems at the same time, each in a thread of its own (its variants in turn): the
    same load on the machine for all, and a third of the run time. A failure in one stops
    the run."""
    results: dict[str, Any] = {s: {} for s in systems}
    errors: list[BaseException] = []

    def one(system: str) -> None:
        try:
            for variant in VARIANTS:
                fleet = BeatFleet(system, variant, ctx["tmp"], ctx["redis_url"], ctx["agent"], ctx["r"])
                try:
                    results[system][variant] = beat_summary(run_beat(fleet, plan, log))
                finally:
                    fleet.stop_all()
                if errors:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,), name=f"beat-{s}") for s in systems]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# ---- task locks --------------------------------------------------------------------------------


TASKS = {"baseline": "peers.noop", OURS: "peers.ours_noop", ONCE: "peers.once_noop", SINGLETON: "peers.singleton_noop"}


@dataclass
class TaskBench:
    """Two workers (A, B; each also on a queue of its own) of one variant."""

    variant: str
    tmp: Path
    redis_url: str
    agent: ConsulAgent
    r: redis.Redis
    workers: dict[str, Worker] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return bench_env(self.redis_url, self.agent.address, BENCH_VARIANT=self.variant)

    def start(self, name: str) -> Worker:
        import peers_app

        worker = start_worker(
            peers_app.app,
            self.tmp,
            self.env(),
            concurrency=3,  # worker A runs the three held tasks at once
            app_path="peers_app",
            extra_args=["-Q", f"celery,{name}"],
            cwd=BENCH,
        )
        self.workers[name] = worker
        return worker

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def send(task_name: str, args: tuple, **options: Any) -> Any:
    """apply_async; celery-once's refusal comes back as None."""
    import peers_app

    task = peers_app.app.tasks[task_name]
    try:
        return task.apply_async(args, **options)
    except Exception as exc:
        if peers_app.AlreadyQueued is not None and isinstance(exc, peers_app.AlreadyQueued):
            return None
        raise


def latency_and_burst(systems: list[str], plan: Plan, counter: list[int], r: redis.Redis) -> dict[str, dict[str, list[float]]]:
    """Per system (and the baseline), no-ops one at a time at ``plan.rate``, the systems
    taking turns task by task (so that the machine's drift hits them alike): the time of the
    send call (celery-once and celery-singleton lock there), the time in the worker from
    prerun to postrun (ours locks and unlocks there, the peers unlock there), their sum
    (``latency``) and the send -> result round trip; then each round's burst tasks/s."""
    import peers_app
    from celery.result import ResultSet

    out: dict[str, dict[str, list[float]]] = {
        s: {"latency": [], "send": [], "worker": [], "round_trip": [], "burst": []} for s in ["baseline", *systems]
    }
    names = list(out)
    for rnd in range(plan.rounds + 1):  # round 0 warms up every pool process
        r.delete("spans")
        sends: dict[str, tuple[str, float]] = {}
        count = 10 if rnd == 0 else plan.paced
        t_start = time.perf_counter()
        for i in range(count * len(names)):
            system = names[(i + i // len(names)) % len(names)]  # the order rotates every turn
            ahead = t_start + i / plan.rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)  # pacing the sender
            counter[0] += 1
            t0 = time.perf_counter()
            res = send(TASKS[system], (counter[0],))
            t1 = time.perf_counter()
            value = res.get(timeout=30)
            if value != counter[0]:
                raise RuntimeError(f"{system}: a no-op returned {value!r}, not {counter[0]}")
            sends[res.id] = (system, t1 - t0)
            if rnd:
                out[system]["round_trip"].append(time.perf_counter() - t0)
        if rnd == 0:
            continue
        time.sleep(0.3)  # the last postrun record
        spans = {x["id"]: x["dt"] for x in map(json.loads, r.lrange("spans", 0, -1))}
        for task_id, (system, dt) in sends.items():
            if task_id in spans:
                out[system]["send"].append(dt)
                out[system]["worker"].append(spans[task_id])
                out[system]["latency"].append(dt + spans[task_id])
        for system in names[rnd % len(names) :] + names[: rnd % len(names)]:
            results = []
            t0 = time.perf_counter()
            for _ in range(plan.burst):
                counter[0] += 1
                results.append(send(TASKS[system], (counter[0],)))
            ResultSet(results, app=peers_app.app).join_native(timeout=120)
            out[system]["burst"].append(plan.burst / (time.perf_counter() - t0))
    return out


HOLD_TASKS = {OURS: "peers.ours_hold", ONCE: "peers.once_hold", SINGLETON: "peers.singleton_hold"}


def stuck_round(bench: TaskBench, systems: list[str], variant: str, cap: float) -> dict[str, dict[str, Any]]:
    """Every system's held task runs on worker A, which is SIGKILLed 1 s into the runs; each
    task is then sent again for worker B every RESEND s until a copy runs. Per system:
    stuck_s (kill -> that copy's start), and whether it was projected or censored."""
    import peers_app

    args = (peers_app.HOLD_SECONDS,)
    bench.r.delete("holds")

    def started(task_id: str) -> float | None:
        for raw in bench.r.lrange("holds", 0, -1):
            x = json.loads(raw)
            if x["id"] == task_id:
                return float(x["t"])
        return None

    first = {}
    for system in systems:
        first[system] = send(HOLD_TASKS[system], args, queue="A")
        if first[system] is None:
            raise RuntimeError(f"{system}: the held task was refused at its first send (a lock left over?)")
    for system in systems:
        wait_for(lambda system=system: started(first[system].id), 30, f"{system}: the held task to start on worker A")
    time.sleep(1.0)
    t_kill = time.time()
    bench.workers["A"].kill()  # its whole process group

    # celery-once and celery-singleton at their defaults hold for an hour or for ever: confirmed
    # stuck for CONFIRM_STUCK, then read from Redis rather than waited out.
    long_lock = {s: variant == "defaults" and s in (ONCE, SINGLETON) for s in systems}
    tried: dict[str, list[Any]] = {s: [] for s in systems}
    run_at: dict[str, float | None] = dict.fromkeys(systems)
    while True:
        open_ = [s for s in systems if run_at[s] is None and time.time() < t_kill + (CONFIRM_STUCK if long_lock[s] else cap)]
        if not open_:
            break
        for system in open_:
            pending = [r for r in tried[system] if system != OURS]  # a peer's accepted copy will run
            if not pending:
                res = send(HOLD_TASKS[system], args, queue="B")
                if res is not None and res.id != first[system].id:
                    tried[system].append(res)
            for res in tried[system][-8:]:
                if (t := started(res.id)) is not None:
                    run_at[system] = t
        time.sleep(RESEND)
    out: dict[str, dict[str, Any]] = {}
    for system in systems:
        row: dict[str, Any] = {"stuck_s": None, "projected": False, "censored": False}
        if run_at[system] is not None:
            row["stuck_s"] = run_at[system] - t_kill
        elif long_lock[system]:
            prefix = "qo_peers.once_hold" if system == ONCE else f"SINGLETON-{variant}_"
            keys = list(bench.r.scan_iter(match=prefix + "*", count=1000))
            ttls = [bench.r.pttl(k) for k in keys]
            live = [t for t in ttls if t >= 0]
            row.update(projected=True, lock_keys=[k.decode() for k in keys], never_expires=bool(ttls) and not live)
            row["stuck_s"] = time.time() - t_kill + max(live) / 1000 if live else None  # None: no expiry
            if keys:  # free it for the next round (what an operator would have to do)
                bench.r.delete(*keys)
        else:
            row.update(stuck_s=cap, censored=True)
        out[system] = row
    # Let whatever runs now end, and bring worker A back.
    peers_app.store().set("peers:hold:stop", "1")
    time.sleep(0.5)
    peers_app.store().delete("peers:hold:stop")
    bench.start("A")
    return out


DUP_TASKS = {"baseline": "peers.plain_dup", OURS: "peers.ours_dup", ONCE: "peers.once_dup", SINGLETON: "peers.singleton_dup"}
#: The sender processes of the duplicates case: each sends its trials at the agreed instants
#: (the systems in turn, DUP_SPACING s apart), and prints each refusal at send time.
SENDER = """
import json, sys, time
import peers_app
peers_app.configure(sys.argv[1], sys.argv[2])
t0, first, names = float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
peers_app.app.connection_for_write().ensure_connection()
for k, name in enumerate(names):
    while time.time() < t0 + {spacing} * k:
        time.sleep(0.0005)
    try:
        peers_app.app.tasks[name].apply_async((first + k,))
    except Exception as exc:
        print(json.dumps({{"refused": type(exc).__name__, "name": name}}))
"""
DUP_SPACING = 2.0  # s between trials: the task's body runs 1 s


def duplicates_round(bench: TaskBench, systems: list[str], trials: int, first_trial: int) -> dict[str, dict[str, int]]:
    """Three sender processes send the same task at the same instants, ``trials`` times per
    system; per system: runs beyond one per trial, trials that never ran, refusals at send."""
    bench.r.delete("dups")
    plan = [systems[k % len(systems)] for k in range(trials * len(systems))]
    t_first = time.time() + 4.0  # the senders start up meanwhile
    args = [bench.redis_url, bench.variant, str(t_first), str(first_trial), *(DUP_TASKS[s] for s in plan)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SENDER.format(spacing=DUP_SPACING), *args],
            env=bench.env(),
            cwd=BENCH,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60 + DUP_SPACING * len(plan))
        outputs.append(out)
        if proc.returncode != 0:
            raise RuntimeError(f"a sender of the duplicates case failed:\n{out[-2000:]}")
    time.sleep(1.5)  # the last trial's runs
    runs = collections.Counter(json.loads(x)["trial"] for x in bench.r.lrange("dups", 0, -1))
    refused = collections.Counter(
        json.loads(line)["name"] for out in outputs for line in out.splitlines() if line.startswith('{"refused"')
    )
    result = {}
    for system in systems:
        mine = [first_trial + k for k, s in enumerate(plan) if s == system]
        result[system] = {
            "trials": len(mine),
            "duplicates": sum(max(0, runs[t] - 1) for t in mine),
            "lost": sum(1 for t in mine if runs[t] == 0),
            "refused_at_send": refused[DUP_TASKS[system]],
        }
    return result


def run_tasks(variant: str, ctx: dict[str, Any], plan: Plan, available: list[str], log: Callable[[str], None]) -> dict:
    import peers_app

    peers_app.configure(ctx["redis_url"], variant)
    bench = TaskBench(variant, ctx["tmp"], ctx["redis_url"], ctx["agent"], ctx["r"])
    out: dict[str, Any] = {s: {} for s in ["baseline", *available]}
    try:
        bench.start("A")
        bench.start("B")
        if variant == "defaults":  # the settings tuned are expiries: they change nothing per task
            timing = latency_and_burst(available, plan, ctx["counter"], ctx["r"])
            for system, t in timing.items():
                row = out[system]
                for what in ("latency", "send", "worker", "round_trip"):
                    row[f"{what}_ms_median"] = statistics.median(t[what]) * 1000
                row["latency_ms_p90"] = statistics.quantiles(t["latency"], n=10)[8] * 1000
                row["latency_samples"] = len(t["latency"])
                row["burst_tasks_per_s"] = statistics.median(t["burst"])
                log(
                    f"    {system:18} paced {plan.rate:g}/s: send {row['send_ms_median']:.2f} + worker "
                    f"{row['worker_ms_median']:.2f} = {row['latency_ms_median']:.2f} ms (round trip "
                    f"{row['round_trip_ms_median']:.1f} ms); burst {row['burst_tasks_per_s']:.0f} tasks/s"
                )
        everyone = ["baseline", *available]
        found = duplicates_round(bench, everyone, plan.dup_trials, ctx["counter"][0] + 1)
        ctx["counter"][0] += plan.dup_trials * len(everyone)
        for system, d in found.items():
            out[system]["same_task_sent_at_once"] = d
            log(f"    {system:18} {variant:8} sent by 3 at once: {d}")
        for system in available:
            out[system]["stuck_rounds"] = []
        for _ in range(plan.stuck):
            found = stuck_round(bench, available, variant, plan.stuck_cap)
            for system, row in found.items():
                out[system]["stuck_rounds"].append(row)
                log(f"    {system:18} {variant:8} killed holder: {row}")
    finally:
        bench.stop()
    return out


# ---- the curl script --------------------------------------------------------------------------


def run_curl(ctx: dict[str, Any], plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Two nodes fire at once, a third after the first holder released; runs per tick."""
    import peers_app

    peers_app.configure(ctx["redis_url"], "defaults")
    agent: ConsulAgent = ctx["agent"]
    runs_file = ctx["tmp"] / "curl-runs.txt"
    runs_file.write_text("")
    script = BENCH / "curl_lock.sh"
    job_name = f"peers-curl-{int(time.time())}"
    t_begin = time.time()

    def node(tick: int, n: int) -> subprocess.Popen:
        job = ["sh", "-c", f'echo "{tick} node{n}" >> "{runs_file}"; sleep 0.3']
        return subprocess.Popen(["sh", str(script), agent.address, job_name, *job], stderr=subprocess.PIPE)

    for tick in range(plan.ticks):
        procs = [node(tick, 1), node(tick, 2)]
        for p in procs:
            p.wait(30)
        late = node(tick, 3)  # fires late, after the holder released
        late.wait(30)
    curl_s = time.time() - t_begin
    curl_runs = collections.Counter(line.split()[0] for line in runs_file.read_text().splitlines() if line.strip())

    ctx["r"].delete("job-runs")
    worker = start_worker(
        peers_app.app, ctx["tmp"], bench_env(ctx["redis_url"], agent.address), concurrency=2, app_path="peers_app", cwd=BENCH
    )
    t_begin = time.time()
    try:
        base = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        for tick in range(plan.ticks):
            due = (base + datetime.timedelta(seconds=2 * tick)).strftime("%Y-%m-%dT%H:%M:%SZ")
            headers = {"consul_lock_tick": f"peers-job@{due}"}
            pair = [send("peers.ours_job", (), headers=headers) for _ in range(2)]
            for res in pair:
                res.get(timeout=30, propagate=False)
            send("peers.ours_job", (), headers=headers).get(timeout=30, propagate=False)
    finally:
        worker.stop()
    ours_s = time.time() - t_begin
    ours_runs = collections.Counter(json.loads(x)["tick"] for x in ctx["r"].lrange("job-runs", 0, -1))
    row = {
        CURL: {
            "ticks": plan.ticks,
            "late_duplicates": sum(c - 1 for c in curl_runs.values()),
            "lost": plan.ticks - len(curl_runs),
        },
        OURS: {
            "ticks": plan.ticks,
            "late_duplicates": sum(c - 1 for c in ours_runs.values()),
            "lost": plan.ticks - len(ours_runs),
        },
    }
    log(f"    curl-script: {row[CURL]} in {curl_s:.0f} s; ConsulLockedTask with tick ids: {row[OURS]} in {ours_s:.0f} s")
    return row


# ---- summary, targets, plots ----------------------------------------------------------------


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def beat_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The issue's schema for one variant: crash_takeover_s, duplicates, missed, ..."""
    return {
        "crash_takeover_s": row["crash_takeover_s"],
        "crash_takeover_median_s": median(row["crash_takeover_s"]),
        "crash_takeover_max_s": max(row["crash_takeover_s"], default=None),
        "stop_takeover_s": row["stop_takeover_s"],
        "pause_takeover_s": row["pause_takeover_s"],
        "crash_dispatch_s": row["crash_dispatch_s"],
        "duplicates": row["duplicates"],
        "missed": row["missed"],
        "by_kind": row["by_kind"],
        "runs": row["runs"],
        "lease_s": row["lease_s"],
        "censored_at_s": row["censored_at_s"],
        "censored": {k: row[f"{k}_censored"] for k in KINDS},
        "lock_ttl_at_signal_s": {k: row.get(f"{k}_lock_ttl_at_signal_s") for k in KINDS},
        "rounds": row["rounds"],
    }


def task_summary(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if "latency_ms_median" in row:
        out["added_ms"] = row["latency_ms_median"] - baseline["latency_ms_median"]
        out["burst_ratio"] = row["burst_tasks_per_s"] / baseline["burst_tasks_per_s"]
    stuck = [r["stuck_s"] for r in row.get("stuck_rounds", [])]
    out["stuck_s"] = None if not stuck or any(s is None for s in stuck) else statistics.median(stuck)
    out["stuck_never_expires"] = any(r.get("never_expires") for r in row.get("stuck_rounds", []))
    out["stuck_projected"] = any(r.get("projected") for r in row.get("stuck_rounds", []))
    out["duplicates"] = row.get("same_task_sent_at_once", {}).get("duplicates")
    return out


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, met, figures) for the four targets of the issue."""
    out: list[tuple[str, bool | None, str]] = []
    ours = results["beat"].get(OURS, {})
    bad = {v: (ours[v]["duplicates"], ours[v]["missed"]) for v in VARIANTS if v in ours}
    out.append(
        (
            "0 duplicated and 0 missed ticks in every beat scenario",
            all(d == 0 and m == 0 for d, m in bad.values()) if bad else None,
            "; ".join(f"{v}: {d} duplicated, {m} missed (by kind {ours[v]['by_kind']})" for v, (d, m) in bad.items()),
        )
    )
    meds = {
        s: results["beat"][s]["defaults"]["crash_takeover_median_s"]
        for s in BEAT_SYSTEMS
        if s in results["beat"] and results["beat"][s]["defaults"]["crash_takeover_median_s"] is not None
    }
    if OURS in meds:
        ok = all(meds[OURS] < v for s, v in meds.items() if s != OURS)
        out.append(
            (
                "lowest median crash takeover at defaults",
                ok,
                ", ".join(
                    f"{s} {v:.2f} s" + (" (censored)" if results["beat"][s]["defaults"]["censored"]["crash"] else "")
                    for s, v in meds.items()
                ),
            )
        )
    stuck = {s: results["task"][s]["defaults"] for s in TASK_SYSTEMS if s in results["task"]}
    if OURS in stuck:

        def as_num(row: dict[str, Any]) -> float:
            return math.inf if row["stuck_s"] is None else row["stuck_s"]

        ok = all(as_num(stuck[OURS]) < as_num(v) for s, v in stuck.items() if s != OURS)
        out.append(
            (
                "killed holder's lock stuck less than any peer's at defaults",
                ok,
                ", ".join(
                    f"{s} " + ("never frees" if v["stuck_s"] is None else f"{v['stuck_s']:.1f} s") for s, v in stuck.items()
                ),
            )
        )
        added = {s: v.get("added_ms") for s, v in stuck.items() if v.get("added_ms") is not None}
        peers = {s: a for s, a in added.items() if s != OURS}
        if OURS in added and peers:
            fastest = min(peers, key=lambda s: peers[s])
            ratio = added[OURS] / peers[fastest] if peers[fastest] > 0 else math.inf
            out.append(
                (
                    "added latency per task, as a ratio to the fastest peer's (reported)",
                    None,
                    f"ours {added[OURS]:.2f} ms vs {fastest} {peers[fastest]:.2f} ms: {ratio:.1f}x",
                )
            )
    return out


def plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """Takeover distributions and duplicated/missed counts (PNG and SVG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    palette = {OURS: "tab:blue", REDBEAT: "tab:red", SINGLE_BEAT: "tab:orange"}
    short = {OURS: "ours", REDBEAT: "redbeat", SINGLE_BEAT: "single-beat"}
    titles = {"crash": "crash (SIGKILL)", "stop": "stop (SIGTERM)", "pause": "pause past the lease (SIGSTOP)"}
    fig, axes = plt.subplots(1, len(KINDS), figsize=(15, 5), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        col = 0
        ticks = []
        for system in BEAT_SYSTEMS:
            for variant in VARIANTS:
                row = results["beat"].get(system, {}).get(variant)
                if row is None:
                    continue
                col += 1
                ticks.append((col, f"{short[system]}\n{variant}"))
                values = row[f"{kind}_takeover_s"]
                if not values:
                    ax.text(col, 0.05, "not run", ha="center", fontsize=7, rotation=90)
                    continue
                if row["censored"][kind]:
                    ax.scatter([col] * len(values), values, marker="^", s=40, color=palette[system], zorder=3)
                    ax.text(col, values[0] * 1.15, f"> {values[0]:g} s\n(cut off)", ha="center", fontsize=7)
                    continue
                box = ax.boxplot([values], positions=[col], patch_artist=True, showfliers=False, widths=0.6)
                box["boxes"][0].set_facecolor(palette[system])
                box["boxes"][0].set_alpha(0.3)
                ax.scatter([col + random.uniform(-0.15, 0.15) for _ in values], values, s=12, color=palette[system], zorder=3)
        ax.set_xticks([c for c, _ in ticks], [t for _, t in ticks], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(titles[kind], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("signal -> another instance holds the leader lock (s, log)")
    fig.suptitle(f"Beat HA, three instances, a job every {INTERVAL:g} s: takeover of the leader lock")
    written += save(fig, folder / "takeover")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [(s, v) for s in BEAT_SYSTEMS for v in VARIANTS if v in results["beat"].get(s, {})]
    for ax, what in zip(axes, ("duplicates", "missed"), strict=True):
        bottom = [0.0] * len(names)
        for kind, color in zip(KINDS, ("tab:red", "tab:gray", "tab:purple"), strict=True):
            vals = [results["beat"][s][v]["by_kind"][kind][what] for s, v in names]
            ax.bar(range(len(names)), vals, bottom=bottom, color=color, label=titles[kind])
            bottom = [b + x for b, x in zip(bottom, vals, strict=True)]
        for i, (s, v) in enumerate(names):
            cut = " (waits cut off)" if results["beat"][s][v]["censored_at_s"] else ""
            ax.text(i, bottom[i], f"{results['beat'][s][v][what]}{cut}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max([*bottom, 1.0]) * 1.2)
        ax.set_xticks(range(len(names)), [f"{short[s]}\n{v}" for s, v in names], fontsize=8)
        ax.set_title(
            f"{'duplicated' if what == 'duplicates' else 'missed'} ticks (job every {INTERVAL:g} s), by fault", fontsize=10
        )
        ax.legend(fontsize=7)
    written += save(fig, folder / "ticks")

    fig, ax = plt.subplots(figsize=(9, 4))
    rows = [(s, v) for s in TASK_SYSTEMS for v in VARIANTS if v in results["task"].get(s, {})]
    vals = [results["task"][s][v]["stuck_s"] for s, v in rows]
    top = max([x for x in vals if x is not None] + [1.0]) * 1.5
    ax.bar(
        range(len(rows)),
        [top if x is None else x for x in vals],
        color=["tab:blue" if s == OURS else "tab:green" for s, _ in rows],
    )
    for i, x in enumerate(vals):
        ax.text(i, top if x is None else x, "never" if x is None else f"{x:.0f} s", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"{s}\n{v}" for s, v in rows], fontsize=8)
    ax.set_ylabel("kill -> the task can run again (s, log)")
    ax.set_title("Task locks: how long a SIGKILLed holder's lock stays stuck")
    written += save(fig, folder / "stuck")
    return written


def fmt(x: float | None, unit: str = "s", digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f} {unit}".strip()


def print_tables(results: dict[str, Any], log: Callable[[str], None]) -> None:
    log("")
    log(f"beat HA (job every {INTERVAL:g} s; takeover = signal -> another instance holds the lock)")
    log(
        f"{'system':20}{'variant':9}{'crash med':>10}{'max':>8}{'stop med':>10}{'pause med':>10}"
        f"{'dispatch med':>13}{'dup':>5}{'missed':>7}{'runs':>6}"
    )
    for system in BEAT_SYSTEMS:
        for variant in VARIANTS:
            row = results["beat"].get(system, {}).get(variant)
            if row is None:
                continue
            cens = " (censored)" if row["censored_at_s"] else ""
            log(
                f"{system:20}{variant:9}{fmt(row['crash_takeover_median_s']):>10}{fmt(row['crash_takeover_max_s']):>8}"
                f"{fmt(median(row['stop_takeover_s'])):>10}{fmt(median(row['pause_takeover_s'])):>10}"
                f"{fmt(median(row['crash_dispatch_s'])):>13}{row['duplicates']:5d}{row['missed']:7d}{row['runs']:6d}{cens}"
            )
    log("")
    log("task locks (added = median send->result latency minus the plain task's, paced; burst = tasks/s)")
    log(f"{'system':20}{'variant':9}{'added':>10}{'burst':>9}{'ratio':>7}{'stuck':>14}{'dup (3 senders)':>17}")
    for system in ["baseline", *TASK_SYSTEMS]:
        for variant in VARIANTS:
            row = results["task"].get(system, {}).get(variant)
            if row is None:
                continue
            stuck = "never frees" if row["stuck_never_expires"] else fmt(row["stuck_s"], digits=1)
            if row["stuck_projected"] and not row["stuck_never_expires"]:
                stuck += "*"
            added = fmt(row.get("added_ms"), "ms") if system != "baseline" else fmt(row.get("latency_ms_median"), "ms")
            burst = f"{row['burst_tasks_per_s']:.0f}" if "burst_tasks_per_s" in row else "-"
            ratio = f"{row['burst_ratio']:.0%}" if "burst_ratio" in row else "-"
            dup = "-" if row.get("duplicates") is None else str(row["duplicates"])
            log(f"{system:20}{variant:9}{added:>10}{burst:>9}{ratio:>7}{stuck:>14}{dup:>17}")
    log("  * projected: confirmed stuck for 5 s, then the lock's remaining TTL in Redis added (not waited out)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same cases, fewer rounds (under 8 minutes)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write the plots (PNG and SVG) into DIR")
    parser.add_argument("--only", default="beat,task,curl", help="comma-separated parts to run: beat, task, curl (default all)")
    parser.add_argument("--set", default="", metavar="K=V,...", help="override round counts (e.g. crash=2,stop=2,ticks=10)")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if not parts <= {"beat", "task", "curl"}:
        parser.error(f"--only: unknown part(s) {sorted(parts - {'beat', 'task', 'curl'})}")
    plan = QUICK if args.quick else Plan()
    for item in filter(None, args.set.split(",")):
        key, _, value = item.partition("=")
        if key not in Plan.__dataclass_fields__:
            parser.error(f"--set: {key!r} is not one of {sorted(Plan.__dataclass_fields__)}")
        plan = dataclasses.replace(plan, **{key: type(getattr(plan, key))(value)})
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    import peers_app

    missing = availability()
    t_begin = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["bench/peers.py", *(argv if argv is not None else sys.argv[1:])]),
        "plan": plan.__dict__,
        "unavailable": {k: v for k, v in missing.items() if v},
        "tuning": {s: {v: peers_app.settings(s, v) for v in VARIANTS} for s in NAMES if s != CURL},
        "beat": {},
        "task": {},
        "ticks": {},
    }
    for name, why in missing.items():
        if why:
            log(f"NOT MEASURED {name}: {why}")
    log("tuning (bench/peers_app.py TUNING):")
    for system in NAMES:
        if system != CURL:
            log(f"  {system:18} defaults {peers_app.settings(system, 'defaults')}   tuned {peers_app.settings(system, 'tuned')}")

    failed: BaseException | None = None
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp_name, contextlib.ExitStack() as servers:
        tmp = Path(tmp_name)
        try:
            agent, info = start_server_agent(tmp)
            servers.callback(agent.stop)
            redis_server = start_redis(tmp)
            servers.callback(redis_server.stop)
            results["consul"] = info
            log(f"Consul v{info['version']} server agent (data dir {info['data_dir']}) and Redis at {redis_server.url}")
            peers_app.configure(redis_server.url, "defaults")
            ctx = {
                "tmp": tmp,
                "redis_url": redis_server.url,
                "agent": agent,
                "r": redis.Redis.from_url(redis_server.url),
                "counter": [0],
            }
            if "beat" in parts:
                log("beat HA:")
                worker = start_worker(
                    peers_app.app, tmp, bench_env(redis_server.url, agent.address), concurrency=2, app_path="peers_app", cwd=BENCH
                )
                try:
                    results["beat"] = run_beats([s for s in BEAT_SYSTEMS if not missing[s]], ctx, plan, log)
                finally:
                    worker.stop()
            if "task" in parts:
                log("task locks:")
                available = [s for s in TASK_SYSTEMS if not missing[s]]
                for variant in VARIANTS:
                    rows = run_tasks(variant, ctx, plan, available, log)
                    for system, row in rows.items():
                        results["task"].setdefault(system, {})[variant] = row
                for by_variant in results["task"].values():
                    base = results["task"]["baseline"]["defaults"]
                    for variant, row in by_variant.items():
                        by_variant[variant] = task_summary(row, base)
            if "curl" in parts and not missing[CURL]:
                log("curl script vs ConsulLockedTask with tick ids:")
                results["ticks"] = run_curl(ctx, plan, log)
                for system, row in results["ticks"].items():
                    results["task"].setdefault(system, {}).setdefault("defaults", {}).update(row)
        except BaseException as exc:
            failed = exc
        servers.close()
        if failed is not None:
            keep = Path(tempfile.mkdtemp(prefix="peers-logs-"))
            for f in tmp.glob("*.log"):
                shutil.copy(f, keep)
            traceback.print_exception(failed)
            log(f"FAILED: {failed!r} (logs kept in {keep})")

    results["elapsed_s"] = time.monotonic() - t_begin
    if failed is None:
        print_tables(results, log)
        if results["ticks"]:
            log(
                f"\nlate node ({plan.ticks} ticks): curl-script {results['ticks'][CURL]}, "
                f"ConsulLockedTask {results['ticks'][OURS]}"
            )
        results["targets"] = [{"target": t, "met": ok, "figures": f} for t, ok, f in targets(results)]
        log("\ntargets:")
        for t in results["targets"]:
            verdict = {True: "MET", False: "MISSED", None: "reported"}[t["met"]]
            log(f"  {verdict:8} {t['target']}: {t['figures']}")
        if args.plots is not None and results["beat"]:
            for path in plots(results, args.plots):
                log(f"plot: {path}")
    log(f"run time {results['elapsed_s']:.0f} s")
    write_json(args.json, schema(results))
    return 1 if failed is not None else 0


def schema(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's JSON: {"beat": {NAME: {...defaults..., "tuned": {...}}}, "task": {NAME: ...}},
    NAME one of NAMES; the variant "defaults" at the top of each NAME, "tuned" inside it."""
    out = {k: v for k, v in results.items() if k not in ("beat", "task")}
    for part in ("beat", "task"):
        out[part] = {}
        for name, by_variant in results[part].items():
            row = dict(by_variant.get("defaults", {}))
            if "tuned" in by_variant:
                row["tuned"] = by_variant["tuned"]
            out[part][name] = row
    if "baseline" in out["task"]:  # the plain task every lock is measured against
        out["task_baseline"] = out["task"].pop("baseline")
    for name, why in results.get("unavailable", {}).items():
        out["beat" if name in BEAT_SYSTEMS else "task"].setdefault(name, {})["unavailable"] = why
    return json.loads(json.dumps(out, default=str))


if __name__ == "__main__":
    sys.exit(main())
