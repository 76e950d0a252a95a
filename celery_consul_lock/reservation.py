"""Send-time dedupe (``lock_at="send"`` / ``"both"``): a task's lock key reserved before its
message is published, and handed to the run that message starts.

A reservation is the task's lock key itself (the ``consul lock`` layout, the lock's flags),
acquired by a session of its own that nobody renews, with no health checks and no
lock-delay; the key's value names the message (``task_id``, ``reserved_at``, ``host``,
``pid``, ``name``, ``reserved: true``). So, while it lasts:

- another send of a call with the same key finds the key held and publishes nothing: it
  returns the holder's task id (a reservation's, or a running run's);
- the run that the message starts takes the key over from the reservation's session in one
  transaction (``unlock`` + ``lock``, :meth:`ConsulClient.kv_take_over`): no moment where
  neither holds it, then destroys that session;
- a message that never runs (lost, revoked, expired, its worker gone) leaves the reservation
  to Consul, which ends the session, freeing the key, between TTL and 2 x TTL after the
  send (the TTL: the task's ``lock_reserve_ttl``, plus the countdown or ETA; no more than
  the message's ``expires``, and never under Consul's 10 s).

Limit: the key says *a* copy of the call is queued or running; it cannot tell a queued
message that will never be delivered from a slow one until the TTL says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .consul import LOCK_FLAG, shared_client
from .errors import ConsulLockError, LockConflict
from .holder import LockHolder
from .settings import ConsulSettings

__all__ = ["Reservation", "cancel", "reservation_ttl", "reserve"]

log = logging.getLogger("celery_consul_lock.reservation")

#: Consul's shortest and longest session TTL: a reservation's TTL is kept between them.
TTL_MIN, TTL_MAX = 10.0, 86400.0
#: Reads and writes one reserve() makes at most before giving up (a key that changes
#: hands on every read); then the message is sent unreserved.
ATTEMPTS = 8
#: A key in lock-delay (its last holder's session died) cannot be reserved; look again
#: this often, up to the lock-delay.
LOCK_DELAY_RETRY = 0.25


@dataclass(frozen=True)
class Reservation:
    """What :func:`reserve` found or made for a key."""

    key: str
    #: True when this call reserved the key (then ``session`` holds it).
    made: bool
    session: str | None = None
    #: The task id holding the key: ours if made, else the queued or running copy's (None:
    #: held by something that is not a task message, or free but inside a lock-delay).
    task_id: str | None = None


def reserve(settings: ConsulSettings, key: str, task_id: str, *, ttl: float, name: str) -> Reservation:
    """Reserve ``key`` (full, prefix applied) for the message ``task_id``, or report who holds
    it. Raises LockConflict for a key that is not a lock, ConsulLockError when Consul cannot
    be asked."""
    client = shared_client(settings)
    value = json.dumps(
        {
            "task_id": task_id,
            "reserved": True,
            "reserved_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "name": name,
        },
        separators=(",", ":"),
    ).encode()
    sid: str | None = None
    made = False
    give_up = time.monotonic() + settings.lock_delay + 1
    try:
        for _ in range(ATTEMPTS):
            _, entry = client.kv_get(key)
            if entry is not None and entry.flags not in (0, LOCK_FLAG):
                raise LockConflict(key, entry.flags)
            if entry is not None and entry.session:
                holder = LockHolder.from_entry(entry)
                return Reservation(key, False, task_id=holder.extra.get("task_id"))
            if sid is None:
                sid = client.session_create(f"celery-consul-lock reservation {name} {task_id}", ttl=ttl, lock_delay=0, checks=())
            attempt = client.kv_lock(key, sid, value, exists=entry is not None)
            if attempt.acquired:
                made = True
                if attempt.conflict is not None:  # repurposed between our read and write
                    client.kv_restore(key, sid, attempt.conflict)
                    raise LockConflict(key, attempt.conflict.flags)
                log.debug("reserved %s for %s[%s] (ttl %g s)", key, name, task_id, ttl)
                return Reservation(key, True, sid, task_id)
            if attempt.reason == "lock-delay":
                if time.monotonic() > give_up:
                    break
                time.sleep(LOCK_DELAY_RETRY)
            elif attempt.reason == "session":
                sid = None
        log.info("could not reserve %s for %s[%s] (lock-delay or contention): sending it unreserved", key, name, task_id)
        return Reservation(key, False)
    finally:
        if sid is not None and not made:
            _destroy(settings, sid)


def cancel(settings: ConsulSettings, reservation: Reservation) -> None:
    """Give a reservation up (its message could not be published): the key is freed at once."""
    if reservation.made and reservation.session:
        _destroy(settings, reservation.session)


def reservation_ttl(reserve_ttl: float, options: dict[str, Any]) -> float:
    """The reservation session's TTL for a message sent with Celery's ``options``: the task's
    ``lock_reserve_ttl`` after the message is due (``countdown`` / ``eta``), but no longer
    than until it ``expires``; within Consul's 10 s .. 24 h."""
    due = _seconds_until(options.get("eta"))
    countdown = options.get("countdown")
    if isinstance(countdown, int | float):
        due = max(due, float(countdown))
    ttl = reserve_ttl + due
    expires = options.get("expires")
    if expires is not None:
        ttl = min(ttl, _seconds_until(expires) if not isinstance(expires, int | float) else float(expires))
    return min(TTL_MAX, max(TTL_MIN, ttl))


def _seconds_until(when: Any) -> float:
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return 0.0
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, float((when - datetime.now(timezone.utc)).total_seconds()))
    return 0.0


def _destroy(settings: ConsulSettings, sid: str) -> None:
    try:
        shared_client(settings).session_destroy(sid)
    except ConsulLockError as exc:  # its TTL ends it
        log.warning("could not destroy reservation session %s (its TTL ends it): %s", sid, exc)
