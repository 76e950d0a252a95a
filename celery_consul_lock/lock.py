"""ConsulLock: a mutual-exclusion lock on one Consul KV key, compatible with ``consul lock``.

The key (``PREFIX/.lock`` by convention, e.g. ``locks/backup/.lock``) is acquired for a
Consul session with the flags ``consul lock`` and the Go client use, so this lock, the
``consul lock`` command and a hand-written curl script that acquires the same key exclude
each other. The key's value says who holds it (JSON: host, pid, name, acquired_at, plus
whatever the caller adds); :meth:`ConsulLock.holder` reads it.

Guarantee: while Consul works, at most one session holds the key, and within one process
at most one ``ConsulLock`` (and one thread) holds it although they share a session.

Limit: like every lease, the lock can be lost while held — the session destroyed, its node
failing a check, the agent unreachable past the fencing deadline, the key deleted. Loss
sets :attr:`ConsulLock.lost` and runs the ``on_lost`` callbacks, before Consul can give the
key to another holder when the cause is a lost connection (self-fencing). It is NOT safe
to assume the lock is held until :meth:`release`: check :attr:`held` before side effects,
or pass :attr:`fencing_token` along so the resource can refuse a stale holder.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from . import native
from .backoff import Backoff
from .consul import LOCK_FLAG, ConsulClient, KVEntry, LockAttempt, shared_client
from .errors import ConsulLockError, ConsulUnavailable, LockConflict, LockLost, LockTimeout, SessionGone
from .holder import KeyIdent, LocalKeys, LockHolder, holder_of, read_holder
from .liveness import identity
from .reap import KEEP_FIELD, keep_until, kept_until, reap_later
from .session import LockSession, retire_if_unused, shared_session
from .settings import ConsulSettings
from .watch import ReleaseFlag, follow, judge_lock, wait_for_change

__all__ = ["ConsulLock", "LockHolder"]

acquire_log = logging.getLogger("celery_consul_lock.lock.acquire")
release_log = logging.getLogger("celery_consul_lock.lock.release")
lost_log = logging.getLogger("celery_consul_lock.lock.watch")

#: A key in lock-delay cannot be taken and tells nobody when it frees; poll it this often
#: so that once a lock-delay is in effect, we do not hot loop (the Go client waits 5 s,
#: which would add seconds to every takeover).
LOCK_DELAY_RETRY = 0.25
#: Longest single blocking query while waiting for a held key; Consul caps waits at 10 min.
WAIT_MAX = 60.0
#: Backoff while Consul is briefly unavailable (a leader election takes about a second).
RETRY_MIN, RETRY_MAX = 0.1, 2.0
#: Several failed attempts in a row with a session Consul says is gone means something
#: destroys our sessions as fast as we create them; give up rather than loop.
SESSION_RETRIES = 3


@dataclass(slots=True)
class Holding:
    """One acquisition of a lock: what acquire sets together and release ends together."""

    #: The session that holds the key for us, and its ID.
    session: LockSession
    sid: str
    #: The key's value as our acquire wrote it (release writes it back, with released_at).
    value: bytes
    #: The key's ModifyIndex written by the acquire (the fencing token).
    token: int | None
    #: The key's value (base64, as Consul returns it) just before the acquire.
    previous: str | None
    #: The process that acquired (a forked child never touches Consul for it).
    pid: int
    #: Set by release: what the watcher of this holding looks at.
    released: ReleaseFlag = field(default_factory=ReleaseFlag)
    #: Under gevent, where a watcher hands a loss back to (see ConsulLock._mark_lost).
    owner: native.Owner | None = None

    @property
    def current(self) -> bool:
        """True until released."""
        return not self.released.released


_LOCAL: LocalKeys[ConsulLock] = LocalKeys()
#: Keys this process has seen as locks (flags 0 or LOCK_FLAG).
_LOCK_KEYS: set[KeyIdent] = set()


class ConsulLock:
    """A lock on one Consul key, held by a Consul session.

    ``with ConsulLock("locks/backup/.lock"): ...`` waits for the lock (up to ``timeout``
    if given, then raises :class:`LockTimeout`) and releases it on exit.
    ``acquire(blocking=False)`` takes it or reports the holder in :attr:`last_holder` at
    once. Settings not given as keyword arguments come from Consul's ``CONSUL_HTTP_*``
    environment variables, then the defaults (see :class:`ConsulSettings`).

    By default the lock uses its process's shared session, so an acquire + release costs
    two KV writes; ``private_session=True`` gives it a session of its own for each
    acquisition, destroyed after release.

    A released key stays in Consul with its release record until ``keep_until`` (at least
    ``reap_after`` after the release, and ``keep_released`` if that is longer), then this
    process removes it if nobody took it meanwhile (see :mod:`.reap`).
    """

    def __init__(
        self,
        key: str,
        *,
        name: str | None = None,
        value: dict[str, Any] | None = None,
        timeout: float | None = None,
        private_session: bool = False,
        session: LockSession | None = None,
        on_lost: Callable[[ConsulLock, str], None] | None = None,
        keep_released: float = 0.0,
        settings: ConsulSettings | None = None,
        **setting_values: Any,
    ) -> None:
        if settings is None:
            settings = ConsulSettings.resolve(setting_values)
        elif setting_values:
            settings = ConsulSettings.resolve({**_as_dict(settings), **setting_values}, env={})
        self.settings = settings
        self.key = settings.full_key(key)
        self.name = name or self.key
        self.value = dict(value or {})
        self.timeout = timeout
        self.private_session = private_session
        #: After a release, the key keeps its release record at least this long (seconds),
        #: and at least ``settings.reap_after``; then it may be removed (see :mod:`.reap`).
        self.keep_released = keep_released
        #: A session owned by the caller, used instead of the shared or a private one and
        #: never destroyed by the lock.
        self.given_session = session
        #: Set when the lock is lost while held; cleared by the next acquire.
        self.lost = threading.Event()
        #: Why the lock was lost, once :attr:`lost` is set.
        self.lost_reason: str | None = None
        #: Who held the key when our last acquire gave up (None if nobody: lock-delay).
        self.last_holder: LockHolder | None = None
        self._callbacks: list[Callable[[ConsulLock, str], None]] = [on_lost] if on_lost else []
        self._ident = (settings.base_url, settings.datacenter, self.key)
        #: Guards the holding; a real lock (the watcher is a real thread), held for a few
        #: statements only.
        self._mutex = native.lock()
        #: The latest acquisition (kept after its release for fencing_token and previous).
        self._holding: Holding | None = None
        self._value_tail: tuple[int, bytes] = (0, b"}")
        #: A session holding the key for us (a send-time reservation, see :mod:`.reservation`)
        #: whose hold the next acquire takes over atomically, then destroys; used once.
        self.reservation: str | None = None

    def __repr__(self) -> str:
        state = "held" if self._current() else "free"
        if self.lost.is_set():
            state = "lost"
        return f"<ConsulLock {self.key!r} {state} at {self.settings.base_url}>"

    # -- public -------------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; True if taken.

        ``blocking=False`` tries once and returns at once. Otherwise waits (with Consul
        blocking queries, not polling) until the key frees or ``timeout`` seconds pass;
        ``timeout=None`` waits forever. Raises :class:`ConsulLockError` subclasses when
        Consul cannot be asked (unreachable, ACL), never returns False for that.
        """
        if timeout is not None and timeout < 0:
            timeout = None
        if not blocking:
            deadline: float | None = time.monotonic()
        else:
            deadline = None if timeout is None else time.monotonic() + timeout
        if self._current() is not None:
            raise ConsulLockError(f"{self!r} is already held by this object; release it first (it is not reentrant)")
        if not self._claim_local(deadline):
            return False
        try:
            taken = self._acquire_in_consul(deadline)
        except BaseException:
            self._free_local()
            raise
        if not taken:
            self._free_local()
        return taken

    def _claim_local(self, deadline: float | None) -> bool:
        """Keep other holders in this process off the key (they share our session, and
        Consul would answer them true); False, with :attr:`last_holder` set, when another
        one here still holds it at ``deadline``."""
        other = _LOCAL.claim(self._ident, self, deadline)
        if other is None:
            return True
        self.last_holder = other._as_holder()
        acquire_log.debug("%s is held in this process by %s", self.key, self.last_holder)
        return False

    def _free_local(self) -> None:
        _LOCAL.free(self._ident, self)

    def release(self, *, finished: bool = True, restore: bool = False) -> bool:
        """Release the lock if we hold it; True if Consul confirmed we still held it.

        Consul frees the key only for the session that holds it, so this never frees a
        lock that moved on to someone else. Errors are logged, not raised (if the agent
        cannot be reached, the key is released in the background once it can, or the
        session's TTL frees it). In a process forked while the lock was held, it only
        drops the child's copy of the state: the parent still holds the key.

        The released key keeps the holder's value with ``released_at`` added, so the next
        acquirer can tell (:attr:`previous`) a holder that finished from one whose session
        died holding the key. With ``finished=False`` (the holder is interrupted, e.g. its
        process is shutting down mid-run) the value is kept without ``released_at``: the
        key is free at once, and the next acquirer sees an unfinished holder, as if it died.
        With ``restore=True`` (a holding that did nothing) the key gets back the value it had
        before our acquire, so the next acquirer sees the holder before us. Every release but
        a restore also adds ``keep_until`` (see :mod:`.reap`): the record stays until then,
        after which this process removes the key if it is still free.
        """
        with self._mutex:
            holding = self._holding
            if holding is None or not holding.current:
                return False
            holding.released.set()
        session, value = holding.session, holding.value
        if holding.pid != os.getpid():
            release_log.debug("%s was acquired by pid %s: a forked child leaves it to its parent", self.key, holding.pid)
            return False
        if restore and holding.previous:
            value = base64.b64decode(holding.previous)
            until = kept_until(value)
        else:
            until = keep_until(time.time(), max(self.settings.reap_after, self.keep_released))
            released = b'"released_at":"%s",' % _utc_now_ms() if finished else b""
            value = b'{%s"%s":%.3f,%s' % (released, KEEP_FIELD.encode(), until, value[1:])
        client = shared_client(self.settings)
        ok = False
        try:
            ok = self._release_in_consul(client, holding, value)
            if ok and until is not None:
                self._reap_later(until)
        finally:
            session.unhold(self)
            self._free_local()
            if self._owns(session):
                session.destroy(client)
            else:
                retire_if_unused(session)
        return ok

    def _owns(self, session: LockSession) -> bool:
        """True for a session made for this lock alone (destroyed with its release)."""
        return self.private_session and session is not self.given_session

    def _release_in_consul(self, client: ConsulClient, holding: Holding, value: bytes) -> bool:
        """``?release=``, retried through a brief outage (a Consul leader election) for as
        long as the session's fencing deadline allows. If it still fails, the session is
        given up: it stops being renewed (a session that kept renewing would keep the key
        held forever), and once Consul answers again the key is released and the session
        destroyed in the background; if it never does, the TTL frees the key."""
        session = holding.session
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            try:
                ok = self._release_once(client, holding, value)
            except ConsulLockError as exc:
                if time.monotonic() + backoff.peek() < session.deadline and session.lost_reason is None:
                    delay = backoff.next()
                    release_log.info("releasing %s failed (%s); retrying in %.2f s", self.key, exc, delay)
                    time.sleep(delay)
                    continue
                release_log.warning(
                    "could not release %s; giving its session up (it stops being renewed, and is released and "
                    "destroyed as soon as Consul answers, or ended by its TTL): %s",
                    self.key,
                    exc,
                )
                session.release_later(*self._release_key(holding, value))
                session.lose(f"releasing {self.key} failed: {exc}")
                return False
            if ok:
                release_log.debug("released %s (token %s)", self.key, holding.token)
            else:
                release_log.warning("%s was no longer held by our session when released (lost: %s)", self.key, self.lost_reason)
            return ok

    def _reap_later(self, until: float) -> None:
        """Queue the key just released for removal at ``until`` (epoch s), its keep time."""
        reap_later(self.settings, self.key, until)

    def _release_once(self, client: ConsulClient, holding: Holding, value: bytes) -> bool:
        """One try at freeing what ``holding`` took in Consul; True if it was still ours."""
        return client.kv_release(self.key, holding.sid, value)

    def _release_key(self, holding: Holding, value: bytes) -> tuple[str, bytes]:
        """(key, value) whose ``?release=`` by the holding's session frees it: what a release
        that failed leaves to the session (see :meth:`LockSession.release_later`)."""
        return self.key, value

    @property
    def session_id(self) -> str | None:
        """The Consul session holding the key for us; None when not held."""
        holding = self._current()
        return holding.sid if holding is not None else None

    @property
    def previous(self) -> dict[str, Any] | None:
        """The key's value (JSON) just before our last acquire, read atomically with it;
        None if the key did not exist or its value is not a JSON object. A value with
        ``released_at`` was released by a holder that finished (:meth:`release`), one
        without it was freed by its session's end (or written by another client)."""
        raw = self._holding.previous if self._holding is not None else None
        if not raw:
            return None
        try:
            data = json.loads(base64.b64decode(raw))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    @property
    def fence_key(self) -> str:
        """The key our session holds while we hold the lock: what a ``check-session``
        transaction names to write only while the holding lasts."""
        return self.key

    @property
    def fencing_token(self) -> int | None:
        """The key's ModifyIndex written by our acquire, read atomically with it: every
        later holder's is larger, so a resource that remembers the largest token it saw can
        refuse a deposed holder. None before the first acquire (after a release: the last
        acquire's).

        It keeps growing when a released key is removed (:mod:`.reap`) and created again:
        a ModifyIndex is the Raft index of the write, one counter for the whole datacenter
        that only grows, not a count kept in the key (as ``LockIndex`` is, which restarts
        at 1 in a new key and which a plain PUT resets)."""
        holding = self._holding
        return holding.token if holding is not None else None

    @property
    def held(self) -> bool:
        """True while we hold the lock, have not seen it lost, and are inside the session's
        self-fencing deadline. Check it right before a side effect."""
        holding = self._current()
        return (
            holding is not None
            and self.lost_reason is None
            and holding.session.alive()
            and holding.pid == os.getpid()  # a forked child's copy is not a holding
        )

    def check(self) -> None:
        """Raise :class:`LockLost` unless :attr:`held`."""
        if not self.held:
            reason = self.lost_reason or ("not acquired" if self._current() is None else "the session's fencing deadline passed")
            raise LockLost(self.key, reason)

    def on_lost(self, callback: Callable[[ConsulLock, str], None]) -> None:
        """Call ``callback(lock, reason)`` when the lock is lost while held."""
        self._callbacks.append(callback)

    def declare_lost(self, reason: str) -> None:
        """Declare the current holding lost (by its owner, e.g. a beat stepping down): from
        now on :attr:`held` is false, then :attr:`lost` is set and the ``on_lost`` callbacks
        run. The key stays held in Consul until :meth:`release`. Nothing happens when the
        lock is not held or already lost."""
        self._mark_lost(reason)

    def session_lost(self, reason: str) -> None:
        """Called by the lock's session when it is lost: the holding is lost with it."""
        self._mark_lost(f"session lost: {reason}")

    def close(self) -> None:
        """Release the lock if held (a private session is destroyed with it)."""
        self.release()

    def __enter__(self) -> ConsulLock:
        if not self.acquire(blocking=True, timeout=self.timeout):
            raise LockTimeout(self.key, self.timeout or 0.0, str(self.last_holder) if self.last_holder else None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @classmethod
    def holder(cls, key: str, *, settings: ConsulSettings | None = None, **setting_values: Any) -> LockHolder | None:
        """Who holds ``key`` now (a consistent read), or None if nobody does."""
        settings = settings or ConsulSettings.resolve(setting_values)
        return read_holder(shared_client(settings), settings.full_key(key))

    # -- acquiring ----------------------------------------------------------------------

    def _acquire_in_consul(self, deadline: float | None) -> bool:
        # ``exists`` picks the transaction's form; a wrong guess costs a request, no write.
        # A key this process has locked before is taken with ``get`` + ``lock``, which
        # reports the key's previous flags, so a key repurposed since (a semaphore's) is put
        # back and refused. A key never seen here is first tried with ``check-not-exists``
        # + ``lock``, which only creates: if the key exists, it is read and its flags
        # checked before anything is written, so a key that is not a lock is never touched.
        exists = self._ident in _LOCK_KEYS
        checked = exists

        def attempt_once(client: ConsulClient, session: LockSession, sid: str) -> bool | None:
            nonlocal exists, checked
            value = self._value(sid)
            if self.reservation is not None and self._took_over(client, session, sid, value):
                return True
            attempt = client.kv_lock(self.key, sid, value, exists=exists)
            if attempt.reason in ("missing", "exists"):
                exists = attempt.reason == "exists"
                if exists and not checked:
                    _, entry = client.kv_get(self.key)
                    self._check_is_lock(entry)
                    checked = True
                return None
            _LOCK_KEYS.add(self._ident)
            exists = True
            if attempt.acquired:
                self._taken(client, session, sid, value, attempt)
                return True
            if attempt.reason == "session":
                raise SessionGone(sid, client.address)
            return None if self._wait_for_change(client, session, deadline) else False

        return self._acquire_loop(deadline, attempt_once)

    def _acquire_loop(
        self, deadline: float | None, attempt_once: Callable[[ConsulClient, LockSession, str], bool | None]
    ) -> bool:
        """Run ``attempt_once(client, session, sid)`` until it returns True (taken) or False
        (gave up at the deadline); None means try again. Around it, the parts every kind of
        holding shares: a usable session (a new one when the last was lost), retries through
        a brief Consul outage while the caller waits, and a bound on sessions that Consul
        says are gone (``attempt_once`` raises :class:`SessionGone`)."""
        client = shared_client(self.settings)
        session = self._new_session()
        session_failures = 0
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            try:
                session = self._usable_session(session)
                sid = session.ensure(client)
                outcome = attempt_once(client, session, sid)
                if outcome is not None:
                    return outcome
                backoff.reset()
            except SessionGone as exc:
                session.lose("Consul does not know the session")
                session_failures += 1
                if session_failures >= SESSION_RETRIES:
                    raise SessionGone(exc.session, client.address) from None
            except ConsulUnavailable as exc:
                # Brief during a Consul leader election: retry while the caller waits
                # (not through a TLS failure: waiting does not fix a configuration).
                left = None if deadline is None else deadline - time.monotonic()
                if not exc.transient or (left is not None and left <= 0):
                    raise
                delay = backoff.next()
                acquire_log.info("acquiring %s: %s; retrying in %.2f s", self.key, exc.detail, delay)
                time.sleep(delay if left is None else min(delay, left))

    def _took_over(self, client: ConsulClient, session: LockSession, sid: str, value: bytes) -> bool:
        """Take the key over from :attr:`reservation` (once); False when that session no
        longer holds it (expired, or taken over by another copy of the message)."""
        reserved, self.reservation = self.reservation, None
        attempt = client.kv_take_over(self.key, reserved or "", sid, value)
        if not attempt.acquired:
            acquire_log.info("%s: the reservation is gone; acquiring as usual", self.key)
            return False
        _LOCK_KEYS.add(self._ident)
        self._taken(client, session, sid, value, attempt)
        try:
            client.session_destroy(reserved or "")
        except ConsulLockError as exc:  # its TTL ends it; it holds nothing any more
            acquire_log.info("could not destroy the reservation's session of %s: %s", self.key, exc)
        acquire_log.debug("took %s over from its reservation", self.key)
        return True

    def _usable_session(self, session: LockSession) -> LockSession:
        if session.id is not None and not session.alive():
            session.lose(session.lost_reason or "fencing deadline passed")
        if session.lost_reason is not None:
            session = self._new_session()
        if session.overdue():
            # Renewals are failing: a lock taken now would be fenced within moments.
            raise ConsulUnavailable(self.settings.base_url, "acquiring a lock", "the session's renewals are failing")
        return session

    def _taken(self, client: ConsulClient, session: LockSession, sid: str, value: bytes, attempt: LockAttempt) -> None:
        previous = attempt.conflict
        if previous is not None:
            # Not a lock (a semaphore's key, say): put it back as it was, and refuse.
            restored = client.kv_restore(self.key, sid, previous)
            acquire_log.error("%s has flags %#x: not a lock; restored it: %s", self.key, previous.flags, restored)
            raise LockConflict(self.key, previous.flags)
        self._acquired(Holding(session, sid, value, attempt.modify_index, attempt.previous, os.getpid()))

    def _wait_for_change(self, client: ConsulClient, session: LockSession, deadline: float | None) -> bool:
        """After a refused acquire: False when the time is up (holder recorded), else wait
        for the key to change (held) or for the lock-delay to pass, and return True."""
        index, entry = client.kv_get(self.key)
        self._check_is_lock(entry)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            self._gave_up(client, entry, session)
            return False
        if entry is not None and entry.session:
            # Held: wait for the key to change, told by the process's watcher.
            wait = WAIT_MAX if left is None else min(WAIT_MAX, left)
            acquire_log.debug("%s is held by session %s; waiting up to %.1f s", self.key, entry.session, wait)
            wait_for_change(self.settings, self.key, index, [entry], wait)
        else:
            # Free but inside a lock-delay: Consul says nothing of when it ends.
            acquire_log.debug("%s is in lock-delay; retrying in %.2f s", self.key, LOCK_DELAY_RETRY)
            time.sleep(LOCK_DELAY_RETRY if left is None else min(LOCK_DELAY_RETRY, left))
        return True

    def _new_session(self) -> LockSession:
        if self.given_session is not None:
            if self.given_session.lost_reason is not None:
                raise SessionGone(self.given_session.id or "?", self.settings.base_url)
            return self.given_session
        if self.private_session:
            return self._private_session()
        return shared_session(self.settings)

    def _private_session(self) -> LockSession:
        """A session for this lock alone (destroyed with its release, see :meth:`_owns`)."""
        return LockSession(self.settings, name=f"celery-consul-lock {self.name} {socket.gethostname()} pid {os.getpid()}")

    def _gave_up(self, client: ConsulClient, entry: KVEntry | None, session: LockSession) -> None:
        if entry is not None and entry.session:
            self.last_holder = holder_of(client, entry)
            acquire_log.debug("%s is held by %s", self.key, self.last_holder)
        else:
            self.last_holder = None
            acquire_log.debug("%s is free but inside a lock-delay", self.key)
        self._drop_unused(client, session)

    def _drop_unused(self, client: ConsulClient, session: LockSession) -> None:
        """After a failed acquire: destroy a session made for this lock alone."""
        if self._owns(session) and session.holding() == 0:
            session.destroy(client)

    def _check_is_lock(self, entry: KVEntry | None) -> None:
        if entry is not None and entry.flags not in (0, LOCK_FLAG):
            raise LockConflict(self.key, entry.flags)

    def _value(self, sid: str) -> bytes:
        """The key's value: who holds it, as JSON (the fixed part encoded once per process)."""
        pid = os.getpid()
        if self._value_tail[0] != pid:
            fixed = {"host": socket.gethostname(), "pid": pid, **identity(), "name": self.name, **self.value}
            self._value_tail = (pid, json.dumps(fixed, separators=(",", ":"), default=str)[1:].encode())
        return b'{"acquired_at":"%s","session":"%s",%s' % (_utc_now_ms(), sid.encode(), self._value_tail[1])

    def _acquired(self, holding: Holding) -> None:
        holding.owner = native.owner()
        session = holding.session
        with self._mutex:
            self._holding = holding
            self.lost_reason = None
            if self.lost.is_set():
                self.lost.clear()
            self.last_holder = None
        session.hold(self)
        if session.lost_reason is not None:  # lost between ensure() and hold()
            self.session_lost(session.lost_reason)
        self._watch_later(holding)
        acquire_log.debug("acquired %s (session %s)", self.key, holding.sid)

    def _watch_later(self, holding: Holding) -> None:
        """Have the process's watcher follow the holding's key for loss (see :mod:`.watch`)."""
        judge = functools.partial(judge_lock, key=self.key, sid=holding.sid)
        lost = functools.partial(self._mark_lost, holding=holding)
        follow(self.settings, self.key, holding.token or 0, judge, holding.released, lost)

    def _current(self) -> Holding | None:
        """The holding not yet released, or None."""
        holding = self._holding
        return holding if holding is not None and holding.current else None

    def _as_holder(self) -> LockHolder:
        return LockHolder(
            key=self.key,
            session=self.session_id or "",
            host=socket.gethostname(),
            pid=os.getpid(),
            name=self.name,
            extra=dict(self.value),
            fencing_token=self.fencing_token,
            **identity(),  # started, pidns: what tells this process from a later one
        )

    # -- losing -------------------------------------------------------------------------

    def _mark_lost(self, reason: str, holding: Holding | None = None) -> None:
        """The current holding (or ``holding``, if it is still the current one) is lost:
        ``held`` is false from now on (``lost_reason`` is set). Then :attr:`lost` is set and
        the callbacks run: here, or under gevent, when called from a watcher (a real
        thread), in a greenlet of the hub that acquired the lock."""
        with self._mutex:
            current = self._current()
            if current is None or self.lost_reason is not None or (holding is not None and holding is not current):
                return
            self.lost_reason = reason
        native.log(lost_log, logging.WARNING, "lock %s lost: %s", self.key, reason)
        if current.owner is None:
            self._tell_lost(current, reason)
        else:
            current.owner.call(self._tell_lost, current, reason)

    def _tell_lost(self, holding: Holding, reason: str) -> None:
        with self._mutex:
            if self._holding is not holding:  # acquired again since: that holding is not lost
                return
            callbacks = list(self._callbacks)
        self.lost.set()
        for callback in callbacks:
            try:
                callback(self, reason)
            except Exception:
                lost_log.exception("on_lost callback %r for %s failed", callback, self.key)


_SECOND: tuple[int, bytes] = (0, b"")


def _utc_now_ms() -> bytes:
    """Now in UTC as ISO 8601 with milliseconds (``2026-11-26T10:14:22.830+00:00``), the
    part up to the second formatted once per second."""
    global _SECOND
    now = time.time()
    second = int(now)
    cached = _SECOND
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode())
    return b"%s.%03d+00:00" % (cached[1], int((now - second) * 1000))


def _as_dict(settings: ConsulSettings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}
