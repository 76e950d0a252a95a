"""`make demo`: an example project as a real cluster, its leader stopped twice; each tick runs once.

    make demo                    # the Django example (LeaderDatabaseScheduler on SQLite)
    make demo EXAMPLE=flask      # the Flask example (ConsulLeaderScheduler, -S consul)
    .venv/bin/python -m example_project.demo --example flask --seconds 30

Starts, in a run folder under .demo/, a Consul agent and Redis (the binaries scripts/provision.sh
found), 2 workers and 3 beats of the example, with a heartbeat every 2 s. Half-way it kills the
leading beat (SIGKILL), at three quarters it stops the next leader (SIGTERM). Then it stops
everything it started, by pid (also on Ctrl-C and on errors), and prints one line per tick
(which beat sent it, which worker ran it, how many times it ran), the failover times, the
duplicates and missed ticks, where each process's log is, and writes a timeline picture
(timeline.svg). It exits 1 if a tick ran twice or went missing, so the demo is also a check.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from celery_consul_lock.testing import start_consul, start_redis
from tests.servers import ROOT, binaries

from .analysis import analyse, describe
from .cluster import EXAMPLES, Status, example_cluster, run_scenario
from .timeline import render_svg

#: When the leader is stopped, as fractions of the run, and how.
PLAN = [(0.5, signal.SIGKILL), (0.75, signal.SIGTERM)]
#: Without a terminal (CI), a plain progress line this often.
PLAIN_EVERY = 10.0


class Progress:
    """One updating line on a terminal (``\\r``); occasional plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.last_plain = -PLAIN_EVERY
        self.last_state: tuple[str | None, int] = (None, 0)

    def __call__(self, s: Status) -> None:
        line = (
            f"{s.elapsed:5.1f} s / {s.duration:.0f} s   leader: {s.leader or '(none: failover)':16}  "
            f"ticks: {s.ticks:3}   failovers: {s.failovers}" + (f"   next: {s.next_event}" if s.next_event else "")
        )
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stdout.write("\r" + line[:width].ljust(width))
            sys.stdout.flush()
        elif s.elapsed - self.last_plain >= PLAIN_EVERY or (s.leader, s.failovers) != self.last_state:
            self.last_plain = s.elapsed
            print(line, flush=True)
        self.last_state = (s.leader, s.failovers)

    def done(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C, so every process started is stopped."""
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--example", choices=sorted(EXAMPLES), default="django", help="which example project (default django)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run from the first tick (default 60)")
    parser.add_argument("--beats", type=int, default=3, help="beat instances (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    parser.add_argument("--svg", type=Path, help="also write the timeline picture here (e.g. docs/demo-timeline.svg)")
    args = parser.parse_args(argv)
    example = EXAMPLES[args.example]
    run_dir = ROOT / ".demo" / f"{example.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    print(
        f"make demo EXAMPLE={example.name}: {args.beats} beats ({example.scheduler_label}), {args.workers} workers, "
        f"heartbeat every 2 s, {args.seconds:.0f} s; the leader gets SIGKILL at {PLAN[0][0]:.0%} and SIGTERM at "
        f"{PLAN[1][0]:.0%}.\nrun folder: {run_dir.relative_to(ROOT)}",
        flush=True,
    )
    progress = Progress(sys.stdout.isatty())
    binaries()  # the consul and redis-server binaries scripts/provision.sh found
    agent = start_consul(run_dir, node="demo")
    redis_server = None
    try:
        agent.wait_ready()
        redis_server = start_redis(run_dir)
        print(f"Consul agent {agent.address}, Redis {redis_server.url}; starting workers and beats...", flush=True)
        with example_cluster(example, agent.address, redis_server.url, run_dir) as cluster:
            obs = run_scenario(
                cluster, beats=args.beats, workers=args.workers, duration=args.seconds, plan=PLAN, progress=progress
            )
            progress.done()
    except KeyboardInterrupt:
        progress.done()
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    finally:
        if redis_server is not None:
            redis_server.stop()
        agent.stop()
    result = analyse(obs)
    print()
    print("\n".join(describe(obs, result)))
    svg = render_svg(obs, result)
    (run_dir / "timeline.svg").write_text(svg)
    if args.svg:
        args.svg.write_text(svg)
    print("\nlogs:")
    logs = {"consul": agent.proc.log, "redis": redis_server.proc.log, **obs.logs}
    for name, path in logs.items():
        print(f"  {name:8} {path.relative_to(ROOT)}")
    print(f"timeline: {(run_dir / 'timeline.svg').relative_to(ROOT)}" + (f" (and {args.svg})" if args.svg else ""))
    verdict = "OK: every tick ran exactly once, none missed" if result.ok else "FAILED: a tick ran twice or went missing"
    print(f"\n{verdict}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
