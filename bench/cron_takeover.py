"""A node's cron wrapper SIGKILLed mid-run: how soon another node's waiting one runs the job.

Run: ``python bench/cron_takeover.py [--runs N] [--ttl S] [--lock-delay S]``

Starts a Consul dev agent in a temporary directory. Each run, per tool, on a key of its own:
a holder starts a job that sleeps, a second invocation waits for the same key, the holder
(the wrapper process alone) is SIGKILLed, and the time until the waiting invocation's job
starts is measured.

consul-lock   ``consul lock PREFIX CMD`` as holder and waiter (its session has a TTL of 15 s,
              Consul's default lock-delay of 15 s, no check of its own: a killed holder's
              key waits for the TTL, up to 2 x TTL, then the lock-delay)
run           ``celery-consul-lock run --on-held wait`` as holder and waiter, with
              ``--ttl`` / ``--lock-delay`` (default 15 / 15, the package's defaults): its
              session is tied to a health check that expires 3 renewal intervals after the
              wrapper's last pass, then the lock-delay
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_consul_lock.testing import Proc, spawn, wait_for  # noqa: E402
from tests.servers import binaries, start_consul, wait_consul_ready  # noqa: E402

WRAPPER = str(Path(sys.executable).parent / "celery-consul-lock")
#: A holder's job starts within seconds; a waiter's after the holder's key frees (consul lock:
#: up to 2 x TTL + lock-delay, 45 s with its defaults); room for a loaded machine.
START_TIMEOUT = 60.0
TAKEOVER_TIMEOUT = 180.0


def argv(tool: str, address: str, prefix: str, job: str, opts: argparse.Namespace) -> list[str]:
    if tool == "consul-lock":
        return [binaries()[0], "lock", f"-http-addr={address}", prefix, job]
    options = ["--on-held", "wait", "--wait-timeout", "300", "--ttl", str(opts.ttl), "--lock-delay", str(opts.lock_delay)]
    return [WRAPPER, "run", "--key", prefix, "--cron", "* * * * *", *options, "--", "sh", "-c", job]


def one(tool: str, address: str, workdir: Path, n: int, opts: argparse.Namespace) -> float:
    prefix = f"locks/bench-takeover-{tool}-{os.getpid()}-{n}"
    first, second = workdir / f"{tool}-{n}-first", workdir / f"{tool}-{n}-second"
    env = {**os.environ, "CONSUL_HTTP_ADDR": address}
    # Both jobs keep running once started, so that either tool's process exiting is a failure.
    holder = spawn(f"{tool}-{n}-holder", argv(tool, address, prefix, f"touch {first}; exec sleep 300", opts), workdir, env=env)
    waiter: Proc | None = None
    try:
        wait_for(first.exists, START_TIMEOUT, f"{tool}'s holder job to start", interval=0.01, procs=[holder])
        waiter = spawn(
            f"{tool}-{n}-waiter", argv(tool, address, prefix, f"touch {second}; exec sleep 300", opts), workdir, env=env
        )
        time.sleep(3)  # the waiter is waiting on the key
        waiter.check_alive()
        holder.signal(signal.SIGKILL)  # the holder process alone: its job is left to the kernel
        killed = time.monotonic()
        wait_for(second.exists, TAKEOVER_TIMEOUT, f"{tool}'s waiter job to start", interval=0.01, procs=[waiter])
        return time.monotonic() - killed
    finally:
        for p in (holder, waiter):
            if p is not None:
                p.kill()  # SIGKILL of its process group, and reaped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=15.0)
    parser.add_argument("--lock-delay", type=float, default=15.0)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cron-takeover-") as tmp:
        workdir = Path(tmp)
        binaries()  # the binaries scripts/provision.sh found (exports CONSUL_BIN)
        agent = start_consul(workdir / "consul")
        try:
            wait_consul_ready(agent)
            print(f"SIGKILL of the running holder -> the waiting node's job starts ({opts.runs} runs each)")
            medians = {}
            for tool in ("consul-lock", "run"):
                took = [one(tool, agent.address, workdir, n, opts) for n in range(opts.runs)]
                medians[tool] = statistics.median(took)
                print(f"  {tool:12} median {medians[tool]:6.2f} s   runs {', '.join(f'{t:.2f}' for t in took)}", flush=True)
            print(f"  ratio run / consul-lock: {medians['run'] / medians['consul-lock']:.2f}")
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
