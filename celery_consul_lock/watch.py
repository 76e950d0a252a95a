"""The process's watcher: one per settings, following every held key and every waiter.

After a lock has been held for a moment (WATCH_DELAY), it is *followed*: the watcher makes
consistent blocking reads of a few folders that together cover everything it follows (one
``GET /v1/kv/FOLDER?recurse&index=N&consistent`` per folder, at most WATCH_QUERIES of them)
and judges every followed holding from the answer of the folder it is under: a lock is lost
when its key is deleted, freed or taken by another session (the Go client's lock monitor), a
semaphore's slot by its own rule. Waiters (a lock or a semaphore waiting for a held key to
change) subscribe to the same watcher and are woken when what they saw changes, instead of
each holding a connection in a blocking query of its own.

The folders (:func:`watch_folders`): each followed path's folder, the two whose common
folder is deepest merged into it while they are more than WATCH_QUERIES (``locks/a/`` and
``reports/b/`` are read as two folders, not as the whole KV store; ``locks/1/`` to
``locks/9/`` and ``reports/b/`` as ``locks/`` and ``reports/b/``). So a process
keeps at most WATCH_QUERIES connections and WATCH_QUERIES + 1 threads for watching however
many locks it holds or waits for (before #16: one thread and one connection per held lock).
The price: each answer lists every key under its folder, so its size grows with the keys
there, and under a high write rate under a folder the watcher reads it at most once per
WATCH_INTERVAL. Only paths in more than WATCH_QUERIES top-level folders make it read the
whole KV store.

The threads: a *planner*, which takes holdings as they come due, chooses the folders and
judges every answer, and one *reader* per folder, each with a connection of its own. When
a path outside every folder being read is followed (a holding come due, a waiter), the
folders are chosen again at once: a reader whose new folder its query in progress does not
cover is interrupted (its socket shut down, see
:meth:`~celery_consul_lock.transport.Connection.interrupt`) and starts again, a reader for a
new folder is started. Folders are narrowed lazily, at a reader's next query. All are real
OS threads (see :mod:`.native`), also under gevent; a reader left with no folder closes its
connection at once and ends after WATCH_IDLE.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import native
from .consul import ConsulClient, KVEntry
from .errors import ConsulLockError
from .settings import ConsulSettings

__all__ = [
    "WATCH_DELAY",
    "WATCH_QUERIES",
    "Followed",
    "FollowedHolding",
    "ReleaseFlag",
    "Snapshot",
    "Waiter",
    "Watcher",
    "follow",
    "judge_lock",
    "wait_for_change",
    "watch_folders",
    "watched",
]

watch_log = logging.getLogger("celery_consul_lock.lock.watch")

#: A lock held longer than this is followed. Most locks guard short work and are released
#: sooner; following those too would make the watcher read on their account. Until then a
#: lock's loss is still caught by its session (renewals and the fencing deadline), only a
#: deleted or stolen key goes unseen for that long.
WATCH_DELAY = 0.5
#: The watcher's blocking-query wait (a change under the folder ends it early).
WATCH_WAIT = 60.0
#: After a failed read, try again after this (the Go client's MonitorRetryTime); the
#: session's fencing deadline covers longer outages.
WATCH_RETRY = 1.0
#: At most one read of a folder per this, however fast keys under it change: a loss is
#: seen at most this much later than it would be by a query of its own.
WATCH_INTERVAL = 0.2
#: A reader with no folder to read ends after this long (its connection is closed at once),
#: and so does the planner with nothing to follow.
WATCH_IDLE = 60.0
#: At most this many folders are read at once, each by a blocking query on a connection and
#: a thread of its own: locks in a few unrelated folders (your lock keys, a semaphore's
#: folder, a lock under another prefix) are then read without the whole KV store. Three so
#: that a worker process stays within consul_lock_max_connections + 6 connections (pool,
#: two renewals, these, the agent watch): nine processes of 16 + 6 stay under the agent's
#: 200 per client address (see settings.DEFAULT_MAX_CONNECTIONS).
WATCH_QUERIES = 3


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


def _folder_of(path: str) -> str:
    """The folder a followed ``path`` is read under: a folder (ending in ``/``) itself, a
    key's folder (``locks/a/`` for ``locks/a/.lock``), a key outside every folder itself."""
    if path.endswith("/"):
        return path
    cut = path.rfind("/")
    return path[: cut + 1] if cut >= 0 else path


def _parents(folder: str) -> list[str]:
    """The folders ``folder`` is under, outermost first: ``["", "a/", "a/b/"]`` for ``a/b/c/``."""
    parents = [""]
    at = folder.find("/")
    while 0 <= at < len(folder) - 1:
        parents.append(folder[: at + 1])
        at = folder.find("/", at + 1)
    return parents


def _outermost(prefixes: Iterable[str]) -> list[str]:
    """The prefixes that start with no other one (sorted): reading them reads the others too."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not kept or not prefix.startswith(kept[-1]):
            kept.append(prefix)
    return kept


def watch_folders(paths: Iterable[str], limit: int = WATCH_QUERIES) -> tuple[str, ...]:
    """The folders to read so that every path in ``paths`` is under one of them (sorted;
    ``()`` for no paths): the paths' folders, merged while they are more than ``limit``, each
    time the two whose common folder is deepest (into that folder, which then also covers the
    others under it). ``("",)``, the whole KV store, only when the paths are in more than
    ``limit`` top-level folders (or keys outside every folder).

    Folders as deep as possible, because an answer lists every key under its folder (released
    keys stay for hours, see :mod:`.reap`). Cost: one pass over the folders and their parent
    folders (about 1 ms for 1,000 folders here), not one per merge."""
    folders = _outermost(_folder_of(path) for path in paths)
    if len(folders) <= limit:
        return tuple(folders)
    # How many folders to read each parent folder holds; the deepest parent that holds two
    # or more is the common folder of the closest two.
    count: dict[str, int] = {}
    for folder in folders:
        for parent in _parents(folder):
            count[parent] = count.get(parent, 0) + 1
    total, merged = len(folders), []
    levels = itertools.groupby(sorted(count, key=lambda p: -p.count("/")), key=lambda p: p.count("/"))
    for _, level in levels:  # deepest first; at one depth, the parent holding most first
        for parent in sorted(level, key=lambda p: (-count[p], p)):
            held = count[parent]  # final: what is under it was merged before
            if held < 2:
                continue
            merged.append(parent)
            total -= held - 1
            for above in _parents(parent) if parent else []:
                count[above] -= held - 1
            if total <= limit:
                return tuple(_outermost([*folders, *merged]))
    return tuple(_outermost([*folders, *merged]))


@dataclass(eq=False)
class _Reader:
    """One of the watcher's blocking queries: a real thread and a connection of its own,
    reading the ``folder`` the planner gives it (under the watcher's mutex, like every field
    but ``client``, made by the planner before it first starts the thread)."""

    client: ConsulClient | None = None
    #: Set by the planner when it gives a new folder (ends a wait between reads).
    wake: native.Event = field(default_factory=native.Event)
    #: The folder to read (None: none; the connection is closed at once, the thread ends
    #: after WATCH_IDLE of this).
    folder: str | None = None
    #: The folder of the request in progress (None: none), and whether it must restart.
    reading: str | None = None
    restart: bool = False
    running: bool = False
    #: The last answer, and whether the planner has judged it.
    snapshot: Snapshot | None = None
    fresh: bool = False

    def interrupt(self) -> None:
        """End the request in progress (see ConsulClient.interrupt); it starts again."""
        if self.reading is not None and self.client is not None and not self.restart:
            self.restart = True
            self.client.interrupt()


class Watcher:
    """The process's watcher for one settings (see the module's docstring): a planner thread
    started with the first holding or waiter, and up to WATCH_QUERIES readers."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.settings = settings
        self._mutex = native.lock()  # held for a few statements only (also by greenlets)
        self._wake = native.Event()  # the planner's
        self._readers = tuple(_Reader() for _ in range(WATCH_QUERIES))
        #: Holdings not yet due (in the order they come due: all wait WATCH_DELAY).
        self._pending: collections.deque[FollowedHolding] = collections.deque()
        self._held: list[FollowedHolding] = []
        self._waiters: list[Waiter] = []
        #: The folders given to the readers; whether a path followed is outside all of them
        #: (choose again now), and whether one was dropped (choose again, maybe narrower).
        self._folders: tuple[str, ...] = ()
        self._outside = False
        self._dropped = False
        #: Queries started so far (by every reader).
        self._started = 0
        self._running = False  # the planner

    # -- from the callers ------------------------------------------------------------------

    @property
    def reading(self) -> tuple[str, ...]:
        """The folders of the queries in progress (sorted); ``()`` between queries and idle."""
        with self._mutex:
            return tuple(sorted(r.reading for r in self._readers if r.reading is not None))

    def follow(self, holding: FollowedHolding) -> None:
        with self._mutex:
            holding.since = self._started
            first = not self._pending  # else the planner already wakes when the first comes due
            self._pending.append(holding)
            start = self._start()
        if first:
            self._wake.set()
        if start:
            native.start_thread(self._plan, (), "consul-lock-watcher")

    def wait(self, waiter: Waiter, timeout: float | None) -> None:
        """Block until ``waiter`` sees a change, or ``timeout`` seconds (None: ever)."""
        with self._mutex:
            # Set first: the last answers came from queries started before this waiter, so
            # they tell a change only if their index shows them newer than what it read.
            waiter.since = self._started
            if any(r.snapshot is not None and waiter.changed(r.snapshot) for r in self._readers):
                return
            self._waiters.append(waiter)
            # Under a folder given to a reader, its query in progress covers the waiter (that
            # folder or a wider one it narrows from), or its next one starts after now.
            outside = not self._covered(waiter.path)
            self._outside = self._outside or outside
            start = self._start()
        if outside:
            self._wake.set()
        if start:
            native.start_thread(self._plan, (), "consul-lock-watcher")
        try:
            waiter.wakeup.wait(timeout)
        finally:
            with self._mutex:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    self._dropped = True

    def _covered(self, path: str) -> bool:
        """Under the mutex: whether ``path`` is under a folder given to a reader."""
        return any(path.startswith(folder) for folder in self._folders)

    def _start(self) -> bool:
        """Under the mutex: True when the planner must be started (it is not running)."""
        start, self._running = not self._running, True
        return start

    # -- the planner -----------------------------------------------------------------------

    def _plan(self) -> None:
        try:
            self._plan_loop()
        except BaseException:  # never die silently: say so, wake the waiters, let the next caller restart us
            native.log(watch_log, logging.ERROR, "the watcher of %s crashed", self.settings.base_url, exc_info=True)
            with self._mutex:
                self._running = False
            self._wake_waiters("")
            raise

    def _plan_loop(self) -> None:
        idle_since: float | None = None
        while True:
            with self._mutex:
                self._wake.clear()
                due = self._follow_due()
                replan, self._outside, self._dropped = self._outside or self._dropped, False, False
                paths = [x.path for x in (*self._held, *self._waiters)] if replan else []
            # Chosen outside the mutex (a millisecond per 1,000 paths), which callers take too.
            folders = watch_folders(paths) if replan else None
            with self._mutex:
                if folders is not None:
                    self._assign(folders)
                starts = [r for r in self._readers if r.folder is not None and not r.running]
                for reader in starts:
                    reader.running = True
                answers = [r.snapshot for r in self._readers if r.fresh and r.snapshot is not None]
                latest = [r.snapshot for r in self._readers if due and r.snapshot is not None]
                for reader in self._readers:
                    reader.fresh = False
                next_due = self._pending[0].due if self._pending else None
                idle = not (self._pending or self._held or self._waiters)
                if idle and idle_since is not None and time.monotonic() - idle_since >= WATCH_IDLE:
                    self._running = False
                    return
            for reader in starts:
                reader.client = reader.client or ConsulClient(self.settings, native=True)
                native.start_thread(self._read, (reader, reader.client), "consul-lock-watch-reader")
            self._judge(answers, due, latest)
            if not idle:
                idle_since = None
                self._wake.wait(None if next_due is None else max(0.0, next_due - time.monotonic()))
            else:
                idle_since = time.monotonic() if idle_since is None else idle_since
                self._wake.wait(WATCH_IDLE)

    def _follow_due(self) -> list[FollowedHolding]:
        """Under the mutex: holdings due are followed from now on (noting one outside the
        folders read; returned), released ones dropped. Pending holdings are not read for:
        a lock released before WATCH_DELAY costs no query."""
        # Everything due within half a delay is taken at once: under a high acquire rate the
        # planner wakes once per half delay, not once per acquire. Released holdings are
        # dropped only when due: dropping them earlier would empty the queue, and the next
        # follow() would then wake the planner again (one wake per short lock).
        horizon = time.monotonic() + WATCH_DELAY / 2
        due = []
        while self._pending and self._pending[0].due <= horizon:
            holding = self._pending.popleft()
            if not holding.released.is_set():
                due.append(holding)
                if not self._outside and not self._covered(holding.path):
                    self._outside = True
        held = [h for h in self._held if not h.released.is_set()]
        if len(held) != len(self._held):
            self._held, self._dropped = held, True
        self._held.extend(due)
        return due

    def _assign(self, folders: tuple[str, ...]) -> None:
        """Under the mutex: read ``folders`` from now on. A reader keeps its folder if it is
        still wanted; one whose query in progress covers a new folder takes it at its next
        query; any other reader given a new folder, or none, is interrupted."""
        if folders != self._folders:
            self._folders = folders
            self._give(folders)
        # A waiter that came meanwhile, under a folder read before but not now: again, at once.
        if not self._outside and not all(self._covered(w.path) for w in self._waiters):
            self._outside = True
            self._wake.set()

    def _give(self, folders: tuple[str, ...]) -> None:
        """Under the mutex: the readers' part of :meth:`_assign`."""
        new = [f for f in folders if all(r.folder != f for r in self._readers)]
        free = [r for r in self._readers if r.folder not in folders]
        for folder in list(new):  # first those whose query in progress covers a new folder
            reader = next((r for r in free if r.reading is not None and folder.startswith(r.reading)), None)
            if reader is not None:
                new.remove(folder)
                free.remove(reader)
                reader.folder = folder
        free.sort(key=lambda r: r.reading is not None)  # then the idle ones
        for n, reader in enumerate(free):
            reader.folder = new[n] if n < len(new) else None
            reader.interrupt()  # a query of another folder, or of one nobody needs now
            reader.wake.set()

    def _judge(self, answers: list[Snapshot], due: list[FollowedHolding], latest: list[Snapshot]) -> None:
        """Judge the holdings and waiters under each new answer's folder, and the holdings
        just come ``due`` by the ``latest`` answers (a key deleted while it was pending)."""
        if answers:
            with self._mutex:
                held, waiters = list(self._held), list(self._waiters)
            for holding in held:
                self._judge_one(holding, answers)
            for waiter in waiters:
                if any(waiter.changed(s) for s in answers):
                    waiter.wakeup.set()
        for holding in due:
            self._judge_one(holding, latest)

    def _judge_one(self, holding: FollowedHolding, snapshots: list[Snapshot]) -> None:
        for snapshot in snapshots:
            reason = holding.judge(snapshot) if holding.newer(snapshot) else None
            if reason is None:
                continue
            with self._mutex:
                if holding.released.is_set() or holding not in self._held:
                    return
                self._held.remove(holding)
                self._dropped = True
            self._wake.set()  # the planner plans again at once: its folder may be needed no more
            # On a thread of its own: the callbacks a loss runs (the user's on_lost too) must
            # not hold up the judging of every other lock of the process.
            native.start_thread(holding.lost, (reason,), "consul-lock-lost")
            return

    def _wake_waiters(self, folder: str) -> None:
        """Wake the waiters under ``folder`` (they read again themselves, and see an error)."""
        with self._mutex:
            waiters = [w for w in self._waiters if w.path.startswith(folder)]
        for waiter in waiters:
            waiter.wakeup.set()

    # -- the readers -----------------------------------------------------------------------

    def _read(self, reader: _Reader, client: ConsulClient) -> None:
        try:
            self._read_loop(reader, client)
        except BaseException:  # never die silently: the planner starts it again when it next plans
            native.log(watch_log, logging.ERROR, "a reader of the watcher of %s crashed", self.settings.base_url, exc_info=True)
            with self._mutex:
                reader.running, folder, reader.reading = False, reader.folder, None
            self._wake_waiters(folder or "")
            raise

    def _read_loop(self, reader: _Reader, client: ConsulClient) -> None:
        index, folder, last = 0, None, 0.0
        while True:
            with self._mutex:
                client.resume()
                reader.restart = False
                reader.wake.clear()
                wanted = reader.reading = reader.folder
                if wanted is not None:
                    self._started += 1
                query = self._started
            if wanted is None:
                client.close()  # at once: the watcher's connections are those it reads on
                if reader.wake.wait(WATCH_IDLE):
                    continue
                with self._mutex:
                    if reader.folder is None:
                        reader.running = False
                        return
                continue
            if wanted != folder:
                index, folder = 0, wanted  # a new folder: its first answer comes at once
                native.log(watch_log, logging.DEBUG, "watching %r", folder or "the whole KV store")
            native.sleep(max(0.0, last + WATCH_INTERVAL - time.monotonic()))
            last = time.monotonic()
            try:
                new_index, entries = client.kv_list(folder, index=index or None, wait=WATCH_WAIT, consistent=True)
            except ConsulLockError as exc:
                with self._mutex:
                    restart, reader.reading = reader.restart, None
                if not restart:
                    native.log(watch_log, logging.DEBUG, "watching %r failed, retrying: %s", folder, exc)
                    self._wake_waiters(folder)
                    reader.wake.wait(WATCH_RETRY)
                continue
            snapshot = Snapshot.of(folder, new_index, query, entries)
            with self._mutex:
                reader.reading = None
                reader.snapshot, reader.fresh = snapshot, True
            self._wake.set()
            index = max(1, new_index if new_index >= index else 1)


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


def watched(settings: ConsulSettings) -> tuple[str, ...]:
    """The folders the process's watcher for ``settings`` is reading now (sorted; ``()``:
    none)."""
    return _WATCHERS.get(settings).reading
