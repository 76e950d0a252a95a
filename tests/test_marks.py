"""The pure rules of exactly-once (no servers): which tick a mark lets run, which message a
worker judges as sent by a deposed leader, and which copy of a message is a duplicate."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from celery_consul_lock.protocol import LEADER_HEADER, beat_of_request, leader_header, stale_leader
from celery_consul_lock.task import _delivery_finished
from celery_consul_lock.ticks import DONE_TICKS_KEPT, OPEN_TICK_RETENTION, OPEN_TICKS_MAX, Mark, Tick, attributed, beat_of

DUE = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)


def tick(seconds: float, entry: str = "e") -> Tick:
    return Tick.of(entry, DUE + timedelta(seconds=seconds))


def after(mark: Mark, data: dict | None) -> Mark:
    assert data is not None
    return Mark(data.get("epoch"), mark.modify_index + 1, data)


EMPTY = Mark(None, 0, {})


def test_a_tick_that_completed_is_covered_and_says_so():
    mark = after(EMPTY, EMPTY.completed(tick(0), {}))
    assert mark.verdict(tick(0)) == f"tick {tick(0)} already ran to completion"
    assert mark.verdict(tick(1)) is None  # later: runs


def test_a_failed_ticks_retry_runs_after_a_later_tick_completed():
    mark = after(EMPTY, EMPTY.opened(tick(0), 1.0))  # t0 starts, fails, retries later
    mark = after(mark, mark.opened(tick(3), 2.0))
    mark = after(mark, mark.completed(tick(3), {}))  # t3 completes first
    assert mark.epoch == tick(3).epoch and mark.verdict(tick(0)) is None
    mark = after(mark, mark.completed(tick(0), {}))  # the retry completes: the mark never moves down
    assert mark.epoch == tick(3).epoch and not mark.open and mark.covers(tick(0))


def test_a_late_tick_that_never_started_runs_once():
    mark = after(EMPTY, EMPTY.completed(tick(60), {}))
    assert mark.verdict(tick(0)) is None
    mark = after(mark, mark.completed(tick(0), {}))
    assert mark.covers(tick(0)) and mark.epoch == tick(60).epoch


def test_a_tick_older_than_the_kept_history_is_taken_as_done():
    mark = EMPTY
    for n in range(1, DONE_TICKS_KEPT + 2):
        mark = after(mark, mark.completed(tick(n), {}))
    assert len(mark.done) == DONE_TICKS_KEPT and mark.done[0] == tick(2).epoch
    assert "older than the" in (mark.verdict(tick(1)) or "") and "older than the" in (mark.verdict(tick(0.5)) or "")
    assert mark.verdict(tick(DONE_TICKS_KEPT + 2)) is None


def test_a_mark_written_by_the_first_version_keeps_its_high_water_rule():
    old = Mark(tick(10).epoch, 5, {"due": "x", "epoch": tick(10).epoch})
    assert old.covers(tick(5)) and old.covers(tick(10)) and not old.covers(tick(11))


def test_open_ticks_are_bounded_in_age_and_number():
    mark = after(EMPTY, EMPTY.opened(tick(0), 0.0))
    later = after(mark, mark.opened(tick(1), OPEN_TICK_RETENTION + 1))
    assert list(later.open) == [str(tick(1)).rpartition("@")[2]]
    for n in range(OPEN_TICKS_MAX + 5):
        later = after(later, later.opened(tick(10 + n), OPEN_TICK_RETENTION + 2 + n))
    assert len(later.open) == OPEN_TICKS_MAX and str(tick(1)).rpartition("@")[2] not in later.open


def _header(token: int, sent_at: float | None, elected_at: float, name: str = "s") -> dict:
    header = {"scheduler": name, "token": token, "instance": "i", "elected_at": elected_at}
    if sent_at is not None:
        header["sent_at"] = sent_at
    return header


@pytest.fixture(autouse=True)
def _forget_leaders(monkeypatch):
    from celery_consul_lock import protocol

    monkeypatch.setattr(protocol, "_LEADERS", {})


def test_a_mark_names_the_beat_that_sent_its_ticks_and_none_once_two_beats_did():
    # The beat name comes from the leader header, also from a header of version 0.1 (no
    # sent_at); a message without one (sent by hand, another scheduler) names no beat.
    class Request:
        def __init__(self, headers: dict) -> None:
            self.headers = headers

    ours = Request({LEADER_HEADER: leader_header("nightly", 7, "host-1-ab", 1.0, 2.0)})
    old = Request({LEADER_HEADER: {"scheduler": "nightly", "token": 3, "instance": "host-2-cd"}})
    assert beat_of_request(ours) == beat_of_request(old) == "nightly"
    assert beat_of_request(Request({})) is None
    assert beat_of_request(Request({LEADER_HEADER: "garbage"})) is None

    mark = after(EMPTY, attributed(EMPTY.opened(tick(0), 1.0), "nightly"))
    assert beat_of(mark.data) == "nightly"
    # A run without a beat (a retry that lost its headers) keeps the name; so does the
    # completion; and a write that changes nothing stays nothing.
    mark = after(mark, attributed(mark.completed(tick(0), {"task_id": "t"}), None))
    assert beat_of(mark.data) == "nightly"
    assert attributed(None, "nightly") is None
    # An unnamed mark (older version) is named by the next run of a beat's tick.
    legacy = Mark(0.0, 1, {"epoch": 0.0, "due": "x", "open": {}, "done": [0.0]})
    assert beat_of(attributed(legacy.completed(tick(1), {}), "nightly")) == "nightly"
    # Another beat writing the same entry's mark: nobody's alone any more, for good.
    shared = after(mark, attributed(mark.opened(tick(5), 3.0), "hourly"))
    assert "beat" in shared.data and beat_of(shared.data) is None
    assert beat_of(attributed(shared.completed(tick(5), {}), "nightly")) is None


def test_a_message_is_stale_only_if_sent_after_a_newer_leader_was_elected():
    assert stale_leader(_header(10, 105.0, 100.0)) is None
    assert stale_leader(_header(20, 205.0, 200.0)) is None  # a newer leader, elected at 200
    assert stale_leader(_header(10, 150.0, 100.0)) is None  # sent while it led: a late retry
    why = stale_leader(_header(10, 201.0, 100.0))
    assert why and "token 20" in why  # sent after the newer leader was elected
    assert stale_leader(_header(10, 201.0, 100.0, name="other")) is None  # per scheduler
    assert stale_leader(_header(10, None, 100.0)) is None  # a sender without send times


@pytest.mark.parametrize(
    ("previous", "attempt", "finished"),
    [
        ({"task_id": "a", "released_at": "t"}, (0, 0), True),
        ({"task_id": "a", "released_at": "t", "retries": 2}, (1, 0), True),  # a later attempt finished
        ({"task_id": "a", "released_at": "t"}, (1, 0), False),  # our predecessor: we are its retry
        ({"task_id": "a", "released_at": "t"}, (0, 1), False),  # we are its requeued copy
        ({"task_id": "a", "released_at": "t", "requeues": 1}, (0, 1), True),
        ({"task_id": "a"}, (0, 0), False),  # freed by its session's end: the run died
        ({"task_id": "b", "released_at": "t"}, (0, 0), False),
        (None, (0, 0), False),
    ],
)
def test_a_copy_is_a_duplicate_only_if_this_messages_run_finished(previous, attempt, finished):
    assert _delivery_finished(previous, "a", attempt) is finished
