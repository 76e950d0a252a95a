"""Who holds a lock key: in Consul (:class:`LockHolder`, read from the key's value and its
session) and in this process (:class:`LocalKeys`, the in-process exclusion that keeps two
locks sharing one session apart).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .consul import ConsulClient, KVEntry
from .errors import ConsulLockError
from .liveness import holder_alive
from .native import at_fork

__all__ = ["LocalKeys", "LockHolder", "holder_of", "read_holder"]

#: A lock key as one process tells them apart: (Consul's address, datacenter, key).
KeyIdent = tuple[str, str | None, str]
_Owner = TypeVar("_Owner")


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock key, as far as the key's value and its session tell."""

    key: str
    session: str
    host: str | None = None
    pid: int | None = None
    name: str | None = None
    acquired_at: str | None = None
    #: Whatever else the holder wrote into the value (e.g. a Celery task id).
    extra: dict[str, Any] = field(default_factory=dict)
    #: The session's name and node, as Consul reports them (for holders that write no value).
    session_name: str | None = None
    node: str | None = None
    #: The key's ModifyIndex when it was taken: the holder's fencing token.
    fencing_token: int | None = None
    #: The holder process's start time and PID namespace (see :mod:`.liveness`).
    started: int | None = None
    pidns: str | None = None

    @classmethod
    def from_entry(cls, entry: KVEntry, session_info: dict[str, Any] | None = None) -> LockHolder:
        data: dict[str, Any] = {}
        if entry.value:
            try:
                loaded = json.loads(entry.value)
                data = loaded if isinstance(loaded, dict) else {"value": loaded}
            except ValueError:
                data = {"value": entry.value.decode("utf-8", "replace")}
        known = {k: data.pop(k, None) for k in ("host", "pid", "name", "acquired_at", "started", "pidns")}
        data.pop("session", None)
        return cls(
            key=entry.key,
            session=entry.session or "",
            host=known["host"],
            pid=known["pid"],
            name=known["name"],
            acquired_at=known["acquired_at"],
            extra=data,
            session_name=(session_info or {}).get("Name"),
            node=(session_info or {}).get("Node"),
            fencing_token=entry.modify_index,
            started=known["started"],
            pidns=known["pidns"],
        )

    def alive(self) -> bool | None:
        """Whether the holder's process still runs: True or False when it runs on this host
        (see :mod:`.liveness`), None when this host cannot tell."""
        return holder_alive(self.host, self.pid, self.started, self.pidns)

    def __str__(self) -> str:
        parts = []
        if self.name:
            parts.append(f"{self.name!r}")
        if self.host or self.pid:
            parts.append(f"on {self.host or '?'} pid {self.pid or '?'}")
        parts.extend(f"{k}={v}" for k, v in sorted(self.extra.items()))
        if not (self.host or self.name) and self.session_name:
            parts.append(f"session {self.session_name!r} on node {self.node or '?'}")
        parts.append(f"(session {self.session[:8]})")
        return " ".join(parts)


class LocalKeys(Generic[_Owner]):
    """Keys held in this process: Consul answers true when the same session acquires a
    key twice, so two locks sharing a session must be kept apart here."""

    def __init__(self) -> None:
        self._reset()
        at_fork(self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[KeyIdent, _Owner] = {}
        self._waiting = 0  # claims waiting in _cond.wait: free() notifies only if any

    def claim(self, ident: KeyIdent, owner: _Owner, deadline: float | None) -> _Owner | None:
        """Claim ``ident`` for ``owner`` by ``deadline``; returns None, or the other owner."""
        with self._cond:
            while ident in self._held:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return self._held[ident]
                self._waiting += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiting -= 1
            self._held[ident] = owner
            return None

    def free(self, ident: KeyIdent, owner: _Owner) -> None:
        with self._cond:
            if self._held.get(ident) is owner:
                del self._held[ident]
                if self._waiting:
                    self._cond.notify_all()


def read_holder(client: ConsulClient, key: str) -> LockHolder | None:
    """Who holds ``key`` now (a consistent read), or None if nobody does."""
    _, entry = client.kv_get(key, consistent=True)
    if entry is None or not entry.session:
        return None
    return holder_of(client, entry)


def holder_of(client: ConsulClient, entry: KVEntry) -> LockHolder:
    """The holder of a held key; asks Consul for the session's name and node only when the
    key's value does not say who holds it (``consul lock``, curl scripts)."""
    holder = LockHolder.from_entry(entry)
    if holder.host or holder.name:
        return holder
    try:
        info = client.session_info(entry.session or "")
    except ConsulLockError:
        return holder
    return LockHolder.from_entry(entry, info)
