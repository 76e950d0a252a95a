"""`make demo-cron`: the same cron line on three "nodes", each slot run exactly once.

    make demo-cron
    .venv/bin/python -m example_project.demo_cron --slots 4 --every 12

Starts a Consul agent (in a run folder under .demo/), then for each of a few slots of
``--every 12`` starts three wrappers as three nodes' crons would, with the same line:

    celery-consul-lock run --key locks/demo-backup --every 12 --on-held wait -- sh -c '<the job>'

Node a and node b start on time; node c starts 4 s late (a slow node, a clock behind: after the
first run finished). In the second slot the wrapper running the job is SIGKILLed mid-run: its
lock frees within its health check's TTL plus the lock-delay, and a waiting node runs the slot.
Then it prints, per slot, who ran it and what every node decided, and exits 1 unless every slot
ran to completion exactly once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from celery_consul_lock.cron import EXIT_SKIPPED
from celery_consul_lock.testing import Proc, spawn, wait_for
from tests.servers import ROOT, binaries, start_consul, wait_consul_ready

WRAPPER = str(Path(sys.executable).parent / "celery-consul-lock")
#: The three nodes and how late each one's cron fires, in seconds.
NODES = {"a": 0.0, "b": 0.0, "c": 4.0}
#: The slot (counting from 0) whose running wrapper is SIGKILLed mid-run.
KILLED_SLOT = 1
#: What the job does: note its start, work for a second and a half, note its end.
JOB = 'echo "start $NODE $CELERY_CONSUL_LOCK_SLOT" >> "$RUNS"; sleep 1.5; echo "done $NODE $CELERY_CONSUL_LOCK_SLOT" >> "$RUNS"'


@dataclass
class Invocation:
    node: str
    slot: int
    proc: Proc
    killed: bool = False

    def decision(self) -> str:
        """What the wrapper decided, from its last stderr line."""
        if self.killed:
            return "SIGKILLed mid-run"
        lines = [line for line in self.proc.log_text().splitlines() if line.startswith("celery-consul-lock run:")]
        status = self.proc.returncode
        # "celery-consul-lock run: key K, slot S: DECISION; holder: H" -> DECISION
        last = lines[-1].split(": ", 2)[-1].rpartition("; holder: ")[0] if lines else "(no output)"
        return f"exit {status}{' (skipped)' if status == EXIT_SKIPPED else ''}: {last}"


def run(slots: int, every: float, workdir: Path) -> int:
    binaries()  # the consul binary scripts/provision.sh found (exports CONSUL_BIN)
    consul = start_consul(workdir / "consul")
    invocations: list[Invocation] = []
    try:
        wait_consul_ready(consul)
        runs = workdir / "runs"
        runs.touch()
        env = {**os.environ, "CONSUL_HTTP_ADDR": consul.address, "RUNS": str(runs)}
        args = ["--key", "locks/demo-backup", "--every", f"{every:g}", "--ttl", "10", "--lock-delay", "1", "--on-held", "wait"]
        first = (time.time() // every + 1) * every
        print(f"Consul at {consul.address}; {slots} slots of --every {every:g} from {_hms(first)}; nodes {', '.join(NODES)}")
        print(f"node c starts {NODES['c']:g} s late; the running node of slot {KILLED_SLOT + 1} is SIGKILLed mid-run\n")
        starts = sorted((first + i * every + late, i, name) for i in range(slots) for name, late in NODES.items())
        for at, slot, name in starts:
            time.sleep(max(0.0, at - time.time()))
            proc = spawn(
                f"slot{slot + 1}-{name}", [WRAPPER, "run", *args, "--", "sh", "-c", JOB], workdir, env={**env, "NODE": name}
            )
            invocations.append(Invocation(name, slot, proc))
            if slot == KILLED_SLOT and name == "b":
                _kill_the_runner(invocations, slot, f"demo-backup@{_iso(first + slot * every)}", runs)
        for inv in invocations:
            inv.proc.wait(60)
        return _report(invocations, runs, slots)
    finally:
        for inv in invocations:
            if inv.proc.alive():
                inv.proc.kill()  # SIGKILL of its process group
        consul.stop()


def _kill_the_runner(invocations: list[Invocation], slot: int, tick: str, runs: Path) -> None:
    """SIGKILL the wrapper whose job started for ``tick`` (the wrapper alone: the kernel then
    sends its job SIGTERM, PR_SET_PDEATHSIG)."""
    mine = {inv.node: inv for inv in invocations if inv.slot == slot}

    def runner() -> str | None:
        for line in runs.read_text().splitlines():
            what, node, ran = line.split()
            if what == "start" and ran == tick and node in mine:
                return node
        return None

    # Both wrappers run until the job has started (one runs it, the other waits for the lock).
    name = wait_for(runner, 30, f"a job to start in slot {slot + 1}", procs=[inv.proc for inv in mine.values()])
    victim = mine[name]
    victim.proc.signal(signal.SIGKILL)
    victim.killed = True
    print(f"{_hms(time.time())} slot {slot + 1}: SIGKILLed node {name}'s wrapper while its job ran")


def _report(invocations: list[Invocation], runs: Path, slots: int) -> int:
    done: dict[str, list[str]] = {}
    started: dict[str, list[str]] = {}
    for line in runs.read_text().splitlines():
        what, node, tick = line.split()
        (done if what == "done" else started).setdefault(tick, []).append(node)
    ticks = sorted({*done, *started})
    ok = len(ticks) == slots and all(len(done.get(t, [])) == 1 for t in ticks)
    print()
    for i, tick in enumerate(ticks):
        completed = ", ".join(done.get(tick, [])) or "NOBODY"
        print(f"slot {i + 1} {tick}: completed by {completed}; started by {', '.join(started[tick])}")
        for inv in sorted((inv for inv in invocations if inv.slot == i), key=lambda inv: inv.node):
            print(f"    node {inv.node}: {inv.decision()}")
    print(f"\nOK: {slots} slots, each ran to completion exactly once" if ok else "\nFAILED: a slot ran twice or never")
    print(f"logs: {runs.parent}")
    return 0 if ok else 1


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hms(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--every", type=float, default=12.0, help="seconds between slots (at least 10: node c starts 4 s late)")
    opts = parser.parse_args()
    workdir = ROOT / ".demo" / f"cron-{int(time.time())}"
    workdir.mkdir(parents=True)
    return run(opts.slots, opts.every, workdir)


if __name__ == "__main__":
    sys.exit(main())
