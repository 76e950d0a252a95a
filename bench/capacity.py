"""Capacity: locked cycles per second a three-server Consul cluster sustains, and what limits it.

Run: ``python bench/capacity.py [--quick] [--churn] [--celery] [--json PATH] [--plots DIR]
[--lockers 1,4,16,64] [--rounds N] [--seconds S] [--procs N] [--skip curve,held,keys,rate] [--split-cores]``
(``make bench-capacity`` runs everything with the plot, in the bench environment, which has
matplotlib; without ``--plots`` the plain ``.venv`` does; ``--replot JSON --plots DIR`` only
draws an earlier run's plot). About 15 minutes in full, 4 with ``--quick``.

The deployment it measures is Consul's standard one, on this machine: three *server* agents
(127.0.0.11-13, ``raft_multiplier = 1`` as Consul advises for production, file-backed data
directories: every Raft log write is fsynced to this machine's disk) and one *client* agent
(127.0.0.21), the local agent every locker talks to, as an application host's processes do.

1. **The curve.** At each count of concurrent lockers (``--lockers``, default 1, 4, 16, 64),
   spread over ``--procs`` processes (default: as many as lockers, at most 4) of threads,
   each locker runs cycles back to back on a key of its own for ``--seconds``, after a
   warm-up, in three flows, in rotating order each round:

   ours   ``ConsulLock.acquire(blocking=False)`` + ``release()``: the acquire transaction
          (``get`` + ``lock``: the previous value and the fencing token come back
          atomically) and the ``?release=`` write, with the lock's bookkeeping;
   txn    ours's two requests sent raw (what Consul charges for them, without our code);
   floor  the two writes of any Consul lock sent raw, ``PUT ?acquire=`` + ``PUT ?release=``
          for a session made beforehand, on one keep-alive connection per locker;
   plain  two plain KV writes (``PUT /v1/kv/KEY``), Consul's cheapest writes (reference).

   **The number judged** (the issue's): locked cycles/s over the floor's writes/s, two
   writes per cycle, target >= 0.45 at 16 lockers (0.5: as fast as the floor). The ratios
   ours/txn (our code's share) and txn/floor (the transaction's, in Consul) say where a
   gap comes from.

   Each locker has a key of its own (distinct keys): capacity is how many *independent*
   locked tasks per second the cluster carries (per-customer jobs, many periodic tasks).
   On one shared key the lockers would exclude each other, and the rate would be that of
   one holder whatever the concurrency (two Raft commits in a row per cycle): the
   1-locker point. The keys are reused from cycle to cycle, so the KV does not grow
   during the run (growth is part 3).

   Beside each point: p50/p95/p99 of a cycle's latency, and what each part used over the
   measured seconds: CPU (cores: CPU seconds per second, from /proc/PID/stat) of each
   server, the client agent, the lockers' processes and everything else on the machine;
   the leader's Raft disk time (``consul.raft.leader.dispatchLog``: the write + fsync of a
   batch of log entries, in Consul's own metrics) as a share of the wall time, and how many
   entries each disk write carried; then **the limiting resource**: the machine's CPU when
   all its cores are busy, else the leader's log fsync when it writes more than 80 % of the
   time, else a locker process's CPU (one core: Python's GIL), else the client agent's, else
   latency (each locker waits for its commits; more lockers would go faster).
2. **Held locks.** A fresh process takes 0, 100 and 1000 distinct locks and holds them past
   the loss watch's start: its memory (RSS), threads and TCP connections to the agent, per
   held lock, and any lock lost or refused on the way (an agent allows 200 connections
   per client address by default, ``limits.http_max_conns_per_client``).
3. **Keys in KV.** The cycle latency at 1 locker, ours and floor, with 0, 10k and 100k other
   keys under the lock prefix ``locks/``.
4. **The servers' cost at equal rates.** ours at 16 and 8 lockers, txn at 16, 8 and 6: the
   servers' CPU per cycle against the cycle rate. A lower rate costs the servers more per
   cycle whatever the requests (Raft carries fewer entries per log write, and their fixed
   work per second is shared by fewer cycles), so a flow that is slower for another reason
   also looks dearer to the servers; this part tells the two apart (txn's cost fitted at
   ours' rate, as a + b / rate).
5. ``--churn``: **session churn.** Sessions created + destroyed back to back through the
   client agent, by 1 and 16 lockers: what the cluster carries. Then a real ``celery
   worker`` (prefork, 2 processes, ``--max-tasks-per-child=1``: a new process for every
   task) of ``tests.proj`` on the client agent runs a burst of locked no-ops (each process
   creates its session, the task locks and releases, the process destroys its session as
   it exits), beside the same burst of unlocked no-ops with the same recycling and of
   locked no-ops without it: sessions created and destroyed per second (Consul's
   ``consul.fsm.session`` counts), the cost per recycle, and the sessions left behind.
6. ``--celery``: **through Celery.** A worker with ``-P threads -c 16`` on the client agent
   runs a burst of no-ops, unlocked and as ``ConsulLockedTask`` with a key per task.

``--split-cores`` pins the three servers to the upper half of the machine's CPUs and the
client agent and the lockers to the other half, as separate server and application hosts
are: the lockers' CPU is then not taken from the servers (on one shared machine it is, and a
flow whose own code costs more CPU slows the servers down for that reason alone).

The machine's disk fsync latency is probed first (a 4 KiB write + fdatasync in place, in
the data directory's file system): Raft's writes cannot be faster than it. Every figure
depends on this machine; ``--json`` keeps them all. Exits 1 if the target at 16 lockers is
missed or a part failed (errors, lost or refused locks, sessions left behind, failed tasks).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import save, write_json  # noqa: E402
from lock_cost import Floor, Ours, Plain  # noqa: E402

from celery_consul_lock import ConsulLock, close_sessions  # noqa: E402
from celery_consul_lock.consul import LOCK_FLAG  # noqa: E402
from celery_consul_lock.transport import Connection  # noqa: E402
from tests.servers import ConsulAgent, ConsulCluster, RedisServer, start_client_agent, start_cluster, start_redis  # noqa: E402

#: locked cycles/s at 16 lockers >= this x the floor's (the issue's target).
TARGET_RATIO = 0.45
TARGET_LOCKERS = 16
LOCKERS = (1, 4, 16, 64)
#: Lockers are threads in at most this many processes (a process's Python code runs on one
#: core at a time; more processes than cores only add switching).
PROCS_MAX = 4
FLOWS = ("ours", "txn", "floor", "plain")
#: Locks one process holds at once in part 2.
HELD = (0, 100, 1000)
#: Other keys under the lock prefix in part 3 (--quick stops at 10k: filling takes a while).
KEY_COUNTS = (0, 10_000, 100_000)
#: Cumulative Raft and session counters, from every agent (Consul's Prometheus format).
TELEMETRY_HCL = 'telemetry { prometheus_retention_time = "10m", disable_hostname = true }'
CLIENT_BIND = "127.0.0.21"
#: Held locks are counted after this long: every watcher has started (WATCH_DELAY is 0.5 s).
HOLD_SETTLE = 2.0
#: After filling keys, let the servers settle (followers catch up) before timing cycles.
KEYS_SETTLE = 2.0
#: Consul's default limit of concurrent HTTP connections per client address.
AGENT_CONN_LIMIT = 200
#: A point's limit is the machine's CPU when this share of its cores is busy (also: one
#: locker process's or the client agent's, of one core) ...
CPU_BUSY = 0.9
#: ... or the leader's log fsync when it writes this share of the time (Raft batches the
#: entries that arrive meanwhile, so a disk busy less than all the time still has headroom).
DISK_BUSY = 0.8
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How long and how often everything runs."""

    lockers: tuple[int, ...]
    rounds: int
    seconds: float
    warmup: float
    procs_max: int
    held: tuple[int, ...]
    key_counts: tuple[int, ...]
    key_seconds: float
    churn_tasks: int


def plan_of(args: argparse.Namespace) -> Plan:
    """The plan of a run: the command line's values, else the defaults (shorter with --quick)."""
    quick = args.quick
    return Plan(
        lockers=tuple(args.lockers),
        rounds=args.rounds or (1 if quick else 3),
        seconds=args.seconds or (3.0 if quick else 10.0),
        warmup=1.0 if quick else 2.0,
        procs_max=args.procs,
        held=HELD,
        key_counts=KEY_COUNTS[:2] if quick else KEY_COUNTS,
        key_seconds=3.0 if quick else 8.0,
        churn_tasks=30 if quick else 60,
    )


# -- what each process and Consul used ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields_ = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine so far, over all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = values[3], values[4]
    return (sum(values[:8]) - idle - iowait) / CLK_TCK, iowait / CLK_TCK


def metrics(agent: ConsulAgent) -> dict[str, float]:
    """The agent's metrics in Prometheus' text format: ``name{labels}`` -> value."""
    with urllib.request.urlopen(agent.url + "/v1/agent/metrics?format=prometheus", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


@dataclass
class Snapshot:
    """What every part had used at one moment."""

    t: float
    cpu: dict[str, float]
    machine: tuple[float, float]
    leader: dict[str, float]
    followers: list[dict[str, float]]
    #: The client agent's HTTP request counts, by endpoint.
    requests: dict[str, float]


@dataclass
class Topology:
    """The cluster, the lockers' client agent, and which server leads."""

    cluster: ConsulCluster
    agent: ConsulAgent
    leader: ConsulAgent = field(init=False)

    def __post_init__(self) -> None:
        self.leader = self.cluster.leader_agent()

    def snapshot(self, lockers: list[int]) -> Snapshot:
        cpu = {a.node + ("*" if a is self.leader else ""): cpu_seconds(a.proc.pid) for a in self.cluster.agents}
        cpu["client agent"] = cpu_seconds(self.agent.proc.pid)
        cpu["lockers"] = sum(cpu_seconds(pid) for pid in lockers)
        cpu["lockers max"] = max((cpu_seconds(pid) for pid in lockers), default=0.0)
        followers = [metrics(a) for a in self.cluster.agents if a is not self.leader]
        requests = {k: v for k, v in metrics(self.agent).items() if k.startswith("consul_http_") and k.endswith("_count")}
        return Snapshot(time.monotonic(), cpu, machine_cpu(), metrics(self.leader), followers, requests)


def usage(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Cores each part used between two snapshots, the leader's disk share, the limit."""
    wall = after.t - before.t
    cores = {name: (after.cpu[name] - before.cpu[name]) / wall for name in after.cpu}
    busy = (after.machine[0] - before.machine[0]) / wall
    ours = sum(v for k, v in cores.items() if k != "lockers max")
    cores["rest of the machine"] = max(0.0, busy - ours)
    cores["machine"] = busy
    cores["iowait"] = (after.machine[1] - before.machine[1]) / wall

    def delta(name: str, a: dict[str, float] = after.leader, b: dict[str, float] = before.leader) -> float:
        return a.get(name, 0.0) - b.get(name, 0.0)

    disk_ms, writes = delta("consul_raft_leader_dispatchLog_sum"), delta("consul_raft_leader_dispatchLog_count")
    commits = delta("consul_raft_commitTime_count")
    store = [
        (a.get("consul_raft_rpc_appendEntries_storeLogs_sum", 0.0) - b.get("consul_raft_rpc_appendEntries_storeLogs_sum", 0.0))
        for a, b in zip(after.followers, before.followers, strict=True)
    ]
    raft = {
        "leader_disk_share": disk_ms / 1000 / wall,
        "leader_disk_ms_per_write": disk_ms / writes if writes else 0.0,
        "entries_per_disk_write": commits / writes if writes else 0.0,
        "commits_per_s": commits / wall,
        "follower_disk_share_max": max(store, default=0.0) / 1000 / wall,
    }
    requests = {
        k[len("consul_http_") : -len("_count")]: after.requests[k] - before.requests.get(k, 0.0)
        for k in after.requests
        if after.requests[k] - before.requests.get(k, 0.0) > 0
    }
    return {"cores": cores, "raft": raft, "limit": limit_of(cores, raft), "requests": requests}


#: With ``--split-cores``: the CPUs the servers are pinned to (the rest run the client agent
#: and the lockers, as an application host does); None: everything shares every CPU.
SERVER_CPUS: set[int] | None = None


def limit_of(cores: dict[str, float], raft: dict[str, float]) -> str:
    """The resource that stops a point going faster (see the module's doc)."""
    ncpu = os.cpu_count() or 1
    if SERVER_CPUS:
        servers = sum(v for k, v in cores.items() if k.startswith("server"))
        if servers >= CPU_BUSY * len(SERVER_CPUS):
            return f"the servers' CPU ({servers:.2f} of their {len(SERVER_CPUS)} core(s) busy)"
    if cores["machine"] >= CPU_BUSY * ncpu:
        parts = {k: v for k, v in cores.items() if k not in ("machine", "iowait", "lockers max")}
        top = max(parts, key=lambda k: parts[k])
        return f"machine CPU ({cores['machine']:.1f} of {ncpu} cores busy; most: {top} {parts[top]:.2f})"
    if raft["leader_disk_share"] >= DISK_BUSY:
        return f"leader's Raft log fsync (writing {raft['leader_disk_share']:.0%} of the time)"
    if cores["lockers max"] >= CPU_BUSY:
        return f"a locker process's CPU ({cores['lockers max']:.2f} core: Python's GIL)"
    if cores["client agent"] >= CPU_BUSY:
        return f"client agent CPU ({cores['client agent']:.2f} core)"
    return "latency: lockers wait on their commits (neither CPU nor disk is full)"


def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process ``pid`` on ``cpus`` only (threads it starts later inherit
    it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def split_cores(cluster: ConsulCluster, agent: ConsulAgent) -> tuple[set[int], set[int]]:
    """Pin the servers to the upper half of this machine's CPUs, and the client agent and
    this process (so every locker it forks) to the rest: the deployment's separate server and
    application hosts, on one machine. Returns (servers' CPUs, the application's CPUs)."""
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        raise SystemExit("--split-cores needs at least 2 CPUs")
    servers, app = set(range(ncpu // 2, ncpu)), set(range(ncpu // 2))
    for server in cluster.agents:
        pin(server.proc.pid, servers)
    pin(agent.proc.pid, app)
    pin(os.getpid(), app)
    return servers, app


def fsync_probe(folder: Path, count: int = 100) -> dict[str, float]:
    """Median and p90 milliseconds of a 4 KiB write + fdatasync in place in a file of
    ``folder`` (as Raft's BoltDB log store writes its pages): Raft's floor on this disk."""
    path = folder / "fsync-probe"
    out = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        block = os.urandom(4096)
        os.write(fd, block * 256)
        os.fsync(fd)
        for i in range(count):
            t0 = time.perf_counter()
            os.pwrite(fd, block, 4096 * (i % 256))
            os.fdatasync(fd)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    q = statistics.quantiles(out, n=10)
    return {"median_ms": statistics.median(out), "p90_ms": q[8]}


# -- the lockers --------------------------------------------------------------------------------


class TxnFloor(Floor):
    """The two requests ConsulLock sends, raw: its acquire transaction (``get`` + ``lock`` of
    the key, which returns the previous value and the fencing token atomically) and ``PUT
    ?release=``: Consul's own cost of our acquire, without our code."""

    def __init__(self, agent: ConsulAgent, key: str) -> None:
        super().__init__(agent, key)
        lock_key = json.dumps(f"{key}/.lock")
        value = base64.b64encode(self.body).decode()
        ops = [
            {"KV": {"Verb": "get", "Key": "@"}},
            {"KV": {"Verb": "lock", "Key": "@", "Value": value, "Flags": LOCK_FLAG, "Session": self.session}},
        ]
        self.txn = json.dumps(ops).replace('"@"', lock_key).encode()
        self.put(f"/v1/kv/{key}/.lock?flags={LOCK_FLAG}")  # the transaction's get needs the key

    def __call__(self) -> None:
        status, _, text = self.conn.request("PUT", "/v1/txn", self.txn, {}, 5.0)
        if status != 200:
            raise RuntimeError(f"acquire transaction answered {status}: {text[:200]!r}")
        self.put(f"/v1/kv/{self.key}/.lock?release={self.session}&flags={LOCK_FLAG}")


#: A locker's cycle: built in the locker's thread for its key; ``obj()`` runs one cycle,
#: ``obj.close()`` ends it.
MAKERS: dict[str, Callable[[ConsulAgent, str], Any]] = {
    "ours": lambda agent, key: Ours(agent, f"{key}/.lock"),
    "txn": TxnFloor,
    "floor": Floor,
    "plain": Plain,
}


def _locker_process(flow: str, agent: ConsulAgent, keys: list[str], start: float, stop: float, out: Pipe) -> None:
    """A process of lockers (forked): one thread per key, cycling from ``start`` (all
    threads at once) until ``stop`` (``time.monotonic()``); sends back the cycles'
    (end, seconds) and the errors."""
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def locker(key: str) -> None:
        mine: list[tuple[float, float]] = []
        try:
            cycle = MAKERS[flow](agent, key)
        except Exception as exc:
            with lock:
                errors.append(f"set-up: {exc!r}")
            return
        time.sleep(max(0.0, start - time.monotonic()))
        try:
            while True:
                t0 = time.monotonic()
                if t0 >= stop:
                    break
                try:
                    cycle()
                except Exception as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                mine.append((time.monotonic(), time.monotonic() - t0))
        finally:
            cycle.close()
            with lock:
                samples.extend(mine)

    threads = [threading.Thread(target=locker, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    close_sessions()
    out.send((samples, errors))
    out.close()


@dataclass
class Point:
    """One flow at one concurrency, one round."""

    flow: str
    lockers: int
    procs: int
    cycles_per_s: float
    latencies_ms: list[float]
    errors: list[str]
    usage: dict[str, Any]


def run_point(topo: Topology, flow: str, lockers: int, plan: Plan, seconds: float | None = None) -> Point:
    """``lockers`` lockers of ``flow`` for the warm-up and ``seconds``; measured after the warm-up."""
    seconds = seconds or plan.seconds
    procs = min(lockers, plan.procs_max)
    keys = [f"locks/capacity/{flow}-{i}" for i in range(lockers)]
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic() + 0.5 + 0.02 * lockers  # every thread set up by then
    measure_from, stop = start + plan.warmup, start + plan.warmup + seconds
    children = []
    for p in range(procs):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_locker_process, args=(flow, topo.agent, keys[p::procs], start, stop, send), daemon=True)
        proc.start()
        send.close()
        children.append((proc, recv))
    pids = [proc.pid for proc, _ in children if proc.pid is not None]
    time.sleep(max(0.0, measure_from - time.monotonic()))
    before = topo.snapshot(pids)
    time.sleep(max(0.0, stop - time.monotonic()))
    after = topo.snapshot(pids)
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    for proc, recv in children:
        try:
            got, errs = recv.recv()
        except EOFError:
            got, errs = [], [f"locker process {proc.pid} died without results"]
        samples += got
        errors += errs
        proc.join(30)
    measured = [s for end, s in samples if measure_from <= end <= stop]
    rate = len(measured) / seconds
    used = usage(before, after)
    used["cpu_ms_per_cycle"] = cpu_per_cycle(used["cores"], rate)
    count = len([1 for end, _ in samples if before.t <= end <= after.t]) or 1
    used["requests_per_cycle"] = {k: v / count for k, v in used.pop("requests").items()}
    return Point(flow, lockers, procs, rate, [s * 1000 for s in measured], errors, used)


def cpu_per_cycle(cores: dict[str, float], rate: float) -> dict[str, float]:
    """CPU milliseconds one cycle cost: all servers, the leader, the client agent, the lockers."""
    if not rate:
        return {}
    servers = sum(v for k, v in cores.items() if k.startswith("server"))
    leader = sum(v for k, v in cores.items() if k.startswith("server") and k.endswith("*"))
    parts = {"servers": servers, "leader": leader, "client agent": cores["client agent"], "lockers": cores["lockers"]}
    return {k: v / rate * 1000 for k, v in parts.items()}


#: Ratios of cycles per second printed per point: (numerator flow, denominator flow).
RATIOS = (("ours", "floor"), ("ours", "txn"), ("txn", "floor"), ("ours", "plain"))


def ratio(a: list[Point], b: list[Point]) -> float:
    """The median over the rounds of a's cycles/s over b's in the same round (the two runs
    seconds apart, so the machine's drift from round to round moves it less)."""
    values = [x.cycles_per_s / y.cycles_per_s for x, y in zip(a, b, strict=True) if y.cycles_per_s]
    return statistics.median(values) if values else 0.0


def median_usage(runs: list[Point]) -> dict[str, Any]:
    """The middle round's usage, with each part's CPU per cycle the median over all rounds (one
    round's figure moves by 10-20 % with whatever else the machine does meanwhile)."""
    usage = dict(runs[len(runs) // 2].usage)
    parts = [p.usage["cpu_ms_per_cycle"] for p in runs if p.usage.get("cpu_ms_per_cycle")]
    if parts:
        usage["cpu_ms_per_cycle"] = {k: statistics.median(q[k] for q in parts) for k in parts[0]}
    return usage


def percentiles(ms: list[float]) -> dict[str, float]:
    if len(ms) < 2:
        return {"p50_ms": ms[0] if ms else float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "n": len(ms)}
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": statistics.median(ms), "p95_ms": q[94], "p99_ms": q[98], "n": len(ms)}


def curve(topo: Topology, plan: Plan) -> dict[int, dict[str, Any]]:
    """Every flow at every concurrency, ``plan.rounds`` rounds in rotating order."""
    out: dict[int, dict[str, Any]] = {}
    orders = (FLOWS[r % len(FLOWS) :] + FLOWS[: r % len(FLOWS)] for r in itertools.count())
    for n in plan.lockers:
        points: dict[str, list[Point]] = {f: [] for f in FLOWS}
        for _ in range(plan.rounds):
            for flow in next(orders):
                points[flow].append(run_point(topo, flow, n, plan))
        row: dict[str, Any] = {}
        for flow, runs in points.items():
            row[flow] = {
                "cycles_per_s": statistics.median(p.cycles_per_s for p in runs),
                "cycles_per_s_rounds": [p.cycles_per_s for p in runs],
                **percentiles([ms for p in runs for ms in p.latencies_ms]),
                "errors": sum(len(p.errors) for p in runs),
                "first_errors": [e for p in runs for e in p.errors][:3],
                "procs": runs[0].procs,
                "usage": median_usage(runs),
            }
        for a, b in RATIOS:
            row[f"ratio_{a}_{b}"] = ratio(points[a], points[b])
        # The measure: locked cycles per second over the floor's writes per second.
        row["cycles_per_floor_write"] = row["ratio_ours_floor"] / 2
        out[n] = row
        print_curve_row(n, row)
    return out


def print_curve_header(plan: Plan) -> None:
    print(
        "\n1. The curve: cycles/s of ConsulLock acquire + release (ours), of its two requests sent raw (txn), of the"
        "\n   two writes of any Consul lock sent raw, ?acquire= + ?release= (floor), and of two plain KV writes (plain);"
        f"\n   median of {plan.rounds} round(s) of {plan.seconds:g} s after {plan.warmup:g} s warm-up, distinct keys."
        f"\n   cores = CPU seconds per second of: the 3 servers (leader marked *), the client agent, the"
        f"\n   lockers' processes, the rest of this machine; disk = share of the time the leader writes+fsyncs"
        f"\n   its Raft log, entries/write = Raft entries carried by one such write (batching); CPU ms per cycle ="
        f"\n   what one cycle cost each part (servers: the three together), the median over the rounds."
    )
    print(f"\n{'lockers':>7} {'flow':6}{'cycles/s':>10}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'err':>5}   limit")


def print_curve_row(n: int, row: dict[str, Any]) -> None:
    for flow in FLOWS:
        r = row[flow]
        print(
            f"{n:>7} {flow:6}{r['cycles_per_s']:10.0f}{r['p50_ms']:8.2f}{r['p95_ms']:8.2f}{r['p99_ms']:8.2f}{r['errors']:5d}   "
            f"{r['usage']['limit']}"
        )
        u = r["usage"]
        cores = "  ".join(f"{k} {v:.2f}" for k, v in u["cores"].items() if k not in ("lockers max", "iowait"))
        raft = u["raft"]
        print(
            f"{'':15}cores: {cores}\n{'':15}disk {raft['leader_disk_share']:.0%} "
            f"({raft['leader_disk_ms_per_write']:.2f} ms/write, {raft['entries_per_disk_write']:.1f} entries/write, "
            f"{raft['commits_per_s']:.0f} commits/s), iowait {u['cores']['iowait']:.2f}"
        )
        per = "  ".join(f"{k} {v:.2f}" for k, v in u["cpu_ms_per_cycle"].items())
        reqs = "  ".join(f"{k} {v:.2f}" for k, v in sorted(u["requests_per_cycle"].items(), key=lambda kv: -kv[1]))
        print(f"{'':15}CPU ms per cycle: {per}\n{'':15}requests per cycle at the agent: {reqs}")
    ratios = "   ".join(f"{a}/{b} = {row[f'ratio_{a}_{b}']:.2f}" for a, b in RATIOS)
    print(f"{'':15}{ratios}   ours cycles per floor write = {row['cycles_per_floor_write']:.3f}")


# -- held locks ----------------------------------------------------------------------------------


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def connections_to(host: str, port: int) -> int:
    """Established TCP connections of this process to ``host:port`` (IPv4)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    remote = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    count = 0
    with open("/proc/self/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[2] == remote and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


def _held_process(agent: ConsulAgent, count: int, out: Pipe) -> None:
    """Take ``count`` distinct locks (after one warm acquire + release), hold them past
    HOLD_SETTLE, and send back what the process used."""
    result: dict[str, Any] = {"held": count}
    try:
        warm = ConsulLock("locks/capacity/held-warm/.lock", address=agent.address)
        warm.acquire(blocking=False)
        warm.release()
        base = {"rss_kib": rss_kib(), "threads": threading.active_count(), "conns": connections_to(agent.bind, agent.http_port)}
        locks = [ConsulLock(f"locks/capacity/held-{i}/.lock", address=agent.address) for i in range(count)]
        t0 = time.monotonic()
        refused = []
        for lock in locks:
            try:
                if not lock.acquire(blocking=False):
                    refused.append(f"{lock.key}: held by {lock.last_holder}")
            except Exception as exc:
                refused.append(f"{lock.key}: {exc!r}")
        result["acquire_s"] = time.monotonic() - t0
        time.sleep(HOLD_SETTLE)
        held = sum(lock.held for lock in locks)
        result.update(
            rss_kib=rss_kib(),
            threads=threading.active_count(),
            conns=connections_to(agent.bind, agent.http_port),
            base=base,
            still_held=held,
            lost=[lock.lost_reason for lock in locks if lock.lost_reason][:3],
            lost_count=sum(1 for lock in locks if lock.lost_reason),
            refused=refused[:3],
            refused_count=len(refused),
        )
        t0 = time.monotonic()
        for lock in locks:
            lock.release()
        result["release_s"] = time.monotonic() - t0
        close_sessions()
    except Exception:
        result["error"] = traceback.format_exc()
    out.send(result)
    out.close()


def held_locks(topo: Topology, plan: Plan) -> list[dict[str, Any]]:
    print(
        f"\n2. Held locks: one process takes N distinct locks and holds them {HOLD_SETTLE:g} s (each held lock past"
        f"\n   0.5 s is watched for loss); what the process uses beyond its state after one acquire + release."
        f"\n   The agent allows {AGENT_CONN_LIMIT} connections per client address by default."
    )
    print(
        f"\n{'held':>6}{'RSS MiB':>9}{'KiB/lock':>10}{'threads':>9}{'conns':>7}{'conns/lock':>12}"
        f"{'lost':>6}{'refused':>9}{'acquire s':>11}"
    )
    ctx = multiprocessing.get_context("fork")
    rows = []
    for count in plan.held:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_held_process, args=(topo.agent, count, send), daemon=True)
        proc.start()
        send.close()
        try:
            r = recv.recv()
        except EOFError:
            r = {"held": count, "error": "the process died"}
        proc.join(60)
        rows.append(r)
        if "error" in r:
            print(f"{count:>6}  failed: {r['error']}")
            continue
        per = count or 1
        r["kib_per_lock"] = (r["rss_kib"] - r["base"]["rss_kib"]) / per if count else 0.0
        r["conns_per_lock"] = (r["conns"] - r["base"]["conns"]) / per if count else 0.0
        print(
            f"{count:>6}{r['rss_kib'] / 1024:9.1f}{r['kib_per_lock']:10.1f}{r['threads']:9d}{r['conns']:7d}"
            f"{r['conns_per_lock']:12.3f}{r['lost_count']:6d}{r['refused_count']:9d}{r['acquire_s']:11.2f}"
        )
        for what in ("lost", "refused"):
            if r[what]:
                print(f"{'':6}first {what}: {r[what][0]}")
    return rows


# -- keys in KV -----------------------------------------------------------------------------------


def fill(agent: ConsulAgent, start: int, stop: int) -> None:
    """Write keys ``locks/capacity-fill/<i>`` for i in [start, stop), 64 per transaction."""
    conn = Connection(agent.bind, agent.http_port)
    value = "eyJ4IjoxfQ=="  # {"x":1}
    try:
        for i in range(start, stop, 64):
            ops = ",".join(
                f'{{"KV":{{"Verb":"set","Key":"locks/capacity-fill/{j}","Value":"{value}"}}}}'
                for j in range(i, min(i + 64, stop))
            )
            status, _, text = conn.request("PUT", "/v1/txn", f"[{ops}]".encode(), {}, 30.0)
            if status != 200:
                raise RuntimeError(f"filling keys failed: {status} {text[:200]!r}")
    finally:
        conn.close()


def key_growth(topo: Topology, plan: Plan) -> list[dict[str, Any]]:
    print(
        f"\n3. Keys in KV: 1 locker's cycle with N other keys under locks/ ({plan.key_seconds:g} s each flow, in two"
        "\n   halves: ours, floor, floor, ours)."
    )
    print(f"\n{'keys':>8}{'ours p50':>10}{'p99':>8}{'floor p50':>11}{'p99':>8}{'ours/floor':>12}{'fill s':>8}")
    rows = []
    have = 0
    for count in plan.key_counts:
        t0 = time.monotonic()
        fill(topo.agent, have, count)
        fill_s, have = time.monotonic() - t0, max(have, count)
        row: dict[str, Any] = {"keys": count, "fill_s": fill_s}
        time.sleep(KEYS_SETTLE)
        runs: dict[str, list[Point]] = {"ours": [], "floor": []}
        for flow in ("ours", "floor", "floor", "ours"):  # neither always first after the fill
            runs[flow].append(run_point(topo, flow, 1, plan, plan.key_seconds / 2))
        for flow, points in runs.items():
            row[flow] = {
                "cycles_per_s": statistics.fmean(p.cycles_per_s for p in points),
                **percentiles([ms for p in points for ms in p.latencies_ms]),
                "errors": sum(len(p.errors) for p in points),
            }
        row["ratio_ours_floor"] = row["ours"]["p50_ms"] / row["floor"]["p50_ms"]
        rows.append(row)
        print(
            f"{count:>8}{row['ours']['p50_ms']:10.2f}{row['ours']['p99_ms']:8.2f}{row['floor']['p50_ms']:11.2f}"
            f"{row['floor']['p99_ms']:8.2f}{row['ratio_ours_floor']:12.2f}{fill_s:8.1f}"
        )
    return rows


# -- real Celery workers: session churn, locked tasks -------------------------------------------

#: A task's runtime as its worker logs it (``-l INFO``).
SUCCEEDED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<id>[0-9a-f-]+)\] succeeded in (?P<secs>[0-9.eE+-]+)s:")
SESSIONS_CREATED = 'consul_fsm_session_count{op="create"}'
SESSIONS_DESTROYED = 'consul_fsm_session_count{op="destroy"}'


@dataclass(frozen=True)
class Burst:
    """One case of a burst through a real worker of ``tests.proj``: ``task`` sent ``n`` times
    at once (each with a key of its own) to a worker of ``pool`` x ``concurrency``."""

    task: str
    pool: str
    concurrency: int
    extra: tuple[str, ...] = ()


def bursts(topo: Topology, workdir: Path, redis_url: str, cases: dict[str, Burst], n: int) -> dict[str, dict[str, Any]]:
    """Each case in turn, on a fresh worker pointed at the client agent and ``redis_url``:
    tasks/s, the sessions the cluster created and destroyed meanwhile, failed tasks, and
    the sessions of processes no longer running that are left 5 s after the burst."""
    from celery.result import ResultSet

    from tests.proj.app import app
    from tests.workers import start_worker, worker_env

    app.conf.broker_url = app.conf.result_backend = redis_url
    env = worker_env(redis_url, topo.agent.address, TEST_TTL="30")
    keys = itertools.count(random.randrange(10**9))
    out: dict[str, dict[str, Any]] = {}
    for case, b in cases.items():
        worker = start_worker(app, workdir, env, pool=b.pool, concurrency=b.concurrency, extra_args=list(b.extra))
        try:
            # Warm: every pool process (or thread) has run a task once.
            ResultSet([app.send_task(b.task, kwargs={"n": next(keys)}) for _ in range(b.concurrency)]).get(timeout=120)
            before = metrics(topo.leader)
            t0 = time.monotonic()
            results = ResultSet([app.send_task(b.task, kwargs={"n": next(keys)}) for _ in range(n)])
            results.get(timeout=600, propagate=False)
            wall = time.monotonic() - t0
            after = metrics(topo.leader)
            left = leftover_sessions(topo.agent, worker, wait=5.0)
            failed = sum(1 for r in results.results if r.failed())
            ids = {r.id for r in results.results}
            runtimes = [float(m["secs"]) * 1000 for m in SUCCEEDED.finditer(worker.log_text()) if m["id"] in ids]
        finally:
            worker.stop()
        created = after.get(SESSIONS_CREATED, 0.0) - before.get(SESSIONS_CREATED, 0.0)
        destroyed = after.get(SESSIONS_DESTROYED, 0.0) - before.get(SESSIONS_DESTROYED, 0.0)
        out[case] = {
            "tasks": n,
            "wall_s": wall,
            "tasks_per_s": n / wall,
            "ms_per_task": wall / n * 1000,
            "runtime_p50_ms": statistics.median(runtimes) if runtimes else float("nan"),
            "sessions_created_per_s": created / wall,
            "sessions_destroyed_per_s": destroyed / wall,
            "left_behind": left,
            "failed": failed,
        }
    print(f"\n{'case':26}{'tasks/s':>9}{'ms/task':>9}{'run p50 ms':>12}{'sessions +/s':>14}{'-/s':>7}{'left':>6}{'failed':>8}")
    for case, r in out.items():
        print(
            f"{case:26}{r['tasks_per_s']:9.1f}{r['ms_per_task']:9.1f}{r['runtime_p50_ms']:12.1f}{r['sessions_created_per_s']:14.1f}"
            f"{r['sessions_destroyed_per_s']:7.1f}{len(r['left_behind']):6d}{r['failed']:8d}"
        )
    return out


class SessionCycle:
    """A session's life as a recycled pool process lives it: ``PUT /v1/session/create``
    then ``PUT /v1/session/destroy`` (two Raft writes), on one keep-alive connection."""

    def __init__(self, agent: ConsulAgent, key: str) -> None:
        self.conn = Connection(agent.bind, agent.http_port)
        self.body = json.dumps({"Name": f"capacity {key}", "TTL": "30s"}).encode()

    def __call__(self) -> None:
        status, _, text = self.conn.request("PUT", "/v1/session/create", self.body, {}, 5.0)
        if status != 200:
            raise RuntimeError(f"session create answered {status}: {text[:100]!r}")
        sid = json.loads(text)["ID"]
        status, _, text = self.conn.request("PUT", f"/v1/session/destroy/{sid}", b"", {}, 5.0)
        if status != 200:
            raise RuntimeError(f"session destroy answered {status}: {text[:100]!r}")

    def close(self) -> None:
        self.conn.close()


MAKERS["session"] = SessionCycle


def churn(topo: Topology, plan: Plan, workdir: Path, redis_url: str) -> dict[str, Any]:
    """Session churn: what the cluster carries, and a real recycling worker (see the doc)."""
    n = plan.churn_tasks
    print(
        "\n5. Session churn. What the cluster carries: sessions created + destroyed back to back (two Raft"
        f"\n   writes, as a recycled pool process does) by 1 and {TARGET_LOCKERS} lockers ({plan.key_seconds:g} s each):"
    )
    out: dict[str, Any] = {"cluster": {}}
    for lockers in (1, TARGET_LOCKERS):
        p = run_point(topo, "session", lockers, plan, plan.key_seconds)
        out["cluster"][str(lockers)] = {"sessions_per_s": p.cycles_per_s, **percentiles(p.latencies_ms), "errors": len(p.errors)}
        print(
            f"{lockers:>5} lockers: {p.cycles_per_s:6.0f} sessions created and destroyed per second, p50 "
            f"{percentiles(p.latencies_ms)['p50_ms']:.2f} ms per create + destroy, errors {len(p.errors)}; "
            f"limit: {p.usage['limit']}"
        )
    print(
        f"\n   A celery worker (prefork, 2 processes) on the client agent, {n} tasks sent at once; with"
        "\n   --max-tasks-per-child=1 every task runs in a new process, which makes its session and destroys it as it exits:"
    )
    recycled = ("--max-tasks-per-child=1",)
    cases = {
        "unlocked, recycled": Burst("proj.noop", "prefork", 2, recycled),
        "locked, recycled": Burst("proj.locked_noop", "prefork", 2, recycled),
        "locked, not recycled": Burst("proj.locked_noop", "prefork", 2),
    }
    out["worker"] = bursts(topo, workdir, redis_url, cases, n)
    per_task = {case: r["ms_per_task"] for case, r in out["worker"].items()}
    out["session_cost_per_recycle_ms"] = per_task["locked, recycled"] - per_task["unlocked, recycled"]
    out["recycle_cost_ms"] = per_task["locked, recycled"] - per_task["locked, not recycled"]
    out["left_behind"] = sum(len(r["left_behind"]) for r in out["worker"].values())
    out["failed"] = sum(r["failed"] for r in out["worker"].values())
    print(
        f"\nRecycling costs {out['recycle_cost_ms']:.0f} ms per task (locked recycled - locked not recycled), of which"
        f"\nthe session (locked recycled - unlocked recycled) {out['session_cost_per_recycle_ms']:.0f} ms; sessions left"
        f" behind: {out['left_behind']}.\nA recycle is bounded by the pool's process start, far below the session churn"
        " the cluster carries."
    )
    return out


def celery_tasks(topo: Topology, plan: Plan, workdir: Path, redis_url: str) -> dict[str, Any]:
    """Locked no-ops against unlocked ones through a threads-pool worker of TARGET_LOCKERS."""
    n = plan.churn_tasks * 10
    print(
        f"\n6. Through Celery: a worker with -P threads -c {TARGET_LOCKERS} on the client agent runs {n} no-op tasks"
        "\n   sent at once: unlocked, and as ConsulLockedTask with a key per task (Celery's own cost is in both)."
    )
    cases = {
        f"unlocked, threads x {TARGET_LOCKERS}": Burst("proj.noop", "threads", TARGET_LOCKERS),
        f"locked, threads x {TARGET_LOCKERS}": Burst("proj.locked_noop", "threads", TARGET_LOCKERS),
    }
    out: dict[str, Any] = {"worker": bursts(topo, workdir, redis_url, cases, n)}
    unlocked, locked = (r["tasks_per_s"] for r in out["worker"].values())
    out["ratio_locked_unlocked"] = locked / unlocked
    out["failed"] = sum(r["failed"] for r in out["worker"].values())
    print(f"\nlocked/unlocked tasks per second = {out['ratio_locked_unlocked']:.2f}")
    return out


def leftover_sessions(agent: ConsulAgent, worker: Any, wait: float) -> list[str]:
    """Our sessions (named ``celery-consul-lock HOST pid PID``) still at the agent ``wait``
    seconds after a burst whose PID is none of ``worker``'s live processes."""
    deadline = time.monotonic() + wait
    while True:
        live = {worker.pid, *worker.children()}
        stale = []
        for s in agent.api("/v1/session/list"):
            m = re.search(r"^celery-consul-lock .* pid (\d+)$", s.get("Name", ""))
            if m and int(m.group(1)) not in live:
                stale.append(s["Name"])
        if not stale or time.monotonic() > deadline:
            return stale
        time.sleep(0.2)


# -- the plot ------------------------------------------------------------------------------------


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """cycles/s and p50/p99 latency against lockers (PNG and SVG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = results["curve"]
    xs = sorted(int(n) for n in rows)
    fig, (rate, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"ours": "tab:blue", "txn": "tab:green", "floor": "tab:orange", "plain": "tab:gray"}
    labels = {
        "ours": "ours (ConsulLock acquire + release)",
        "txn": "txn (ours's two requests, raw)",
        "floor": "floor (raw ?acquire + ?release)",
        "plain": "2 plain KV PUTs",
    }
    for flow in FLOWS:
        rate.plot(xs, [rows[str(n)][flow]["cycles_per_s"] for n in xs], "o-", color=colors[flow], label=labels[flow])
        lat.plot(xs, [rows[str(n)][flow]["p50_ms"] for n in xs], "o-", color=colors[flow], label=f"{flow} p50")
        lat.plot(xs, [rows[str(n)][flow]["p99_ms"] for n in xs], "^--", color=colors[flow], alpha=0.6, label=f"{flow} p99")
    for n in xs:
        rate.annotate(
            f"{rows[str(n)]['ratio_ours_floor']:.2f}",
            (n, rows[str(n)]["ours"]["cycles_per_s"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="tab:blue",
        )
    for ax in (rate, lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(n) for n in xs])
        ax.set_xlabel("concurrent lockers (distinct keys)")
        ax.grid(alpha=0.3)
    rate.set_ylabel("cycles per second (each: 2 KV writes)")
    rate.set_title("throughput (numbers: ours/floor)")
    lat.set_ylabel("ms per cycle")
    lat.set_yscale("log")
    lat.set_title("cycle latency")
    rate.legend(fontsize=8)
    lat.legend(fontsize=7, ncol=3)
    consul = results["consul"]
    fig.suptitle(
        f"Consul v{consul['version']}: 3 servers (raft_multiplier 1, fdatasync {results['fsync']['median_ms']:.1f} ms) "
        "+ 1 client agent, "
        f"{os.cpu_count()} cores shared by all",
        fontsize=10,
    )
    return save(fig, folder / "capacity")


# -- main ----------------------------------------------------------------------------------------


def judge(rows: dict[int, dict[str, Any]]) -> bool:
    """Print the target's verdict at TARGET_LOCKERS (True when not measured there)."""
    if TARGET_LOCKERS not in rows:
        return True
    at = rows[TARGET_LOCKERS]
    met = bool(at["cycles_per_floor_write"] >= TARGET_RATIO)
    print(
        f"\nAt {TARGET_LOCKERS} lockers: locked cycles/s = {at['cycles_per_floor_write']:.3f} x the floor's writes/s "
        f"(target >= {TARGET_RATIO}; 0.5 = as fast as the floor, two writes per cycle): {'MET' if met else 'MISSED'}."
        f"\n  In cycles: ours/floor = {at['ratio_ours_floor']:.2f}; of it, Consul's cost of our acquire transaction"
        f" over a plain ?acquire= (txn/floor) = {at['ratio_txn_floor']:.2f},\n  our code's over the same requests sent"
        f" raw (ours/txn) = {at['ratio_ours_txn']:.2f}. Limit of ours there: {at['ours']['usage']['limit']}."
    )
    return met


# -- the servers' cost at equal rates ---------------------------------------------------------

#: (flow, lockers) pairs of part 4: ours and its two requests sent raw (txn), each at several
#: concurrencies, so that their rates overlap.
RATE_POINTS = (("ours", 16), ("txn", 16), ("ours", 8), ("txn", 8), ("txn", 6))


def equal_rates(topo: Topology, plan: Plan) -> dict[str, Any]:
    """The servers' CPU per cycle against the cycle rate, for ours and for the same requests
    sent raw: tells a cost of our requests (ours above txn at the same rate) from a cost of a
    lower rate (Raft batches fewer entries per log write, and the servers' fixed work is
    shared by fewer cycles)."""
    print(
        "\n4. The servers' CPU per cycle against the rate: ours and txn at several concurrencies "
        f"({plan.rounds} round(s) of {plan.seconds:g} s each)."
    )
    print(f"{'flow':>6} {'lockers':>7} {'cycles/s':>9} {'servers ms/cycle':>17} {'entries/write':>14}")
    rows = []
    for _ in range(plan.rounds):
        for flow, n in RATE_POINTS:
            p = run_point(topo, flow, n, plan)
            per = p.usage["cpu_ms_per_cycle"]
            row = {
                "flow": flow,
                "lockers": n,
                "cycles_per_s": p.cycles_per_s,
                "servers_ms_per_cycle": per.get("servers", float("nan")),
                "entries_per_write": p.usage["raft"]["entries_per_disk_write"],
            }
            rows.append(row)
            print(f"{flow:>6} {n:7d} {p.cycles_per_s:9.0f} {row['servers_ms_per_cycle']:17.2f} {row['entries_per_write']:14.1f}")
    ours = [r for r in rows if r["flow"] == "ours" and r["lockers"] == TARGET_LOCKERS]
    txn = [r for r in rows if r["flow"] == "txn"]
    rate = statistics.median(r["cycles_per_s"] for r in ours)
    mine = statistics.median(r["servers_ms_per_cycle"] for r in ours)
    theirs = cost_at(rate, [(r["cycles_per_s"], r["servers_ms_per_cycle"]) for r in txn if r["cycles_per_s"]])
    print(
        f"At ours' rate at {TARGET_LOCKERS} lockers ({rate:.0f} cycles/s) the servers spend {mine:.2f} ms per cycle of ours "
        f"and {theirs:.2f} ms per cycle of txn at that rate (fitted to txn's points): ratio {mine / theirs:.2f}."
    )
    return {"points": rows, "ours_rate": rate, "ours_servers_ms": mine, "txn_servers_ms_at_that_rate": theirs}


def cost_at(rate: float, points: list[tuple[float, float]]) -> float:
    """The cost per cycle at ``rate`` on the curve ``cost = a + b / rate`` fitted to
    ``points`` (rate, cost) by least squares: a per-cycle part and a part per second shared
    by the cycles of that second."""
    if len({x for x, _ in points}) < 2:
        return statistics.median(y for _, y in points) if points else float("nan")
    slope, intercept = statistics.linear_regression([1 / x for x, _ in points], [y for _, y in points])
    return intercept + slope / rate


def lockers_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--lockers must be positive integers separated by commas, got {text!r}")
    return values


#: The parts ``--skip`` can leave out.
PARTS = ("curve", "held", "keys", "rate")


def parts_list(text: str) -> set[str]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown}: --skip takes {', '.join(PARTS)}")
    return parts


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s per point, keys up to 10k, 30 churn tasks")
    parser.add_argument("--lockers", type=lockers_list, default=list(LOCKERS), help="concurrencies (default 1,4,16,64)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per point (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, default=0.0, help="measured seconds per point (default 10, --quick 3)")
    parser.add_argument("--procs", type=int, default=PROCS_MAX, help=f"at most this many locker processes (default {PROCS_MAX})")
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="pin the servers to half the CPUs and the client agent and lockers to the other half",
    )
    parser.add_argument("--churn", action="store_true", help="also measure session churn through a recycling celery worker")
    parser.add_argument("--celery", action="store_true", help="also run locked tasks through a threads-pool celery worker")
    parser.add_argument("--skip", type=parts_list, default=set(), help="parts to skip, comma-separated: curve, held, keys, rate")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument(
        "--plots", type=Path, metavar="DIR", help="write capacity.png and capacity.svg into DIR (needs matplotlib)"
    )
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw the plot of an earlier run's --json into --plots")
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.seconds < 0 or args.procs < 1:
        parser.error("--rounds and --seconds must not be negative, --procs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        for path in plot(json.loads(args.replot.read_text()), args.plots or Path(".")):
            print(f"wrote {path}")
        return 0
    plan = plan_of(args)
    skip = args.skip
    results: dict[str, Any] = {"plan": plan.__dict__, "cores": os.cpu_count()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="capacity-") as tmp:
        workdir = Path(tmp)
        results["fsync"] = fsync_probe(workdir)
        cluster = start_cluster(workdir, hcl=[TELEMETRY_HCL])
        agent: ConsulAgent | None = None
        redis_server: RedisServer | None = None
        try:
            agent = start_client_agent(workdir, cluster, CLIENT_BIND, "bench-node", hcl=[TELEMETRY_HCL])
            agent.wait_ready(timeout=60)
            topo = Topology(cluster, agent)
            if args.split_cores:
                global SERVER_CPUS
                SERVER_CPUS, app_cpus = split_cores(cluster, agent)
                results["split_cores"] = {"servers": sorted(SERVER_CPUS), "client agent and lockers": sorted(app_cpus)}
                print(
                    f"--split-cores: the 3 servers run on CPU(s) {sorted(SERVER_CPUS)}, the client agent and the lockers "
                    f"on {sorted(app_cpus)} (separate server and application hosts, on one machine)."
                )
            config = topo.leader.api("/v1/agent/self")
            results["consul"] = {
                "version": config["Config"]["Version"],
                "leader": topo.leader.node,
                "data_dir": "file-backed (not -dev)",
                "raft_election_timeout": config["DebugConfig"].get("ConsulRaftElectionTimeout"),
            }
            print(
                f"Consul v{results['consul']['version']}: 3 servers (127.0.0.11-13, raft_multiplier 1: election timeout "
                f"{results['consul']['raft_election_timeout']}, file-backed data dirs in {tmp}) and the lockers' client agent "
                f"{agent.address}; leader {topo.leader.node}.\nThis machine: {os.cpu_count()} cores shared by all of them "
                f"(and whatever else runs); 4 KiB write + fdatasync here: median {results['fsync']['median_ms']:.2f} ms, "
                f"p90 {results['fsync']['p90_ms']:.2f} ms."
            )
            if "curve" not in skip:
                print_curve_header(plan)
                rows = curve(topo, plan)
                results["curve"] = {str(n): r for n, r in rows.items()}
                errors = sum(r[f]["errors"] for r in rows.values() for f in FLOWS)
                ok = ok and errors == 0
                ok = judge(rows) and ok
            if "held" not in skip:
                held = held_locks(topo, plan)
                results["held"] = held
                ok = ok and all("error" not in r and not r["lost_count"] and not r["refused_count"] for r in held)
            if "keys" not in skip:
                results["keys"] = key_growth(topo, plan)
            if "rate" not in skip:
                results["rate"] = equal_rates(topo, plan)
            if args.churn or args.celery:
                redis_server = start_redis(workdir)
            if args.churn:
                results["churn"] = churn(topo, plan, workdir, redis_server.url)
                ok = ok and not results["churn"]["left_behind"] and not results["churn"]["failed"]
            if args.celery:
                results["celery"] = celery_tasks(topo, plan, workdir, redis_server.url)
                ok = ok and not results["celery"]["failed"]
        finally:
            try:
                close_sessions()
            finally:
                if redis_server is not None:
                    redis_server.stop()
                if agent is not None:
                    agent.stop()
                cluster.stop()
    results["ok"] = ok
    write_json(args.json, results)
    if args.plots and "curve" in results:
        for path in plot(results, args.plots):
            print(f"wrote {path}")
    print(f"\n{'OK' if ok else 'MISSED (see above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
