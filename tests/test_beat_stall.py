"""A beat leader whose scheduler loop stalls, and a broker outage that stalls every beat alike,
with real `celery beat -S consul` processes, one real worker, Redis and the Consul dev agent.

The stall is made by a test hook of tests/proj (``_stall_send``): a send from a beat hangs
inside the publish while the file ``stall-<pid>`` exists in TEST_STALL_DIR, as a publish to a
wedged broker connection does. The tick rules are those of tests/test_beat.py (see its doc).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from celery_consul_lock import Tick

from .beats import Beat, Harness, skips, ticks
from .servers import wait_for
from .test_beat import check_ticks, forget_tick_mark, leader_of, report, takeover_after

#: The stall timeout of these tests: the shortest accepted with the default
#: consul_lock_timeout (5 s + 3 s), so the scenarios run fast.
STALL = 8.0
#: check TTL + lock-delay + lock-delay poll, at the beat defaults.
CRASH = 2.0 + 1.5 + 0.25
#: A stalled leader is replaced within the stall timeout + the crash bound; the first tick
#: of the new leader then needs its send and the worker (as CRASH_BOUND in test_beat.py).
STALL_BOUND = STALL + CRASH
SEND_SLACK = 2.25
#: How long the broker is down in the outage scenarios.
OUTAGE = 20.0


def stall_env(tmp_path: Path) -> dict[str, str]:
    return {"TEST_BEAT_STALL_TIMEOUT": f"{STALL:g}", "TEST_STALL_DIR": str(tmp_path)}


def two_beats(h: Harness, consul) -> tuple[Beat, Beat]:
    """A worker and two beats; once they tick, (leader, standby)."""
    forget_tick_mark(consul)
    h.worker(consul.address)
    beats = [h.beat(consul.address), h.beat(consul.address)]
    h.wait_joined()
    leader = leader_of(h)
    return leader, next(b for b in beats if b is not leader)


def hook_file(tmp_path: Path, name: str, beat: Beat) -> dict | None:
    """What the stall hook wrote for ``beat`` (``stalled`` or ``woke``), once it has."""
    beat.check_alive()
    path = tmp_path / f"{name}-{beat.pid}"
    return json.loads(path.read_text()) if path.exists() and path.stat().st_size else None


def due(record: dict) -> float:
    return Tick.parse(record["tick"]).epoch


def test_a_stalled_leader_is_replaced_within_the_stall_bound_and_sends_nothing_after_waking(harness, r, consul, tmp_path):
    harness.extra_env = stall_env(tmp_path)
    leader, standby = two_beats(harness, consul)

    # 1. The leader's next send hangs inside the publish.
    (tmp_path / f"stall-{leader.pid}").touch()
    stalled = wait_for(lambda: hook_file(tmp_path, "stalled", leader), 10, "the leader's send to hang")
    began = stalled["t"]

    # 2. Within the stall timeout + the crash bound, the standby leads and sends.
    takeover = takeover_after(harness, leader.instance, began, STALL_BOUND + 10)
    gap = takeover["t"] - began
    report("stall: send hung -> first run sent by the new leader", f"{gap:.2f} s (bound {STALL_BOUND:g} s)")
    assert takeover["instance"] == standby.instance, takeover
    assert gap <= STALL_BOUND + SEND_SLACK, f"the first tick of the new leader ran {gap:.2f} s after the stall began"
    text = leader.log_text()
    assert "the scheduler loop has been inside one tick or send" in text and "stepping down" in text, text[-3000:]

    # 3. The stalled beat wakes: its hung message reaches the worker, which drops it (older
    #    token, or a tick already run); it sends nothing more and rejoins as a standby.
    offset = leader.log_size()
    seen_skips = len(skips(r))
    (tmp_path / f"stall-{leader.pid}").unlink()
    woke = wait_for(lambda: hook_file(tmp_path, "woke", leader), 10, "the stalled send to return")["t"]
    dropped = wait_for(
        lambda: [s for s in skips(r)[seen_skips:] if s["reason"] in ("stale-leader", "duplicate-tick")],
        10,
        "the worker to drop the woken beat's message",
    )
    report("stall: the woken beat's message was dropped as", sorted({s["reason"] for s in dropped}))
    wait_for(lambda: "rejoining the election" in leader.log_text(offset), 10, "the woken beat to rejoin the election")
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= woke + 5, 15, "5 s of ticks after the stalled beat woke")
    assert leader.alive(), "the woken beat exited"
    assert not [x for x in records if x["instance"] == leader.instance and x["t"] > began], records
    assert {x["instance"] for x in records if x["t"] > began} == {standby.instance}, records
    after = leader.log_text(offset)
    assert "Sending due task" not in after and "elected leader" not in after, after
    report("stall: wide (tick-id gap, run gap) pairs", check_ticks(records, [began], STALL_BOUND))


def stepped_down(h: Harness) -> int:
    return sum(b.log_text().count("stepping down") for b in h.beats)


def elections(h: Harness) -> int:
    return sum(b.log_text().count("elected leader") for b in h.beats)


def redis_ready(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def last_tick_just_ran(h: Harness, r) -> list[dict]:
    """The records, right after a new one landed (so no tick is in flight for ~1 s)."""
    count = len(ticks(r))
    return h.wait_ticks(lambda xs: len(xs) > count, 10, "the next tick")


@pytest.mark.parametrize("outage", ["frozen", "restarted"])
def test_a_broker_outage_moves_leadership_at_most_once_per_beat_and_runs_each_tick_once(
    harness, r, consul, tmp_path, redis_server, outage
):
    """Redis frozen (SIGSTOP), or killed and started again (it keeps no data), for 20 s: the
    send hangs on whichever beat leads (a frozen Redis never answers; against a restarting
    one, Celery retries the publish and the connection for longer than the stall timeout).
    Each beat steps down at most once, sitting out until its send returns; when Redis is back
    the tick that could not be sent runs once (the first missed one: run-once), the sends that
    hung carry that same tick id, and ticking goes on with no further change of leader."""
    harness.extra_env = stall_env(tmp_path)
    two_beats(harness, consul)
    before = last_tick_just_ran(harness, r)
    began = time.time()
    redis_server.proc.signal(signal.SIGSTOP if outage == "frozen" else signal.SIGKILL)
    try:
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:  # the outage: the beats must stay up through it
            for beat in harness.beats:
                beat.check_alive()
            time.sleep(0.2)
        steps_in_outage = stepped_down(harness)
    finally:
        if outage == "frozen":
            redis_server.proc.signal(signal.SIGCONT)
        else:
            redis_server.proc.popen.wait(10)
            redis_server.proc.restart()
        wait_for(lambda: redis_ready(r), 15, "Redis to answer again")
    back = time.time()
    report(f"{outage} broker: step-downs during the outage", steps_in_outage)
    assert steps_in_outage <= len(harness.beats), "\n".join(b.log_text()[-2000:] for b in harness.beats)

    # Ticks go on (the restarted Redis lost the records made before it was killed).
    after = harness.wait_ticks(lambda xs: xs[-1]["t"] >= back + 8 and len(xs) > 1, 60, "8 s of ticks after the outage")
    if outage == "frozen":
        assert after[: len(before)] == before
        after = after[len(before) :]
    records = before + after
    report(f"{outage} broker: first run after the outage", f"{after[0]['tick']} at +{after[0]['t'] - back:.2f} s")
    # The first run after the outage is the first missed tick (run-once), not a later one.
    assert due(after[0]) <= due(before[-1]) + 1.5, (before[-1], after[0])
    steady = next(x for x in after if due(x) > back - 1)
    report(f"{outage} broker: Redis back -> first fresh tick ran", f"{steady['t'] - back:.2f} s")
    # Leadership settles: no step-down after the outage, at most one election per step-down.
    total = stepped_down(harness)
    assert total <= len(harness.beats), f"leadership moved again after the outage ({total} step-downs)"
    assert elections(harness) <= 1 + total, "\n".join(b.log_text()[-2000:] for b in harness.beats)
    report(f"{outage} broker: step-downs, elections in all", (total, elections(harness)))
    report(f"{outage} broker: wide (tick-id gap, run gap) pairs", check_ticks(records, [began], OUTAGE + 15))


def test_the_loop_watch_times_each_step_on_its_own_and_not_the_time_between_ticks():
    from celery_consul_lock.beat import LoopWatch

    now = [100.0]
    loop = LoopWatch(clock=lambda: now[0])
    assert loop.busy_since is None and loop.busy_for() == 0.0
    with loop.step():  # a tick
        now[0] += 2
        assert loop.busy_for() == 2.0
        with loop.step():  # a send inside it starts a new measure...
            assert loop.busy_for() == 0.0
            now[0] += 3
            assert loop.busy_for() == 3.0
        loop.sent()
        assert loop.busy_for() == 0.0  # ... and so does its end
        now[0] += 1
    assert loop.busy_since is None and loop.sends == 1
    now[0] += 600  # the sleep between ticks (max_interval) is no step
    assert loop.busy_for() == 0.0
