"""A Consul semaphore as stored in its KV prefix (the Go client's ``api/semaphore.go``
recipe, see :mod:`.semaphore`): reading it, writing ``.lock``'s value, and which of its keys
nobody can use any more (what the sweep removes, :mod:`.reap`, by the Go client's
``Semaphore.Destroy`` rules).

- ``PREFIX/<session id>``: a *contender key*, acquired by that session, flags
  :data:`~.consul.SEMAPHORE_FLAG`; once its session is gone (our sessions free, not delete,
  their keys) nobody can take it again: it is *dead*.
- ``PREFIX/.lock``: ``{"Limit": N, "Holders": {"<session id>": true, ...}}``, changed only by
  check-and-set on its ModifyIndex; a listed holder whose session holds no key under the
  prefix is dead and does not count.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection
from dataclasses import dataclass

from .consul import SEMAPHORE_FLAG, KVEntry
from .errors import ConsulLockError, SemaphoreConflict

__all__ = ["SEMAPHORE_KEY", "SemaphoreState", "decode_lock", "encode_lock"]

#: The coordination key's name inside the prefix (the Go client's DefaultSemaphoreKey).
SEMAPHORE_KEY = ".lock"


@dataclass(frozen=True)
class SemaphoreState:
    """A semaphore as stored in Consul: its limit and live holders.

    ``limit`` is None when ``.lock`` does not exist (no holder). ``holders`` are the session
    IDs listed in ``.lock`` whose contender key is still held by that session; ``listed`` all
    of those in ``.lock``, dead ones included. ``index`` is ``.lock``'s ModifyIndex (0:
    absent), the check-and-set index of the next change."""

    key: str
    limit: int | None
    index: int
    holders: frozenset[str]
    listed: frozenset[str]
    #: The contender keys under the prefix, by the session ID in their name.
    contenders: dict[str, KVEntry]

    @classmethod
    def parse(cls, key: str, entries: list[KVEntry]) -> SemaphoreState:
        """Read the listing of a semaphore's prefix; raises :class:`SemaphoreConflict` when
        ``.lock`` is not a semaphore's, :class:`ConsulLockError` when its value is not the
        recipe's JSON."""
        prefix = key[: -len(SEMAPHORE_KEY)]
        lock_entry = None
        contenders: dict[str, KVEntry] = {}
        alive: set[str] = set()
        for entry in entries:
            if entry.session:
                alive.add(entry.session)
            if entry.key == key:
                lock_entry = entry
            elif entry.key.startswith(prefix) and "/" not in entry.key[len(prefix) :]:
                contenders[entry.key[len(prefix) :]] = entry
        if lock_entry is None:
            return cls(key, None, 0, frozenset(), frozenset(), contenders)
        if lock_entry.flags != SEMAPHORE_FLAG:
            raise SemaphoreConflict(key, lock_entry.flags)
        limit, listed = decode_lock(key, lock_entry.value)
        return cls(key, limit, lock_entry.modify_index, frozenset(listed & alive), frozenset(listed), contenders)

    def dead_contenders(self) -> list[KVEntry]:
        """Contender keys (the semaphore's flags) whose session is gone: nobody can take them
        again."""
        return [e for e in self.contenders.values() if e.flags == SEMAPHORE_FLAG and not e.session]

    def stale_contenders(self) -> list[str]:
        """The keys of :meth:`dead_contenders`."""
        return [e.key for e in self.dead_contenders()]

    def unused_once(self, leaving: Collection[str]) -> bool:
        """True if ``.lock`` may be deleted, by check-and-set on :attr:`index`, once the
        contender keys ``leaving`` are gone: the Go client's ``Semaphore.Destroy`` rule (it
        exists and no live holder is listed: dead ones are pruned), and no contender key
        with the semaphore's flags is left (not even one waiting for a slot). An admission
        racing the delete changes ``.lock`` first, so one of the two check-and-sets fails:
        the admission's (it reads again and creates ``.lock`` afresh) or the delete's."""
        return (
            self.index != 0
            and not self.holders
            and all(e.key in leaving for e in self.contenders.values() if e.flags == SEMAPHORE_FLAG)
        )


def decode_lock(key: str, value: bytes | None) -> tuple[int | None, set[str]]:
    """(Limit, listed holders) of ``.lock``'s value ((None, empty) for none); raises
    :class:`ConsulLockError` naming ``key`` when it is not the recipe's JSON."""
    if not value:
        return None, set()
    try:
        data = json.loads(value)
        limit = data.get("Limit")
        holders = data.get("Holders") or {}
        if not isinstance(limit, int) or not isinstance(holders, dict):
            raise ValueError("no Limit or Holders")
    except (ValueError, AttributeError) as exc:
        raise ConsulLockError(f"semaphore key {key!r} does not hold the recipe's JSON ({exc}); refusing to use it") from None
    return limit, {str(sid) for sid, on in holders.items() if on}


def encode_lock(limit: int, holders: frozenset[str] | set[str]) -> str:
    """``.lock``'s value as the Go client writes it (base64, for a transaction)."""
    text = json.dumps({"Limit": limit, "Holders": dict.fromkeys(sorted(holders), True)}, separators=(",", ":"))
    return base64.b64encode(text.encode()).decode()
