"""Ticks late and lost while one worker's Consul agent is down, beside a baseline without.

Run: ``python bench/agent_outage.py [--runs N] [--outage S] [--baseline S] [--json PATH]``

Starts, in a temporary directory, the standard topology of tests/outage.py: three Consul
servers (127.0.0.11-13), a client agent per node (127.0.0.21, .22), one ``celery worker`` of
``tests.proj.app`` (prefork, 2 processes) on each node's agent, and Redis. A thread sends
``proj.heartbeat`` with a tick id about every second (0.5-1.5 s apart), at its due time. Each run:

baseline  ticks for ``--baseline`` seconds, nothing failing;
outage    3 s of ticks, then node A's agent SIGKILLed for ``--outage`` seconds and started
          again; ticks go on until node A's worker has run 2 ticks after the restart.

Per tick: *late* is the time from its due time to the start of its run (as the task records
it). *Lost* ticks never ran, *doubled* ones ran twice. *Requeued* ticks ran from a copy that
node A's worker sent back. Exits 1 if any tick was lost or doubled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import write_json  # noqa: E402

from tests.outage import OutageScenario, Outcome  # noqa: E402
from tests.proj import app as proj  # noqa: E402
from tests.servers import have_loopback_aliases, start_cluster, start_redis, wait_consul_ready  # noqa: E402

CASES = ("baseline", "outage")


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def requeued(outcome: Outcome) -> int:
    return sum(1 for xs in outcome.runs.values() if any(x.get("requeues") for x in xs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--outage", type=float, default=20.0, help="seconds node A's agent stays down")
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of ticks without a failure, per run")
    parser.add_argument(
        "--probe-interval",
        type=float,
        help="consul_lock_agent_probe_interval of node A's worker (default 1 s); a long one leaves the detection to the runs "
        "that hit the outage, so that their hand-off is measured",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args()
    if not have_loopback_aliases():
        print("needs 127.0.0.11-22 on the loopback interface", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="bench-agent-outage-"))
    cluster = redis_server = scenario = None
    results: dict[str, list[Outcome]] = {case: [] for case in CASES}
    started = time.monotonic()
    try:
        cluster = start_cluster(workdir / "cluster")
        redis_server = start_redis(workdir / "redis")
        os.environ["REDIS_URL"] = redis_server.url
        proj.app.conf.broker_url = proj.app.conf.result_backend = redis_server.url
        sick_env = {"TEST_AGENT_PROBE_INTERVAL": str(args.probe_interval)} if args.probe_interval else {}
        scenario = OutageScenario(cluster, proj, redis_server.url, workdir, sick_env=sick_env).start()
        for n in range(args.runs):
            baseline = scenario.run(before=args.baseline, outage=None, after=0)
            wait_consul_ready(scenario.sick.agent, timeout=60)
            outage = scenario.run(before=3, outage=args.outage, after=3)
            for case, outcome in zip(CASES, (baseline, outage), strict=True):
                results[case].append(outcome)
                print(f"run {n + 1} {case:9} {outcome.summary()}", flush=True)
    finally:
        if scenario is not None:
            scenario.stop()
        if redis_server is not None:
            redis_server.stop()
        if cluster is not None:
            cluster.stop()

    probe = f"node A's agent probed every {args.probe_interval or 1:g} s"
    print(f"\n{args.runs} runs, {args.outage:g} s outage each, {probe}, in {time.monotonic() - started:.0f} s")
    print(f"{'case':10} {'ticks':>6} {'lost':>5} {'doubled':>8} {'late median':>12} {'p90':>7} {'max':>7} {'requeued':>9}")
    failed = False
    summary: dict[str, dict[str, float]] = {}
    for case in CASES:
        outcomes = results[case]
        late = [x for o in outcomes for x in o.lateness()]
        row = {
            "ticks": sum(len(o.sent) for o in outcomes),
            "lost": sum(len(o.lost) for o in outcomes),
            "doubled": sum(len(o.doubled) for o in outcomes),
            "late_median": statistics.median(late) if late else float("nan"),
            "late_p90": quantile(late, 0.9),
            "late_max": max(late, default=float("nan")),
            "requeued": sum(requeued(o) for o in outcomes),
        }
        summary[case] = row
        failed = failed or bool(row["lost"] or row["doubled"])
        print(
            f"{case:10} {row['ticks']:6d} {row['lost']:5d} {row['doubled']:8d} {row['late_median']:12.3f} "
            f"{row['late_p90']:7.3f} {row['late_max']:7.3f} {row['requeued']:9d}"
        )
    print("lost and doubled: 0 expected;", "FAILED" if failed else "OK")
    write_json(args.json, {"runs": args.runs, "outage": args.outage, "probe_interval": args.probe_interval, "summary": summary})
    if args.keep:
        print(f"logs in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
