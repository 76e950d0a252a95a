"""The process's watcher reads a few folders, each on a connection of its own, never the whole
KV store for locks in folders with nothing in common (issue #16): a lock under ``locks/`` and
one under ``reports/`` are read as two folders, the many keys elsewhere in KV stay unread, and
the loss of either lock is still seen within the watcher's bound.

Scenarios against a real dev agent holding 5,000 unrelated keys in a folder of their own: two
locks in unrelated folders; more folders than WATCH_QUERIES, merged as they come; a waiter
for a key in a folder nothing else of the process is under. Every read the watcher makes is
recorded (the client's ``kv_list`` wrapped, its answer untouched). Then: locks released before
they are followed cost no read; under gevent, a query on a real socket is interrupted and a
lock in a new folder is acquired and watched; the watcher's connection closes when nothing is
left to follow; and threads taking locks in many folders, some deleted behind them, while the
folders read keep changing.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings
from celery_consul_lock.consul import ConsulClient, kv_set
from celery_consul_lock.watch import WATCH_DELAY, WATCH_QUERIES, watched

from .servers import wait_for
from .test_connections import port_of
from .test_gevent import agent_connections, run_green_child

#: Keys elsewhere in KV, which no answer of the watcher may list.
NOISE_KEYS = 5000
#: Within this of a key being deleted or freed behind its holder's back, the holder knows
#: (the watcher reads at most every 0.2 s; room for a loaded machine).
LOSS_BOUND = 5.0


@pytest.fixture(scope="module")
def noise(consul) -> Iterator[str]:
    """A folder of NOISE_KEYS keys of 100 bytes that nothing here locks (written 64 to a
    transaction); its name, with the ``/``."""
    folder = f"noise-{uuid.uuid4().hex[:8]}/"
    client = ConsulClient(ConsulSettings(address=consul.address))
    value = b"x" * 100
    for start in range(0, NOISE_KEYS, 64):
        ok, _, errors = client.txn([{"KV": kv_set(f"{folder}k{n}", value)} for n in range(start, min(start + 64, NOISE_KEYS))])
        assert ok, errors
    yield folder
    consul.api(f"/v1/kv/{folder}?recurse", "DELETE")
    client.close()


@dataclass
class Read:
    """One kv_list call of a client: the settings it was made with, its prefix, how many
    entries it answered (-1: no answer, e.g. interrupted), and when it started and ended."""

    settings: ConsulSettings
    prefix: str
    entries: int = -1
    start: float = 0.0
    end: float = float("inf")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Read]:
    """Every ``ConsulClient.kv_list`` call of this process from now on (the watcher's reads)."""
    seen: list[Read] = []
    real = ConsulClient.kv_list

    def kv_list(self: ConsulClient, prefix: str, **kw):
        read = Read(self.settings, prefix, start=time.monotonic())
        seen.append(read)
        try:
            index, entries = real(self, prefix, **kw)
        finally:
            read.end = time.monotonic()
        read.entries = len(entries)
        return index, entries

    monkeypatch.setattr(ConsulClient, "kv_list", kv_list)
    return seen


def own(reads: list[Read], settings: ConsulSettings) -> list[Read]:
    return [r for r in reads if r.settings == settings]


def most_at_once(reads: list[Read]) -> int:
    """How many of ``reads`` were in progress at the same time, at most."""
    events = sorted([(r.start, 1) for r in reads] + [(r.end, -1) for r in reads], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def assert_never_read(reads: list[Read], settings: ConsulSettings, noise: str) -> None:
    """No read made with ``settings`` covered ``noise`` (the whole KV store included), and
    never more than WATCH_QUERIES of them at once."""
    mine = own(reads, settings)
    assert mine, "the watcher made no read at all"
    covering = [r for r in mine if noise.startswith(r.prefix)]
    assert not covering, f"the watcher read {covering[0].prefix!r} ({covering[0].entries} entries), which lists {noise}"
    most, at_once = max(r.entries for r in mine), most_at_once(mine)
    print(f"{len(mine)} reads of {sorted({r.prefix for r in mine})}; at most {most} entries in an answer, {at_once} at once")
    assert most < 50, most
    assert at_once <= WATCH_QUERIES, at_once


def lose(lock: ConsulLock, consul, how: str) -> float:
    """Delete ``lock``'s key (``how`` "delete") or free it by its own session's ID from
    elsewhere ("free"); wait until its holder knows; returns how long that took."""
    at = time.monotonic()
    if how == "delete":
        consul.api(f"/v1/kv/{lock.key}", "DELETE")
    else:
        consul.api(f"/v1/kv/{lock.key}?release={lock.session_id}", "PUT", {})
    wait_for(lock.lost.is_set, LOSS_BOUND, f"the loss of {lock.key} ({how}) to be seen")
    return time.monotonic() - at


def test_locks_in_two_unrelated_folders_are_read_each_on_its_own_not_with_the_keys_elsewhere(settings, consul, noise, reads):
    settings = settings.replace(max_connections=5)  # a watcher of this test's own
    tag = uuid.uuid4().hex[:8]
    a = ConsulLock(f"locks/{tag}/.lock", settings=settings)
    b = ConsulLock(f"reports-{tag}/b/.lock", settings=settings)
    assert a.acquire(blocking=False) and b.acquire(blocking=False)
    try:
        # Their common folder is the whole KV store (and its 5,000 other keys): the watcher
        # reads their two folders instead, one query each.
        folders = (f"locks/{tag}/", f"reports-{tag}/b/")
        wait_for(lambda: watched(settings) == folders, 5 + WATCH_DELAY, f"the watcher to read {folders}")
        took_a = lose(a, consul, "delete")
        assert a.lost_reason == "the key was deleted" and b.held
        took_b = lose(b, consul, "free")
        assert "freed behind our back" in (b.lost_reason or "")
        print(f"lost {took_a:.2f} s after the delete, {took_b:.2f} s after the free")
        assert_never_read(reads, settings, noise)
    finally:
        a.release()
        b.release()


def test_more_folders_than_the_watcher_reads_are_merged_as_they_come_and_every_loss_is_seen(settings, consul, noise, reads):
    settings = settings.replace(max_connections=6)
    tag = uuid.uuid4().hex[:8]
    keys = [f"{tag}/f{n}/.lock" for n in range(WATCH_QUERIES + 2)] + [f"{tag}-other/x/.lock"]
    locks = [ConsulLock(key, settings=settings) for key in keys]
    try:
        # One at a time, each followed before the next: the watcher goes from one folder to
        # WATCH_QUERIES, then merges (a query in progress interrupted and started again).
        for lock in locks:
            assert lock.acquire(blocking=False)
            folder = lock.key.rsplit("/", 1)[0] + "/"
            wait_for(
                lambda folder=folder: any(folder.startswith(w) for w in watched(settings)),
                5 + WATCH_DELAY,
                f"the watcher to read a folder over {folder}",
            )
        final = tuple(sorted((f"{tag}/", f"{tag}-other/x/")))  # the five merged, the other as deep
        wait_for(lambda: watched(settings) == final, 5, f"the watcher to read {final}")
        # Each lost in turn, by a delete or a free; the others stay held.
        for n, lock in enumerate(locks):
            took = lose(lock, consul, "delete" if n % 2 else "free")
            print(f"{lock.key} lost {took:.2f} s after it was {'deleted' if n % 2 else 'freed'}")
            assert all(other.held for other in locks[n + 1 :]), [other.lost_reason for other in locks]
        assert_never_read(reads, settings, noise)
        assert len({r.prefix for r in own(reads, settings)}) > WATCH_QUERIES  # it did go through several plans
    finally:
        for lock in locks:
            lock.release()


def test_a_waiter_for_a_key_in_a_new_folder_is_woken_by_its_release_there(settings, consul, noise, reads):
    settings = settings.replace(max_connections=7)
    tag = uuid.uuid4().hex[:8]
    mine = ConsulLock(f"{tag}-a/x/.lock", settings=settings)
    assert mine.acquire(blocking=False)
    other = ConsulClient(settings)
    sid = other.session_create("the other holder", ttl=30, lock_delay=2, checks=[])
    wanted = f"{tag}-b/y/.lock"
    assert other.kv_lock(wanted, sid, b'{"name":"other"}', exists=False).acquired
    got: list[float] = []
    errors: list[BaseException] = []

    def wait() -> None:
        lock = ConsulLock(wanted, settings=settings)
        try:
            if lock.acquire(timeout=60):
                got.append(time.monotonic())
                lock.release()
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    try:
        # The watcher reads {tag}-a/x/, where nothing changes: its query would answer after
        # 60 s. The waiter's folder is outside it, so a query of that folder starts now.
        wait_for(lambda: watched(settings) == (f"{tag}-a/x/",), 5 + WATCH_DELAY, "the watcher to read the held lock's folder")
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        folders = (f"{tag}-a/x/", f"{tag}-b/y/")
        wait_for(lambda: watched(settings) == folders, 5, f"the watcher to read {folders}")
        assert not got and not errors
        released_at = time.monotonic()
        assert other.kv_release(wanted, sid, b"")
        waiter.join(LOSS_BOUND + 5)
        assert not errors, errors
        assert got, "the waiter never got the key"
        print(f"the waiter got the key {got[0] - released_at:.2f} s after its release")
        assert got[0] - released_at < LOSS_BOUND
        assert mine.held
        assert_never_read(reads, settings, noise)
    finally:
        mine.release()
        other.session_destroy(sid)
        other.close()


def test_locks_released_before_they_are_followed_cost_no_read(settings, consul, reads):
    settings = settings.replace(max_connections=8)
    tag = uuid.uuid4().hex[:8]
    held = ConsulLock(f"{tag}-held/x/.lock", settings=settings)
    assert held.acquire(blocking=False)
    try:
        wait_for(lambda: watched(settings) == (f"{tag}-held/x/",), 5 + WATCH_DELAY, "the watcher to read the held lock's folder")
        # 20 locks, each in a folder of its own and released well before WATCH_DELAY: the
        # watcher reads none of their folders, nor one over them, and the query in progress
        # is not interrupted for them (before: each interrupted it and it started again).
        for n in range(20):
            short = ConsulLock(f"{tag}-short-{n}/.lock", settings=settings)
            assert short.acquire(blocking=False)
            short.release()
        time.sleep(2 * WATCH_DELAY)  # not an assertion: any read on their account happens by now
        mine = own(reads, settings)
        assert {r.prefix for r in mine} == {f"{tag}-held/x/"}, mine
        # Its first read (answered at once) and the blocking query still in progress.
        assert len(mine) == 2, mine
        assert watched(settings) == (f"{tag}-held/x/",)
    finally:
        held.release()


def test_under_gevent_a_query_on_a_real_socket_is_interrupted_at_once(consul, key):
    """The watcher's queries run on real sockets in real threads, also under gevent, and are
    interrupted when their folder changes: shutting such a socket down went through gevent's
    socket class and raised AttributeError (the watcher crashed, losses went unseen)."""
    out = run_green_child(
        f"""
        from celery_consul_lock import ConsulSettings
        from celery_consul_lock.consul import ConsulClient

        client = ConsulClient(ConsulSettings(address={consul.address!r}), native=True)
        index, _ = client.kv_get({key!r})
        ended = []

        def block():
            try:
                client.kv_get({key!r}, index=max(index, 1), wait=30)
                ended.append("answered")
            except Exception as exc:
                ended.append(str(exc))

        native.start_thread(block, (), "block")
        gevent.sleep(0.5)  # the query reaches the agent
        at = time.monotonic()
        client.interrupt()
        until(lambda: ended, 10)
        print(json.dumps({{"ended": ended, "after": time.monotonic() - at}}))
        """
    )
    assert len(out["ended"]) == 1 and "interrupted" in out["ended"][0], out
    assert out["after"] < 2, out


def test_under_gevent_a_lock_in_another_folder_than_the_watched_one_is_acquired_and_its_loss_seen(consul):
    """A greenlet acquires a lock outside the folder the watcher reads: its folder is read
    too, and its loss seen. Before, the acquire itself interrupted the watcher's query and
    raised AttributeError (gevent's socket shutdown on a real socket): in a gevent worker,
    a run whose lock came in a new folder after the first was followed failed."""
    tag = uuid.uuid4().hex[:8]
    out = run_green_child(
        f"""
        from celery_consul_lock import ConsulLock
        from celery_consul_lock.watch import watched

        a = ConsulLock("{tag}-a/x/.lock", address={consul.address!r}, lock_delay=2)
        b = ConsulLock("{tag}-b/y/.lock", address={consul.address!r}, lock_delay=2)
        assert a.acquire()
        read_a = until(lambda: watched(a.settings) == ("{tag}-a/x/",), 10)
        try:
            b.acquire()
            error = None
        except Exception as exc:
            error = repr(exc)
        both = until(lambda: watched(a.settings) == ("{tag}-a/x/", "{tag}-b/y/"), 10)
        at = time.monotonic()
        import urllib.request
        urllib.request.urlopen(urllib.request.Request("http://{consul.address}/v1/kv/{tag}-b/y/.lock", method="DELETE")).read()
        lost = until(b.lost.is_set, 10)
        print(json.dumps({{"read_a": read_a, "error": error, "both": both, "lost": lost, "reason": b.lost_reason,
                          "after": time.monotonic() - at, "a_held": a.held}}))
        """
    )
    assert out["read_a"] and out["error"] is None, out
    assert out["both"] and out["lost"] and out["reason"] == "the key was deleted" and out["a_held"], out
    assert out["after"] < LOSS_BOUND, out


def test_the_watchers_connection_closes_once_nothing_is_left_to_follow(settings, consul, reads):
    settings = settings.replace(max_connections=9)
    port = port_of(consul)
    lock = ConsulLock(f"locks/close-{uuid.uuid4().hex[:8]}/.lock", settings=settings)
    assert lock.acquire(blocking=False)
    # Counted once the reader has had an answer, so its connection is in the count (the
    # folders are planned before the reader connects: counting then missed it under load).
    wait_for(lambda: any(r.settings == settings and r.entries >= 0 for r in reads), 5 + WATCH_DELAY, "the watcher's first answer")
    holding = agent_connections(os.getpid(), port)
    lock.release()
    # The release changes the folder: the answer wakes the planner, which finds nothing left
    # to follow and ends the query; its reader closes the connection at once (before: the
    # watcher kept it a minute).
    wait_for(lambda: watched(settings) == (), 5, "the watcher to stop reading")
    wait_for(lambda: agent_connections(os.getpid(), port) <= holding - 1, 5, "the watcher's connection to close")


def test_every_delete_is_seen_and_no_lock_lost_falsely_while_the_folders_read_keep_changing(settings, consul):
    """Threads take locks in 15 folders (more than WATCH_QUERIES, fewer at times), hold each a
    random while, and some keys are deleted behind them: the folders read change again and
    again (merged, split, interrupted), and still every delete is seen within the bound, no
    lock released normally was reported lost, and every waiter got its key."""
    settings = settings.replace(max_connections=10)
    tag = uuid.uuid4().hex[:8]
    folders = [f"{tag}/t{n}/s{m}" for n in range(5) for m in range(3)]
    stop = time.monotonic() + 12
    seen: list[float] = []
    missed, false_losses, waits, errors = [], [], [], []

    def holder(n: int) -> None:
        rnd = random.Random(n)
        try:
            while time.monotonic() < stop:
                lock = ConsulLock(f"{rnd.choice(folders)}/k{n}/.lock", settings=settings)
                assert lock.acquire(blocking=False), lock.key
                hold = rnd.choice([0.1, 0.3, 0.8, 1.2])
                time.sleep(hold)  # not an assertion: the lock's hold time
                if hold >= 0.8 and rnd.random() < 0.5:
                    at = time.monotonic()
                    consul.api(f"/v1/kv/{lock.key}", "DELETE")
                    if lock.lost.wait(LOSS_BOUND):
                        seen.append(time.monotonic() - at)
                    else:
                        missed.append(lock.key)
                elif lock.lost.is_set():
                    false_losses.append((lock.key, lock.lost_reason))
                lock.release()
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    def waiter(n: int) -> None:
        rnd = random.Random(100 + n)
        try:
            while time.monotonic() < stop:
                key = f"{tag}/w{n}/x/.lock"
                first, second = ConsulLock(key, settings=settings), ConsulLock(key, settings=settings.replace(ttl=11))
                assert first.acquire(blocking=False)
                got: list[bool] = []
                t = threading.Thread(target=lambda g=got, s=second: g.append(s.acquire(timeout=LOSS_BOUND + 5)), daemon=True)
                t.start()
                time.sleep(rnd.choice([0.2, 0.7]))  # not an assertion: the waiter waits meanwhile
                first.release()
                t.join(LOSS_BOUND + 10)
                waits.append(bool(got and got[0]))
                second.release()
        except BaseException as exc:  # shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=holder, args=(n,)) for n in range(16)]
    threads += [threading.Thread(target=waiter, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print(
        f"{len(seen)} deletes seen (median {statistics.median(seen):.2f} s, at most {max(seen):.2f} s), "
        f"{len(missed)} missed, {len(false_losses)} false losses, {sum(waits)} of {len(waits)} waits got the key"
    )
    assert not errors, errors[:3]
    assert seen and not missed and not false_losses, (missed, false_losses)
    assert waits and all(waits), waits
