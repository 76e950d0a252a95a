"""Loss watching: after a lock has been held for a moment, a watcher thread makes consistent
blocking reads of its key and reports the holding lost as soon as the key is deleted, freed
or taken by another session (the Go client's lock monitor).

:class:`DelayedThreads` starts the watchers (a delayed-thread scheduler: one thread that
starts each watcher once its lock has been held for WATCH_DELAY), :func:`watch` is the
watcher's loop around a read that judges the holding (:func:`read_key` for a lock's key; a
semaphore judges its prefix), :class:`ReleaseFlag` tells both when the holding they are
about was released.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from . import native
from .consul import ConsulClient
from .errors import ConsulLockError
from .settings import ConsulSettings

__all__ = ["DelayedThreads", "ReleaseFlag", "WatchRead", "read_key", "watch", "watch_later"]

watch_log = logging.getLogger("celery_consul_lock.lock.watch")

#: A lock held longer than this gets a watcher (see DelayedThreads).
WATCH_DELAY = 0.5
#: The watcher's blocking-query wait; the release of the key ends it early.
WATCH_WAIT = 60.0
#: After a watcher's read fails, try again after this (the Go client's MonitorRetryTime);
#: the session's fencing deadline covers longer outages.
WATCH_RETRY = 1.0

#: One consistent blocking read past ``index`` of what a holding took:
#: ``read(client, index) -> (Consul's index, why the holding is lost, or None)``.
WatchRead = Callable[[ConsulClient, int], tuple[int, "str | None"]]


class ReleaseFlag:
    """Says when one holding of a lock (one acquire) has been released: what the watch
    starter and the watcher of that holding look at. An Event's interface, but the Event
    itself is made only if a watcher has to wait on it (after a failed read), not on every
    acquire (an Event costs as much as the rest of an acquire's bookkeeping). The watcher
    is a real OS thread: its Event is a real one (:class:`native.Event`)."""

    __slots__ = ("_event", "released")

    def __init__(self) -> None:
        self.released = False
        self._event: native.Event | None = None

    def set(self) -> None:
        self.released = True
        event = self._event
        if event is not None:
            event.set()

    def is_set(self) -> bool:
        return self.released

    def wait(self, timeout: float) -> bool:
        """Called by the holding's one watcher thread only (so one Event at most)."""
        event = self._event
        if event is None:
            event = self._event = native.Event()
        # set() flags first, then looks for the Event: it either sees this Event, or has
        # flagged before the check below.
        if self.released:
            return True
        return event.wait(timeout)


class DelayedThreads:
    """Starts a thread at a given time unless what it is about was released by then: here,
    a lock's watcher once the lock has been held for WATCH_DELAY.

    Most locks guard short work and are released sooner; watching those too would cost a
    thread, a connection and a blocking query each, doubling the price of a lock. Until
    its watcher starts, a lock's loss is still caught by its session (renewals and the
    fencing deadline), only a deleted or stolen key goes unseen for that long.

    The starter and the watchers are real OS threads (see :mod:`.native`), also under
    gevent: a task body that does not yield does not keep a loss from being seen.
    """

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)

    def _reset(self) -> None:
        self._mutex = native.lock()
        self._wake = native.Event()
        self._due: list[tuple[float, int, Callable[..., None], tuple[Any, ...], ReleaseFlag]] = []
        self._seq = itertools.count()
        self._running = False

    def schedule(self, at: float, target: Callable[..., None], args: tuple[Any, ...], released: ReleaseFlag) -> None:
        with self._mutex:
            was_empty = not self._due
            heapq.heappush(self._due, (at, next(self._seq), target, args, released))
            start, self._running = not self._running, True
            if was_empty:  # later items never come due before the head: no need to wake
                self._wake.set()
        if start:
            native.start_thread(self._run, (), "consul-lock-watch-starter")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # never die silently: say so, and let the next schedule() restart us
            native.log(watch_log, logging.ERROR, "the watch starter thread crashed", exc_info=True)
            with self._mutex:
                self._running = False
            raise

    def _loop(self) -> None:
        while True:
            while True:
                with self._mutex:
                    head = self._due[0][0] if self._due else None
                    if head is not None and head <= time.monotonic():
                        break
                    self._wake.clear()  # under the mutex: a schedule() after this sets it again
                self._wake.wait(None if head is None else min(WATCH_WAIT, head - time.monotonic()))
            with self._mutex:
                # Take everything due within a batch window: one wake-up per window, not
                # one per acquisition, under a high acquire rate.
                horizon = time.monotonic() + WATCH_DELAY / 2
                due = []
                while self._due and self._due[0][0] <= horizon:
                    due.append(heapq.heappop(self._due))
            for _, _, target, args, released in due:
                if not released.is_set():
                    native.start_thread(target, args, "consul-lock-watch")
            native.sleep(WATCH_DELAY / 2)


_STARTER = DelayedThreads()


def watch_later(
    settings: ConsulSettings,
    key: str,
    sid: str,
    released: ReleaseFlag,
    lost: Callable[[str], None],
    read: WatchRead | None = None,
) -> None:
    """Watch ``key``, held by session ``sid``, from WATCH_DELAY on until ``released`` is set:
    ``lost(reason)`` is called (from the watcher thread) when ``read`` (default
    :func:`read_key`: the key deleted, freed or taken by another session) says the holding
    is lost."""
    read = read or functools.partial(read_key, key=key, sid=sid)
    _STARTER.schedule(time.monotonic() + WATCH_DELAY, watch, (settings, key, read, released, lost), released)


def read_key(client: ConsulClient, index: int, *, key: str, sid: str) -> tuple[int, str | None]:
    """A lock's watch read: lost when ``key`` is deleted, freed or taken from ``sid``."""
    new_index, entry = client.kv_get(key, index=index, wait=WATCH_WAIT, consistent=True)
    if entry is None:
        return new_index, "the key was deleted"
    if entry.session == sid:
        return new_index, None
    if entry.session:
        return new_index, f"the key is now held by session {entry.session}"
    return new_index, "the key was freed behind our back (our session destroyed or invalidated?)"


def watch(settings: ConsulSettings, what: str, read: WatchRead, released: ReleaseFlag, lost: Callable[[str], None]) -> None:
    """The watcher: ``read`` until ``released`` is set or it says the holding of ``what`` is
    lost (then ``lost(reason)``); a failed read is retried after WATCH_RETRY."""
    client = ConsulClient(settings, native=True)
    index = 0  # the first read answers at once, with the current index
    try:
        while not released.is_set():
            try:
                new_index, loss = read(client, index)
            except ConsulLockError as exc:
                if released.wait(WATCH_RETRY):
                    return
                native.log(watch_log, logging.DEBUG, "watching %s failed, retrying: %s", what, exc)
                continue
            if released.is_set():
                return
            if loss is not None:
                lost(loss)
                return
            index = new_index if new_index >= index else 1
            index = max(index, 1)
    except Exception:
        native.log(watch_log, logging.ERROR, "watcher of %s crashed", what, exc_info=True)
    finally:
        client.close()
