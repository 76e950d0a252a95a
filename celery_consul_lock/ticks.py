"""Tick marks: the per-entry high-water mark in Consul that makes each tick (one scheduled
run of a periodic entry, identified by its tick id: :class:`~.protocol.Tick`, carried in the
message header :data:`~.protocol.TICK_HEADER`) run at most once to completion.

The mark lives at ``<key_prefix>celery-consul-lock/ticks/<entry>`` as JSON
``{"due": ..., "epoch": ..., "task_id": ..., "open": {"<due>": <started at>, ...}}``:
the latest tick that ran to completion, and the ticks *open* — started but not completed
(a run that failed, is retrying, or died). A high-water mark alone cannot tell "this tick
completed" from "a later one did", so a retry of a failed tick arriving after a later tick
completed would be skipped; the open set tells them apart. A run marks its tick open before
its body, and completed after it, each in a transaction that also checks that the writer's
session still holds the task's lock (``check-session`` + ``cas``): a worker that lost its
lock cannot change the mark.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .consul import ConsulClient, kv_set
from .errors import ConsulLockError
from .protocol import Tick, crontab_tick, interval_tick  # noqa: F401  (import path kept: ticks.crontab_tick)
from .settings import ConsulSettings, validate_key

__all__ = ["Mark", "attributed", "beat_of", "change_mark", "key_part", "mark_key", "read_mark"]

log = logging.getLogger("celery_consul_lock.ticks")

#: Where the marks live, under the key prefix.
MARKS_PREFIX = "celery-consul-lock/ticks/"
#: The field in which a ``celery-consul-lock run`` wrapper names itself in the marks it opens
#: and completes: a mark with it belongs to a cron line (no beat knows its entry), and the
#: beat's sweep never removes it (see :mod:`.reap`).
RUNNER_FIELD = "runner"

#: The field in which a mark names the beat whose entry it is: the beat name (``consul_lock_
#: beat_name``) that the tick's leader header (:data:`~.protocol.LEADER_HEADER`) carries. That
#: beat's leader removes the mark once the entry is gone from its schedule (see :mod:`.reap`).
#: Null when beats of different names wrote it (then no beat's sweep removes it); absent in a
#: mark only runs of other senders wrote (an older version, a tick sent by hand).
BEAT_FIELD = "beat"

#: How long a tick stays open (started, not completed) in its entry's mark: a retry or
#: redelivery of it arriving later than this after its first start, once a later tick has
#: completed, is skipped. A week outlasts Celery's retry schedules and Redis's visibility
#: timeout (1 h) by far.
OPEN_TICK_RETENTION = 7 * 24 * 3600.0
#: Completed ticks kept per entry, to tell a late message of a tick that never ran (run it)
#: from a copy of one that completed (skip it); older ticks are taken as done. About 20
#: bytes each, written with every completed tick.
DONE_TICKS_KEPT = 128
#: At most this many open ticks per entry (about 40 bytes each; Consul values take 512 KB).
OPEN_TICKS_MAX = 1000
#: Check-and-set attempts on a mark that other runs keep moving.
MARK_CAS_TRIES = 10

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Mark:
    """An entry's mark in Consul (see the module doc) and the key's ModifyIndex, for
    check-and-set. ``epoch`` is the latest completed tick's due time (None: none yet)."""

    epoch: float | None
    modify_index: int
    data: dict[str, Any]

    @property
    def open(self) -> dict[str, float]:
        """Open ticks: due time (as in the tick id) -> when their first run started (epoch s)."""
        value = self.data.get("open")
        return value if isinstance(value, dict) else {}

    @property
    def done(self) -> list[float]:
        """Due times (epoch s) of the latest DONE_TICKS_KEPT completed ticks, oldest first."""
        value = self.data.get("done")
        return [float(e) for e in value] if isinstance(value, list) else []

    def verdict(self, tick: Tick) -> str | None:
        """Why a run of ``tick`` must not start, or None if it must. It must when the tick
        is open (a retry or redelivery of a run that did not complete), later than the
        latest completed tick, or older but never completed (a late message: a backlog, a
        countdown, a message the previous leader sent); not when it completed, or is older
        than every completed tick the mark still keeps (taken as done: never twice)."""
        if self.epoch is None or _due(tick) in self.open or tick.epoch > self.epoch:
            return None
        done = self.done
        if tick.epoch == self.epoch or tick.epoch in done:
            return f"tick {tick} already ran to completion"
        if "done" not in self.data:  # written by version 0.1, which kept only the high-water mark
            return f"tick {tick} is at or below the entry's latest completed tick"
        if len(done) >= DONE_TICKS_KEPT and tick.epoch < done[0]:
            return (
                f"tick {tick} is older than the {DONE_TICKS_KEPT} latest completed ticks the mark keeps; "
                "taken as done (a copy must never run twice)"
            )
        return None

    def covers(self, tick: Tick) -> bool:
        """True if a run of ``tick`` must not start (see :meth:`verdict`)."""
        return self.verdict(tick) is not None

    def opened(self, tick: Tick, now: float) -> dict[str, Any] | None:
        """The mark with ``tick`` open (its run is starting), or None if nothing changes.
        Open ticks older than OPEN_TICK_RETENTION are forgotten, the oldest first past
        OPEN_TICKS_MAX."""
        if _due(tick) in self.open:
            return None
        opened = {due: since for due, since in self.open.items() if since >= now - OPEN_TICK_RETENTION}
        opened[_due(tick)] = now
        if len(opened) > OPEN_TICKS_MAX:
            dropped = sorted(opened, key=opened.__getitem__)[: len(opened) - OPEN_TICKS_MAX]
            log.warning("tick mark of %s: more than %d open ticks; forgetting %s", tick.entry, OPEN_TICKS_MAX, dropped)
            opened = {due: since for due, since in opened.items() if due not in dropped}
        return {**self.data, "open": opened, "done": self.done}

    def completed(self, tick: Tick, extra: dict[str, Any]) -> dict[str, Any]:
        """The mark with ``tick`` completed: no longer open, among the kept completed ticks,
        and the latest completed tick moved up to it (never down)."""
        opened = {due: since for due, since in self.open.items() if due != _due(tick)}
        done = sorted({*self.done, tick.epoch})[-DONE_TICKS_KEPT:]
        data = {**self.data, "open": opened, "done": done}
        if self.epoch is None or tick.epoch > self.epoch:
            data.update(due=_due(tick), epoch=tick.epoch, **extra)
        return data


def attributed(data: dict[str, Any] | None, beat: str | None) -> dict[str, Any] | None:
    """``data`` (a mark about to be written; None: nothing to write) naming ``beat`` as the
    beat whose entry it is (see :data:`BEAT_FIELD`): set when it names none yet, null when it
    names another; unchanged for a run of a tick no beat of ours sent (``beat`` None)."""
    if data is None or beat is None or data.get(BEAT_FIELD) == beat:
        return data
    return {**data, BEAT_FIELD: beat if BEAT_FIELD not in data else None}


def beat_of(data: dict[str, Any]) -> str | None:
    """The beat a mark's data names as its entry's (see :data:`BEAT_FIELD`), or None."""
    beat = data.get(BEAT_FIELD)
    return beat if isinstance(beat, str) else None


def _due(tick: Tick) -> str:
    return str(tick).rpartition("@")[2]


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
        epoch = float(data["epoch"]) if "epoch" in data else None
    except (ValueError, KeyError, TypeError, AttributeError):
        data, epoch = {}, None
    return Mark(epoch, kv.modify_index, data if isinstance(data, dict) else {})


def change_mark(
    client: ConsulClient,
    settings: ConsulSettings,
    entry: str,
    mark: Mark,
    change: Callable[[Mark], dict[str, Any] | None],
    *,
    lock_key: str,
    session: str,
) -> Mark | None:
    """Write ``change(mark)`` (None: nothing to write) if our session still holds
    ``lock_key``, by check-and-set on the mark's index; when another run moved the mark
    meanwhile (a run of the same entry under another lock key), re-read it and apply the
    change again. Returns the mark as written (or as read, if nothing changed), or None
    when our session no longer holds ``lock_key`` (nothing written)."""
    key = mark_key(settings, entry)
    for _ in range(MARK_CAS_TRIES):
        data = change(mark)
        if data is None:
            return mark
        write = kv_set(key, json.dumps(data).encode(), index=mark.modify_index)
        done = client.kv_fenced(lock_key, session, [write], action="updating a tick mark", resource=key)
        if done.ok:
            epoch = data.get("epoch")
            return Mark(float(epoch) if epoch is not None else None, int(done.results[-1]["ModifyIndex"]), data)
        if done.lost:
            return None
        mark = read_mark(client, settings, entry)
    raise ConsulLockError(f"tick mark {key!r} kept moving under {MARK_CAS_TRIES} updates in a row; giving up")
