"""The process's watcher: one per settings, following every held key and every waiter.

After a lock has been held for a moment (WATCH_DELAY), it is *followed*: the watcher makes
consistent blocking reads of the longest common folder of everything it follows (one
``GET /v1/kv/PREFIX?recurse&index=N&consistent``) and judges every followed holding from each
answer: a lock is lost when its key is deleted, freed or taken by another session (the Go
client's lock monitor), a semaphore's slot by its own rule. Waiters (a lock or a semaphore
waiting for a held key to change) subscribe to the same watcher and are woken when what
they saw changes, instead of each holding a connection in a blocking query of its own.

So a process keeps one watcher thread and one connection per settings however many locks
it holds or waits for (before: one thread and one connection per held lock). The price:
each answer lists every key under the prefix, so its size grows with the keys there, and
under a high write rate under the prefix the watcher reads at most once per WATCH_INTERVAL.
Keep the locks of an application under one folder (``locks/`` by default): locks in folders
with nothing in common make the prefix the whole KV store.

When a key outside the prefix is followed, the query in progress is interrupted (its socket
shut down, see :meth:`~celery_consul_lock.transport.Connection.interrupt`) and started again
over the wider prefix. The watcher is a real OS thread (see :mod:`.native`), also under gevent.
"""

from __future__ import annotations

import bisect
import collections
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import native
from .consul import ConsulClient, KVEntry
from .errors import ConsulLockError
from .settings import ConsulSettings

__all__ = [
    "WATCH_DELAY",
    "Followed",
    "FollowedHolding",
    "ReleaseFlag",
    "Snapshot",
    "Waiter",
    "Watcher",
    "common_prefix",
    "follow",
    "judge_lock",
    "wait_for_change",
    "watched",
]

watch_log = logging.getLogger("celery_consul_lock.lock.watch")

#: A lock held longer than this is followed. Most locks guard short work and are released
#: sooner; following those too would make the watcher read on their account. Until then a
#: lock's loss is still caught by its session (renewals and the fencing deadline), only a
#: deleted or stolen key goes unseen for that long.
WATCH_DELAY = 0.5
#: The watcher's blocking-query wait (a change under the prefix ends it early).
WATCH_WAIT = 60.0
#: After a failed read, try again after this (the Go client's MonitorRetryTime); the
#: session's fencing deadline covers longer outages.
WATCH_RETRY = 1.0
#: At most one read per this, however fast keys under the prefix change: a loss is seen
#: at most this much later than it would be by a query of its own.
WATCH_INTERVAL = 0.2
#: A watcher with nothing to follow closes its connection after this long.
WATCH_IDLE = 60.0


class ReleaseFlag:
    """Says when one holding of a lock (one acquire) has been released: the watcher stops
    following it then (a plain flag: set once, read by the watcher)."""

    __slots__ = ("released",)

    def __init__(self) -> None:
        self.released = False

    def set(self) -> None:
        self.released = True

    def is_set(self) -> bool:
        return self.released


@dataclass(frozen=True)
class Snapshot:
    """One answer of the watcher: the keys under ``prefix`` (sorted), at Consul's ``index``,
    from the watcher's query number ``query``."""

    prefix: str
    index: int
    query: int
    entries: tuple[KVEntry, ...]
    _keys: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, prefix: str, index: int, query: int, entries: Sequence[KVEntry]) -> Snapshot:
        ordered = tuple(sorted(entries, key=lambda e: e.key))
        return cls(prefix, index, query, ordered, [e.key for e in ordered])

    def covers(self, path: str) -> bool:
        return path.startswith(self.prefix)

    def get(self, key: str) -> KVEntry | None:
        """The entry of ``key``, or None (deleted, or never there)."""
        at = bisect.bisect_left(self._keys, key)
        return self.entries[at] if at < len(self._keys) and self._keys[at] == key else None

    def at(self, path: str) -> tuple[KVEntry, ...]:
        """The entries of ``path``: a key (exactly), or a folder ending in ``/`` (every key
        under it)."""
        if not path.endswith("/"):
            entry = self.get(path)
            return (entry,) if entry is not None else ()
        start = bisect.bisect_left(self._keys, path)
        end = bisect.bisect_left(self._keys, path[:-1] + "0")  # "0" follows "/"
        return self.entries[start:end]


#: A followed holding's rule: why the holding is lost in a snapshot, or None.
Judge = Callable[[Snapshot], "str | None"]


def judge_lock(snapshot: Snapshot, *, key: str, sid: str) -> str | None:
    """A lock's rule: lost when ``key`` is deleted, freed or taken from session ``sid``."""
    entry = snapshot.get(key)
    if entry is None:
        return "the key was deleted"
    if entry.session == sid:
        return None
    if entry.session:
        return f"the key is now held by session {entry.session}"
    return "the key was freed behind our back (our session destroyed or invalidated?)"


def _fingerprint(entries: Sequence[KVEntry]) -> frozenset[tuple[str, int]]:
    return frozenset((e.key, e.modify_index) for e in entries)


@dataclass(eq=False)
class Followed:
    """Something the watcher follows at ``path`` (a key, or a folder ending in ``/``). An
    answer says something about it only when known to be newer than what it is about: its
    index above ``after`` (Consul's index only grows under a prefix), or its query started
    after ``since`` (the watcher's count of queries started when it was added)."""

    path: str
    after: int
    since: int = 0

    def newer(self, snapshot: Snapshot) -> bool:
        return snapshot.covers(self.path) and (snapshot.index > self.after or snapshot.query > self.since)


@dataclass(eq=False, kw_only=True)
class FollowedHolding(Followed):
    """A held lock or semaphore slot, followed from ``due`` on until ``released``:
    ``lost(reason)`` (on a thread of its own) once ``judge`` finds a reason."""

    due: float
    judge: Judge
    released: ReleaseFlag
    lost: Callable[[str], None]


@dataclass(eq=False, kw_only=True)
class Waiter(Followed):
    """A caller waiting for the entries at ``path`` to differ from ``seen``."""

    seen: frozenset[tuple[str, int]]
    wakeup: native.Wakeup = field(default_factory=native.Wakeup)

    def changed(self, snapshot: Snapshot) -> bool:
        return self.newer(snapshot) and _fingerprint(snapshot.at(self.path)) != self.seen


def common_prefix(paths: Sequence[str]) -> str:
    """The longest folder (up to and including a ``/``) that every path starts with; when
    they share no folder, their longest common start (``""``: the whole KV store). Cut at a
    folder so that keys added next to the ones followed need no new query."""
    first, last = min(paths), max(paths)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    common = first[:n]
    cut = common.rfind("/")
    return common[: cut + 1] if cut >= 0 else common


class Watcher:
    """The process's watcher for one settings (see the module's docstring): a real thread
    started with the first holding or waiter, and one connection of its own (closed after
    WATCH_IDLE with nothing to follow)."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.settings = settings
        self._mutex = native.lock()  # held for a few statements only (also by greenlets)
        self._wake = native.Event()
        self._client = ConsulClient(settings, native=True)
        #: Holdings not yet due (in the order they come due: all wait WATCH_DELAY).
        self._pending: collections.deque[FollowedHolding] = collections.deque()
        self._held: list[FollowedHolding] = []
        self._waiters: list[Waiter] = []
        #: The prefix of the query in progress (None: none), and whether it must restart.
        self._reading: str | None = None
        self._restart = False
        #: Queries started so far, and the last answer.
        self._started = 0
        self._snapshot: Snapshot | None = None
        self._running = False

    # -- from the callers ------------------------------------------------------------------

    @property
    def reading(self) -> str | None:
        """The prefix of the query in progress; None between queries and while idle."""
        return self._reading

    def follow(self, holding: FollowedHolding) -> None:
        with self._mutex:
            holding.since = self._started
            idle = not (self._pending or self._held or self._waiters)
            self._pending.append(holding)
            self._cover(holding.path)
            start = self._start()
        if idle:
            self._wake.set()
        if start:
            native.start_thread(self._run, (), "consul-lock-watcher")

    def wait(self, waiter: Waiter, timeout: float | None) -> None:
        """Block until ``waiter`` sees a change, or ``timeout`` seconds (None: ever)."""
        with self._mutex:
            # Set first: the last answer came from a query started before this waiter, so it
            # tells a change only if its index shows it newer than what the waiter read.
            waiter.since = self._started
            snapshot = self._snapshot
            if snapshot is not None and waiter.changed(snapshot):
                return
            self._waiters.append(waiter)
            self._cover(waiter.path)
            start = self._start()
        self._wake.set()
        if start:
            native.start_thread(self._run, (), "consul-lock-watcher")
        try:
            waiter.wakeup.wait(timeout)
        finally:
            with self._mutex:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _cover(self, path: str) -> None:
        """Under the mutex: restart the query in progress if it does not cover ``path``."""
        if self._reading is not None and not path.startswith(self._reading) and not self._restart:
            self._restart = True
            self._client.interrupt()

    def _start(self) -> bool:
        """Under the mutex: True when the thread must be started (it is not running)."""
        start, self._running = not self._running, True
        return start

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # never die silently: say so, wake the waiters, let the next caller restart us
            native.log(watch_log, logging.ERROR, "the watcher of %s crashed", self.settings.base_url, exc_info=True)
            with self._mutex:
                self._running = False
                waiters = list(self._waiters)
            for waiter in waiters:
                waiter.wakeup.set()
            raise

    def _loop(self) -> None:
        index, prefix, last = 0, None, 0.0
        while True:
            with self._mutex:
                paths = self._follow_due()
                self._reading = None if not paths else common_prefix(paths)
                self._restart = False
                self._client.resume()
                if self._reading is not None:
                    self._started += 1
                reading, query = self._reading, self._started
                self._wake.clear()
                next_due = self._pending[0].due if self._pending else None
            self._judge()
            if reading is None:
                self._idle(next_due)
                continue
            if reading != prefix:
                index, prefix = 0, reading  # a new prefix: its first answer comes at once
                native.log(watch_log, logging.DEBUG, "watching %r", prefix or "the whole KV store")
            native.sleep(max(0.0, last + WATCH_INTERVAL - time.monotonic()))
            last = time.monotonic()
            try:
                new_index, entries = self._client.kv_list(prefix, index=index or None, wait=WATCH_WAIT, consistent=True)
            except ConsulLockError as exc:
                with self._mutex:
                    restart, self._reading = self._restart, None
                if not restart:
                    native.log(watch_log, logging.DEBUG, "watching %r failed, retrying: %s", prefix, exc)
                    self._wake_all()  # waiters read again themselves (and see the error)
                    self._wake.wait(WATCH_RETRY)
                continue
            with self._mutex:
                self._reading = None
                self._snapshot = Snapshot.of(prefix, new_index, query, entries)
            index = max(1, new_index if new_index >= index else 1)

    def _follow_due(self) -> list[str]:
        """Under the mutex: holdings due are followed from now on, released ones dropped;
        returns the paths to read (pending holdings included, so no restart when they come
        due)."""
        # Everything due within half a delay is taken at once: under a high acquire rate the
        # watcher wakes once per half delay, not once per acquire. Released holdings are
        # dropped only when due: dropping them earlier would empty the queue, and the next
        # follow() would then wake the thread again (one wake per short lock).
        horizon = time.monotonic() + WATCH_DELAY / 2
        while self._pending and self._pending[0].due <= horizon:
            holding = self._pending.popleft()
            if not holding.released.is_set():
                self._held.append(holding)
        self._held = [h for h in self._held if not h.released.is_set()]
        if not (self._held or self._waiters):
            return []
        return [x.path for x in (*self._held, *self._waiters, *self._pending)]

    def _judge(self) -> None:
        """Judge every followed holding and waiter by the last answer."""
        with self._mutex:
            snapshot = self._snapshot
            if snapshot is None:
                return
            held, waiters = list(self._held), list(self._waiters)
        for holding in held:
            reason = holding.judge(snapshot) if holding.newer(snapshot) else None
            if reason is not None and not holding.released.is_set():
                with self._mutex:
                    self._held.remove(holding)
                # On a thread of its own: the callbacks a loss runs (the user's on_lost too)
                # must not hold up the judging of every other lock of the process.
                native.start_thread(holding.lost, (reason,), "consul-lock-lost")
        for waiter in waiters:
            if waiter.changed(snapshot):
                waiter.wakeup.set()

    def _wake_all(self) -> None:
        with self._mutex:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wakeup.set()

    def _idle(self, next_due: float | None) -> None:
        """Nothing to read for: wait for a caller, or for the next holding to come due;
        close the connection after WATCH_IDLE of this."""
        timeout = WATCH_IDLE if next_due is None else max(0.0, next_due - time.monotonic())
        if not self._wake.wait(timeout) and next_due is None:
            self._client.close()


class _Watchers:
    """The process's watchers, one per settings; a forked child starts with none."""

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)

    def _reset(self) -> None:
        self._mutex = native.lock()
        self._watchers: dict[ConsulSettings, Watcher] = {}

    def get(self, settings: ConsulSettings) -> Watcher:
        watcher = self._watchers.get(settings)
        if watcher is None:
            with self._mutex:  # looked up again: a racing caller may have made it meanwhile
                watcher = self._watchers.get(settings)
                if watcher is None:
                    watcher = self._watchers[settings] = Watcher(settings)
        return watcher


_WATCHERS = _Watchers()


def follow(
    settings: ConsulSettings, path: str, token: int, judge: Judge, released: ReleaseFlag, lost: Callable[[str], None]
) -> None:
    """Follow a holding from WATCH_DELAY on until ``released`` is set: ``lost(reason)`` is
    called (on a real thread started by the watcher) once ``judge`` finds the holding lost in an
    answer that is newer than the acquire that wrote index ``token`` at ``path`` (a key, or
    a semaphore's folder ending in ``/``)."""
    holding = FollowedHolding(path, token - 1, due=time.monotonic() + WATCH_DELAY, judge=judge, released=released, lost=lost)
    _WATCHERS.get(settings).follow(holding)


def wait_for_change(settings: ConsulSettings, path: str, index: int, seen: Sequence[KVEntry], timeout: float | None) -> None:
    """Wait until the entries at ``path`` (a key, or a folder ending in ``/``) differ from
    ``seen``, read at Consul's ``index``, or ``timeout`` seconds pass (None: however long):
    through the process's watcher, so that waiters hold no connection while they wait.
    Returns early, too, when the watcher cannot read (the caller's next read tells why)."""
    waiter = Waiter(path, index, seen=_fingerprint(seen))
    _WATCHERS.get(settings).wait(waiter, timeout)


def watched(settings: ConsulSettings) -> str | None:
    """The prefix the process's watcher for ``settings`` is reading now (None: none)."""
    return _WATCHERS.get(settings).reading
