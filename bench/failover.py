"""How fast a leader-elected beat fails over: graceful stops, crashes and stalls of the leader.

Run: ``python bench/failover.py [--rounds N] [--interval S] [--stall-timeout S] [--standby log|consul] [--json PATH]``

Starts its own Consul *server* agent with a data directory (not ``-dev``), a Redis (broker
and results) and one ``celery worker`` of ``tests.proj.app`` (prefork, 2 processes) in a
temporary directory, and keeps two ``celery beat -S consul`` instances of it running, with
the ``heartbeat`` entry due every ``--interval`` seconds (``proj.heartbeat`` records each
tick it runs, with the instance that sent it, in the Redis list ``runs``). Then, N times
each, alternating:

graceful  SIGTERM to the leader (it releases the lock on its way out);
crash     SIGKILL to the leader (its session dies with its health check's TTL, then the
          lock-delay keeps the key for a while);
stall     the leader's next send hangs inside the publish (the test project's hook, while
          the file ``stall-<pid>`` exists): after ``--stall-timeout`` (the beats'
          consul_lock_beat_stall_timeout, default 8 s, the least accepted) it steps down.
          Once a standby leads, the stalled beat is let go (its hung message must be
          dropped by the worker) and then killed.

The leader is the instance of the latest tick record (``<host>-<pid>-<hex>``: its pid
names the process). Per failover, measured from the moment of the signal (for a stall,
from the moment the send began to hang, as the hook recorded it):

takeover  until the standby logs "elected leader" (the beat log's own timestamp);
dispatch  until the first tick sent by another instance ran on the worker (the tick
          record's time: it includes the wait for the next due time and the worker).

After each failover a fresh beat replaces the stopped one, and the next round starts once
its log says "standing by" — which a beat says only when its first 10 s wait for the lock
ends, so each round lasts at least that long. ``--standby consul`` starts the next round
0.5 s after Consul lists the fresh beat's election session instead. Over the whole run,
no tick id may run twice. Exits 1 if the graceful takeover median exceeds 1 s, the crash
takeover max exceeds 5 s, a stall takeover exceeds the documented bound (stall timeout +
crash bound), or a tick ran twice.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from common import start_server_agent, write_json  # noqa: E402

from celery_consul_lock.beat import BeatConfig  # noqa: E402
from celery_consul_lock.testing import Proc, start_beat  # noqa: E402
from tests.beats import instance_pid  # noqa: E402
from tests.proj.app import app  # noqa: E402
from tests.servers import ConsulAgent, start_redis, wait_for  # noqa: E402
from tests.workers import Worker, start_worker, worker_env  # noqa: E402

#: Median takeover after a graceful stop (the leader releases the lock) ...
TARGET_GRACEFUL_MEDIAN = 1.0
#: ... and the slowest takeover after a crash (check TTL + lock-delay + retry, with margin).
TARGET_CRASH_MAX = 5.0
#: Longest wait for a takeover or a dispatch before the run is declared failed.
EVENT_TIMEOUT = 20.0
#: Longest wait for a fresh beat to stand by (its first election wait lasts 10 s).
STANDBY_TIMEOUT = 40.0
#: --standby consul: a fresh beat stands by this long after Consul lists its session.
SESSION_SETTLE = 0.5
POLL = 0.02
#: Default --stall-timeout: the least a beat accepts with the default consul_lock_timeout.
STALL_TIMEOUT = 8.0
KINDS = ("graceful", "crash", "stall")

LINE = re.compile(r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] (?P<msg>.*)$", re.M)
JOINING = re.compile(r"beat (?P<instance>\S+): joining the election")
STATES = {"elected leader": "leader", "standing by": "standby", "lost leadership": "lost"}


def log_time(stamp: str) -> float:
    """A Celery log timestamp (local time, milliseconds) as a Unix time."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Beat(Proc):
    """One ``celery beat`` process we started (the shared harness's Proc), numbered ``n``."""

    n: int = 0
    started: float = 0.0
    stopped: float | None = None
    instance: str | None = None
    session_seen: float | None = None  # when Consul first listed its election session

    def events(self) -> list[tuple[float, str]]:
        """(log time, state) of every election state change this beat logged."""
        out = []
        for m in LINE.finditer(self.log_text()):
            msg = m["msg"]
            if self.instance is None and (j := JOINING.search(msg)):
                self.instance = j["instance"]
            for needle, state in STATES.items():
                if msg.startswith("beat ") and needle in msg:
                    out.append((log_time(m["ts"]), state))
        return out

    def state(self) -> str | None:
        events = self.events()
        return events[-1][1] if events else None


@dataclass
class Round:
    kind: str
    old: str
    new: str
    takeover: float
    dispatch: float
    exit_s: float | None = None  # graceful: how long the old leader took to exit
    exit_code: int | None = None


@dataclass
class Fleet:
    tmp: Path
    env: dict[str, str]
    agent: ConsulAgent
    beat_name: str
    standby: str  # "log" or "consul": how a fresh beat is known to stand by
    stall_timeout: float
    beats: list[Beat] = field(default_factory=list)

    def standing_by(self, beat: Beat) -> bool:
        state = beat.state()
        if state == "standby" or self.standby == "log" or state is not None or beat.instance is None:
            return state == "standby"
        # In the election without having said so yet (it says so when its first 10 s wait
        # for the lock ends): its session exists, and it has had time to find the lock held.
        if beat.session_seen is None:
            names = {s.get("Name") for s in self.agent.api("/v1/session/list") or []}
            if f"celery beat {self.beat_name} {beat.instance}" in names:
                beat.session_seen = time.monotonic()
            return False
        return time.monotonic() - beat.session_seen >= SESSION_SETTLE

    def start(self) -> Beat:
        n = len(self.beats)
        beat = start_beat(f"beat{n}", self.tmp, self.env, app_path="tests.proj.app", cwd=ROOT, kind=Beat)
        beat.n, beat.started = n, time.time()
        self.beats.append(beat)
        return beat

    def running(self) -> list[Beat]:
        return [b for b in self.beats if b.alive() and b.stopped is None]

    def by_pid(self, pid: int) -> Beat | None:
        return next((b for b in self.running() if b.pid == pid), None)

    def stop_all(self) -> None:
        for beat in self.beats:  # all at once, then each by its pid
            if beat.alive():
                beat.signal(signal.SIGTERM)
        for beat in self.beats:
            beat.stop()


class Runs:
    """The tick records in the Redis list ``runs``, read incrementally."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.ticks: list[dict] = []
        self._seen = 0

    def poll(self) -> list[dict]:
        new = self.r.lrange("runs", self._seen, -1)
        self._seen += len(new)
        for raw in new:
            rec = json.loads(raw)
            if rec.get("kind") == "tick":
                self.ticks.append(rec)
        return self.ticks

    def skips(self) -> collections.Counter:
        return collections.Counter(json.loads(s)["reason"] for s in self.r.lrange("skips", 0, -1))


def wait_standby(fleet: Fleet, beat: Beat) -> None:
    wait_for(lambda: fleet.standing_by(beat), STANDBY_TIMEOUT, f"beat{beat.n} to stand by", interval=0.1, procs=[beat])


def current_leader(fleet: Fleet, runs: Runs, interval: float) -> Beat:
    """The beat that sent the latest tick, which must be recent and its log must agree."""

    def find() -> Beat | None:
        ticks = runs.poll()
        if not ticks or time.time() - ticks[-1]["t"] > 2 * interval + 1:
            return None
        return fleet.by_pid(instance_pid(ticks[-1]["instance"]))

    leader = wait_for(find, EVENT_TIMEOUT, "a recent tick from a running beat", interval=0.05)
    if leader.state() != "leader":
        raise RuntimeError(f"beat{leader.n} sent the latest tick but its log says {leader.state()!r}")
    return leader


def failover(kind: str, fleet: Fleet, runs: Runs, interval: float) -> Round:
    time.sleep(random.uniform(0, interval))  # stop at a random point of the tick cycle
    leader = current_leader(fleet, runs, interval)
    old = runs.ticks[-1]["instance"]
    others = [b for b in fleet.running() if b is not leader]
    if len(others) != 1 or not fleet.standing_by(others[0]):
        raise RuntimeError(f"expected one standby besides beat{leader.n}, got {[(b.n, b.state()) for b in others]}")
    standby = others[0]
    seen_events = len(standby.events())
    seen_ticks = len(runs.poll())

    stall = fleet.tmp / f"stall-{leader.pid}"
    if kind == "stall":
        stall.touch()
        t_stop = wait_for(lambda: hook_time(fleet.tmp / f"stalled-{leader.pid}"), EVENT_TIMEOUT, "the send to hang")
    else:
        t_stop = time.time()
        if kind == "graceful":
            os.kill(leader.pid, signal.SIGTERM)
        else:
            os.killpg(leader.pid, signal.SIGKILL)
    leader.stopped = t_stop

    takeover = dispatch = exited = None
    deadline = time.monotonic() + EVENT_TIMEOUT + (fleet.stall_timeout if kind == "stall" else 0)
    while (takeover is None or dispatch is None) and time.monotonic() < deadline:
        if exited is None and leader.popen.poll() is not None:
            exited = time.time() - t_stop
        if takeover is None:
            elected = [t for t, s in standby.events()[seen_events:] if s == "leader"]
            if elected:
                takeover = elected[0] - t_stop
        if dispatch is None:
            later = [x["t"] for x in runs.poll()[seen_ticks:] if x["instance"] != old]
            if later:
                dispatch = min(later) - t_stop
        time.sleep(POLL)
    if takeover is None or dispatch is None:
        raise RuntimeError(
            f"{kind} stop of beat{leader.n}: no {'takeover' if takeover is None else 'dispatch'} "
            f"within {EVENT_TIMEOUT:g} s; standby log tail:\n{standby.log_text()[-800:]}"
        )
    new = next(x["instance"] for x in runs.ticks[seen_ticks:] if x["instance"] != old)
    if instance_pid(new) != standby.pid:
        raise RuntimeError(f"a tick came from {new}, not from the standby beat{standby.n} (pid {standby.pid})")

    result = Round(kind, old, new, takeover, dispatch)
    if kind == "stall":  # let the hung send go, then stop the beat like the others
        stall.unlink()
        wait_for(lambda: hook_time(fleet.tmp / f"woke-{leader.pid}"), EVENT_TIMEOUT, "the stalled send to return")
        os.kill(leader.pid, signal.SIGTERM)
    try:
        result.exit_code = leader.popen.wait(10)
        if kind == "graceful":
            result.exit_s = exited if exited is not None else time.time() - t_stop
    except subprocess.TimeoutExpired:
        result.exit_code = None
    leader.kill()

    fresh = fleet.start()
    wait_standby(fleet, fresh)
    return result


def hook_time(path: Path) -> float | None:
    """The time the stall hook wrote into ``path``, once it has."""
    return json.loads(path.read_text())["t"] if path.exists() and path.stat().st_size else None


def summarize(rounds: list[Round], kind: str) -> dict[str, float]:
    mine = [r for r in rounds if r.kind == kind]
    take, disp = [r.takeover for r in mine], [r.dispatch for r in mine]
    return {
        "n": len(mine),
        "takeover_median": statistics.median(take),
        "takeover_max": max(take),
        "dispatch_median": statistics.median(disp),
        "dispatch_max": max(disp),
    }


def log_complaints(tmp: Path) -> collections.Counter:
    """WARNING and ERROR lines of the beat and worker logs, by file kind and message (ids,
    addresses and numbers blurred so that repeats count together)."""
    found: collections.Counter = collections.Counter()
    for log in sorted(tmp.glob("beat*.log")) + sorted(tmp.glob("worker-*.log")):
        kind = "beat" if log.name.startswith("beat") else "worker"
        for m in LINE.finditer(log.read_text(errors="replace")):
            head = m.group(0)[: m.start("msg") - m.start()]
            if "WARNING/" in head or "ERROR/" in head or "CRITICAL/" in head:
                msg = re.sub(r"[0-9a-f]{6,}(-[0-9a-f]{4,})*|\d+(\.\d+)?", "#", m["msg"])[:160]
                found[f"{kind}: {head.split(': ')[1].split('/')[0]} {msg}"] += 1
    return found


def print_complaints(complaints: collections.Counter) -> None:
    print(f"warnings/errors in the beat and worker logs: {sum(complaints.values())}")
    for msg, n in complaints.most_common(5):
        print(f"  {n:4d} x {msg}")


def leftover(pgids: list[int]) -> list[int]:
    out = subprocess.run(["pgrep", "-g", ",".join(map(str, pgids))], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="failovers of each kind, alternating (default 10)")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between heartbeat ticks (default 1; tick ids have whole-second resolution)",
    )
    parser.add_argument(
        "--standby",
        choices=("log", "consul"),
        default="log",
        help="a fresh beat stands by when its log says so (default; about 10 s after it joins), or (consul) "
        f"{SESSION_SETTLE:g} s after Consul lists its election session: a shorter run",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=STALL_TIMEOUT,
        help=f"the beats' consul_lock_beat_stall_timeout (default {STALL_TIMEOUT:g} s, the least accepted)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.interval <= 0:
        parser.error("--rounds must be at least 1 and --interval positive")

    t_begin = time.monotonic()
    app.conf.consul_lock_beat_stall_timeout = args.stall_timeout
    config = BeatConfig.from_app(app)  # refuses a stall timeout the beats would refuse
    bound, stall_bound = config.crash_failover_bound, config.stall_failover_bound
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp_name:
        tmp = Path(tmp_name)
        agent, info = start_server_agent(tmp)
        redis_server = None
        worker: Worker | None = None
        fleet: Fleet | None = None
        failure: Exception | None = None
        try:
            redis_server = start_redis(tmp)
            app.conf.broker_url = app.conf.result_backend = redis_server.url
            env = worker_env(
                redis_server.url,
                agent.address,
                TEST_BEAT_INTERVAL=f"{args.interval:g}",
                TEST_BEAT_STALL_TIMEOUT=f"{args.stall_timeout:g}",
                TEST_STALL_DIR=str(tmp),
            )
            runs = Runs(redis_server.url)
            fleet = Fleet(tmp, env, agent, config.name, args.standby, args.stall_timeout)
            first = [fleet.start(), fleet.start()]  # they elect a leader while the worker starts
            worker = start_worker(app, tmp, env, pool="prefork", concurrency=2)
            wait_for(lambda: sum(b.state() == "leader" for b in first) == 1, 60, "a leader among the first two beats")
            for b in first:
                if b.state() != "leader":
                    wait_standby(fleet, b)
            print(
                f"Consul v{info['version']} server agent with data dir {info['data_dir']}; 1 worker x 2 prefork; "
                f"2 beats, heartbeat every {args.interval:g} s, stall timeout {args.stall_timeout:g} s; "
                f"{args.rounds} graceful + {args.rounds} crash + {args.rounds} stall failovers, in turn; "
                f"a fresh beat stands by per its {args.standby}"
            )
            for i in range(len(KINDS) * args.rounds):
                kind = KINDS[i % len(KINDS)]
                rounds.append(failover(kind, fleet, runs, args.interval))
                r = rounds[-1]
                print(f"  {i + 1:2d} {kind:8} takeover {r.takeover:6.3f} s  dispatch {r.dispatch:6.3f} s", flush=True)
            time.sleep(args.interval + 0.5)  # let the last ticks land
            ticks = runs.poll()
            skips = runs.skips()
        except Exception as exc:
            failure = exc
        finally:
            try:
                if fleet is not None:
                    fleet.stop_all()
                if worker is not None:
                    worker.stop()
            finally:
                try:
                    if redis_server is not None:
                        redis_server.stop()
                finally:
                    agent.stop()
        pgids = [agent.proc.pid]
        pgids += [redis_server.proc.pid] if redis_server is not None else []
        pgids += [worker.pid] if worker is not None else []
        pgids += [b.pid for b in fleet.beats] if fleet is not None else []
        left = leftover(pgids)
        complaints = log_complaints(tmp)
        if failure is not None or left or complaints:
            keep = Path(tempfile.mkdtemp(prefix="failover-logs-"))
            for log in tmp.glob("*.log"):
                shutil.copy(log, keep)
            print(f"logs with warnings or errors kept in {keep}")
        if failure is not None or left:
            if failure is not None and not isinstance(failure, (RuntimeError, AssertionError)):
                traceback.print_exception(failure)
            print_complaints(complaints)
            print(f"FAILED: {failure or f'processes left after stop: {left}'} (logs kept in {keep})")
            return 1
    elapsed = time.monotonic() - t_begin

    ids = collections.Counter(x["tick"] for x in ticks)
    duplicates = sum(c - 1 for c in ids.values() if c > 1)
    missing_id = sum(1 for x in ticks if not x["tick"])
    bad_exits = [r for r in rounds if r.kind == "graceful" and r.exit_code != 0]
    report = {kind: summarize(rounds, kind) for kind in KINDS}
    checks = {
        "graceful takeover median": (report["graceful"]["takeover_median"], TARGET_GRACEFUL_MEDIAN),
        "crash takeover max": (report["crash"]["takeover_max"], TARGET_CRASH_MAX),
        "stall takeover max": (report["stall"]["takeover_max"], stall_bound),
    }
    ok = all(v <= target for v, target in checks.values()) and duplicates == 0 and missing_id == 0

    print()
    print(f"{'':10}{'n':>4}{'takeover med':>14}{'max':>8}{'dispatch med':>14}{'max':>8}   target")
    targets = {
        "graceful": f"takeover median <= {TARGET_GRACEFUL_MEDIAN:g} s",
        "crash": f"takeover max <= {TARGET_CRASH_MAX:g} s (documented bound {bound:.2f} s)",
        "stall": f"takeover max <= stall timeout + crash bound = {stall_bound:.2f} s",
    }
    for kind, s in report.items():
        print(
            f"{kind:10}{s['n']:4d}{s['takeover_median']:14.3f}{s['takeover_max']:8.3f}"
            f"{s['dispatch_median']:14.3f}{s['dispatch_max']:8.3f}   {targets[kind]}"
        )
    print()
    print(
        f"ticks run: {len(ticks)}, distinct ids: {len(ids)}, duplicates: {duplicates} (target 0), "
        f"without id: {missing_id}; skipped by the worker: {dict(skips) or 0}"
    )
    graceful_exits = [r.exit_s for r in rounds if r.exit_s is not None]
    if graceful_exits:
        print(f"graceful leader exit: median {statistics.median(graceful_exits):.3f} s, max {max(graceful_exits):.3f} s")
    if bad_exits:
        print(f"graceful stops without exit code 0: {[(r.old, r.exit_code) for r in bad_exits]}")
    over_bound = sum(1 for r in rounds if r.kind == "crash" and r.takeover > bound)
    print(f"crash takeovers over the documented bound: {over_bound}")
    stalls = [r.takeover - args.stall_timeout for r in rounds if r.kind == "stall"]
    print(
        f"stall takeovers over the documented bound: {sum(1 for r in rounds if r.kind == 'stall' and r.takeover > stall_bound)}; "
        f"after the stall timeout: median {statistics.median(stalls):.3f} s, max {max(stalls):.3f} s"
    )
    print_complaints(complaints)
    for name, (value, target) in checks.items():
        print(f"{name} = {value:.3f} s (target <= {target:g} s) {'OK' if value <= target else 'MISSED'}")
    print(f"{'OK' if ok else 'MISSED'}   run time {elapsed:.0f} s")

    write_json(
        args.json,
        {
            "interval": args.interval,
            "standby": args.standby,
            "rounds": [r.__dict__ for r in rounds],
            "summary": report,
            "ticks": len(ticks),
            "duplicates": duplicates,
            "skips": dict(skips),
            "documented_crash_bound": bound,
            "stall_timeout": args.stall_timeout,
            "documented_stall_bound": stall_bound,
            "targets": {"graceful_takeover_median": TARGET_GRACEFUL_MEDIAN, "crash_takeover_max": TARGET_CRASH_MAX},
            "elapsed_s": elapsed,
            "ok": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
