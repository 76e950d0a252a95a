"""Celery's shutdown kinds (5.5+) and the task locks held by running ConsulLockedTask bodies,
with real prefork workers and the Consul dev agent.

Worker A runs ``proj.ticked`` (acks_late, reject_on_worker_lost, a tick id) for BODY seconds,
holding ``locks/proj.ticked/.lock``; worker B stands by. Then A is signalled:
- warm (SIGTERM; a second SIGTERM is ignored by Celery): the body runs to its end, and the
  key is released then;
- cold (SIGQUIT): Celery terminates the pool process (SIGTERM, raised in the body as
  SystemExit), the key is released at once, and the message goes back to the queue;
- soft (SIGQUIT with ``worker_soft_shutdown_timeout``): the same, after the soft timeout;
  a second SIGQUIT ends the wait at once.
The test watches the key in Consul (when another holder could take it) and which worker runs
the body to its end: exactly one run completes, and no redelivered copy is wrongly skipped.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from celery_consul_lock import TICK_HEADER

from .servers import wait_for
from .workers import start_worker, worker_env

KEY = "locks/proj.ticked/.lock"
BODY = 12.0
#: Signal (or soft timeout) -> the key free: the pool process's SIGTERM reaches the body at
#: once (time.sleep is interrupted), then one release request. Far under TTL + lock-delay
#: (10 + 2 s here), which a key left to its dead session would take.
FREE_BOUND = 2.0

CASES = {
    # name: (signals sent, 0.5 s apart; worker_soft_shutdown_timeout; the body is interrupted)
    "warm": (["SIGTERM"], None, False),
    "warm-twice": (["SIGTERM", "SIGTERM"], None, False),
    "cold": (["SIGQUIT"], None, True),
    "soft": (["SIGQUIT"], 3.0, True),
    "soft-then-cold": (["SIGQUIT", "SIGQUIT"], 8.0, True),
}


def records(r, kind: str) -> list[dict]:
    return [x for x in (json.loads(v) for v in r.lrange("runs", 0, -1)) if x["kind"] == kind]


@pytest.mark.parametrize("case", list(CASES))
def test_which_shutdown_frees_a_running_tasks_lock_at_once_and_its_redelivery_runs(case, proj, consul, redis_server, r, tmp_path):
    sigs, soft, interrupted = CASES[case]
    extra = {"TEST_SOFT_SHUTDOWN_TIMEOUT": f"{soft:g}"} if soft else {}
    env = worker_env(redis_server.url, consul.address, **extra)
    a = start_worker(proj.app, tmp_path, env, concurrency=1)
    b = None
    try:
        consul.api(f"/v1/kv/{KEY}", "DELETE")
        result = proj.ticked.apply_async(kwargs={"seconds": BODY}, headers={TICK_HEADER: f"shutdown-{case}@2026-01-01T00:00:00Z"})
        started = wait_for(lambda: records(r, "start"), 20, "the body to start")[0]
        assert started["pid"] in a.children()
        b = start_worker(proj.app, tmp_path, env, concurrency=1)

        def holder() -> str | None:
            b.check_alive()
            entry = consul.api(f"/v1/kv/{KEY}") or [{}]
            return entry[0].get("Session")

        assert holder(), "the running body does not hold its key"
        # 1. Signal A.
        sent: list[float] = []
        for i, name in enumerate(sigs):
            if i:
                time.sleep(0.5)  # the operator's second signal, half a second later
            sent.append(time.time())
            a.popen.send_signal(getattr(signal, name))
        # 2. When is the key free for another holder?
        wait_for(lambda: not holder(), BODY + 10, "the key to be freed", interval=0.02)
        free_at = time.time()
        if not interrupted:
            expected = started["t"] + BODY  # the body's end
        elif len(sigs) > 1:
            expected = sent[-1]  # the second SIGQUIT cuts the soft wait short
        else:
            expected = sent[0] + (soft or 0)
        print(f"\n[shutdown] {case}: key free {free_at - sent[0]:.2f} s after the signal (expected {expected - sent[0]:.2f} s)")
        assert expected - 0.5 <= free_at <= expected + FREE_BOUND, (case, free_at - expected)
        # 3. Exactly one run completes: A's (warm), or B's run of the redelivered message.
        ends = wait_for(lambda: records(r, "end"), 40, "a run to complete")
        assert result.get(timeout=30) == f"shutdown-{case}@2026-01-01T00:00:00Z"
        wait_for(lambda: a.popen.poll() is not None, 30, "worker A to exit")
        runner = a if not interrupted else b
        assert len(ends) == 1 and ends[0]["pid"] in set(runner.children()) | {started["pid"]}, (ends, runner.name)
        starts = records(r, "start")
        assert len(starts) == (2 if interrupted else 1), starts
        skips = [json.loads(v) for v in r.lrange("skips", 0, -1)]
        assert not skips, f"a copy was skipped: {skips}"
        if interrupted:
            assert "interrupted by its process's exit: releasing locks/proj.ticked/.lock unfinished" in a.log_text()
    finally:
        a.stop()
        if b is not None:
            b.stop()
