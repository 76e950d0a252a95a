"""A worker whose Consul agent dies hands its ticks to a worker whose agent answers.

Consul's standard topology (tests/outage.py): three servers, a client agent per node, two
workers each on its own node's agent, a tick about every second. One node's agent is SIGKILLed for
20 s and started again; every tick must run exactly once, on time within LATE_BOUND.
"""

from __future__ import annotations

import pytest

from .outage import DOWN_LINE, UP_LINE, OutageScenario
from .servers import ConsulCluster, have_loopback_aliases

pytestmark = [pytest.mark.cluster]

#: How late a tick may run, from its due time. The hand-off of a tick that reached the sick
#: worker takes milliseconds (its agent refuses connections); the rest is Celery and Redis on
#: a busy 2-core machine. The benchmark (bench/agent_outage.py) measures the real figures.
LATE_BOUND = 2.0
OUTAGE = 20.0


@pytest.fixture
def scenario(cluster: ConsulCluster, proj, redis_server, tmp_path):
    assert have_loopback_aliases(), "needs 127.0.0.21-22 on the loopback interface"  # the cluster fixture needs it too
    s = OutageScenario(cluster, proj, redis_server.url, tmp_path)
    try:
        yield s.start()
    finally:
        s.stop()
        for node in s.nodes:
            if node.worker is not None:
                lines = [x for x in node.worker.log_text().splitlines() if "WARNING" in x or "ERROR" in x]
                print(f"===== worker of {node.name}: {len(lines)} warning/error lines, the last ones:")
                print("\n".join(lines[-15:]))


def test_a_worker_whose_agent_dies_hands_its_ticks_to_the_healthy_worker_and_resumes_after(scenario, r) -> None:
    outcome = scenario.run(before=6, outage=OUTAGE, after=3)
    print(outcome.summary())
    assert outcome.killed_at is not None and outcome.restarted_at is not None
    # Every tick ran exactly once ...
    assert not outcome.lost, f"ticks never ran: {outcome.lost}"
    assert not outcome.doubled, f"ticks ran twice: {[(t, outcome.runs[t]) for t in outcome.doubled]}"
    assert r.llen("skips") == 0, r.lrange("skips", 0, -1)
    # ... late by at most the bound ...
    late = max(outcome.lateness())
    assert late <= LATE_BOUND, f"a tick ran {late:.3f} s after its due time"
    # ... and Celery's retry counter was never touched (the user's max_retries stays theirs).
    assert all(x["retries"] == 0 for xs in outcome.runs.values() for x in xs)
    # While the agent was down, the healthy worker ran every tick.
    during = outcome.ticks_due(outcome.killed_at, outcome.restarted_at)
    assert len(during) >= OUTAGE / 2
    assert {outcome.node_of(t) for t in during} == {scenario.healthy.name}, [(t, outcome.node_of(t)) for t in during]
    # Before the outage both worked, and the sick one works again after it (run() waited for it).
    assert outcome.node_of(outcome.sent[-1][0]) is not None
    assert scenario.sick.name in {outcome.node_of(t) for t, due in outcome.sent if due > outcome.restarted_at}
    # It said so once each way.
    log = scenario.sick.worker.log_text()
    assert log.count(DOWN_LINE) == 1 and log.count(UP_LINE) == 1, [x for x in log.splitlines() if "Consul agent at" in x]
    assert DOWN_LINE not in scenario.healthy.worker.log_text()
