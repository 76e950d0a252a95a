"""The schedule state a leader-elected beat keeps in Consul: each entry's last run time and
run count, so that a new leader continues where the old one stopped.

An entry's state lives at ``<prefix>celery-consul-lock/beat/<name>/entries/<entry>`` as JSON
``{"last_run_at": ISO 8601 or null, "total_run_count": int, "definition": hash, "token": int}``,
with a hash of the entry's timing (task and schedule): when those change, the stored state is
ignored and the entry starts afresh; args, kwargs and options may change freely. Only the
leader writes it, in transactions that first check that its session still holds the leader
lock (``check-session``), so a deposed leader cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery.schedules import schedule as interval_schedule

from .consul import kv_set, shared_client
from .election import BeatConfig
from .lock import ConsulLock
from .ticks import key_part

__all__ = ["ScheduleState"]

log = logging.getLogger("celery_consul_lock.beat")


class ScheduleState:
    """Reads and writes the schedule state of one beat (see the module doc)."""

    def __init__(self, config: BeatConfig) -> None:
        self.config = config

    def key(self, name: str) -> str:
        """The KV key of entry ``name``'s state."""
        return self.config.state_prefix + key_part(name)

    def load(self, schedule: Mapping[str, Any], now: datetime) -> int:
        """Set ``last_run_at`` and ``total_run_count`` of the entries of ``schedule`` from
        Consul (entries whose definition changed start afresh; under ``missed="skip"`` an
        interval entry that missed more than one run starts from ``now``). Returns how many
        entries Consul keeps state for; raises ConsulLockError when it cannot be read."""
        client = shared_client(self.config.settings)
        stored = {e.key: e for e in client.kv_keys(self.config.state_prefix)}
        for name, entry in schedule.items():
            kv = stored.get(self.key(name))
            if kv is None or not kv.value:
                continue
            data = json.loads(kv.value)
            if data.get("definition") != definition_hash(entry):
                log.info("beat: the schedule of %s changed; it starts afresh", name)
                continue
            entry.last_run_at = datetime.fromisoformat(data["last_run_at"])
            entry.total_run_count = int(data.get("total_run_count", 0))
            if self.config.missed == "skip" and skip_missed(entry, now):
                log.info("beat: skipping the ticks of %s missed while nobody led", name)
        return len(stored)

    def read(self, name: str) -> dict[str, Any] | None:
        """The stored state of entry ``name`` (a consistent read), or None."""
        _, kv = shared_client(self.config.settings).kv_get(self.key(name), consistent=True)
        data = json.loads(kv.value) if kv is not None and kv.value else None
        return data if isinstance(data, dict) else None

    def write(self, entries: list[Any], lock: ConsulLock) -> tuple[bool, Any]:
        """Write the state of ``entries`` if ``lock``'s session still holds it: (True, None),
        or (False, Consul's errors) when the fenced write was refused (nothing more is
        written). Raises ConsulLockError when Consul cannot be asked."""
        sid = lock.session_id
        if sid is None:
            return False, "the leader lock is not held"
        writes = []
        for entry in entries:
            value = json.dumps(
                {
                    "last_run_at": entry.last_run_at.isoformat() if entry.last_run_at else None,
                    "total_run_count": entry.total_run_count,
                    "definition": definition_hash(entry),
                    "token": lock.fencing_token,
                }
            )
            writes.append(kv_set(self.key(entry.name), value.encode()))
        client = shared_client(self.config.settings)
        done = client.kv_fenced(lock.key, sid, writes, action="recording the schedule state", resource="the keys involved")
        return (True, None) if done.ok else (False, list(done.errors))


def skip_missed(entry: Any, now: datetime) -> bool:
    """Under ``missed="skip"``: an interval entry more than one interval overdue resumes from
    ``now`` (True if it did)."""
    due, _ = entry.is_due()
    if due and isinstance(entry.schedule, interval_schedule):
        missed_from = entry.last_run_at + entry.schedule.run_every
        if (now - missed_from).total_seconds() > entry.schedule.run_every.total_seconds():
            entry.last_run_at = now
            return True
    return False


def definition_hash(entry: Any) -> str:
    """A short hash of what decides an entry's timing: its task and schedule (not args,
    kwargs or options, so editing those keeps the entry's timing)."""
    text = repr((entry.task, repr(entry.schedule)))
    return hashlib.sha1(text.encode()).hexdigest()[:16]
