"""bench/capacity.py's own logic (no Consul): its options, how it names a point's limit from
what the parts used, and how it counts a process's connections. The benchmark itself runs
with `make bench-capacity`, never in `make test`."""

from __future__ import annotations

import socket

import pytest

from .servers import bench_module


@pytest.fixture(scope="module")
def capacity():
    with bench_module("capacity") as module:
        yield module


def test_bad_lockers_or_parts_are_refused_before_anything_starts(capacity, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        capacity.main(["--lockers", "4,0"])
    assert info.value.code == 2
    assert "--lockers must be positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        capacity.main(["--skip", "curve,churn"])
    assert "unknown part(s) ['churn']" in capsys.readouterr().err


def snapshot(capacity, t: float, cpu: dict[str, float], busy: float, disk_ms: float, writes: float, commits: float):
    leader = {
        "consul_raft_leader_dispatchLog_sum": disk_ms,
        "consul_raft_leader_dispatchLog_count": writes,
        "consul_raft_commitTime_count": commits,
    }
    return capacity.Snapshot(t, cpu, (busy, 0.0), leader, [{}], {"consul_http_PUT_v1_txn_count": commits / 2})


def test_usage_reads_cores_disk_share_and_batching_between_two_snapshots(capacity, monkeypatch) -> None:
    monkeypatch.setattr(capacity.os, "cpu_count", lambda: 8)  # nothing near the machine's limit
    names = ("server1", "server2*", "server3", "client agent", "lockers", "lockers max")
    before = snapshot(capacity, 100.0, dict.fromkeys(names, 0.0), 0.0, 0.0, 0.0, 0.0)
    # Over 2 s: the leader wrote its log for 1.8 s (90 %) in 100 writes carrying 400 entries.
    after = snapshot(capacity, 102.0, dict(zip(names, (0.2, 0.6, 0.2, 0.4, 0.4, 0.1), strict=True)), 3.0, 1800.0, 100.0, 400.0)
    used = capacity.usage(before, after)
    assert used["cores"]["server2*"] == pytest.approx(0.3)
    assert used["cores"]["rest of the machine"] == pytest.approx(1.5 - 0.9)
    assert used["raft"]["leader_disk_share"] == pytest.approx(0.9)
    assert used["raft"]["entries_per_disk_write"] == pytest.approx(4.0)
    assert used["requests"] == {"PUT_v1_txn": 200.0}
    assert used["limit"].startswith("leader's Raft log fsync (writing 90%")


@pytest.mark.parametrize(
    ("cores", "disk", "expected"),
    [
        ({"machine": 1.9, "client agent": 0.2, "lockers": 0.1, "lockers max": 0.1, "server1*": 1.0}, 0.2, "machine CPU"),
        ({"machine": 1.0, "client agent": 0.2, "lockers": 0.95, "lockers max": 0.95}, 0.5, "a locker process's CPU"),
        ({"machine": 1.2, "client agent": 0.95, "lockers": 0.1, "lockers max": 0.1}, 0.5, "client agent CPU"),
        ({"machine": 0.5, "client agent": 0.1, "lockers": 0.1, "lockers max": 0.1}, 0.3, "latency"),
    ],
)
def test_a_points_limit_is_the_first_resource_found_full(capacity, monkeypatch, cores, disk, expected) -> None:
    monkeypatch.setattr(capacity.os, "cpu_count", lambda: 2)
    assert capacity.limit_of({**cores, "iowait": 0.0}, {"leader_disk_share": disk}).startswith(expected)


def test_connections_to_counts_this_processs_established_connections_to_one_address(capacity) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert capacity.connections_to("127.0.0.1", port) == 0
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            # Ours to the server's port, not the accepted ends (their remote is our port).
            assert capacity.connections_to("127.0.0.1", port) == 3
        finally:
            for s in clients + accepted:
                s.close()


def test_cost_at_a_rate_fits_a_per_cycle_part_and_a_part_per_second(capacity) -> None:
    # 2 ms per cycle plus 0.5 CPU-seconds per second shared by the cycles of that second.
    points = [(rate, 2.0 + 500.0 / rate) for rate in (150.0, 250.0, 400.0)]
    assert capacity.cost_at(200.0, points) == pytest.approx(2.0 + 500.0 / 200.0)
    assert capacity.cost_at(1000.0, points) == pytest.approx(2.5)
    assert capacity.cost_at(300.0, [(300.0, 3.0)]) == 3.0  # one rate: nothing to fit


def test_cpu_per_cycle_of_a_point_is_the_median_over_its_rounds(capacity) -> None:
    rounds = [
        capacity.Point("ours", 16, 4, 100.0, [], [], {"cores": {}, "cpu_ms_per_cycle": {"servers": v, "lockers": v / 10}})
        for v in (3.0, 9.0, 4.0)
    ]
    used = capacity.median_usage(rounds)
    assert used["cpu_ms_per_cycle"] == {"servers": 4.0, "lockers": 0.4}


def test_with_split_cores_the_servers_core_is_named_when_they_fill_it(capacity, monkeypatch) -> None:
    monkeypatch.setattr(capacity.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(capacity, "SERVER_CPUS", {1})
    cores = {"machine": 1.95, "client agent": 0.3, "lockers": 0.3, "lockers max": 0.1, "iowait": 0.0}
    full = {**cores, "server1": 0.3, "server2*": 0.45, "server3": 0.25}
    assert capacity.limit_of(full, {"leader_disk_share": 0.5}).startswith("the servers' CPU (1.00 of their 1 core(s)")
    idle = {**cores, "server1": 0.2, "server2*": 0.3, "server3": 0.2}
    assert capacity.limit_of(idle, {"leader_disk_share": 0.5}).startswith("machine CPU")
