"""Tick ids: which scheduled run of a periodic entry a message is, and the per-entry
high-water mark in Consul that makes each tick run at most once to completion.

A tick id travels in the message header :data:`TICK_HEADER` as
``"<entry name>@<due time, ISO 8601 UTC>"``, e.g. ``"nightly-backup@2026-11-26T03:00:00Z"``
(milliseconds are kept when present: ``"heartbeat@2026-11-26T10:14:22.830Z"``).
Any scheduler can set it; :class:`~celery_consul_lock.ConsulLockedTask` reads it.

The mark lives at ``<key_prefix>celery-consul-lock/ticks/<entry>`` as JSON
``{"due": ..., "epoch": ..., "task_id": ..., "finished_at": ...}``. It only moves forward,
and only in a transaction that also checks that the writer's session still holds the task's
lock (``check-session`` + ``cas``): a worker that lost its lock cannot move it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .consul import ConsulClient
from .settings import ConsulSettings, validate_key

__all__ = ["TICK_HEADER", "Mark", "Tick", "crontab_tick", "interval_tick", "read_mark", "write_mark"]

#: Message header carrying the tick id (Celery exposes it as ``task.request.consul_lock_tick``).
TICK_HEADER = "consul_lock_tick"
#: Where the marks live, under the key prefix.
MARKS_PREFIX = "celery-consul-lock/ticks/"

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, order=True)
class Tick:
    """One scheduled run: the entry's name and the time it was due (UTC, to the millisecond)."""

    due: datetime
    entry: str

    @classmethod
    def of(cls, entry: str, due: datetime) -> Tick:
        if due.tzinfo is None:
            due = due.replace(tzinfo=timezone.utc)
        due = due.astimezone(timezone.utc)
        return cls(due.replace(microsecond=due.microsecond // 1000 * 1000), entry)

    @classmethod
    def parse(cls, text: str) -> Tick:
        """Read a header value; raises ValueError with the value on a malformed one."""
        entry, sep, when = str(text).rpartition("@")
        if not sep or not entry:
            raise ValueError(f"malformed {TICK_HEADER} {text!r}: expected '<entry>@<ISO 8601 due time>'")
        try:
            due = datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"malformed {TICK_HEADER} {text!r}: {when!r} is not an ISO 8601 time") from None
        return cls.of(entry, due)

    @property
    def epoch(self) -> float:
        return self.due.timestamp()

    def __str__(self) -> str:
        millis = f".{self.due.microsecond // 1000:03d}" if self.due.microsecond else ""
        return f"{self.entry}@{self.due.strftime('%Y-%m-%dT%H:%M:%S')}{millis}Z"


def crontab_tick(entry: str, now: datetime) -> Tick:
    """The tick of a crontab entry firing at ``now``: the minute it is due in.

    Crontab slots fall on whole minutes, so every beat that fires the same slot — even
    independent beats with their own state — computes the same tick, as long as each
    fires within the slot's minute.
    """
    return Tick.of(entry, now.replace(second=0, microsecond=0))


def interval_tick(entry: str, last_run_at: datetime, run_every: timedelta) -> Tick:
    """The tick of an interval entry: its previous run plus the interval (the due time a
    scheduler computed from its own state; independent beats disagree on it)."""
    return Tick.of(entry, last_run_at + run_every)


@dataclass(frozen=True)
class Mark:
    """The latest tick of an entry that ran to completion, and the key's ModifyIndex."""

    epoch: float | None
    modify_index: int
    data: dict[str, Any]

    def covers(self, tick: Tick) -> bool:
        """True if ``tick`` is at or below the mark: a duplicate."""
        return self.epoch is not None and tick.epoch <= self.epoch


def key_part(name: str) -> str:
    """A periodic entry's name made safe as one KV key segment (with a hash of the name when
    that changed it, so two names never share a segment)."""
    safe = _SAFE.sub("_", name)[:200]
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return safe


def mark_key(settings: ConsulSettings, entry: str) -> str:
    """The key of an entry's high-water mark."""
    return validate_key(settings.key_prefix + MARKS_PREFIX + key_part(entry))


def read_mark(client: ConsulClient, settings: ConsulSettings, entry: str) -> Mark:
    """A consistent read of the entry's mark (epoch None if the entry never completed)."""
    _, kv = client.kv_get(mark_key(settings, entry), consistent=True)
    if kv is None:
        return Mark(None, 0, {})
    try:
        data = json.loads(kv.value or b"{}")
        epoch = float(data["epoch"])
    except (ValueError, KeyError, TypeError):
        data, epoch = {}, None
    return Mark(epoch, kv.modify_index, data)


def write_mark(
    client: ConsulClient,
    settings: ConsulSettings,
    tick: Tick,
    previous: Mark,
    *,
    lock_key: str,
    session: str,
    extra: dict[str, Any] | None = None,
) -> bool:
    """Advance the mark to ``tick`` if our session still holds ``lock_key`` and nobody
    moved the mark since ``previous`` was read. False (nothing written) otherwise."""
    data = {"due": str(tick).rpartition("@")[2], "epoch": tick.epoch, **(extra or {})}
    value = base64.b64encode(json.dumps(data).encode()).decode()
    ops = [
        {"KV": {"Verb": "check-session", "Key": lock_key, "Session": session}},
        {"KV": {"Verb": "cas", "Key": mark_key(settings, tick.entry), "Value": value, "Index": previous.modify_index}},
    ]
    ok, _, _ = client.txn(ops, action="recording a completed tick", resource=mark_key(settings, tick.entry))
    return ok
