"""Real OS threads, locks, events and sockets, also under gevent's monkey-patching.

``celery worker -P gevent`` patches ``threading``, ``socket`` and ``time`` before our code is
imported: a ``threading.Thread`` is then a greenlet, a lock or an event a greenlet's, and a
socket waits in the hub. A session renewer or a lock watcher that is a greenlet stops as soon
as one task body blocks without yielding (an unpatched C database driver, a busy loop), and
the session lapses while the body still runs. So the renewer and the watchers run on real OS
threads, with the primitives of this module: real ones under gevent, the usual ``threading``
ones otherwise (this module never imports gevent; it looks for it in ``sys.modules``).

What may cross between a real thread and the greenlets: a :func:`lock` held for a few
statements (never across I/O: a greenlet that yields while holding it would block the whole
hub's thread for the other greenlets that want it), an :class:`Event` that greenlets
``set()`` and real threads ``wait()`` on, a :class:`Wakeup` that anyone sets and its one waiter
(a thread or a greenlet) waits on, and :meth:`Owner.call`, which runs a function in
a greenlet of the hub that owns the lock (what a loss's callbacks and signals need).

Nothing else, and not ``logging`` either: a handler's lock made after the patching (every
handler of a ``celery worker -P gevent``) is gevent's, and when two real threads (no hub in
either) want it at once, the one left waiting is never woken (gevent 26.9: a lost wake-up,
akin to gevent issue #2013; the watcher and the renewer that both see a destroyed session hit
it). So our real threads log with :func:`log`, which hands the record to the hub that started
them.
"""

from __future__ import annotations

import _thread
import logging
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "Event",
    "Owner",
    "Wakeup",
    "at_fork",
    "create_connection",
    "green",
    "lock",
    "log",
    "owner",
    "real_thread",
    "sleep",
    "socket_class",
    "ssl_context_class",
    "start_thread",
]

native_log = logging.getLogger("celery_consul_lock.native")

#: What a forked child must reset (see at_fork), in registration order.
_FORK_RESETS: list[Callable[[], None]] = []


def at_fork(reset: Callable[[], None]) -> None:
    """Run ``reset()`` in every child forked from now on, before any of our code runs there:
    for process-wide state (threads, locks, sessions, connections) that a child must not
    share with its parent. A failing reset is logged; the others still run."""
    _FORK_RESETS.append(reset)


def _reset_after_fork() -> None:
    for reset in list(_FORK_RESETS):
        try:
            reset()
        except Exception:
            native_log.exception("resetting %r in a forked child failed", reset)


os.register_at_fork(after_in_child=_reset_after_fork)


def green() -> bool:
    """True when gevent has monkey-patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def real_thread() -> bool:
    """True under gevent in a real OS thread that runs no gevent hub (one of ours, see
    :func:`start_thread`): there, blocking the thread blocks nobody else, and only real
    sockets and real locks may be used."""
    return green() and sys.modules["gevent._hub_local"].get_hub_if_exists() is None


def _original(module: str, name: str) -> Any:
    """The unpatched ``module.name`` (gevent keeps the originals)."""
    return sys.modules["gevent.monkey"].get_original(module, name)


def lock() -> Any:
    """A real OS lock (``threading.Lock`` when nothing is patched). Hold it for a few
    statements only, never across I/O or anything that may yield to gevent."""
    if green():
        return _original("_thread", "allocate_lock")()
    return _thread.allocate_lock()


def sleep(seconds: float) -> None:
    """``time.sleep`` that blocks the calling OS thread (gevent's would run a hub in it)."""
    if green():
        _original("time", "sleep")(seconds)
    else:
        time.sleep(seconds)


class Event:
    """``threading.Event`` on a real OS lock: ``set()`` from any thread or greenlet (it never
    blocks), ``wait()`` only from a real OS thread (under gevent it blocks that thread, which
    in a greenlet would block the hub)."""

    __slots__ = ("_flag", "_gate", "_guard")

    def __init__(self) -> None:
        self._flag = False
        self._guard = lock()
        self._gate = lock()
        self._gate.acquire()  # released by set(): waiters pass through it

    def set(self) -> None:
        with self._guard:
            if self._flag:
                return
            self._flag = True
            self._gate.release()

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        with self._guard:
            if self._flag:
                self._flag = False
                self._gate.acquire()  # at most a waiter's moment between its acquire and release

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if self._gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._gate.release()  # let the next waiter through too
        return self._flag


class Wakeup:
    """One wake-up for one waiter: :meth:`wait` from the thread or greenlet that made it,
    :meth:`set` from anywhere (a real thread, another thread, a greenlet of the same hub).
    Under gevent, a greenlet waits without blocking its hub, and a set from a real thread
    reaches it through its hub (:meth:`Owner.call`). ``value``: what the setter hands over."""

    __slots__ = ("_event", "_owner", "value")

    def __init__(self) -> None:
        self.value: Any = None
        if green() and not real_thread():
            self._owner: Owner | None = Owner()
            self._event: Any = threading.Event()  # gevent's, since threading is patched
        else:
            self._owner = None
            self._event = Event()

    def set(self) -> None:
        if self._owner is None:
            self._event.set()
        else:
            self._owner.call(self._event.set)

    def is_set(self) -> bool:
        return bool(self._event.is_set())

    def wait(self, timeout: float | None) -> bool:
        return bool(self._event.wait(timeout))


def start_thread(target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
    """Run ``target(*args)`` on a new real OS thread (a daemon: never joined at exit).
    Under gevent the thread logs through the hub of the greenlet that started it (directly
    or through real threads started in turn), see :func:`log`."""
    if green():
        owner = _THREAD_OWNERS.get(_real_ident()) or Owner()
        _original("_thread", "start_new_thread")(_run_owned, (owner, target, args))
        return
    threading.Thread(target=target, args=args, name=name, daemon=True).start()


#: Under gevent, the Owner of each live real thread we started, by its OS thread ident.
_THREAD_OWNERS: dict[int, Owner] = {}
at_fork(_THREAD_OWNERS.clear)  # a forked child has none of its parent's threads


def _real_ident() -> int:
    """The calling OS thread's ident (under gevent, ``threading.get_ident()`` names a greenlet)."""
    return _original("_thread", "get_ident")() if green() else _thread.get_ident()


def _run_owned(owner: Owner, target: Callable[..., None], args: tuple[Any, ...]) -> None:
    ident = _real_ident()
    _THREAD_OWNERS[ident] = owner
    try:
        target(*args)
    finally:
        _THREAD_OWNERS.pop(ident, None)


def log(logger: logging.Logger, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
    """``logger.log(level, msg, *args)`` that a real thread of ours may call under gevent: there
    the record is handed to a greenlet of the hub that started the thread, and is emitted
    when that hub next runs (a body that never yields delays it; the thread goes on at once).
    Elsewhere (no gevent, or called from a greenlet) it logs here and now. ``exc_info=True``
    takes the exception being handled, as ``logger.exception`` does."""
    info = sys.exc_info() if exc_info else None
    owner = _THREAD_OWNERS.get(_real_ident()) if _THREAD_OWNERS else None
    if owner is None:
        logger.log(level, msg, *args, exc_info=info)
    else:
        owner.call(_emit, logger, level, msg, args, info)


def _emit(logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], info: Any) -> None:
    logger.log(level, msg, *args, exc_info=info)


def create_connection(address: tuple[str, int], timeout: float) -> socket.socket:
    """``socket.create_connection`` with an unpatched socket under gevent: a real thread
    must not use a gevent socket (it would make that thread a hub of its own, never freed)."""
    if not green():
        return socket.create_connection(address, timeout=timeout)
    real_socket, getaddrinfo = _original("socket", "socket"), _original("socket", "getaddrinfo")
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, where in getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = real_socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(where)
            return sock  # type: ignore[no-any-return]
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"getaddrinfo returned nothing for {host}")


def socket_class() -> type[socket.socket]:
    """The ``socket.socket`` of the sockets :func:`create_connection` makes (gevent replaces
    the class, and its methods refuse a real socket)."""
    return _original("socket", "socket") if green() else socket.socket


def ssl_context_class() -> type[ssl.SSLContext]:
    """The ``ssl.SSLContext`` whose sockets are real (gevent replaces the class)."""
    return _original("ssl", "SSLContext") if green() else ssl.SSLContext


def owner() -> Owner | None:
    """An :class:`Owner` for the caller under gevent; None otherwise (call directly)."""
    return Owner() if green() else None


class Owner:
    """Where the code that started a real thread lives, so that the thread can hand work
    back to it: under gevent, the hub of the thread that made the Owner (the work then runs
    in a greenlet of that hub, when the hub gets a turn); otherwise, the caller's thread."""

    __slots__ = ("hub",)

    def __init__(self) -> None:
        self.hub = sys.modules["gevent"].get_hub() if green() else None

    def call(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func(*args)`` at once here, or in a new greenlet of the owning hub."""
        hub = self.hub
        if hub is None or _here(hub):
            func(*args)
            return
        hub.loop.run_callback_threadsafe(sys.modules["gevent"].spawn_raw, _logged, func, args)

    def throw(self, glet: Any, exc: BaseException, still: Callable[[], bool]) -> None:
        """Raise ``exc`` in the greenlet ``glet`` at its next switch, if ``still()`` says so
        then (both are checked in the hub's own thread, so nothing runs in between)."""

        def fire() -> None:
            if still() and not glet.dead:
                glet.throw(exc)

        hub = self.hub
        assert hub is not None, "throw() is for greenlets of a gevent hub"
        hub.loop.run_callback_threadsafe(fire)


def _here(hub: Any) -> bool:
    """True when called from ``hub``'s own OS thread."""
    return bool(getattr(hub, "thread_ident", None) == _original("_thread", "get_ident")())


def _logged(func: Callable[..., None], args: tuple[Any, ...]) -> None:
    try:
        func(*args)
    except Exception:
        native_log.exception("%r, handed back to the greenlets by a real thread, failed", func)
