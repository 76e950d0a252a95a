"""What the examples' heartbeat runs leave behind, for the demo and the tests to read.

Each run of a heartbeat body appends one JSON record to the Redis list :data:`RUNS` of the
task's broker (the demo's Redis): the tick id, the beat instance that sent it (from the
``consul_lock_leader`` header), the worker that ran it, the process and the time. Each copy
that ``ConsulLockedTask`` skipped (``task_lock_skipped``) appends one to :data:`SKIPS`.
Nothing here decides anything: a record is written after the lock was taken, so a body that
ran twice leaves two records.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from celery_consul_lock.signals import task_lock_skipped

__all__ = ["RUNS", "SKIPS", "record_run"]

#: Redis lists the records go to.
RUNS = "demo:runs"
SKIPS = "demo:skips"


def _push(task: Any, name: str, record: dict[str, Any]) -> None:
    # A connection per record: one every couple of seconds, and nothing kept across a fork.
    with redis.Redis.from_url(task.app.conf.broker_url) as client:
        client.rpush(name, json.dumps(record))


def record_run(task: Any, **extra: Any) -> None:
    """Append the record of this run of ``task`` (a bound task, inside its body)."""
    leader = getattr(task.request, "consul_lock_leader", None) or {}
    _push(
        task,
        RUNS,
        {
            "task": task.name,
            "tick": getattr(task.request, "consul_lock_tick", None),
            "instance": leader.get("instance"),
            "token": leader.get("token"),
            "worker": task.request.hostname,
            "pid": os.getpid(),
            "id": task.request.id,
            "t": time.time(),
            **extra,
        },
    )


@task_lock_skipped.connect
def _record_skip(sender: Any, key: str, reason: str, tick: Any = None, **_: Any) -> None:
    _push(
        sender,
        SKIPS,
        {
            "task": sender.name,
            "tick": str(tick) if tick else None,
            "reason": reason,
            "key": key,
            "worker": sender.request.hostname,
            "t": time.time(),
        },
    )
