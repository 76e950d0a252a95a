"""Is the process that holds a lock still running? Answered for holders on this host only.

A lock's value names its holder's host and pid, and :func:`identity` adds what tells a
process from a later one with the same pid: its PID namespace and its start time (clock
ticks since boot, from ``/proc``). A copy of a Celery message that finds the same message's
run holding the lock asks :func:`holder_alive` whether that run is alive (a duplicate
delivery: skip it) or died holding it (a redelivery: wait for the key, then run).

Limit: only a holder on this host can be judged, and only where ``/proc`` exists (Linux).
For any other holder the answer is None (unknown), and the caller must find out by waiting:
Consul cannot say whether a session is still being renewed.
"""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["holder_alive", "identity"]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if there is no such
    process, it has exited (a zombie), or ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ')'.
    fields = text[text.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _pid_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


_IDENTITY: tuple[int, dict[str, Any]] = (0, {})


def identity() -> dict[str, Any]:
    """What a lock's value carries to name this process beyond host and pid (empty where
    ``/proc`` does not exist); read once per process."""
    global _IDENTITY
    pid = os.getpid()
    if _IDENTITY[0] != pid:
        started = _start_time(pid)
        _IDENTITY = (pid, {} if started is None else {"started": started, "pidns": _pid_namespace()})
    return _IDENTITY[1]


def holder_alive(host: str | None, pid: int | None, started: Any, pidns: Any) -> bool | None:
    """True if the holder process runs on this host now, False if it has ended, None if
    this host cannot tell (another host, another PID namespace, or no ``/proc``)."""
    if host != socket.gethostname() or not isinstance(pid, int) or not isinstance(started, int):
        return None
    if pidns is None or pidns != _pid_namespace():
        return None
    return _start_time(pid) == started
