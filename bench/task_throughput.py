"""What the lock costs a real Celery worker: task throughput and per-task runtime.

Run: ``python bench/task_throughput.py [--rounds N] [--tasks N] [--workers N] [--concurrency N] [--json PATH]``

Starts its own Consul *server* agent with a data directory (not ``-dev``), a Redis
(broker and results) and two ``celery worker`` processes of ``tests.proj.app`` with four
prefork processes each (by default), in a temporary directory, and measures three cases:

unlocked  ``proj.noop``: a plain Celery no-op, the reference;
distinct  ``proj.locked_noop`` with a different ``n`` for every task (never reused, not
          even across rounds): every run takes and releases a lock of its own;
shared    ``proj.shared_noop``: one key for all, so concurrent runs mostly skip (their
          result is ``{"consul_lock": "skipped", ...}``); runs and skips are counted.

Each case sends N tasks at once and waits for all their results; the cases run
interleaved in rounds, in rotating order, after a warm-up batch of each (the pool
processes create their Consul sessions and connections then). Reported per case:

tasks/s   N / (last result - first send), the median over the rounds;
runtime   each task's execution time as Celery records it in the worker
          (``Task ...[id] succeeded in X s`` in the worker logs, ``-l INFO``): median and
          p90 over every measured task of the case.

The lock's *added latency per task* is median(runtime of the case) - median(runtime of
unlocked). Exits 1 if an added latency or a throughput ratio misses its target, or if
a task failed.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery.result import ResultSet  # noqa: E402
from common import agent_info, write_json  # noqa: E402

from celery_consul_lock import is_skipped  # noqa: E402
from tests.proj.app import app  # noqa: E402
from tests.servers import start_consul, start_redis, wait_consul_ready  # noqa: E402
from tests.workers import Worker, start_worker, worker_env  # noqa: E402

#: The lock may add at most this much to a task's median runtime ...
TARGET_ADDED_MS = 3.0
#: ... and a locked case must keep at least this share of the unlocked throughput.
TARGET_THROUGHPUT_RATIO = 0.50

CASES = {"unlocked": "proj.noop", "distinct": "proj.locked_noop", "shared": "proj.shared_noop"}
LOCKED = ("distinct", "shared")
#: Default shape of the worker fleet: 2 workers x 4 prefork processes.
WORKERS = 2
CONCURRENCY = 4
WARMUP = 40
RESULT_TIMEOUT = 120.0

SUCCEEDED = re.compile(r"Task (?P<name>[\w.]+)\[(?P<id>[0-9a-f-]+)\] succeeded in (?P<secs>[0-9.eE+-]+)s:")


@dataclass
class CaseRun:
    """What one case did over the rounds."""

    walls: list[float] = field(default_factory=list)
    sends: list[float] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    runs: int = 0
    skips: int = 0
    errors: list[str] = field(default_factory=list)


def send_batch(case: str, ns: range) -> tuple[float, float, list[str], list[object]]:
    """Send one task per ``n`` at once, wait for every result; (wall s, send s, ids, values)."""
    task = app.tasks[CASES[case]]
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer:
        results = [task.apply_async((n if case == "distinct" else i,), producer=producer) for i, n in enumerate(ns)]
    sent = time.perf_counter() - t0
    values = ResultSet(results, app=app).join_native(timeout=RESULT_TIMEOUT, propagate=False)
    wall = time.perf_counter() - t0
    return wall, sent, [r.id for r in results], values


def tally(case: str, out: CaseRun, ids: list[str], values: list[object], ns: range) -> None:
    for i, (task_id, value) in enumerate(zip(ids, values, strict=True)):
        expected = ns[i] if case == "distinct" else i
        if is_skipped(value):
            if case != "shared":
                out.errors.append(f"{task_id}: skipped on a key of its own: {value!r}")
            out.skips += 1
        elif value == expected:
            out.runs += 1
        else:
            out.errors.append(f"{task_id}: returned {value!r}, expected {expected!r}")


def run(rounds: int, tasks: int) -> dict[str, CaseRun]:
    next_n = itertools.count(step=tasks)  # distinct keys: a fresh range of n for every batch

    def batch_range() -> range:
        start = next(next_n)
        return range(start, start + tasks)

    for case in CASES:  # warm-up: imports, sessions, connections in every pool process
        start = next(next_n)
        ns = range(start, start + WARMUP)
        _, _, ids, values = send_batch(case, ns)
        warm = CaseRun()
        tally(case, warm, ids, values, ns)
        if warm.errors:
            raise RuntimeError(f"warm-up of {case} failed: {warm.errors[:3]}")

    out = {case: CaseRun() for case in CASES}
    names = list(CASES)
    for r in range(rounds):
        for case in names[r % len(names) :] + names[: r % len(names)]:
            ns = batch_range()
            wall, sent, ids, values = send_batch(case, ns)
            out[case].walls.append(wall)
            out[case].sends.append(sent)
            out[case].task_ids += ids
            tally(case, out[case], ids, values, ns)
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
    parser.add_argument("--tasks", type=int, default=400, help="tasks sent at once per case and round (default 400)")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"celery worker processes (default {WORKERS})")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help=f"prefork processes per worker (default {CONCURRENCY})"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks < 10 or args.workers < 1 or args.concurrency < 1:
        parser.error("--rounds, --workers and --concurrency must be at least 1, --tasks at least 10")

    with tempfile.TemporaryDirectory(prefix="task-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        agent = start_consul(tmp, dev=False, node="bench", server_args=["-bootstrap-expect=1"])
        redis_server = None
        workers: list[Worker] = []
        try:
            wait_consul_ready(agent)
            info = agent_info(agent)
            if not info["server"] or info["dev_mode"] or not info["data_dir"]:
                raise RuntimeError(f"expected a server agent with a data directory, got {info}")
            redis_server = start_redis(tmp)
            app.conf.broker_url = app.conf.result_backend = redis_server.url
            env = worker_env(redis_server.url, agent.address)
            try:
                for _ in range(args.workers):
                    workers.append(start_worker(app, tmp, env, pool="prefork", concurrency=args.concurrency))
                print(f"Consul v{info['version']}, server agent with data dir {info['data_dir']} at {info['address']}")
                print(
                    f"{args.workers} workers x {args.concurrency} prefork processes; {args.rounds} rounds x {args.tasks} tasks "
                    f"of each case sent at once, rotating order, after {WARMUP} warm-up tasks of each"
                )
                results = run(args.rounds, args.tasks)
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

    report: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for case, r in results.items():
        samples = [seen[i] for i in r.task_ids if i in seen]
        missing = len(r.task_ids) - len(samples)
        if missing:
            errors.append(f"{case}: {missing} tasks without a 'succeeded in' log line")
        errors += [f"{case}: {e}" for e in r.errors[:5]]
        tps = [args.tasks / w for w in r.walls]
        report[case] = {
            "tasks_per_s": statistics.median(tps),
            "tasks_per_s_min": min(tps),
            "tasks_per_s_max": max(tps),
            "send_s_median": statistics.median(r.sends),
            **stats(samples),
            "runs": r.runs,
            "skips": r.skips,
            "errors": len(r.errors),
        }

    base = report["unlocked"]
    added = {case: report[case]["median_ms"] - base["median_ms"] for case in LOCKED}
    ratio = {case: report[case]["tasks_per_s"] / base["tasks_per_s"] for case in LOCKED}
    ok = not errors and all(added[c] <= TARGET_ADDED_MS and ratio[c] >= TARGET_THROUGHPUT_RATIO for c in LOCKED)

    print()
    print(f"{'case':10}{'tasks/s':>9}{'median runtime ms':>19}{'p90 runtime ms':>16}{'runs':>7}{'skips':>7}")
    for case, r in report.items():
        print(f"{case:10}{r['tasks_per_s']:9.0f}{r['median_ms']:19.3f}{r['p90_ms']:16.3f}{r['runs']:7d}{r['skips']:7d}")
    print()
    for case, label in (("distinct", "distinct keys"), ("shared", "shared key")):
        print(f"added latency ({label}) = {added[case]:.3f} ms (target <= {TARGET_ADDED_MS:g} ms)")
        print(f"throughput {case}/unlocked = {ratio[case]:.0%} (target >= {TARGET_THROUGHPUT_RATIO:.0%})")
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
            "warmup": WARMUP,
            "results": report,
            "added_latency_ms": added,
            "throughput_ratio": ratio,
            "targets": {"added_latency_ms_max": TARGET_ADDED_MS, "throughput_ratio_min": TARGET_THROUGHPUT_RATIO},
            "errors": errors,
            "ok": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
