"""Celery-style signals (``celery.utils.dispatch.Signal``) sent by ConsulLockedTask.

Connect as with Celery's own::

    from celery_consul_lock.signals import task_lock_skipped

    @task_lock_skipped.connect
    def count_skip(sender, key, reason, holder, task_id, **kw):
        metrics.incr("consul_lock.skipped", tags={"task": sender.name})

A handler that raises is logged and never breaks the task run (signals are sent with
``send_robust``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.dispatch import Signal

__all__ = [
    "beat_leader_elected",
    "beat_leader_lost",
    "send",
    "task_lock_acquired",
    "task_lock_lost",
    "task_lock_skipped",
    "worker_agent_available",
    "worker_agent_unavailable",
]

log = logging.getLogger(__name__)

#: A task run took its lock. Sender: the task. Arguments: key, fencing_token, task_id.
task_lock_acquired = Signal(name="task_lock_acquired", providing_args={"key", "fencing_token", "task_id"})
#: A task run did not run its body because of the lock or the tick mark. Sender: the task.
#: Arguments: key, reason (a :data:`~.task.SkipReason`: "held", "lock-delay", "duplicate-tick",
#: "duplicate-delivery", "stale-leader", "cooldown"), holder (LockHolder or None), task_id, tick (or None).
task_lock_skipped = Signal(name="task_lock_skipped", providing_args={"key", "reason", "holder", "task_id", "tick"})
#: A running task's lock was lost. Sender: the task. Arguments: key, reason, task_id.
task_lock_lost = Signal(name="task_lock_lost", providing_args={"key", "reason", "task_id"})
#: This beat instance won the election. Sender: the Election. Arguments: scheduler (the
#: beat name), instance, fencing_token.
beat_leader_elected = Signal(name="beat_leader_elected", providing_args={"scheduler", "instance", "fencing_token"})
#: This beat instance stopped leading (lease lost, stepped down, or stopped). Sender: the
#: Election. Arguments: scheduler, instance, reason.
beat_leader_lost = Signal(name="beat_leader_lost", providing_args={"scheduler", "instance", "reason"})

#: A worker's Consul agent stopped answering its watch: the worker stops consuming from its
#: queues. Sender: the worker's consumer. Arguments: address, reason.
worker_agent_unavailable = Signal(name="worker_agent_unavailable", providing_args={"address", "reason"})
#: The agent answers again: the worker consumes again. Sender: the worker's consumer.
#: Arguments: address, downtime (seconds since it stopped answering).
worker_agent_available = Signal(name="worker_agent_available", providing_args={"address", "downtime"})


def send(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send ``signal``; failing receivers are logged, never raised."""
    for receiver, result in signal.send_robust(sender, **kwargs):
        if isinstance(result, Exception):
            log.error("receiver %r of %s failed: %r", receiver, signal.name, result)
