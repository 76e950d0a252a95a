"""Lock race: several processes race for ``locks/backup/.lock``; exactly one runs the job.

    .venv/bin/python -m example_project.lock_race [-n 5]

(`make demo` runs the cluster demo, example_project/demo.py.)

Starts a real Consul agent (the binary scripts/provision.sh found), then N processes at the
same instant, each doing what a cron job guarded by celery-consul-lock does: try the lock,
run the "backup" if it got it, else report who holds it and exit. Prints what each process
did and exits non-zero unless exactly one ran the job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_consul_lock.testing import start_consul  # noqa: E402
from tests.servers import binaries  # noqa: E402

CONTENDER = """
import json, os, sys, time
from celery_consul_lock import ConsulLock
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time()))
lock = ConsulLock("locks/backup/.lock", name=f"backup-{sys.argv[2]}")
if lock.acquire(blocking=False):
    t0 = time.time()
    time.sleep(float(sys.argv[3]))  # the backup job
    print(json.dumps({"who": sys.argv[2], "pid": os.getpid(), "ran": True, "token": lock.fencing_token,
                      "seconds": round(time.time() - t0, 2)}))
    lock.release()
else:
    h = lock.last_holder
    print(json.dumps({"who": sys.argv[2], "pid": os.getpid(), "ran": False,
                      "holder": str(h) if h else "nobody (lock-delay)"}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--processes", type=int, default=5, help="contending processes (default 5)")
    parser.add_argument("--job-seconds", type=float, default=2.0, help="how long the backup job runs (default 2)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ccl-demo-") as tmp:
        binaries()
        agent = start_consul(Path(tmp), node="demo")
        try:
            agent.wait_ready()
            print(f"Consul agent at {agent.url}; {args.processes} processes race for locks/backup/.lock\n")
            env = {"CONSUL_HTTP_ADDR": agent.address, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
            start_at = time.time() + 1.5
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", CONTENDER, str(start_at), f"node{i + 1}", str(args.job_seconds)],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for i in range(args.processes)
            ]
            reports = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        finally:
            agent.stop()
    for r in sorted(reports, key=lambda r: not r["ran"]):
        if r["ran"]:
            print(f"  {r['who']:6} pid {r['pid']:<7} RAN the backup ({r['seconds']} s, fencing token {r['token']})")
        else:
            print(f"  {r['who']:6} pid {r['pid']:<7} skipped: held by {r['holder']}")
    winners = sum(r["ran"] for r in reports)
    print(
        f"\n{winners} of {len(reports)} processes ran the job "
        + ("(OK: exactly one)" if winners == 1 else "(WRONG: expected exactly one)")
    )
    return 0 if winners == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
