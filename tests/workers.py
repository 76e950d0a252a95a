"""Real `celery worker` processes for the behaviour tests (and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .servers import ROOT, wait_for


@dataclass
class Worker:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole process group."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def worker_env(redis_url: str, consul_address: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CELERY_"))}
    env.update(REDIS_URL=redis_url, CONSUL_HTTP_ADDR=consul_address, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def start_worker(
    app,
    workdir: Path,
    env: dict[str, str],
    *,
    pool: str = "prefork",
    concurrency: int = 4,
    app_path: str = "tests.proj.app",
    extra_args: list[str] | None = None,
    hostname: str | None = None,
    cwd: Path = ROOT,
) -> Worker:
    """Start `celery worker` and wait until it answers a ping; with ``hostname``, in a UTS
    namespace of its own with that host name (as root: a worker on "another host"); in
    ``cwd`` (files a worker writes there, such as a ``-S`` state database, stay in the test's
    directory)."""
    name = f"w{uuid.uuid4().hex[:6]}@test"
    log = workdir / f"worker-{name.split('@')[0]}.log"
    args = [
        sys.executable, "-m", "celery", "-A", app_path, "worker", "-n", name, "-P", pool, "-c", str(concurrency),
        "--without-heartbeat", "--without-mingle", "--without-gossip", "-l", "INFO", *(extra_args or []),
    ]  # fmt: skip
    if hostname is not None:
        args = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *args]
    with log.open("wb") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    worker = Worker(name, popen, log)

    def ready() -> bool:
        if popen.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.log_text()[-3000:]}")
        return bool(app.control.ping(destination=[name], timeout=0.5))

    try:
        wait_for(ready, 60, f"worker {name} to answer ping", interval=0.2)
    except BaseException:
        worker.stop()
        raise
    return worker


def wait_results(results, timeout: float = 120) -> list:
    """Wait for every AsyncResult; returns their values (exceptions as values)."""
    deadline = time.monotonic() + timeout
    out = []
    for r in results:
        left = max(0.1, deadline - time.monotonic())
        out.append(r.get(timeout=left, propagate=False))
    return out
