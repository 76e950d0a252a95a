"""What the benchmarks share: the agent they measure against and how results are saved.

The servers and processes come from the shared harness (celery_consul_lock.testing, through
tests/servers.py), with the binaries scripts/provision.sh found (exported on import here).
"""

from __future__ import annotations

import json
import sys
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
