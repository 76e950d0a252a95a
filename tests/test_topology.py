"""Node faults on Consul's standard topology (issue 11, item 7): three servers, and one client
agent per simulated node on its own loopback address, every worker and beat talking to its own
node's agent. Each scenario asserts from the per-tick records that every due tick ran exactly
once (a worker's agent killed and restarted: tests/test_agent_outage.py)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from celery_consul_lock import TICK_HEADER, Tick

from .servers import ConsulAgent, start_client_agent, wait_consul_ready, wait_for
from .test_beat import check_ticks, forget_tick_mark, leader_of, report, takeover_after
from .test_beat_stall import SEND_SLACK, STALL_BOUND, hook_file, stall_env
from .test_gevent import GREEN_ENV
from .test_task import assert_no_overlap, intervals, runs

pytestmark = pytest.mark.cluster


@pytest.fixture
def nodes(cluster, tmp_path: Path) -> Iterator[list[ConsulAgent]]:
    """Three client agents (nodes n1-n3 on 127.0.0.41-43) joined to the three servers."""
    agents = [
        start_client_agent(tmp_path / f"n{i}", cluster, f"127.0.0.4{i}", f"n{i}-{time.time_ns() % 10**6}") for i in (1, 2, 3)
    ]
    try:
        for agent in agents:
            wait_consul_ready(agent)
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def test_a_stalled_leader_on_its_own_node_is_replaced_and_every_tick_runs_once(harness, r, cluster, nodes, tmp_path):
    forget_tick_mark(cluster.agents[0])
    harness.extra_env = stall_env(tmp_path)
    harness.worker(nodes[0].address)
    for agent in nodes:
        harness.beat(agent.address)
    harness.wait_joined()
    leader = leader_of(harness)
    (tmp_path / f"stall-{leader.pid}").touch()
    began = wait_for(lambda: hook_file(tmp_path, "stalled", leader), 10, "the leader's send to hang")["t"]
    takeover = takeover_after(harness, leader.instance, began, STALL_BOUND + 10)
    gap = takeover["t"] - began
    report("topology stall: send hung -> first run sent by the new leader", f"{gap:.2f} s")
    assert gap <= STALL_BOUND + SEND_SLACK, gap
    (tmp_path / f"stall-{leader.pid}").unlink()
    woke = wait_for(lambda: hook_file(tmp_path, "woke", leader), 10, "the stalled send to return")["t"]
    records = harness.wait_ticks(lambda xs: xs[-1]["t"] >= woke + 5, 20, "5 s of ticks after the stalled beat woke")
    assert not [x for x in records if x["instance"] == leader.instance and x["t"] > began], records
    report("topology stall: wide (tick-id gap, run gap) pairs", check_ticks(records, [began], STALL_BOUND))


def test_a_gevent_worker_on_its_node_runs_dozens_of_concurrent_locked_ticks_once_each(proj, workers, r, nodes):
    """A `-P gevent -c 50` worker on node n1's agent; 30 entries locked one key per argument
    (a tick every 3 s each, 1 s bodies: 30 locks held at once) and one entry on a shared key
    (a tick every second, 0.3 s bodies), for about 9 s."""
    (worker,) = workers(1, consul_address=nodes[0].address, pool="gevent", concurrency=50, env=dict(GREEN_ENV))
    start = int(time.time()) + 2
    sent: list[str] = []

    def send(task, entry: str, due: float, *args) -> None:
        tick = str(Tick.of(entry, datetime.fromtimestamp(due, timezone.utc)))
        task.apply_async(args, headers={TICK_HEADER: tick})
        sent.append(tick)

    for second in range(9):
        due = start + second
        wait_for(lambda due=due: time.time() >= due, 5, f"second {second}", interval=0.01)
        send(proj.green_shared, "shared", due, second)
        if second % 3 == 0:
            for n in range(30):
                send(proj.green_keyed, f"keyed-{n}", due, n, 1.0)

    def ended() -> Counter:
        return Counter(x["tick"] for x in runs(r) if x["kind"] == "end" and x.get("tick"))

    try:
        wait_for(lambda: set(sent) <= set(ended()), 60, "every tick to run")
    except AssertionError as exc:
        skips = r.lrange("skips", 0, -1)
        raise AssertionError(f"{exc}: never ran {sorted(set(sent) - set(ended()))}; skips {skips[:5]}") from None
    starts = Counter(x["tick"] for x in runs(r) if x["kind"] == "start")
    assert all(starts[t] == 1 and ended()[t] == 1 for t in sent), [(t, starts[t]) for t in sent if starts[t] != 1]
    assert all(x["held"] for x in runs(r) if x["kind"] == "end"), "a run lost its lock"
    for key in {x["key"] for x in runs(r) if x["kind"] == "start"}:
        assert_no_overlap(intervals(runs(r), key=key))
    spans = intervals(runs(r))
    peak = max(sum(1 for s, e, _ in spans if s <= t < e) for t, _, _ in spans)
    assert peak >= 20, f"at most {peak} runs held their locks at once"
    assert worker.popen.poll() is None
