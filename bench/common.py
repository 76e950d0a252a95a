"""What the benchmarks share: the agent they measure against and how results are saved.

The servers and processes come from the shared harness (celery_consul_lock.testing, through
tests/servers.py), with the binaries scripts/provision.sh found (exported on import here).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import ConsulAgent, binaries, start_consul  # noqa: E402

binaries()  # CONSUL_BIN / REDIS_BIN for the harness


def agent_info(agent: ConsulAgent) -> dict[str, object]:
    """Version, and whether the agent is a server with a data directory (not -dev)."""
    self_info = agent.api("/v1/agent/self")
    config, debug = self_info["Config"], self_info.get("DebugConfig", {})
    return {
        "version": config["Version"],
        "server": bool(config["Server"]),
        "data_dir": debug.get("DataDir"),
        "dev_mode": bool(debug.get("DevMode")),
        "address": agent.address,
    }


def start_server_agent(workdir: Path) -> tuple[ConsulAgent, dict[str, object]]:
    """What the benchmarks measure against: a one-server Consul agent with a data directory
    (writes go through raft and disk, unlike -dev), ready; with its :func:`agent_info`."""
    agent = start_consul(workdir, dev=False, node="bench", server_args=["-bootstrap-expect=1"])
    try:
        agent.wait_ready()
        info = agent_info(agent)
        if not info["server"] or info["dev_mode"] or not info["data_dir"]:
            raise RuntimeError(f"expected a server agent with a data directory, got {info}")
    except BaseException:
        agent.stop()
        raise
    return agent, info


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Save a run's results (``--json PATH``), if asked."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")


def save(fig: Any, stem: Path) -> list[Path]:
    """Write the matplotlib figure ``fig`` as ``stem``.png and ``stem``.svg, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in out:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def stats(samples: list[float]) -> dict[str, float]:
    """Median, p90, mean and min in milliseconds of samples in seconds."""
    ms = [s * 1000 for s in samples]
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[8],
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "n": len(ms),
    }


def interleave(
    methods: dict[str, Callable[[], None]],
    rounds: int,
    iterations: int,
    warmup: int,
    after: Callable[[], None] = lambda: None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """Time each flow ``iterations`` times per round, the flows in rotating order each round
    (so machine noise hits them alike), after ``warmup`` untimed cycles; ``after()`` runs
    untimed after each call. Returns per flow the statistics of all its samples, and per
    round each flow's median."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
            after()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    per_round: list[dict[str, float]] = []
    names = list(methods)
    orders = (names[r % len(names) :] + names[: r % len(names)] for r in itertools.count())
    for _ in range(rounds):
        medians = {}
        for name in next(orders):
            fn, out = methods[name], []
            for _ in range(iterations):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
                after()
            samples[name] += out
            medians[name] = statistics.median(out)
        per_round.append(medians)
    return {name: stats(s) for name, s in samples.items()}, per_round


def interleaved_args(description: str, rounds: int, iterations: int, argv: list[str] | None) -> argparse.Namespace:
    """The command line of an interleaved benchmark: ``--rounds``, ``--iterations`` (each at
    least 1) and ``--json PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds, help=f"rounds of all flows, in rotating order (default {rounds})")
    parser.add_argument("--iterations", type=int, default=iterations, help=f"iterations of each per round (default {iterations})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iterations < 1:
        parser.error("--rounds and --iterations must be at least 1")
    return args
