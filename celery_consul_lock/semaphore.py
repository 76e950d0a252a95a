"""ConsulSemaphore: at most N holders of a Consul KV prefix, compatible with ``consul lock -n N``.

The recipe is the Go client's (``api/semaphore.go``), which ``consul lock -n N PREFIX`` uses,
so this semaphore and that command count against the same N, both ways:

- ``PREFIX/<session id>``: one *contender key* per holder, acquired by the holder's session
  (so it loses its session when the holder's session dies), flags :data:`SEMAPHORE_FLAG`,
  value: who holds it (JSON: host, pid, name, acquired_at; ``consul lock`` writes none).
- ``PREFIX/.lock``: the *coordination key*, flags :data:`SEMAPHORE_FLAG`, JSON
  ``{"Limit": N, "Holders": {"<session id>": true, ...}}``, only ever changed by
  check-and-set on its ModifyIndex. A holder listed there whose contender key has no
  session any more is dead and does not count (every contender prunes it).

The flags keep a semaphore and a lock apart: :class:`~celery_consul_lock.ConsulLock` (and
``consul lock`` without ``-n``) refuse a ``.lock`` key with the semaphore's flags, and a
semaphore refuses one without them (:class:`SemaphoreConflict`). Every holder must agree on
N: a different limit is refused (:class:`SemaphoreLimitConflict`) until the stored one's
holders are all gone (the last to leave deletes ``.lock``, as ``consul lock`` does).

Admission writes the contender key and ``.lock`` in one transaction (after one read of the
prefix), leaving deletes both in one transaction: an acquire + release costs two writes
and a read, where a lock costs two writes. Sessions, renewals, self-fencing, the watcher
and loss reporting are :class:`ConsulLock`'s, unchanged. What stays after the holders: a dead
holder's contender key is deleted by the next admission, or by a sweep (:mod:`.reap`) once
``consul_lock_reap_after`` has passed since its session ended; the sweep then deletes an
emptied ``.lock`` too (see :meth:`.SemaphoreState.unused_once`).

Guarantee: while Consul works and every holder follows the recipe, at most N sessions are
listed as live holders at any moment. Limit: a slot is a lease like a lock, and a holder
can lose it while still running (its session invalidated, Consul unreachable past the
fencing deadline, a paused process); its slot is then given to someone else while it may
still be working, so N+1 can briefly run. :attr:`held` turns false (and ``on_lost`` runs)
before Consul can hand the slot on when the cause is a lost connection (self-fencing); a
paused process learns of it only when it resumes. Unlike a lock's key, a slot has no
fencing token that orders holders: :attr:`fencing_token` is the ``.lock`` ModifyIndex
written by our admission (it only grows, but N holders hold at once).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .consul import SEMAPHORE_FLAG, ConsulClient, shared_client
from .errors import ConsulLockError, InvalidSetting, SemaphoreConflict, SemaphoreLimitConflict, SessionGone
from .holder import LockHolder, holder_of
from .lock import LOCK_DELAY_RETRY, WAIT_MAX, ConsulLock, Holding
from .semaphore_state import SEMAPHORE_KEY, SemaphoreState, decode_lock, encode_lock
from .session import LockSession
from .settings import ConsulSettings
from .watch import Snapshot, follow, wait_for_change

__all__ = ["SEMAPHORE_KEY", "ConsulSemaphore", "SemaphoreState"]

acquire_log = logging.getLogger("celery_consul_lock.semaphore.acquire")

#: Sessionless contender keys (left by dead holders of ours: our sessions free, not delete,
#: their keys) deleted along with an admission, at most this many at a time: the
#: transaction stays small (Consul allows 64 operations).
PRUNE_PER_ADMISSION = 8


@dataclass(slots=True)
class SlotHolding(Holding):
    """One holding of a semaphore slot: a lock's holding, plus what the admission saw."""

    #: ``.lock`` as our admission wrote it (ModifyIndex, holders): the release's first guess.
    admitted: tuple[int, frozenset[str]] = (0, frozenset())
    #: The other live holders when we were admitted (from their contender keys).
    co_holders: tuple[LockHolder, ...] = field(default_factory=tuple)


class _PrefixSessions:
    """Which session each semaphore of this process uses at each prefix.

    A session counts once among a semaphore's holders (it is keyed by session ID), so two
    holders in one process at the same prefix cannot both use the shared session: the
    first does, the others get sessions of their own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._mutex = threading.Lock()
        self._used: dict[tuple[str, str | None, str], dict[LockSession, ConsulSemaphore]] = {}

    def pick(
        self, ident: tuple[str, str | None, str], owner: ConsulSemaphore, shared: LockSession, make: Callable[[], LockSession]
    ) -> LockSession:
        """``shared`` if no other semaphore here uses it at ``ident``, else ``make()``."""
        with self._mutex:
            used = self._used.setdefault(ident, {})
            for session in [s for s, o in used.items() if o is owner]:
                del used[session]
            chosen = shared if shared not in used else make()
            used[chosen] = owner
            return chosen

    def free(self, ident: tuple[str, str | None, str], owner: ConsulSemaphore) -> None:
        with self._mutex:
            used = self._used.get(ident, {})
            for session in [s for s, o in used.items() if o is owner]:
                del used[session]
            if not used:
                self._used.pop(ident, None)


_SESSIONS = _PrefixSessions()


class ConsulSemaphore(ConsulLock):
    """At most ``limit`` holders of ``prefix`` at once, across every process that uses the
    same prefix and limit: this class, the Go client's semaphore, ``consul lock -n``.

    The same shape as :class:`ConsulLock`: ``acquire(blocking, timeout)``, ``release()``,
    ``with ConsulSemaphore("locks/reports", 3): ...`` (raises :class:`LockTimeout` after
    ``timeout``), :attr:`held`, :attr:`lost`, ``on_lost``, :meth:`check`, settings as
    keyword arguments or ``CONSUL_HTTP_*``. When full, a non-blocking or timed-out acquire
    lists the holders in :attr:`last_holders`.

    Holders in one process at one prefix each need a session of their own (the recipe
    counts sessions): the first uses the process's shared session, the others a private one
    made and destroyed with their holding.
    """

    def __init__(self, prefix: str, limit: int, **options: Any) -> None:
        """``options``: :class:`ConsulLock`'s keyword arguments (``name``, ``value``,
        ``timeout``, ``private_session``, ``session``, ``on_lost``, ``settings``, and settings
        by name)."""
        self.limit = validate_limit("limit", limit)
        prefix = prefix.rstrip("/")
        if not prefix:
            raise InvalidSetting("prefix", prefix, "a semaphore needs a non-empty KV prefix")
        super().__init__(f"{prefix}/{SEMAPHORE_KEY}", **options)
        #: The prefix as stored in Consul (the settings' key prefix applied).
        self.prefix = self.key[: -len(SEMAPHORE_KEY) - 1]
        self.name = options.get("name") or self.prefix
        #: Who held the slots when our last acquire gave up (empty when it did not).
        self.last_holders: tuple[LockHolder, ...] = ()
        #: A session made for one holding (another holder here uses the shared one).
        self._own_session: LockSession | None = None

    def __repr__(self) -> str:
        state = "held" if self._current() else "free"
        if self.lost.is_set():
            state = "lost"
        return f"<ConsulSemaphore {self.prefix!r} limit={self.limit} {state} at {self.settings.base_url}>"

    @property
    def co_holders(self) -> tuple[LockHolder, ...]:
        """The other live holders when our current holding was admitted (from their
        contender keys, without asking Consul again); empty when not held."""
        holding = self._current()
        return holding.co_holders if isinstance(holding, SlotHolding) else ()

    @classmethod
    def state(cls, prefix: str, *, settings: ConsulSettings | None = None, **setting_values: Any) -> SemaphoreState:
        """The semaphore at ``prefix`` as stored now (a consistent read)."""
        settings = settings or ConsulSettings.resolve(setting_values)
        key = settings.full_key(f"{prefix.rstrip('/')}/{SEMAPHORE_KEY}")
        _, entries = shared_client(settings).kv_list(key[: -len(SEMAPHORE_KEY)], consistent=True)
        return SemaphoreState.parse(key, entries)

    @classmethod
    def holders(cls, prefix: str, *, settings: ConsulSettings | None = None, **setting_values: Any) -> list[LockHolder]:
        """Who holds the semaphore's slots now (each from its contender key; for holders
        that write no value there, such as ``consul lock -n``, from their session)."""
        settings = settings or ConsulSettings.resolve(setting_values)
        client = shared_client(settings)
        state = cls.state(prefix, settings=settings)
        return [holder_of(client, state.contenders[sid]) for sid in sorted(state.holders) if sid in state.contenders]

    # -- sessions ---------------------------------------------------------------------

    def _claim_local(self, deadline: float | None) -> bool:
        return True  # holders here are kept apart by their sessions (see _new_session)

    def _free_local(self) -> None:
        _SESSIONS.free(self._ident, self)

    def _new_session(self) -> LockSession:
        session = super()._new_session()
        if self.given_session is not None or self.private_session:
            return session
        chosen = _SESSIONS.pick(self._ident, self, session, self._private_session)
        self._own_session = chosen if chosen is not session else None
        return chosen

    def _owns(self, session: LockSession) -> bool:
        return super()._owns(session) or session is self._own_session

    # -- acquiring ----------------------------------------------------------------------

    def _acquire_in_consul(self, deadline: float | None) -> bool:
        def attempt_once(client: ConsulClient, session: LockSession, sid: str) -> bool | None:
            left = None if deadline is None else deadline - time.monotonic()
            index, entries = client.kv_list(self._dir)
            state = SemaphoreState.parse(self.key, entries)
            if state.limit is not None and state.limit != self.limit:
                raise SemaphoreLimitConflict(self.key, state.limit, self.limit)
            others = state.holders - {sid}
            if len(others) >= self.limit:
                if left is not None and left <= 0:
                    self._gave_up_full(client, session, state)
                    return False
                acquire_log.debug("%s is full (%d of %d); waiting", self.prefix, len(others), self.limit)
                # Until the prefix changes, told by the process's watcher.
                wait_for_change(self.settings, self._dir, index, entries, WAIT_MAX if left is None else min(WAIT_MAX, left))
                return None
            return self._enter(client, session, sid, state, others | {sid})

        try:
            return self._acquire_loop(deadline, attempt_once)
        except BaseException:
            own = self._own_session  # made for this acquire: not left renewing after an error
            if own is not None and own.holding() == 0:
                own.destroy(shared_client(self.settings))
            raise

    @property
    def _dir(self) -> str:
        return f"{self.prefix}/"

    def _enter(
        self, client: ConsulClient, session: LockSession, sid: str, state: SemaphoreState, holders: frozenset[str]
    ) -> bool | None:
        """Write our contender key and ``.lock`` with us among the holders, in one
        transaction that fails if ``.lock`` changed since ``state`` was read."""
        value = self._value(sid)
        ops: list[dict[str, Any]] = [
            {
                "KV": {
                    "Verb": "lock",
                    "Key": f"{self._dir}{sid}",
                    "Value": base64.b64encode(value).decode(),
                    "Flags": SEMAPHORE_FLAG,
                    "Session": sid,
                }
            },
            {
                "KV": {
                    "Verb": "cas",
                    "Key": self.key,
                    "Value": encode_lock(self.limit, holders),
                    "Flags": SEMAPHORE_FLAG,
                    "Index": state.index,
                }
            },
        ]
        ops += [{"KV": {"Verb": "delete", "Key": key}} for key in state.stale_contenders()[:PRUNE_PER_ADMISSION]]
        ok, results, errors = client.txn(ops, action="entering a semaphore", resource=self.key)
        if ok:
            token = int(results[1]["KV"]["ModifyIndex"])
            others = tuple(LockHolder.from_entry(state.contenders[o]) for o in sorted(holders - {sid}) if o in state.contenders)
            self._acquired(
                SlotHolding(session, sid, value, token, None, os.getpid(), admitted=(token, holders), co_holders=others)
            )
            return True
        what = " ".join(str(e.get("What", "")) for e in errors)
        if "invalid session" in what:
            raise SessionGone(sid, client.address)
        if "lock delay" in what:  # our contender key, freed by a check of our session?
            time.sleep(LOCK_DELAY_RETRY)
        acquire_log.debug("entering %s raced with another contender (%s); reading again", self.prefix, what)
        return None

    def _gave_up_full(self, client: ConsulClient, session: LockSession, state: SemaphoreState) -> None:
        self.last_holders = tuple(
            holder_of(client, state.contenders[sid]) for sid in sorted(state.holders) if sid in state.contenders
        )
        self.last_holder = self.last_holders[0] if self.last_holders else None
        acquire_log.debug("%s is full: %s", self.prefix, ", ".join(map(str, self.last_holders)))
        self._drop_unused(client, session)

    def _acquired(self, holding: Holding) -> None:
        self.last_holders = ()
        super()._acquired(holding)

    def _watch_later(self, holding: Holding) -> None:
        lost = functools.partial(self._mark_lost, holding=holding)
        judge = functools.partial(self._judge_slot, sid=holding.sid)
        follow(self.settings, self._dir, holding.token or 0, judge, holding.released, lost)

    # -- releasing ----------------------------------------------------------------------

    def _reap_later(self, until: float) -> None:
        """Nothing to queue: the last holder to leave deletes the semaphore's keys itself."""

    def _release_once(self, client: ConsulClient, holding: Holding, value: bytes) -> bool:
        """Take us off ``.lock`` (deleting it when nobody is left, as ``consul lock`` does)
        and delete our contender key, in one transaction; first with ``.lock`` as our
        admission left it, then as read, until the check-and-set holds."""
        sid = holding.sid
        guess: tuple[int, frozenset[str]] | None = holding.admitted if isinstance(holding, SlotHolding) else None
        while True:
            if guess is None:
                _, entry = client.kv_get(self.key)
                if entry is not None and entry.flags != SEMAPHORE_FLAG:
                    raise SemaphoreConflict(self.key, entry.flags)
                _, listed = decode_lock(self.key, entry.value if entry else None)
                guess = (entry.modify_index if entry else 0, frozenset(listed))
            index, holders = guess
            ops: list[dict[str, Any]] = [{"KV": {"Verb": "delete", "Key": f"{self._dir}{sid}"}}]
            if sid in holders and holders - {sid}:
                ops.insert(
                    0,
                    {
                        "KV": {
                            "Verb": "cas",
                            "Key": self.key,
                            "Value": encode_lock(self.limit, holders - {sid}),
                            "Flags": SEMAPHORE_FLAG,
                            "Index": index,
                        }
                    },
                )
            elif sid in holders:
                ops.insert(0, {"KV": {"Verb": "delete-cas", "Key": self.key, "Index": index}})
            ok, _, _ = client.txn(ops, action="leaving a semaphore", resource=self.key)
            if ok:
                return sid in holders
            guess = None

    @property
    def fence_key(self) -> str:
        """Our contender key (held by our session while we hold a slot)."""
        return f"{self._dir}{self.session_id or ''}"

    def _release_key(self, holding: Holding, value: bytes) -> tuple[str, bytes]:
        # Freeing our contender key is enough: every contender then prunes us.
        return f"{self._dir}{holding.sid}", b""

    # -- watching -----------------------------------------------------------------------

    def _judge_slot(self, snapshot: Snapshot, *, sid: str) -> str | None:
        """The watcher's rule for a slot, on an answer that lists the prefix: lost when
        ``.lock`` is gone or no longer a semaphore's, or no longer lists our session among
        its live holders."""
        try:
            state = SemaphoreState.parse(self.key, list(snapshot.at(self._dir)))
        except ConsulLockError as exc:
            return str(exc)
        if state.limit is None:
            return f"the semaphore's key {self.key} was deleted"
        if sid in state.holders:
            return None
        if sid in state.listed:
            return "our contender key lost its session (our session destroyed or invalidated?)"
        return "we were removed from the semaphore's holders"


def validate_limit(name: str, limit: object) -> int:
    """A semaphore's limit: an int of at least 1; raises :class:`InvalidSetting` naming ``name``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidSetting(name, limit, "must be a whole number of at least 1")
    return limit
