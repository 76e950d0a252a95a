"""Real `celery worker` processes of the test project (tests/proj), on the shared harness."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery_consul_lock import testing
from celery_consul_lock.testing import Worker

from .servers import ROOT

__all__ = ["ROOT", "Worker", "start_worker", "wait_results", "worker_env"]


def worker_env(redis_url: str, consul_address: str, **extra: str) -> dict[str, str]:
    """Our environment without CONSUL_*/CELERY_* variables, pointed at ``redis_url`` and
    ``consul_address``, with the repository on PYTHONPATH; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CELERY_"))}
    env.update(REDIS_URL=redis_url, CONSUL_HTTP_ADDR=consul_address, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def start_worker(
    app: Any, workdir: Path, env: dict[str, str], *, app_path: str = "tests.proj.app", cwd: Path = ROOT, **kw: Any
) -> Worker:
    """:func:`celery_consul_lock.testing.start_worker` of tests/proj, run from the repository."""
    return testing.start_worker(app, workdir, env, app_path=app_path, cwd=cwd, **kw)


def wait_results(results, timeout: float = 120) -> list:
    """Wait for every AsyncResult; returns their values (exceptions as values)."""
    deadline = time.monotonic() + timeout
    out = []
    for r in results:
        left = max(0.1, deadline - time.monotonic())
        out.append(r.get(timeout=left, propagate=False))
    return out
