"""The beat-to-worker message protocol: the headers a leader-elected beat (or any scheduler)
puts on a message and :class:`~celery_consul_lock.ConsulLockedTask` reads, in one place both
sides import.

Three headers (Celery copies a message's headers into ``task.request``, also into a retry):

- :data:`TICK_HEADER` (``consul_lock_tick``): the tick id, ``"<entry name>@<due time, ISO 8601
  UTC>"``, e.g. ``"nightly-backup@2026-11-26T03:00:00Z"`` (milliseconds are kept when present:
  ``"heartbeat@2026-11-26T10:14:22.830Z"``): which scheduled run of a periodic entry the
  message is (:class:`Tick`). Any scheduler can set it.
- :data:`LEADER_HEADER` (``consul_lock_leader``): the sending beat leader, a mapping
  ``{"scheduler", "token", "instance", "sent_at", "elected_at"}`` (:func:`leader_header`);
  a worker drops a message its leader sent after a newer leader was elected
  (:func:`stale_leader`). ``scheduler`` is the beat's name (``consul_lock_beat_name``): the
  run records it in the tick's mark as the beat whose entry it is (:func:`beat_of_request`),
  so that beat's leader can remove the mark once the entry is gone (see :mod:`.reap`).
- :data:`LOCK_OPTIONS_HEADER` (``consul_lock``): per-call overrides of a task's lock options,
  e.g. ``task.apply_async(args, headers={"consul_lock": {"on_held": "wait"}})``.

And one a worker puts on a message it sends back to the queue (see :mod:`.availability`):

- :data:`REQUEUE_HEADER` (``consul_lock_requeue``): ``{"count": n, "since": <epoch s of the
  first requeue>}`` (:func:`requeue_header`, :func:`requeues`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "LEADER_HEADER",
    "LOCK_OPTIONS_HEADER",
    "REQUEUE_HEADER",
    "RESERVATION_HEADER",
    "TICK_HEADER",
    "Tick",
    "beat_of_request",
    "crontab_tick",
    "header_value",
    "interval_tick",
    "leader_header",
    "options_override",
    "requeue_header",
    "requeues",
    "retry_headers",
    "stale_leader",
    "tick_of_request",
]

#: Message header carrying the tick id (Celery exposes it as ``task.request.consul_lock_tick``).
TICK_HEADER = "consul_lock_tick"
#: Message header naming the beat leader that sent the message (see :func:`leader_header`).
LEADER_HEADER = "consul_lock_leader"
#: Message header with per-call overrides of the lock options, e.g.
#: ``task.apply_async(args, headers={"consul_lock": {"on_held": "wait"}})``.
LOCK_OPTIONS_HEADER = "consul_lock"
#: Message header of a message sent with ``lock_at="send"``/``"both"``: the session holding
#: its send-time reservation, which the run takes over (see :mod:`.reservation`).
RESERVATION_HEADER = "consul_lock_reservation"
#: Message header of a requeued copy: ``{"count": n, "since": <epoch of the first requeue>}``.
REQUEUE_HEADER = "consul_lock_requeue"
#: Leaderships remembered per scheduler (see :func:`stale_leader`).
LEADERS_KEPT = 16


# -- the tick id ---------------------------------------------------------------------------


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


# -- encoding (the beat's side) ------------------------------------------------------------


def leader_header(scheduler: str, token: int | None, instance: str, elected_at: float, sent_at: float) -> dict[str, Any]:
    """The :data:`LEADER_HEADER` value of a message sent now (``sent_at``, epoch s) by the
    leader of ``scheduler`` elected at ``elected_at`` (epoch s, its clock) holding fencing
    token ``token``. Workers judge a message by when it was sent, against when newer
    leaders were elected (see :func:`stale_leader`): a retry of it may arrive much later."""
    return {"scheduler": scheduler, "token": token, "instance": instance, "sent_at": sent_at, "elected_at": elected_at}


def requeue_header(count: int, since: float) -> dict[str, Any]:
    """The :data:`REQUEUE_HEADER` value of a message's ``count``-th requeued copy, first
    requeued at ``since`` (epoch s)."""
    return {"count": count, "since": since}


def retry_headers(tick: Tick | None, override: Any) -> dict[str, Any]:
    """The headers a retry of a message carries over: its tick id and its lock options
    override (Celery copies neither into a retry by itself)."""
    headers: dict[str, Any] = {TICK_HEADER: str(tick)} if tick else {}
    if override:
        headers[LOCK_OPTIONS_HEADER] = override
    return headers


# -- decoding (the worker's side) ------------------------------------------------------------


def header_value(request: Any, name: str) -> Any:
    """Header ``name`` of a Celery task request (an attribute, or in ``request.headers``)."""
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def tick_of_request(request: Any) -> Tick | None:
    """The request's tick id; raises ValueError naming the header on a malformed one."""
    value = header_value(request, TICK_HEADER)
    return Tick.parse(value) if value else None


def beat_of_request(request: Any) -> str | None:
    """The name of the beat that sent the request's tick (its :data:`LEADER_HEADER`'s
    ``scheduler``), or None for a message no beat of ours sent."""
    header = header_value(request, LEADER_HEADER)
    name = header.get("scheduler") if isinstance(header, Mapping) else None
    return name if isinstance(name, str) and name else None


def options_override(request: Any) -> Any:
    """The request's :data:`LOCK_OPTIONS_HEADER` value, unchecked (None when absent)."""
    return header_value(request, LOCK_OPTIONS_HEADER)


def requeues(header: object) -> tuple[int, float | None]:
    """(requeues so far, epoch s of the first) from a :data:`REQUEUE_HEADER` value; (0, None)
    for an original message or a malformed value."""
    if not isinstance(header, Mapping):
        return 0, None
    try:
        return int(header.get("count", 0)), float(header["since"]) if "since" in header else None
    except (TypeError, ValueError):
        return 0, None


#: Leaderships of each beat scheduler this process has seen messages from: name ->
#: {fencing token: when that leader was elected (epoch s, its clock)}; the newest few.
_LEADERS: dict[str, dict[int, float]] = {}
_LEADERS_MUTEX = threading.Lock()


def stale_leader(header: Any) -> str | None:
    """Why a message with this :data:`LEADER_HEADER` value must be dropped, or None.

    The rule: a message is refused only if its leader had been deposed when it sent it,
    i.e. it was sent (``sent_at``, the sender's clock) at or after the election of a newer
    leader (``elected_at`` of a message with a larger token, that leader's clock). It is
    judged by when it was *sent*, not by when it arrives, so a retry of a tick (Celery
    copies the header into it), a countdown or ETA message, a backlog on a slow queue or an
    ``acks_late`` redelivery sent by the previous leader while it led still runs. A leader
    checks its lease before each send and an election waits out the old lease, so a legal
    send precedes the next election by at least c + d - (W_b - m_b) (2.5 s by default):
    beat hosts' clocks must agree better than that. Messages without ``sent_at`` (from
    version 0.1) are not judged."""
    if not isinstance(header, Mapping):
        return None
    name, token = header.get("scheduler"), header.get("token")
    if not isinstance(name, str) or not isinstance(token, int):
        return None
    sent_at, elected_at = header.get("sent_at"), header.get("elected_at")
    with _LEADERS_MUTEX:
        seen = _LEADERS.setdefault(name, {})
        if isinstance(elected_at, int | float) and token not in seen:
            seen[token] = float(elected_at)
            for old in sorted(seen)[:-LEADERS_KEPT]:
                del seen[old]
        if not isinstance(sent_at, int | float):
            return None
        newer = [(other, since) for other, since in seen.items() if other > token and since <= sent_at]
    if not newer:
        return None
    other, since = min(newer)
    return (
        f"sent by a deposed leader of {name} (token {token}) at {_iso(sent_at)}, after the leader with "
        f"token {other} was elected at {_iso(since)}"
    )


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
