"""The watcher's pure rules: which folders it reads, what an answer lists at a path, and when an
answer may judge a holding or wake a waiter (only when known to be newer than what they saw)."""

from __future__ import annotations

from celery_consul_lock.consul import KVEntry
from celery_consul_lock.watch import Snapshot, Waiter, judge_lock, watch_folders


def entry(key: str, modify_index: int, session: str | None = "s1") -> KVEntry:
    return KVEntry(key, b"", 0, session, 1, modify_index, 1)


def test_the_watched_folders_are_the_paths_folders_the_closest_merged_while_over_the_limit():
    assert watch_folders([]) == ()
    assert watch_folders(["locks/a/.lock"]) == ("locks/a/",)
    assert watch_folders(["locks/a/.lock", "locks/a/.lock", "locks/a/x"]) == ("locks/a/",)
    # Folders with nothing in common: each read on its own, not the whole KV store.
    assert watch_folders(["locks/a/.lock", "reports/b/.lock", "sem/x/"], 3) == ("locks/a/", "reports/b/", "sem/x/")
    # A folder under another one followed is read with it.
    assert watch_folders(["sem/x/", "sem/x/y/.lock", "sem/.lock"], 3) == ("sem/",)
    # More than the limit: the two whose common folder is deepest merged into it (which then
    # covers the others under it), again while over the limit; the rest stay as deep.
    assert watch_folders([f"locks/report-{n}/.lock" for n in range(9)] + ["jobs/b/.lock"], 3) == ("jobs/b/", "locks/")
    app = ["app/locks/1/.lock", "app/locks/2/.lock", "app/locks/3/.lock", "app/sem/x/"]
    assert watch_folders(app, 3) == ("app/locks/", "app/sem/x/")
    assert watch_folders(app, 4) == ("app/locks/1/", "app/locks/2/", "app/locks/3/", "app/sem/x/")
    assert watch_folders(app, 1) == ("app/",)
    deep = ["a/b/c/1/.lock", "a/b/c/2/.lock", "a/b/d/.lock", "a/e/.lock", "f/g/.lock"]
    assert watch_folders(deep, 4) == ("a/b/c/", "a/b/d/", "a/e/", "f/g/")
    assert watch_folders(deep, 3) == ("a/b/", "a/e/", "f/g/")
    assert watch_folders(deep, 2) == ("a/", "f/g/")
    assert watch_folders(["a/x/.lock", "a/y/.lock"], 1) == ("a/",)
    # Keys in no folder: the key itself (a prefix: "mylock" also lists "mylock2").
    assert watch_folders(["mylock", "mylock2", "locks/a/.lock"], 3) == ("locks/a/", "mylock")
    # More top-level folders than the limit: only then the whole KV store.
    assert watch_folders(["a/x/.lock", "b/x/.lock", "c/x/.lock", "d/x/.lock"], 3) == ("",)
    assert watch_folders(["a/x/.lock", "b/x/.lock", "top"], 2) == ("",)


def test_an_answer_lists_a_key_exactly_and_a_folder_with_everything_under_it():
    snap = Snapshot.of(
        "locks/", 10, 1, [entry("locks/b/.lock", 5), entry("locks/a/x", 3), entry("locks/a/.lock", 4), entry("locks/a0", 2)]
    )
    assert [e.key for e in snap.at("locks/a/")] == ["locks/a/.lock", "locks/a/x"]  # not locks/a0
    assert [e.key for e in snap.at("locks/a/.lock")] == ["locks/a/.lock"]
    assert snap.get("locks/c/.lock") is None and snap.covers("locks/c/.lock") and not snap.covers("other/x")


def test_a_lock_is_lost_when_its_key_is_deleted_freed_or_taken():
    snap = Snapshot.of(
        "locks/", 10, 1, [entry("locks/a/.lock", 9, "ours"), entry("locks/b/.lock", 9, None), entry("locks/c/.lock", 9, "theirs")]
    )
    assert judge_lock(snap, key="locks/a/.lock", sid="ours") is None
    assert "freed" in (judge_lock(snap, key="locks/b/.lock", sid="ours") or "")
    assert "theirs" in (judge_lock(snap, key="locks/c/.lock", sid="ours") or "")
    assert judge_lock(snap, key="locks/d/.lock", sid="ours") == "the key was deleted"


def test_a_waiter_is_woken_only_by_an_answer_known_to_be_newer_than_what_it_read():
    # The waiter read locks/a/.lock at ModifyIndex 7, Consul's index 20, when the watcher had
    # started 3 queries.
    waiter = Waiter("locks/a/.lock", 20, since=3, seen=frozenset({("locks/a/.lock", 7)}))
    older = Snapshot.of("locks/", 15, 3, [])  # from before the waiter's read: the key not there yet
    assert not waiter.changed(older)  # else the waiter would read again and again, the answer unchanged
    same = Snapshot.of("locks/", 20, 4, [entry("locks/a/.lock", 7)])  # a later query, nothing changed
    assert not waiter.changed(same)
    released = Snapshot.of("locks/", 25, 3, [entry("locks/a/.lock", 25, None)])  # newer by its index
    assert waiter.changed(released)
    deleted = Snapshot.of("locks/", 18, 4, [])  # a query started after the waiter: newer whatever its index
    assert waiter.changed(deleted)
    elsewhere = Snapshot.of("locks/b/", 30, 9, [])  # does not cover the key: says nothing of it
    assert not waiter.changed(elsewhere)
