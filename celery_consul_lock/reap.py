"""Reaping: free lock keys, and the tick marks and beat state of removed periodic entries,
leave Consul KV once nobody can need them, so the keys under the prefix stay bounded by the
locks held now plus the marks and state of the entries that exist.

A key is removed the way the Go client's ``Lock.Destroy`` removes one (``api/lock.go``): read
it, keep it if a session holds it or its flags are not a lock's (:data:`LOCK_FLAG`, the value
``consul lock`` writes), else delete it with check-and-set on the ModifyIndex just read. So a
key acquired, released or written by anyone after the read is never deleted: a ``consul lock``
holder never sees its key removed under it, and a waiter never misses a release (a delete
wakes its blocking query like any change; it then creates the key to acquire it). Deleting a
key does not end a lock-delay (Consul keeps those by key name), and the fencing token keeps
growing across a removed and re-created key: it is the Raft index of the acquire's write.

When a free key may go (:func:`verdict`):

- released by this package: its value carries ``keep_until`` (epoch seconds, the releaser's
  clock), at least ``consul_lock_reap_after`` after the release and at least the task's
  ``lock_cooldown``, because the next acquirer reads the release record (a redelivered copy
  of a finished run is skipped, a cooldown is kept) until then;
- anything else free (the holder's session ended: crash, TTL, failed check; a ``consul lock``
  or older release): ``consul_lock_reap_after`` after its last write. When that was is told
  by the *index clock*, :class:`IndexClock`: samples of (Raft index, a time by which that
  index was written) kept in one key, taken by every sweep; a key whose ModifyIndex is at or
  below a sample's index was written before that sample's time.

Who removes them: the process that released a key, when its keep time ends (:class:`Reaper`,
a real OS thread per process, removing the keys due together in one transaction); and a
sweep (:func:`sweep`) of the whole key prefix for keys whose releaser is gone (recycled,
crashed, a ``celery-consul-lock run``) or which were freed by a session's end: the beat
leader runs one every ``consul_lock_beat_reap_interval``, and ``celery consul-lock reap``
runs one on demand. Every sweep also removes semaphores' contender keys no session holds,
``consul_lock_reap_after`` after their last write, and then each ``.lock`` left with no live
holder and no contender key (the Go client's ``Semaphore.Destroy`` rules, check-and-set on
the index read: an admission racing it either retries or keeps its slot). The beat leader
also removes the tick marks naming its beat (:data:`.ticks.BEAT_FIELD`), and the schedule
state, of entries it no longer has (:class:`EntryCleanup`) once they have not been written
for ``consul_lock_reap_after`` (a rolling deploy may still run an old config meanwhile),
fenced by its leader lock; never a mark a ``celery-consul-lock run`` wrapper has written (it
carries ``runner``: a cron line is an entry no beat knows) or one naming another beat.

Limit: keep times are compared with this host's clock; clocks skewed by more than a small
part of ``consul_lock_reap_after`` shorten or lengthen them by the skew.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from . import native
from .consul import LOCK_FLAG, SEMAPHORE_FLAG, ConsulClient, KVEntry, kv_delete_cas, shared_client
from .errors import ConsulLockError, ConsulUnavailable
from .semaphore_state import SEMAPHORE_KEY, SemaphoreState
from .settings import ConsulSettings
from .ticks import BEAT_FIELD, MARKS_PREFIX, RUNNER_FIELD, beat_of

__all__ = [
    "KEEP_FIELD",
    "EntryCleanup",
    "IndexClock",
    "Kept",
    "Reaper",
    "SweepReport",
    "Sweeper",
    "keep_until",
    "kept_until",
    "reap_later",
    "sweep",
    "verdict",
]

log = logging.getLogger("celery_consul_lock.reap")

#: The field of a released key's value that says until when it must stay (epoch seconds).
KEEP_FIELD = "keep_until"
#: Where the index clock lives, under the key prefix.
CLOCK_KEY = "celery-consul-lock/clock"
#: Samples the index clock keeps within its horizon: a key is removed at most
#: horizon / this (about 4 minutes at the default reap_after) later than its delay says.
CLOCK_SAMPLES = 60
#: The clock's horizon, in units of reap_after: samples older than this are dropped, but the
#: newest of them, which dates every key written before it.
CLOCK_HORIZON = 2.0
#: Keys a process's reaper keeps queued; the keys it releases past that are left to the sweep
#: (a process releasing 100 distinct keys a second with the default two hours would queue
#: 720,000: about 100 MB).
REAP_QUEUE_MAX = 100_000
#: While Consul is briefly unavailable (a leader election, an agent restart), the reaper tries
#: its due keys again this much later; keys it cannot remove before its process ends are the
#: sweep's.
REAP_RETRY = 5.0
#: When a released key comes due, the reaper waits this much longer for others, so that one
#: transaction (one Raft write) removes them all: removing each on its own doubled the Raft
#: writes of a workload of distinct keys and cost it 20% of its lock cycles (bench/reap_cost.py).
REAP_BATCH_DELAY = 0.5
#: Deletes per transaction (Consul allows 64 operations in one).
DELETES_PER_TXN = 64


def keep_until(now: float, keep: float) -> float:
    """The ``keep_until`` of a key released at ``now`` (epoch s) that must keep its record
    ``keep`` seconds: rounded up to the millisecond."""
    return round(now + keep + 0.0005, 3)


# -- the rule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexClock:
    """Samples of (Raft index, a time by which a write at that index had happened), oldest
    first, as stored at :data:`CLOCK_KEY` (``{"samples": [[index, epoch s], ...]}``), and the
    key's ModifyIndex (0: absent) for the check-and-set that adds a sample."""

    samples: tuple[tuple[int, float], ...] = ()
    modify_index: int = 0

    @classmethod
    def parse(cls, entry: KVEntry | None) -> IndexClock:
        """The clock stored in ``entry`` (an absent or unreadable one starts empty)."""
        if entry is None:
            return cls()
        try:
            raw = json.loads(entry.value or b"{}")["samples"]
            samples = tuple(sorted((int(i), float(t)) for i, t in raw))
        except (ValueError, KeyError, TypeError):
            log.warning("the index clock %s cannot be read; starting it again", entry.key)
            samples = ()
        return cls(samples, entry.modify_index)

    def written_by(self, index: int) -> float | None:
        """A time (epoch s) by which the write at ``index`` had happened; None if it is newer
        than every sample."""
        return next((t for i, t in self.samples if i >= index), None)

    def aged(self, index: int, reap_after: float, now: float) -> bool:
        """True if the write at ``index`` happened at least ``reap_after`` seconds before
        ``now`` (epoch s), as far as the samples tell (False when they cannot)."""
        written = self.written_by(index)
        return written is not None and written + reap_after <= now

    def with_sample(self, index: int, at: float, reap_after: float) -> IndexClock | None:
        """The clock with the sample (``index``, ``at``) added, older samples thinned; None
        when the newest sample is recent enough that nothing needs writing."""
        horizon = max(reap_after, 1.0) * CLOCK_HORIZON
        if self.samples and (index <= self.samples[-1][0] or at - self.samples[-1][1] < horizon / CLOCK_SAMPLES):
            return None
        old = [s for s in self.samples if s[1] < at - horizon]
        kept = [*old[-1:], *(s for s in self.samples if s[1] >= at - horizon), (index, at)]
        return IndexClock(tuple(kept), self.modify_index)

    def encode(self) -> bytes:
        return json.dumps({"samples": [list(s) for s in self.samples]}).encode()


#: Why a free-looking lock key stays: held by a session; flags not a lock's; its release
#: record's keep time not over; freed (without a record) less than reap_after ago, or too
#: recently for the index clock to date it.
Kept = Literal["held", "not a lock", "in keep time", "recently freed"]


def verdict(entry: KVEntry, now: float, reap_after: float, clock: IndexClock | None) -> Kept | None:
    """Why the lock key ``entry`` (as just read) must stay, or None if it may be deleted now
    (by check-and-set on its ModifyIndex). Without a clock, only keys with a keep time may go."""
    if entry.session:
        return "held"
    if entry.flags != LOCK_FLAG:
        return "not a lock"
    until = kept_until(entry.value)
    if until is not None:
        return None if until <= now else "in keep time"
    return None if clock is not None and clock.aged(entry.modify_index, reap_after, now) else "recently freed"


def kept_until(value: bytes | None) -> float | None:
    """The ``keep_until`` of a key's value (epoch s), or None if it has none."""
    if not value or not value.startswith(b"{"):
        return None
    try:
        until = json.loads(value).get(KEEP_FIELD)
    except (ValueError, AttributeError):
        return None
    return float(until) if isinstance(until, int | float) and not isinstance(until, bool) else None


# -- the process's reaper ---------------------------------------------------------------------


@dataclass
class _Queue:
    """A reaper's queue and the thread serving it: what a forked child starts afresh."""

    #: A real lock (the thread is a real one), held for a few statements only.
    mutex: Any = field(default_factory=native.lock)
    #: Set when a key due before the head is queued.
    wake: native.Event = field(default_factory=native.Event)
    #: Each queued key's removal time (epoch s); one heap item per key, re-pushed when its
    #: time moved on (the key was released again).
    due: dict[tuple[ConsulSettings, str], float] = field(default_factory=dict)
    heap: list[tuple[float, int, ConsulSettings, str]] = field(default_factory=list)
    seq: Iterator[int] = field(default_factory=itertools.count)
    running: bool = False
    full_logged: bool = False


class Reaper:
    """Removes the keys this process released once their keep time ends (see the module
    doc), from one real OS thread started on first use (also under gevent). Queued keys are
    lost with the process (recycled, crashed): the sweep removes those."""

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)

    def _reset(self) -> None:
        self._q = _Queue()  # a forked child starts empty: its parent still removes what it queued

    def later(self, settings: ConsulSettings, key: str, at: float) -> None:
        """Remove ``key`` at ``at`` (epoch s), if it is free with a keep time passed then."""
        q, ident = self._q, (settings, key)
        with q.mutex:  # a few statements, no I/O (not even a log line) while it is held
            queued = q.due.get(ident)
            if queued is not None:
                q.due[ident] = max(queued, at)
                return
            if len(q.due) >= REAP_QUEUE_MAX:
                warn, q.full_logged = not q.full_logged, True
                start = False
            else:
                warn = False
                q.due[ident] = at
                item = (at, next(q.seq), settings, key)
                heapq.heappush(q.heap, item)
                if q.heap[0] is item:  # due before everything else queued: wake the thread
                    q.wake.set()
                start, q.running = not q.running, True
        if warn:
            native.log(log, logging.WARNING, "over %d released keys queued; the sweep removes the rest", REAP_QUEUE_MAX)
        if start:
            native.start_thread(self._run, (q,), "consul-lock-reaper")

    def pending(self) -> int:
        """Keys queued now."""
        with self._q.mutex:
            return len(self._q.due)

    def _run(self, q: _Queue) -> None:
        try:
            self._serve(q)
        finally:  # only a crash ends it (logged there): the next later() starts another thread
            with q.mutex:
                q.running = False

    def _serve(self, q: _Queue) -> None:
        while True:
            try:
                due = self._next_due(q)
                native.sleep(REAP_BATCH_DELAY)  # let more come due: their deletes share a write
                due += self._take_due(q)
                by_settings: dict[ConsulSettings, list[str]] = {}
                for settings, key in due:
                    by_settings.setdefault(settings, []).append(key)
                for settings, keys in by_settings.items():
                    # The process's shared pool (its real-socket one under gevent): no
                    # connection of the reaper's own beyond the pool's bound.
                    self._remove(shared_client(settings), settings, keys)
            except Exception:
                native.log(log, logging.ERROR, "the reaper thread crashed", exc_info=True)
                raise

    def _next_due(self, q: _Queue) -> list[tuple[ConsulSettings, str]]:
        """Wait for the head of the queue to come due; returns the keys due now."""
        while True:
            ready = self._take_due(q)
            if ready:
                return ready
            with q.mutex:
                head = q.heap[0][0] if q.heap else None
                if head is not None and head <= time.time():
                    continue
                q.wake.clear()
            q.wake.wait(None if head is None else max(0.0, head - time.time()))

    @staticmethod
    def _take_due(q: _Queue) -> list[tuple[ConsulSettings, str]]:
        """The keys due now, taken off the queue (a key released again since goes back, due
        at its later time)."""
        with q.mutex:
            now = time.time()
            ready = []
            while q.heap and q.heap[0][0] <= now:
                _, _, settings, key = heapq.heappop(q.heap)
                at = q.due.get((settings, key))
                if at is not None and at > now:
                    heapq.heappush(q.heap, (at, next(q.seq), settings, key))
                elif at is not None:
                    del q.due[(settings, key)]
                    ready.append((settings, key))
            return ready

    def _remove(self, client: ConsulClient, settings: ConsulSettings, keys: list[str]) -> None:
        """Read each key and delete those still free with their keep time passed, many to a
        transaction (a key gone, held again, or kept longer by a later release is left: the
        later releaser removes it). While Consul is briefly unavailable, all are tried again
        REAP_RETRY later; other refusals (an ACL) leave them to the sweep."""
        try:
            doomed = []
            for key in keys:
                _, entry = client.kv_get(key, consistent=True)
                if entry is not None and verdict(entry, time.time(), 0.0, None) is None:
                    doomed.append(entry)
            removed = _delete(client, doomed)
        except ConsulLockError as exc:
            if isinstance(exc, ConsulUnavailable) and exc.transient:
                native.log(
                    log,
                    logging.DEBUG,
                    "could not remove %d released keys yet (tried again in %g s): %s",
                    len(keys),
                    REAP_RETRY,
                    exc,
                )
                for key in keys:
                    self.later(settings, key, time.time() + REAP_RETRY)
            else:
                native.log(log, logging.INFO, "could not remove %d released keys (the sweep will): %s", len(keys), exc)
            return
        native.log(log, logging.DEBUG, "removed %d of %d released keys due (others changed)", len(removed), len(keys))


_REAPER = Reaper()


def reap_later(settings: ConsulSettings, key: str, at: float) -> None:
    """Queue ``key``, released by this process, for removal at ``at`` (epoch s)."""
    _REAPER.later(settings, key, at)


# -- the sweep --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryCleanup:
    """What a beat leader's sweep also cleans: the tick marks, and the schedule state where
    the scheduler keeps one in Consul, of entries this beat no longer has."""

    #: Where the beat keeps its entries' state (``.../beat/<name>/entries/``); None: nowhere.
    state_prefix: str | None
    #: The key segments (``ticks.key_part``) of the entries the beat has now; None while it
    #: cannot tell (nothing is removed then).
    known: Callable[[], Collection[str] | None]
    #: (leader lock key, session) while leading, which the deletes are fenced by; else None.
    fence: Callable[[], tuple[str, str] | None]
    #: The beat's name (``consul_lock_beat_name``): a mark naming it (:data:`.ticks.
    #: BEAT_FIELD`) is of this beat's entry. None: only unnamed marks of entries with state
    #: under ``state_prefix`` are.
    beat: str | None = None


@dataclass
class SweepReport:
    """What a sweep did: keys removed (or, in a dry run, that would be), and why others of
    the lock and semaphore keys stayed (reason -> count)."""

    removed: list[str] = field(default_factory=list)
    kept: dict[Kept, int] = field(default_factory=dict)
    #: Keys read under the prefix (of every kind).
    keys: int = 0

    def keep(self, why: Kept) -> None:
        self.kept[why] = self.kept.get(why, 0) + 1


def sweep(
    client: ConsulClient,
    settings: ConsulSettings,
    *,
    dry_run: bool = False,
    entries: EntryCleanup | None = None,
    now: Callable[[], float] = time.time,
) -> SweepReport:
    """One sweep of the key prefix (see the module doc): removes the free lock keys whose
    time has come, and with ``entries`` the marks and state of removed entries; adds a
    sample to the index clock. ``dry_run`` writes nothing and reports what would go. Raises
    ConsulLockError when Consul cannot be asked (what was removed before stays removed)."""
    index, listed = client.kv_list(settings.key_prefix)
    seen_at = now()
    report = SweepReport(keys=len(listed))
    clock_key = settings.key_prefix + CLOCK_KEY
    stored = IndexClock.parse(next((e for e in listed if e.key == clock_key), None))
    clock = stored.with_sample(index, seen_at, settings.reap_after)
    if clock is not None and not dry_run and not client.kv_put(clock_key, clock.encode(), cas=stored.modify_index):
        log.debug("the index clock moved meanwhile (another sweep); its new sample is true all the same")
    clock = clock or stored
    doomed = []
    for entry in listed:
        if entry.flags != LOCK_FLAG:
            continue
        why = verdict(entry, seen_at, settings.reap_after, clock)
        if why is None:
            doomed.append(entry)
        else:
            report.keep(why)
    report.removed += [e.key for e in doomed] if dry_run else _delete(client, doomed)
    report.removed += _clean_semaphores(client, listed, clock, seen_at, settings.reap_after, dry_run, report)
    if entries is not None:
        report.removed += _clean_entries(client, settings, listed, entries, clock, seen_at, dry_run)
    if report.removed:
        log.info("swept %s: removed %d of %d keys", settings.key_prefix or "the KV store", len(report.removed), len(listed))
    return report


class Sweeper:
    """A beat leader's sweeps: one at once, then one every ``interval`` seconds while
    ``leading()`` says so, from a daemon thread (a sweep of a large prefix never holds up
    the scheduler loop). A failed sweep is logged and tried again at the next interval."""

    def __init__(
        self,
        settings: ConsulSettings,
        interval: float,
        leading: Callable[[], bool],
        entries: EntryCleanup | None = None,
    ) -> None:
        self.settings = settings
        self.interval = interval
        self.leading = leading
        self.entries = entries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consul-lock-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        client = ConsulClient(self.settings)
        try:
            while not self._stop.is_set():
                if self.leading():
                    try:
                        sweep(client, self.settings, entries=self.entries)
                    except ConsulLockError as exc:
                        log.warning("sweeping %s failed (tried again in %g s): %s", self.settings.key_prefix, self.interval, exc)
                    except Exception:  # never die silently
                        log.exception("sweeping %s crashed (tried again in %g s)", self.settings.key_prefix, self.interval)
                self._stop.wait(self.interval)
        finally:
            client.close()


def _delete(client: ConsulClient, entries: list[KVEntry]) -> list[str]:
    """Delete each entry by check-and-set on its index, many to a transaction; a transaction
    refused (a key changed meanwhile) is redone one key at a time. Returns the keys deleted."""
    removed: list[str] = []
    for start in range(0, len(entries), DELETES_PER_TXN):
        batch = entries[start : start + DELETES_PER_TXN]
        ok, _, _ = client.txn([{"KV": kv_delete_cas(e.key, e.modify_index)} for e in batch], action="removing free lock keys")
        if ok:
            removed += [e.key for e in batch]
            continue
        removed += [e.key for e in batch if client.kv_delete(e.key, cas=e.modify_index)]
    return removed


def _clean_semaphores(
    client: ConsulClient,
    listed: list[KVEntry],
    clock: IndexClock,
    now: float,
    reap_after: float,
    dry_run: bool,
    report: SweepReport,
) -> list[str]:
    """Delete the semaphores' contender keys no session holds once reap_after has passed
    since their last write, then each ``.lock`` left with no live holder and no contender
    key (:meth:`.SemaphoreState.unused_once`), each by check-and-set on the index read. A
    semaphore whose ``.lock`` is not one (or unreadable) is left alone."""
    folders = sorted({e.key.rpartition("/")[0] + "/" for e in listed if e.flags == SEMAPHORE_FLAG and "/" in e.key})
    if not folders:
        return []
    ordered = sorted(listed, key=lambda e: e.key)
    keys = [e.key for e in ordered]
    dead: list[KVEntry] = []
    emptied: list[tuple[KVEntry, set[str]]] = []
    for folder in folders:
        # Every key under the folder ("/" + 1 is "0"), nested ones too: as an admission reads it.
        under = ordered[bisect.bisect_left(keys, folder) : bisect.bisect_left(keys, folder[:-1] + "0")]
        try:
            state = SemaphoreState.parse(folder + SEMAPHORE_KEY, under)
        except ConsulLockError as exc:
            log.debug("not sweeping the semaphore at %s: %s", folder, exc)
            continue
        gone = [e for e in state.dead_contenders() if clock.aged(e.modify_index, reap_after, now)]
        leaving = {e.key for e in gone}
        for entry in state.contenders.values():
            if entry.flags == SEMAPHORE_FLAG and entry.key not in leaving:
                report.keep("held" if entry.session else "recently freed")
        dead += gone
        if state.unused_once(leaving):
            emptied.append((next(e for e in under if e.key == state.key), leaving))
        elif state.index:
            report.keep("held")
    if dry_run:
        return [e.key for e in dead] + [lock.key for lock, _ in emptied]
    removed = _delete(client, dead)
    deleted = set(removed)
    return removed + _delete(client, [lock for lock, leaving in emptied if leaving <= deleted])


def _clean_entries(
    client: ConsulClient,
    settings: ConsulSettings,
    listed: Iterable[KVEntry],
    cleanup: EntryCleanup,
    clock: IndexClock,
    now: float,
    dry_run: bool,
) -> list[str]:
    """Delete the state and mark of each entry of this beat (state under
    ``cleanup.state_prefix``, or a mark naming ``cleanup.beat``) that it no longer has and
    nobody wrote for reap_after, in one transaction per entry fenced by the leader lock.
    Only the beat's own marks go (:func:`_beats_mark`)."""
    segments = cleanup.known()
    if segments is None:
        return []
    known = set(segments)
    marks_prefix = settings.key_prefix + MARKS_PREFIX
    states: dict[str, KVEntry] = {}
    marks: dict[str, KVEntry] = {}
    for entry in listed:
        if cleanup.state_prefix and entry.key.startswith(cleanup.state_prefix):
            states[entry.key[len(cleanup.state_prefix) :]] = entry
        elif entry.key.startswith(marks_prefix):
            marks[entry.key[len(marks_prefix) :]] = entry
    removed = []
    for segment in sorted((states.keys() | marks.keys()) - known):
        state, mark = states.get(segment), marks.get(segment)
        if mark is not None and not _beats_mark(mark, cleanup.beat, state is not None):
            mark = None
        doomed = [e for e in (state, mark) if e is not None]
        if not doomed or not clock.aged(max(e.modify_index for e in doomed), settings.reap_after, now):
            continue
        if dry_run:
            removed += [e.key for e in doomed]
            continue
        fence = cleanup.fence()
        if fence is None:
            break  # no longer leading
        done = client.kv_fenced(
            fence[0], fence[1], [kv_delete_cas(e.key, e.modify_index) for e in doomed], action="removing a removed entry's state"
        )
        if done.lost:
            break
        if done.ok:
            removed += [e.key for e in doomed]
    return removed


def _beats_mark(mark: KVEntry, beat: str | None, has_state: bool) -> bool:
    """True if the tick mark is the beat's (named ``beat``) to remove with its entry: it names
    that beat (:data:`.ticks.BEAT_FIELD`), or names none and the entry has state here (a mark
    of an older version). Never a mark a ``celery-consul-lock run`` wrapper wrote (it names
    itself in ``runner``: a cron line is an entry no beat knows), one naming another beat or
    several, or one that cannot be read."""
    try:
        data = json.loads(mark.value or b"{}")
    except ValueError:
        return False
    if not isinstance(data, dict) or RUNNER_FIELD in data:
        return False
    if BEAT_FIELD in data:
        return beat is not None and beat_of(data) == beat
    return has_state
