"""Exponential backoff: how long to wait before the next try of something that failed.

One small stateful helper shared by every retry loop of the package (acquiring and releasing
a lock through a Consul leader election, the beat's election, the leftover-session cleaner):
each loop keeps its own bounds (a named constant saying why) and its own way of waiting (a
sleep, an Event's wait, a deadline), and asks a :class:`Backoff` for the delay.

Why not tenacity: each of those loops retries only some outcomes inside a larger loop (a
refused acquire waits on a blocking query, not the backoff; a successful step starts the
delays over), waits on an Event or up to a deadline, and logs the delay it is about to wait;
expressed as tenacity policies they would be longer than the loops, for a dependency.
"""

from __future__ import annotations

__all__ = ["Backoff"]


class Backoff:
    """Delays (seconds) growing from ``first``, doubling after each use, up to ``maximum``:
    ``first, 2 first, 4 first, ..., maximum, maximum, ...``; :meth:`reset` starts over.

    Not thread-safe: one per retry loop."""

    __slots__ = ("_next", "first", "maximum")

    def __init__(self, first: float, maximum: float) -> None:
        if not 0 < first <= maximum:
            raise ValueError(f"backoff bounds must satisfy 0 < first <= maximum, got first={first} maximum={maximum}")
        self.first = first
        self.maximum = maximum
        self._next = first

    def __repr__(self) -> str:
        return f"<Backoff next={self._next:g}s of {self.first:g}..{self.maximum:g}s>"

    def peek(self) -> float:
        """The next delay, without using it."""
        return self._next

    def next(self) -> float:
        """The next delay; the one after it is twice as long (at most ``maximum``)."""
        delay = self._next
        self._next = min(self.maximum, delay * 2)
        return delay

    def reset(self) -> None:
        """Start over from ``first`` (after a success)."""
        self._next = self.first
