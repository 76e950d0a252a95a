"""Consul sessions: one per process (or one per lock on request), renewed in the background.

A lock in Consul is only as alive as the session that holds it. This module owns that
session's life: it creates it lazily (in the process that uses it, never inherited
through ``fork``), renews it from a daemon thread, keeps the *self-fencing deadline* — the
moment after which we may no longer assume our locks are ours — and destroys it on
``close()`` and at interpreter exit, releasing its locks first so the next holder does not
wait out a lock-delay.

Guarantee and its limit: once :meth:`LockSession.deadline` has passed without a
successful renewal, every lock of the session is reported lost, *before* Consul can hand
it to anyone else (a failing check frees it no sooner than lock-delay after our last
contact; a TTL no sooner than TTL after it). That holds only while this host's clock and
the Consul servers' advance at about the same rate, and while this process is scheduled;
a paused process learns of the loss when it resumes.

The renewer is a real OS thread (see :mod:`.native`), also in a gevent worker, so a task
body that blocks without yielding to gevent does not stop the renewals.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import native
from .backoff import Backoff
from .consul import ConsulClient, renewal_client, shared_client
from .errors import ConsulLockError, ConsulUnavailable, SessionGone
from .settings import ConsulSettings

__all__ = ["LockSession", "SessionPool", "close_sessions", "fence_margin", "renewal_interval", "shared_session"]

log = logging.getLogger("celery_consul_lock.session")
renew_log = logging.getLogger("celery_consul_lock.session.renew")

#: Renewals before the fencing deadline: two may fail (or be slow) before we fence.
RENEWALS_PER_WINDOW = 3
#: After a failed renewal, try again this soon (but never after the deadline).
RENEW_RETRY = 0.5
#: Part of the fencing window kept back for clock-rate differences and scheduling.
FENCE_MARGIN_RATIO = 0.1
#: ... and never less than this.
FENCE_MARGIN_MIN = 0.5
#: How often a session left over by an outage is tried again (doubling up to the max).
LEFTOVER_RETRY_MIN, LEFTOVER_RETRY_MAX = 0.2, 2.0


def fence_margin(window: float) -> float:
    """The part of a fencing window (seconds) kept back for clock-rate differences and
    scheduling: the self-fencing deadline is the last contact + window - this."""
    return max(FENCE_MARGIN_MIN, window * FENCE_MARGIN_RATIO)


def renewal_interval(window: float) -> float:
    """Seconds between renewals of a session whose fencing window is ``window`` seconds:
    RENEWALS_PER_WINDOW renewals fit before the self-fencing deadline."""
    return (window - fence_margin(window)) / RENEWALS_PER_WINDOW


class SessionUser(Protocol):
    """What a session tells its locks."""

    def session_lost(self, reason: str) -> None: ...


class LockSession:
    """One Consul session and its renewer thread.

    ``id`` is None until :meth:`ensure` creates the session. Once lost (destroyed behind
    our back, expired, or fenced locally) a LockSession is never revived; the pool makes a
    new one for the next acquire.
    """

    def __init__(self, settings: ConsulSettings, *, name: str, heartbeat: Callable[[ConsulClient], None] | None = None) -> None:
        self.settings = settings
        self.name = name
        #: Called before creating the session and before every renewal (e.g. to pass a TTL
        #: health check the session is tied to); its failure counts as a failed renewal.
        self.heartbeat = heartbeat
        self.id: str | None = None
        self.pid = os.getpid()
        self.lost_reason: str | None = None
        self.window = settings.fence_window
        self.margin = fence_margin(self.window)
        self.interval = renewal_interval(self.window)
        self._last_contact = 0.0
        #: Guards the users and the session's creation (held across I/O: a greenlet's lock
        #: under gevent).
        self._mutex = threading.RLock()
        #: Guards ``lost_reason`` and ``_stop``, which the renewer (a real thread) changes.
        self._state = native.lock()
        self._stop = native.Event()
        #: Where the renewer hands a loss to the session's locks (their greenlets, under gevent).
        self._owner: native.Owner | None = None
        self._users: set[SessionUser] = set()
        #: (key, value) of locks whose release failed while Consul was unavailable.
        self._unreleased: list[tuple[str, bytes]] = []

    def __repr__(self) -> str:
        state = "lost" if self.lost_reason else ("active" if self.id else "new")
        return f"<LockSession {self.id or '-'} {state} at {self.settings.base_url}>"

    # -- life -------------------------------------------------------------------------

    def ensure(self, client: ConsulClient) -> str:
        """Create the session if it does not exist yet; returns its ID."""
        with self._mutex:
            if self.id is None:
                t0 = time.monotonic()
                if self.heartbeat is not None:
                    self.heartbeat(client)
                self.id = client.session_create(
                    self.name,
                    ttl=self.settings.ttl,
                    lock_delay=self.settings.lock_delay,
                    checks=self.settings.session_checks,
                )
                self._last_contact = t0
                self.pid = os.getpid()
                self._owner = native.Owner()
                native.start_thread(self._renew_loop, (), f"consul-session-renew-{self.id[:8]}")
                log.debug("created session %s (ttl=%gs lock_delay=%gs)", self.id, self.settings.ttl, self.settings.lock_delay)
            return self.id

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` value after which our locks must be taken as lost."""
        return self._last_contact + self.window - self.margin

    def overdue(self) -> bool:
        """True when a renewal is late: the renewer is failing to reach Consul."""
        return self.id is not None and time.monotonic() - self._last_contact > 1.5 * self.interval

    def alive(self) -> bool:
        """True if the session exists, is not lost, and its fencing deadline is ahead."""
        return self.id is not None and self.lost_reason is None and time.monotonic() < self.deadline

    def hold(self, user: SessionUser) -> None:
        with self._mutex:
            self._users.add(user)

    def unhold(self, user: SessionUser) -> None:
        with self._mutex:
            self._users.discard(user)

    def holding(self) -> int:
        with self._mutex:
            return len(self._users)

    def lose(self, reason: str) -> None:
        """Mark the session lost: stop renewing, tell every lock it holds. Idempotent.

        From the renewer under gevent, the locks are told in a greenlet of the session's
        hub, when that hub gets a turn; :meth:`alive` (and so every lock's ``held``) is
        false at once."""
        with self._state:
            if self.lost_reason is not None:
                return
            self.lost_reason = reason
            self._stop.set()
        native.log(log, logging.WARNING, "session %s lost: %s", self.id, reason)
        if self._owner is None:
            self._tell_users(reason)
        else:
            self._owner.call(self._tell_users, reason)

    def _tell_users(self, reason: str) -> None:
        with self._mutex:
            users = list(self._users)
        for user in users:
            user.session_lost(reason)

    def retire(self, reason: str) -> None:
        """Mark the session as ended by its owner, quietly: no more renewals, and no
        acquire starts with it; :meth:`destroy` still removes it from Consul."""
        with self._state:
            self._stop.set()
            if self.lost_reason is None:
                self.lost_reason = reason

    def release_later(self, key: str, value: bytes) -> None:
        """Record a key whose release failed (Consul unavailable): :meth:`destroy` releases
        it first, then, if Consul still cannot be reached, keeps trying in the background."""
        with self._mutex:
            self._unreleased.append((key, value))

    def destroy(self, client: ConsulClient, release: Callable[[], None] | None = None) -> None:
        """Stop renewing and destroy the session, after ``release`` freed its keys (and the
        keys whose release failed earlier are released: no lock-delay for their next holder).

        Errors are logged, not raised. While Consul is unavailable (a leader election), a
        daemon thread keeps trying until Consul answers or the session's TTL has surely
        ended it, so its keys are not held for up to 2 x TTL + lock-delay after an outage
        of a few seconds. In a process forked from the session's owner it does nothing in
        Consul: the parent still uses the session.
        """
        if self.pid != os.getpid():
            # Inherited through fork: the parent owns the session and its keys.
            self.retire("inherited through fork")
            return
        if release is not None:
            release()
        self.retire("destroyed")
        with self._mutex:
            sid, self.id = self.id, None
            keys, self._unreleased = self._unreleased, []
        if sid is None:
            return
        leftover = _Leftover(self.settings, sid, keys, until=time.monotonic() + 2 * self.settings.ttl)
        try:
            leftover.end(client)
        except ConsulLockError as exc:
            if not _transient(exc):
                log.warning("could not destroy session %s (its TTL will end it): %s", sid, exc)
                return
            log.warning("could not destroy session %s yet; trying again in the background: %s", sid, exc)
            _LEFTOVERS.add(leftover)
            return
        log.debug("destroyed session %s", sid)

    # -- renewer ----------------------------------------------------------------------

    def _renew_loop(self) -> None:
        client = renewal_client(self.settings)  # connections of the renewers' own
        sid = self.id
        failing: str | None = None
        next_at = self._last_contact + self.interval
        while not self._stop.wait(max(0.0, min(next_at, self.deadline) - time.monotonic())):
            t0 = time.monotonic()
            left = self.deadline - t0
            if left <= 0:
                self.lose(f"no successful renewal for {self.window - self.margin:.1f} s (self-fenced; last error: {failing})")
                return
            try:
                if self.heartbeat is not None:
                    self.heartbeat(client)
                client.session_renew(sid or "", timeout=min(self.settings.timeout, left))
            except SessionGone:
                self.lose("Consul no longer knows the session (destroyed, expired or invalidated by a check)")
                return
            except ConsulLockError as exc:
                if failing is None:
                    native.log(
                        renew_log,
                        logging.WARNING,
                        "renewing session %s failed, retrying until the fencing deadline: %s",
                        sid,
                        exc,
                    )
                failing = str(exc)
                next_at = min(t0 + RENEW_RETRY, self.deadline)
                continue
            except Exception as exc:  # never let the renewer die silently
                native.log(renew_log, logging.ERROR, "renewer of session %s crashed", sid, exc_info=True)
                self.lose(f"renewer crashed: {exc!r}")
                return
            if failing is not None:
                native.log(renew_log, logging.WARNING, "renewing session %s works again", sid)
                failing = None
            self._last_contact = t0
            next_at = t0 + self.interval


@dataclass
class _Leftover:
    """A session given up while Consul was unavailable, and the keys it still holds."""

    settings: ConsulSettings
    sid: str
    keys: list[tuple[str, bytes]]
    #: ``time.monotonic()`` after which Consul has ended the session by its TTL anyway.
    until: float

    def end(self, client: ConsulClient) -> None:
        """Release the keys (only where this session holds them), then destroy the
        session; raises ConsulLockError, keeping what is left to do."""
        while self.keys:
            key, value = self.keys[0]
            client.kv_release(key, self.sid, value)
            self.keys.pop(0)
        client.session_destroy(self.sid)


class _Leftovers:
    """Ends leftover sessions from a daemon thread as soon as Consul answers again."""

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Leftover] = []
        self._thread: threading.Thread | None = None

    def add(self, leftover: _Leftover) -> None:
        with self._cond:
            self._pending.append(leftover)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="consul-session-leftovers", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        backoff = Backoff(LEFTOVER_RETRY_MIN, LEFTOVER_RETRY_MAX)
        try:
            while True:
                with self._cond:
                    while not self._pending:
                        self._cond.wait()
                    pending = list(self._pending)
                for leftover in pending:
                    if self._try(shared_client(leftover.settings), leftover):
                        with self._cond:
                            self._pending.remove(leftover)
                with self._cond:
                    waiting = bool(self._pending)
                if waiting:
                    time.sleep(backoff.next())
                else:
                    backoff.reset()
        except BaseException:  # never die silently: say so, and let the next add() restart us
            log.exception("the leftover sessions thread crashed")
            with self._cond:
                self._thread = None
            raise

    @staticmethod
    def _try(client: ConsulClient, leftover: _Leftover) -> bool:
        """One attempt; True when nothing is left to do."""
        keys = [key for key, _ in leftover.keys]
        if time.monotonic() > leftover.until:
            log.info("session %s has ended by its TTL by now (with it, its keys %s)", leftover.sid, keys)
            return True
        try:
            leftover.end(client)
        except ConsulLockError as exc:
            if _transient(exc):
                log.debug("session %s: Consul still unavailable: %s", leftover.sid, exc)
                return False
            log.warning("could not destroy session %s (its TTL will end it): %s", leftover.sid, exc)
            return True
        log.info("Consul answers again: released %s and destroyed session %s", keys or "no keys", leftover.sid)
        return True


def _transient(exc: ConsulLockError) -> bool:
    """True for an error that waiting can fix: Consul unreachable or between leaders (not
    a TLS or ACL refusal, which needs a configuration change)."""
    return isinstance(exc, ConsulUnavailable) and exc.transient


_LEFTOVERS = _Leftovers()


class SessionPool:
    """The process's shared sessions, one per distinct settings.

    Sessions are per process: after ``fork`` the child forgets the parent's sessions
    without touching them (the parent still renews and owns them) and creates its own.
    """

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)
        atexit.register(self.close_all)

    def _reset(self) -> None:
        self._mutex = threading.Lock()
        self._sessions: dict[ConsulSettings, LockSession] = {}
        self._pid = os.getpid()

    def get(self, settings: ConsulSettings) -> LockSession:
        """The current shared session for ``settings``; a fresh one if the last was lost."""
        if self._pid != os.getpid():  # forked without the at_fork reset (os.fork not used)
            self._reset()
        with self._mutex:
            session = self._sessions.get(settings)
            if session is None or session.lost_reason is not None:
                session = LockSession(settings, name=f"celery-consul-lock {socket.gethostname()} pid {os.getpid()}")
                self._sessions[settings] = session
            return session

    def drop(self, session: LockSession) -> None:
        with self._mutex:
            if self._sessions.get(session.settings) is session:
                del self._sessions[session.settings]

    def sessions(self) -> list[LockSession]:
        with self._mutex:
            return list(self._sessions.values())

    def close_all(self) -> None:
        """Release every lock and destroy every session of this process."""
        if self._pid != os.getpid():
            return
        for session in self.sessions():
            close_session(session)


def close_session(session: LockSession) -> None:
    """Release the session's locks, then destroy it (release first: no lock-delay)."""
    _POOL.drop(session)
    if session.id is None:
        return

    def release_all() -> None:
        with session._mutex:
            users = list(session._users)
        for user in users:
            release = getattr(user, "release", None)
            if release is not None:
                try:
                    release()
                except Exception:
                    log.exception("releasing %r before destroying its session failed", user)

    session.destroy(shared_client(session.settings), release_all)


_POOL = SessionPool()


def shared_session(settings: ConsulSettings) -> LockSession:
    """The session this process shares between its locks for ``settings``."""
    return _POOL.get(settings)


def retire_if_unused(session: LockSession) -> None:
    """Destroy a lost session once none of its locks is held any more."""
    if session.lost_reason is not None and session.holding() == 0 and session.id is not None:
        close_session(session)


def close_sessions() -> None:
    """Release every lock held by this process and destroy its shared sessions.

    Runs by itself at interpreter exit; call it earlier to end them sooner.
    """
    _POOL.close_all()
