"""bench/peers.py's own logic (no servers, no peers installed): its options, how it counts
duplicated and missed ticks, and the JSON schema of issue 18. The benchmark itself runs with
`make bench-peers`, never in `make test`."""

from __future__ import annotations

import json

import pytest

from .servers import bench_module


@pytest.fixture(scope="module")
def peers():
    with bench_module("peers") as module:
        yield module


def test_an_unknown_round_setting_or_part_is_refused_before_anything_starts(peers, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        peers.main(["--set", "crashes=3"])
    assert info.value.code == 2
    assert "'crashes' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        peers.main(["--only", "beat,tasks"])
    assert "unknown part(s) ['tasks']" in capsys.readouterr().err


def test_quick_runs_every_case_with_fewer_rounds(peers) -> None:
    full, quick = peers.Plan(), peers.QUICK
    assert (full.crash, full.stop, full.pause) == (10, 10, 3)
    for name in full.__dataclass_fields__:
        assert 0 < getattr(quick, name) <= getattr(full, name), name


def test_a_run_sent_within_half_an_interval_is_duplicated_and_each_slot_a_gap_spans_beyond_one_is_missed(peers) -> None:
    sends = [0.0, 2.0, 4.0, 4.3, 6.3, 11.0, 13.0]  # 4.3: a second copy; 6.3 -> 11.0 (4.7 s): one tick missed
    duplicated, missed, _ = peers.gaps([{"sent": t, "tick": None} for t in sends])
    assert (duplicated, missed) == (1, 1)
    # Ours: the same tick id run twice counts even when the runs are far apart.
    duplicated, missed, _ = peers.gaps([{"sent": 0.0, "tick": "a"}, {"sent": 2.0, "tick": "b"}, {"sent": 4.0, "tick": "a"}])
    assert (duplicated, missed) == (1, 0)


def test_the_json_has_each_name_with_its_defaults_at_the_top_and_tuned_inside(peers) -> None:
    results = {
        "date": "2026-11-30 12:00 UTC",
        "beat": {
            "celery-consul-lock": {
                "defaults": {"crash_takeover_s": [3.1, 3.4], "duplicates": 0, "missed": 2},
                "tuned": {"crash_takeover_s": [2.0], "duplicates": 0, "missed": 1},
            }
        },
        "task": {"celery-once": {"defaults": {"added_ms": 3.0, "stuck_s": 3600.0}, "tuned": {"added_ms": 3.0, "stuck_s": 24.0}}},
        "unavailable": {"single-beat": "not installed", "curl-script": "curl is not installed"},
    }
    out = json.loads(json.dumps(peers.schema(results)))
    ours = out["beat"]["celery-consul-lock"]
    assert (ours["crash_takeover_s"], ours["duplicates"], ours["missed"]) == ([3.1, 3.4], 0, 2)
    assert ours["tuned"]["crash_takeover_s"] == [2.0]
    assert out["task"]["celery-once"]["stuck_s"] == 3600.0
    assert out["task"]["celery-once"]["tuned"]["stuck_s"] == 24.0
    # A system that could not run is in the output, saying why, not left out.
    assert out["beat"]["single-beat"] == {"unavailable": "not installed"}
    assert out["task"]["curl-script"] == {"unavailable": "curl is not installed"}
    assert set(out["beat"]) | set(out["task"]) <= set(peers.NAMES)


def test_a_missed_tick_counts_against_the_fault_signalled_inside_its_gap_and_a_restart_cuts_the_gap(peers) -> None:
    runs = [{"sent": t, "tick": None} for t in (0.0, 2.0, 4.0, 10.0, 12.0, 30.0, 32.0)]
    crash = peers.BeatRound("crash", t_signal=5.0, takeover=3.0, dispatch=6.0)
    stop = peers.BeatRound("stop", t_signal=12.5, takeover=None, dispatch=None)
    _, missed, events = peers.gaps(runs)
    assert missed == 2 + 8  # 4 -> 10 s: 2 slots; 12 -> 30 s: 8 slots
    assert peers.by_kind(events, [crash, stop]) == {
        "crash": {"duplicates": 0, "missed": 2},
        "stop": {"duplicates": 0, "missed": 8},
        "pause": {"duplicates": 0, "missed": 0},
    }
    # The benchmark restarted the fleet at 20 s: the 12 -> 30 s gap counts until then only.
    _, missed, _ = peers.gaps(runs, cuts=(20.0,))
    assert missed == 2 + 3
