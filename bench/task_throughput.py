"""What the lock costs a real Celery worker: task throughput and per-task runtime.

Run: ``python bench/task_throughput.py [--rounds N] [--tasks N] [--rates R,R,...]
[--paced-tasks N] [--workers N] [--concurrency N] [--json PATH]``

Starts its own Consul *server* agent with a data directory (not ``-dev``), a Redis
(broker and results) and two ``celery worker`` processes of ``tests.proj.app`` with four
prefork processes each (by default), in a temporary directory, and measures four cases:

unlocked  ``proj.noop``: a plain Celery no-op, the reference;
floor     ``proj.floor_noop`` with a different ``n`` for every task: the least any
          Consul-locked no-op can do, two raw writes (``PUT ?acquire=`` and ``PUT
          ?release=``) for a session made once per pool process, no value, no checks;
          what a Consul lock costs on this machine, whoever writes it (for reference);
distinct  ``proj.locked_noop`` with a different ``n`` for every task (never reused, not
          even across rounds): every run takes and releases a lock of its own;
shared    ``proj.shared_noop``: one key for all, so concurrent runs mostly skip (their
          result is ``{"consul_lock": "skipped", ...}``); runs and skips are counted.

in phases, each in rounds with the cases interleaved in rotating order, after a warm-up
batch of each case (the pool processes create their sessions and connections):

burst     N tasks (``--tasks``) sent at once; the workers run flat out, every core busy.
          Gives **tasks/s**: N / (last result - first send), the median over the rounds.
paced R   ``--paced-tasks`` tasks sent one by one at R tasks/s, for each R of
          ``--rates`` (default 50, 100 and 150: about a sixth, a third and a half of
          what the workers run flat out here): loads the workers keep up with, so the
          runtimes show the **added latency per task** when the task does not also queue
          for a CPU; the sent/s column shows the pace was kept.

A task's runtime is its execution time as Celery records it in the worker (``Task
...[id] succeeded in X s`` in the worker logs, ``-l INFO``); medians and p90 are over every
measured task of the case and phase. The *added latency* of a case is median(runtime of
the case) - median(runtime of unlocked), per phase; *over floor* is the part of it our
code adds beyond the two raw writes.

Targets (the issue's): added latency <= 3 ms at every paced rate, and throughput (burst)
>= 50 % of unlocked, for both locked cases. In the burst phase the added latency is
printed, not judged: with every core busy, each request to Consul waits for a CPU on both
sides, and the floor's two raw writes alone add several milliseconds there. Exits 1 if a
target is missed or a task failed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery.result import ResultSet  # noqa: E402
from common import start_server_agent, write_json  # noqa: E402

from celery_consul_lock import is_skipped  # noqa: E402
from tests.proj.app import app  # noqa: E402
from tests.servers import start_redis  # noqa: E402
from tests.workers import Worker, start_worker, worker_env  # noqa: E402

#: The lock may add at most this much to a task's median runtime ...
TARGET_ADDED_MS = 3.0
#: ... and a locked case must keep at least this share of the unlocked throughput.
TARGET_THROUGHPUT_RATIO = 0.50

CASES = {"unlocked": "proj.noop", "floor": "proj.floor_noop", "distinct": "proj.locked_noop", "shared": "proj.shared_noop"}
#: Cases whose every task has a key of its own (never reused, not even across rounds).
DISTINCT = ("floor", "distinct")
LOCKED = ("distinct", "shared")
#: Cases compared with unlocked: the floor for reference, the locked ones judged.
MEASURED = ("floor", *LOCKED)
#: Default shape of the worker fleet: 2 workers x 4 prefork processes.
WORKERS = 2
CONCURRENCY = 4
WARMUP = 40
RESULT_TIMEOUT = 120.0

SUCCEEDED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<id>[0-9a-f-]+)\] succeeded in (?P<secs>[0-9.eE+-]+)s:")


#: Default rates of the paced phases, tasks/s: about a sixth, a third and a half of what
#: 2 x 4 processes run flat out here (260-320 unlocked no-ops a second).
RATES = (50.0, 100.0, 150.0)
PACED_TASKS = 200


@dataclass
class CaseRun:
    """What one case did in one phase over the rounds."""

    walls: list[float] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    runs: int = 0
    skips: int = 0
    errors: list[str] = field(default_factory=list)


class Keys:
    """Hands out ranges of ``n`` never handed out before: distinct keys stay distinct
    across batches, phases and rounds."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, count: int) -> range:
        start, self.next = self.next, self.next + count
        return range(start, start + count)


def send_batch(case: str, ns: range, rate: float | None = None) -> tuple[float, list[str], list[object]]:
    """Send one task per ``n``, at once or ``rate`` per second, and wait for every result;
    returns (wall s, ids, values). The wall is from the first send to the last result,
    or, when paced, to the last send: the result backend's consumer sometimes answers a
    paced batch's last result half a second late, whatever the case, which would make
    the pace look uneven."""
    task = app.tasks[CASES[case]]
    t0 = time.perf_counter()
    results = []
    with app.producer_or_acquire() as producer:
        for i, n in enumerate(ns):
            if rate is not None:
                ahead = t0 + i / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the sender, not waiting for an outcome
            results.append(task.apply_async((n if case in DISTINCT else i,), producer=producer))
    sent = time.perf_counter() - t0
    values = ResultSet(results, app=app).join_native(timeout=RESULT_TIMEOUT, propagate=False)
    wall = time.perf_counter() - t0 if rate is None else sent
    return wall, [r.id for r in results], values


def tally(case: str, out: CaseRun, ids: list[str], values: list[object], ns: range) -> None:
    for i, (task_id, value) in enumerate(zip(ids, values, strict=True)):
        expected = ns[i] if case in DISTINCT else i
        if is_skipped(value):
            if case != "shared":
                out.errors.append(f"{task_id}: skipped on a key of its own: {value!r}")
            out.skips += 1
        elif value == expected:
            out.runs += 1
        else:
            out.errors.append(f"{task_id}: returned {value!r}, expected {expected!r}")


def run(rounds: int, phases: dict[str, tuple[int, float | None]]) -> dict[str, dict[str, CaseRun]]:
    """phase -> case -> what it did; ``phases``: name -> (tasks per batch, rate or None)."""
    keys = Keys()
    for case in CASES:  # warm-up: imports, sessions, connections in every pool process
        ns = keys.take(WARMUP)
        _, ids, values = send_batch(case, ns)
        warm = CaseRun()
        tally(case, warm, ids, values, ns)
        if warm.errors:
            raise RuntimeError(f"warm-up of {case} failed: {warm.errors[:3]}")

    out = {phase: {case: CaseRun() for case in CASES} for phase in phases}
    names = list(CASES)
    for r in range(rounds):
        for case in names[r % len(names) :] + names[: r % len(names)]:
            for phase, (count, pace) in phases.items():
                ns = keys.take(count)
                wall, ids, values = send_batch(case, ns, pace)
                done = out[phase][case]
                done.walls.append(wall)
                done.task_ids += ids
                tally(case, done, ids, values, ns)
    return out


def runtimes(workers: list[Worker]) -> dict[str, float]:
    """task id -> runtime in seconds, from the workers' "succeeded in" log lines."""
    found: dict[str, float] = {}
    for worker in workers:
        for m in SUCCEEDED.finditer(worker.log_text()):
            found[m["id"]] = float(m["secs"])
    return found


def leftover_processes(pgids: list[int]) -> list[int]:
    """Live (non-zombie) processes still in the workers' process groups."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if int(fields[2]) in pgids and fields[0] != "Z":
            left.append(int(stat.parent.name))
    return left


def stats(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[8],
        "n": len(ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all cases, in rotating order (default 5)")
    parser.add_argument("--tasks", type=int, default=400, help="burst: tasks sent at once per case and round (default 400)")
    parser.add_argument(
        "--paced-tasks", type=int, default=PACED_TASKS, help=f"paced: tasks per case and round (default {PACED_TASKS})"
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=list(RATES),
        help=f"paced: tasks sent per second, one phase per rate (default {','.join(f'{r:g}' for r in RATES)})",
    )
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"celery worker processes (default {WORKERS})")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help=f"prefork processes per worker (default {CONCURRENCY})"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.workers < 1 or args.concurrency < 1 or min(args.tasks, args.paced_tasks) < 10:
        parser.error("--rounds, --workers and --concurrency must be at least 1, --tasks and --paced-tasks at least 10")
    if not args.rates or min(args.rates) <= 0:
        parser.error("--rates must be positive numbers")
    phases: dict[str, tuple[int, float | None]] = {"burst": (args.tasks, None)}
    phases.update({f"paced {rate:g}/s": (args.paced_tasks, rate) for rate in args.rates})

    with tempfile.TemporaryDirectory(prefix="task-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        agent, info = start_server_agent(tmp)
        redis_server = None
        workers: list[Worker] = []
        try:
            redis_server = start_redis(tmp)
            app.conf.broker_url = app.conf.result_backend = redis_server.url
            env = worker_env(redis_server.url, agent.address)
            try:
                for _ in range(args.workers):
                    workers.append(start_worker(app, tmp, env, pool="prefork", concurrency=args.concurrency))
                print(f"Consul v{info['version']}, server agent with data dir {info['data_dir']} at {info['address']}")
                print(
                    f"{args.workers} workers x {args.concurrency} prefork processes; {args.rounds} rounds, cases in "
                    f"rotating order, after {WARMUP} warm-up tasks of each; per case and round: burst {args.tasks} "
                    f"tasks sent at once; paced {args.paced_tasks} tasks at each of {', '.join(f'{r:g}' for r in args.rates)}/s"
                )
                results = run(args.rounds, phases)
            finally:
                pgids = [w.pid for w in workers]
                for worker in workers:
                    worker.stop()
            left = leftover_processes(pgids)
            if left:
                raise RuntimeError(f"worker processes left after stop: {left}")
            seen = runtimes(workers)
        finally:
            try:
                if redis_server is not None:
                    redis_server.stop()
            finally:
                agent.stop()

    errors: list[str] = []
    report = {phase: summarize(phase, cases, seen, errors) for phase, cases in results.items()}
    added = {
        phase: {case: rows[case]["median_ms"] - rows["unlocked"]["median_ms"] for case in MEASURED}
        for phase, rows in report.items()
    }
    burst = report["burst"]
    ratio = {case: burst[case]["tasks_per_s"] / burst["unlocked"]["tasks_per_s"] for case in MEASURED}
    paced = [phase for phase in report if phase != "burst"]
    ok = (
        not errors
        and all(added[phase][c] <= TARGET_ADDED_MS for phase in paced for c in LOCKED)
        and all(ratio[c] >= TARGET_THROUGHPUT_RATIO for c in LOCKED)
    )

    for phase, rows in report.items():
        print()
        rate_label = "tasks/s" if phase == "burst" else "sent/s"
        print(f"{phase:14}{rate_label:>9}{'median runtime ms':>19}{'p90 runtime ms':>16}{'runs':>7}{'skips':>7}")
        for case, r in rows.items():
            print(f"{case:14}{r['tasks_per_s']:9.0f}{r['median_ms']:19.3f}{r['p90_ms']:16.3f}{r['runs']:7d}{r['skips']:7d}")
    print()
    print(f"added latency, ms (target <= {TARGET_ADDED_MS:g} ms when paced; burst not judged)")
    print(f"{'':14}{'floor':>8}{'distinct':>10}{'shared':>8}{'over floor: distinct':>22}{'shared':>8}")
    for phase, row in added.items():
        over = [row[c] - row["floor"] for c in LOCKED]
        print(f"{phase:14}{row['floor']:8.3f}{row['distinct']:10.3f}{row['shared']:8.3f}{over[0]:22.3f}{over[1]:8.3f}")
    print()
    for case in MEASURED:
        target = f" (target >= {TARGET_THROUGHPUT_RATIO:.0%})" if case in LOCKED else ""
        print(f"throughput {case}/unlocked (burst) = {ratio[case]:.0%}{target}")
    for e in errors:
        print(f"ERROR {e}")
    print("OK" if ok else "MISSED")

    write_json(
        args.json,
        {
            "consul": info,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "tasks": args.tasks,
            "paced_tasks": args.paced_tasks,
            "rates": args.rates,
            "warmup": WARMUP,
            "results": report,
            "added_latency_ms": added,
            "throughput_ratio": ratio,
            "targets": {
                "added_latency_ms_max (every paced rate)": TARGET_ADDED_MS,
                "throughput_ratio_min (burst)": TARGET_THROUGHPUT_RATIO,
            },
            "errors": errors,
            "ok": ok,
        },
    )
    return 0 if ok else 1


def summarize(phase: str, cases: dict[str, CaseRun], seen: dict[str, float], errors: list[str]) -> dict[str, dict[str, Any]]:
    """Per case of one phase: tasks/s over the rounds and runtime statistics; problems
    are appended to ``errors``."""
    rows: dict[str, dict[str, Any]] = {}
    for case, r in cases.items():
        samples = [seen[i] for i in r.task_ids if i in seen]
        missing = len(r.task_ids) - len(samples)
        if missing:
            errors.append(f"{phase} {case}: {missing} tasks without a 'succeeded in' log line")
        errors += [f"{phase} {case}: {e}" for e in r.errors[:5]]
        per_round = len(r.task_ids) // len(r.walls)
        tps = [per_round / w for w in r.walls]
        rows[case] = {
            "tasks_per_s": statistics.median(tps),
            "tasks_per_s_min": min(tps),
            "tasks_per_s_max": max(tps),
            **stats(samples),
            "runs": r.runs,
            "skips": r.skips,
            "errors": len(r.errors),
        }
    return rows


if __name__ == "__main__":
    sys.exit(main())
