"""Real `celery beat -S consul` processes of the test project (tests/proj), and one worker,
for the beat tests and the command tests. Each process runs in its own process group and is
stopped by its pid (SIGCONT + SIGTERM, then SIGKILL of the group): the shared harness's
:class:`~celery_consul_lock.testing.Proc`."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from celery_consul_lock.testing import Proc, start_beat

from .servers import ROOT, wait_for
from .workers import Worker, start_worker, worker_env

INSTANCE_RE = re.compile(r"beat (\S+): joining the election")


@dataclass
class Beat(Proc):
    """One `celery beat -S consul` process of tests/proj (see :func:`start_beat`)."""

    #: The Consul agent it talks to, and its clock skew (``TEST_CLOCK_SKEW``), if any.
    address: str = ""
    skew: str | None = None

    @property
    def instance(self) -> str | None:
        m = INSTANCE_RE.search(self.log_text())
        return m.group(1) if m else None

    @property
    def pid(self) -> int:
        """The pid of the beat's python process, as its instance id says."""
        instance = self.instance
        return instance_pid(instance) if instance else self.popen.pid

    def elected_at(self) -> float | None:
        """When this beat was last elected, by its log (local time, to the millisecond)."""
        stamps = re.findall(
            r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/MainProcess\] beat \S+: elected leader", self.log_text(), re.M
        )
        if not stamps:
            return None
        when, ms = stamps[-1]
        return time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000

    def stop(self, timeout: float = 5) -> None:
        super().stop(timeout)


def instance_pid(instance: str) -> int:
    """``<host>-<pid>-<hex>`` -> pid (the host may contain dashes)."""
    return int(instance.rsplit("-", 2)[1])


@dataclass
class Harness:
    """Starts beats and one worker for a test, and stops all of them at its end."""

    proj: object
    redis_url: str
    workdir: Path
    beat_name: str = field(default_factory=lambda: f"beat-{uuid.uuid4().hex[:8]}")
    beats: list[Beat] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)
    #: More environment for every beat and worker (e.g. TEST_BEAT_TASK: the entry's task;
    #: TEST_BEAT_INTERVAL: the config entry's interval, default 1 s, "" for no beat_schedule).
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, consul_address: str, **extra: str) -> dict[str, str]:
        return worker_env(
            self.redis_url,
            consul_address,
            TEST_BEAT_NAME=self.beat_name,
            **{"TEST_BEAT_INTERVAL": "1", **self.extra_env, **extra},
        )

    def worker(self, consul_address: str) -> Worker:
        worker = start_worker(self.proj.app, self.workdir, self.env(consul_address), concurrency=2)
        self.workers.append(worker)
        return worker

    def beat(self, consul_address: str, *, skew: str | None = None) -> Beat:
        env = self.env(consul_address)
        if skew is not None:
            env["TEST_CLOCK_SKEW"] = skew.rstrip("s")
            env["PYTHONPATH"] = f"{ROOT / 'tests' / 'skew'}{os.pathsep}{env.get('PYTHONPATH', '')}"
        beat = start_beat(f"beat{len(self.beats)}", self.workdir, env, app_path="tests.proj.app", cwd=ROOT, kind=Beat)
        beat.address, beat.skew = consul_address, skew
        self.beats.append(beat)
        return beat

    def wait_joined(self, beats: list[Beat] | None = None) -> None:
        for beat in beats or self.beats:

            wait_for(lambda beat=beat: beat.instance is not None, 30, f"{beat.name} to join the election", procs=[beat])

    def by_instance(self, instance: str | None) -> Beat:
        for beat in self.beats:
            if beat.instance == instance:
                return beat
        raise AssertionError(f"no beat of ours is instance {instance!r}: {[b.instance for b in self.beats]}")

    def wait_ticks(self, pred, timeout: float, what: str) -> list[dict]:
        """The tick records once ``pred(records)`` holds; on timeout, say what the worker did."""
        r = redis.Redis.from_url(self.redis_url)

        def ready() -> list[dict] | None:
            xs = ticks(r)
            return xs if xs and pred(xs) else None

        try:
            return wait_for(ready, timeout, what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {len(ticks(r))} ticks ran; {self.worker_errors()}") from None
        finally:
            r.close()

    def worker_errors(self) -> str:
        lines = [line for w in self.workers for line in w.log_text().splitlines() if "ERROR" in line]
        return f"{len(lines)} errors in the worker log, the last: {lines[-1]!r}" if lines else "no errors in the worker log"

    def stop(self) -> None:
        for beat in self.beats:
            beat.stop()
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        out = [f"===== {b.name} ({b.instance}, skew {b.skew}):\n{b.log_text()[-4000:]}" for b in self.beats]
        for w in self.workers:
            errors = [line for line in w.log_text().splitlines() if "ERROR" in line or "WARNING" in line]
            out.append(f"===== worker {w.name}: {len(errors)} error/warning lines, the last ones:\n" + "\n".join(errors[-8:]))
        return "\n".join(out)


def ticks(r) -> list[dict]:
    return [x for x in (json.loads(v) for v in r.lrange("runs", 0, -1)) if x["kind"] == "tick"]


def skips(r) -> list[dict]:
    return [json.loads(v) for v in r.lrange("skips", 0, -1)]
