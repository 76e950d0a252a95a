"""What the benchmarks share: the agent they measure against and how results are saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import ConsulAgent  # noqa: E402


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


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """Save a run's results (``--json PATH``), if asked."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2) + "\n")
