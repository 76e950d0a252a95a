"""What a short lock cycle costs the process besides its two requests (issue #16, capacity):
no background thread is woken per acquire. Against a real dev agent."""

from __future__ import annotations

import time

import pytest

from celery_consul_lock import ConsulLock
from celery_consul_lock.settings import ConsulSettings
from celery_consul_lock.watch import WATCH_DELAY, Watcher


def test_short_locks_do_not_wake_the_watcher_once_per_acquire(
    settings: ConsulSettings, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every lock is followed from WATCH_DELAY after its acquire; one released before then is
    # dropped unread. The watcher wakes once per half delay to take what came due, not once
    # per acquire: waking a thread per lock cost a quarter of a cycle's CPU under 4 threads.
    turns = []
    judge = Watcher._judge

    def counting_judge(self: Watcher) -> None:
        turns.append(time.monotonic())
        judge(self)

    monkeypatch.setattr(Watcher, "_judge", counting_judge)
    lock = ConsulLock(f"{key}/.lock", settings=settings)
    cycles, start = 0, time.monotonic()
    while cycles < 300 or time.monotonic() - start < 2 * WATCH_DELAY:
        assert lock.acquire(blocking=False)
        assert lock.release()
        cycles += 1
    elapsed = time.monotonic() - start
    bound = elapsed / (WATCH_DELAY / 2) + 3
    assert len(turns) <= bound, f"{len(turns)} watcher turns for {cycles} cycles in {elapsed:.2f} s (bound {bound:.0f})"
