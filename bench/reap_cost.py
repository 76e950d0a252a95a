"""What reaping costs: lock cycles on distinct keys with and without their removal, and a sweep.

Run: ``python bench/reap_cost.py [--rounds N] [--iterations N] [--keys N ...] [--json PATH]``

Starts its own Consul server agent with a data directory (writes go through raft and disk)
in a temporary directory, and times, interleaved in rounds (rotating order):

kept    ``ConsulLock.acquire()`` + ``release()`` on a new key each time, with
        ``reap_after`` one hour: nothing is removed during the run (the baseline: KV grows
        by one key per cycle);
reaped  the same with ``reap_after`` 0.2 s: the releasing process's reaper thread removes
        each key (one read, one check-and-set delete) while the next cycles run.

Then, for each ``--keys`` count: a sweep of a prefix holding that many released keys still
in their keep time (it reads and judges each, removes none), median of 5; and the sweep that
removes all of them once their keep time has passed (64 deletes per transaction).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import interleave, start_server_agent, write_json  # noqa: E402

from celery_consul_lock import ConsulLock, ConsulSettings, close_sessions  # noqa: E402
from celery_consul_lock.consul import LOCK_FLAG, ConsulClient, kv_set  # noqa: E402
from celery_consul_lock.reap import sweep  # noqa: E402

WARMUP = 20
#: About the size of a released task lock's value (holder, task id, released_at, keep_until).
VALUE = {
    "released_at": "2026-11-30T10:00:00.000+00:00",
    "acquired_at": "2026-11-30T10:00:00.000+00:00",
    "session": "s" * 36,
    "host": "worker-1",
    "pid": 1234,
    "started": 123456,
    "pidns": "pid:[4026531836]",
    "name": "proj.report",
    "task_id": "t" * 36,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both flows (default 5)")
    parser.add_argument("--iterations", type=int, default=200, help="cycles of each flow per round (default 200)")
    parser.add_argument("--keys", type=int, nargs="+", default=[1000, 10000], help="prefix sizes to sweep")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        agent, info = start_server_agent(Path(tmp))
        try:
            results = {"agent": info, "cycles": cycles(agent.address, args.rounds, args.iterations)}
            results["sweeps"] = [sweeps(agent.address, n) for n in args.keys]
        finally:
            close_sessions()
            agent.stop()
    write_json(args.json, results)
    return 0


def cycles(address: str, rounds: int, iterations: int) -> dict[str, object]:
    counter = itertools.count()
    flows = {}
    for name, reap_after in (("kept", 3600.0), ("reaped", 0.2)):
        settings = ConsulSettings(address=address, key_prefix=f"{name}/", reap_after=reap_after)

        def cycle(settings: ConsulSettings = settings) -> None:
            lock = ConsulLock(f"locks/k{next(counter)}/.lock", settings=settings)
            lock.acquire()
            lock.release()

        flows[name] = cycle
    overall, per_round = interleave(flows, rounds, iterations, WARMUP)
    ratio = statistics.median(r["reaped"] / r["kept"] for r in per_round)
    time.sleep(1.0)  # the last keys' keep time
    client = ConsulClient(ConsulSettings(address=address))
    left = {name: len(client.kv_list(f"{name}/")[1]) for name in flows}
    client.close()
    print(f"distinct-key lock cycles, {rounds} rounds x {iterations} (median ms of all cycles):")
    for name, s in overall.items():
        print(f"  {name:7} {s['median_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms  keys left in KV: {left[name]}")
    print(f"  reaped/kept: {ratio:.2f} (median of the rounds' ratios)")
    return {"flows": overall, "reaped_over_kept": ratio, "keys_left": left}


def sweeps(address: str, n: int) -> dict[str, float]:
    settings = ConsulSettings(address=address, key_prefix=f"sweep{n}/", reap_after=3600.0)
    client = ConsulClient(settings)
    fill(client, settings, n, time.time() + 3600)
    judged = []
    for _ in range(5):
        t0 = time.perf_counter()
        report = sweep(client, settings)
        judged.append(time.perf_counter() - t0)
    assert not report.removed
    fill(client, settings, n, 1.0)  # released long ago
    t0 = time.perf_counter()
    removed = len(sweep(client, settings).removed)
    removing = time.perf_counter() - t0
    client.close()
    assert removed == n, removed
    print(
        f"sweep of {n} keys: {statistics.median(judged) * 1000:.0f} ms (median of 5, none due); "
        f"removing all {n}: {removing * 1000:.0f} ms"
    )
    return {"keys": n, "sweep_ms": statistics.median(judged) * 1000, "remove_all_ms": removing * 1000}


def fill(client: ConsulClient, settings: ConsulSettings, n: int, keep_until: float) -> None:
    """``n`` free lock keys under the prefix, released with ``keep_until``, 64 to a transaction."""
    value = json.dumps({**VALUE, "keep_until": keep_until}).encode()
    keys = [f"{settings.key_prefix}locks/report-{i}/.lock" for i in range(n)]
    for start in range(0, n, 64):
        client.txn([{"KV": kv_set(key, value, flags=LOCK_FLAG)} for key in keys[start : start + 64]])


if __name__ == "__main__":
    sys.exit(main())
