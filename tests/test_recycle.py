"""Pool processes recycled by ``max_tasks_per_child`` / ``max_memory_per_child``: each makes one
session, and destroys it as it exits, with a real prefork worker and the Consul dev agent.

A recycled pool process ends through ``os._exit`` (billiard), which skips ``atexit``: its
session is destroyed by our ``worker_process_shutdown`` handler. Without it, every recycled
process would leave its session (and, with ``Behavior: release``, nothing else) until its
TTL, 60 s here, ends it: the wait below is far shorter, so such a leak fails the test.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from .servers import wait_for
from .workers import wait_results

TASKS = 30
#: The session's TTL here: a session left behind would outlive the wait below by far.
TTL = "60"
#: A pool process destroys its session as it exits, right after its task's result is sent;
#: on a loaded 2-core machine the last exits have been seen to take a few seconds.
GONE_WITHIN = 20.0


def holders(consul, ns: list[int]) -> list[dict]:
    """What each task's lock key says about its last holder (pid, session, ...)."""
    return [consul.api(f"/v1/kv/locks/noop-{n}/.lock?raw") for n in ns]


@pytest.mark.parametrize("recycle", ["--max-tasks-per-child=1", "--max-memory-per-child=1"])
def test_recycled_pool_processes_make_one_session_each_and_leave_none_behind(recycle, proj, consul, workers):
    (worker,) = workers(1, concurrency=2, extra_args=[recycle], env={"TEST_TTL": TTL})
    base = random.randrange(10**9, 2 * 10**9)  # keys of this run alone (the dev agent is shared)
    ns = [base + i for i in range(TASKS)]
    # 1. Thirty locked tasks, two at a time; the pool replaces each process after its task.
    results = [proj.locked_noop.delay(n) for n in ns]
    assert wait_results(results) == ns
    # 2. Each task's key names the process and session that held it: one session per
    #    process, and (recycled after every task) a process per task.
    sessions_of: dict[int, set[str]] = {}
    for holder in holders(consul, ns):
        sessions_of.setdefault(holder["pid"], set()).add(holder["session"])
    assert all(len(s) == 1 for s in sessions_of.values()), sessions_of
    assert len(sessions_of) == TASKS, f"not recycled after every task: {len(sessions_of)} processes ran {TASKS} tasks"
    # 3. Every one of those processes has exited, and destroyed its session as it did.
    sessions = {s for sids in sessions_of.values() for s in sids}

    def all_gone() -> bool:
        running = set(sessions_of) & set(worker.children())
        left = [s["Name"] for s in consul.api("/v1/session/list") if s["ID"] in sessions]
        return not running and not left

    wait_for(all_gone, GONE_WITHIN, "the recycled processes to exit and their sessions to be destroyed", procs=[worker])
    # 4. No other session names one of those processes (e.g. a second one it made).
    named = [s for s in consul.api("/v1/session/list") if _pid_of(s["Name"]) in sessions_of]
    assert not named, f"sessions of exited processes: {json.dumps(named)}"


def _pid_of(name: str) -> int | None:
    """The pid in a shared session's name (``celery-consul-lock HOST pid PID``)."""
    m = re.fullmatch(r"celery-consul-lock .* pid (\d+)", name)
    return int(m.group(1)) if m else None
