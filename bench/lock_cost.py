"""What one lock costs: ConsulLock acquire + release against the floor and a curl script.

Run: ``python bench/lock_cost.py [--rounds N] [--iterations N] [--json PATH]``

Starts its own Consul *server* agent with a data directory (not ``-dev``: a server
persists every Raft write to disk, as in production) in a temporary directory, and
times, per iteration:

plain   two plain KV writes (``PUT /v1/kv/bench/floor``), for reference only: Consul's
        cheapest writes, cheaper at the server than an acquire and a release;
floor   the two writes a lock is made of, sent raw: ``PUT ?acquire=`` and ``PUT
        ?release=`` for a session made beforehand, on one keep-alive connection (the
        package's own lean HTTP/1.1 connection, so the ratio isolates what the lock adds);
ours    ``ConsulLock.acquire()`` + ``release()``, warm: the lock object reused, the
        process-wide session already created, its keep-alive connection open.
script  what a hand-written curl script does: create a session, acquire the key with
        ``?acquire=``, release it, destroy the session, each request on a new connection,
        emulated in this process (the cheapest such a flow can be);
curl    the same flow as a shell script runs it, one ``curl`` process per request.

All run interleaved in rounds, in rotating order, so machine noise hits them
alike. ours/floor is judged as the median, over the rounds, of the ratio of the two flows'
medians within a round (the ratio of the overall medians is printed too). Exits 1 if
ours/floor or curl/ours misses its target, so it can serve as a check.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import interleave, interleaved_args, start_server_agent, write_json  # noqa: E402

from celery_consul_lock import ConsulLock, close_sessions  # noqa: E402
from celery_consul_lock.consul import LOCK_FLAG  # noqa: E402
from celery_consul_lock.transport import Connection  # noqa: E402
from tests.servers import ConsulAgent  # noqa: E402

#: ours may cost at most this much more than two raw KV writes ...
TARGET_OURS_FLOOR = 1.15
#: ... and a curl script's flow must cost at least this many times ours.
TARGET_SCRIPT_OURS = 3.0

LOCK_KEY = "locks/bench/.lock"
SCRIPT_KEY = "locks/bench-script/.lock"
FLOOR_KEY = "bench/floor"
#: About the size of the JSON value ConsulLock writes (host, pid, name, time, session).
FLOOR_VALUE = json.dumps({"host": "bench-host", "pid": 12345, "name": LOCK_KEY, "acquired_at": "x" * 29, "session": "y" * 36})
WARMUP = 20


class Plain:
    """Two plain KV writes (no session) on one keep-alive connection, for reference:
    Consul's cheapest writes, below what any lock can cost (acquire and release also
    check the session in Consul's state store)."""

    def __init__(self, agent: ConsulAgent, key: str = FLOOR_KEY) -> None:
        self.conn = Connection(agent.bind, agent.http_port)
        self.body = FLOOR_VALUE.encode()
        self.key = key

    def put(self, target: str) -> None:
        status, _, text = self.conn.request("PUT", target, self.body, {}, 5.0)
        if status != 200 or text.strip() != b"true":
            raise RuntimeError(f"PUT {target} failed: {status} {text!r}")

    def __call__(self) -> None:
        self.put(f"/v1/kv/{self.key}")
        self.put(f"/v1/kv/{self.key}")

    def close(self) -> None:
        self.conn.close()


class Floor(Plain):
    """The two KV writes a lock is made of, sent raw: ``PUT ?acquire=`` and ``PUT
    ?release=`` with the lock flags, for a session made beforehand, on one keep-alive
    connection (the package's own lean HTTP/1.1 connection, so the ratio isolates what
    the lock adds: its bookkeeping and the client library)."""

    def __init__(self, agent: ConsulAgent, key: str = FLOOR_KEY) -> None:
        super().__init__(agent, key)
        # Never renewed: a TTL longer than any run (on a loaded machine a run took over the
        # 2 x 60 s an earlier TTL lasted, and the floor's acquire failed with "invalid session").
        _, _, text = self.conn.request("PUT", "/v1/session/create", b'{"TTL": "3600s", "LockDelay": "0s"}', {}, 5.0)
        self.session = json.loads(text)["ID"]

    def __call__(self) -> None:
        self.put(f"/v1/kv/{self.key}/.lock?acquire={self.session}&flags={LOCK_FLAG}")
        self.put(f"/v1/kv/{self.key}/.lock?release={self.session}&flags={LOCK_FLAG}")

    def close(self) -> None:
        self.conn.request("PUT", f"/v1/session/destroy/{self.session}", b"", {}, 5.0)
        super().close()


class Ours:
    """ConsulLock acquire + release, the lock object and the shared session reused."""

    def __init__(self, agent: ConsulAgent, key: str = LOCK_KEY) -> None:
        self.lock = ConsulLock(key, address=agent.address)

    def __call__(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise RuntimeError(f"could not acquire {self.lock.key}: held by {self.lock.last_holder}")
        if not self.lock.release():
            raise RuntimeError(f"release of {self.lock.key} was not confirmed")

    def close(self) -> None:
        """Nothing to close: the session is the process's (close_sessions ends it)."""


class Script:
    """The curl-script flow emulated in this process: four requests, a new connection each.

    This is the least such a flow can cost (no process start-up at all); see Curl for
    what a script really costs.
    """

    def __init__(self, agent: ConsulAgent) -> None:
        self.host, self.port = agent.bind, agent.http_port

    def request(self, path: str, body: str = "") -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("PUT", path, body=body.encode(), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read().decode()
            if resp.status != 200:
                raise RuntimeError(f"PUT {path} answered {resp.status}: {text!r}")
            return text
        finally:
            conn.close()

    def __call__(self) -> None:
        sid = json.loads(self.request("/v1/session/create", json.dumps({"TTL": "15s"})))["ID"]
        if self.request(f"/v1/kv/{SCRIPT_KEY}?acquire={sid}", "script").strip() != "true":
            raise RuntimeError(f"script could not acquire {SCRIPT_KEY}")
        if self.request(f"/v1/kv/{SCRIPT_KEY}?release={sid}", "script").strip() != "true":
            raise RuntimeError(f"script could not release {SCRIPT_KEY}")
        self.request(f"/v1/session/destroy/{sid}")


class Curl(Script):
    """The real curl-script flow: the same four requests, one `curl` process each, as the
    shell scripts this project replaces do them."""

    def request(self, path: str, body: str = "") -> str:
        out = subprocess.run(
            ["curl", "-sS", "--fail", "-X", "PUT", "--data-binary", body, f"http://{self.host}:{self.port}{path}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout


def run(agent: ConsulAgent, rounds: int, iterations: int) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """Per flow, the statistics of all its samples; and per round, each flow's median."""
    plain, floor, ours, script, curl = Plain(agent), Floor(agent), Ours(agent), Script(agent), Curl(agent)
    methods: dict[str, Callable[[], None]] = {"plain": plain, "floor": floor, "ours": ours, "script": script, "curl": curl}
    try:
        return interleave(methods, rounds, iterations, WARMUP)
    finally:
        floor.close()
        plain.close()


def main(argv: list[str] | None = None) -> int:
    args = interleaved_args(__doc__.split("\n\n")[0], 15, 40, argv)

    with tempfile.TemporaryDirectory(prefix="lock-cost-") as tmp:
        agent, info = start_server_agent(Path(tmp))
        try:
            print(f"Consul v{info['version']}, server agent with data dir {info['data_dir']} at {info['address']}")
            print(f"{args.rounds} rounds x {args.iterations} iterations of each, rotating order, after {WARMUP} warm-up cycles")
            results, per_round = run(agent, args.rounds, args.iterations)
        finally:
            try:
                close_sessions()
            finally:
                agent.stop()

    # The target is judged on the ratio within each round (the two flows a few seconds
    # apart), whose median is less moved by this VM's drift from round to round than the
    # ratio of the overall medians, which is printed too.
    ours_floor = statistics.median(r["ours"] / r["floor"] for r in per_round)
    ours_floor_overall = results["ours"]["median_ms"] / results["floor"]["median_ms"]
    ours_plain = results["ours"]["median_ms"] / results["plain"]["median_ms"]
    script_ours = results["script"]["median_ms"] / results["ours"]["median_ms"]
    curl_ours = results["curl"]["median_ms"] / results["ours"]["median_ms"]
    ok = ours_floor <= TARGET_OURS_FLOOR and curl_ours >= TARGET_SCRIPT_OURS

    labels = {
        "plain": "2 plain KV PUTs (reference)",
        "floor": "raw acquire+release PUTs",
        "ours": "ConsulLock acquire+release",
        "script": "script flow in-process, new conns",
        "curl": "script flow with curl processes",
    }
    print()
    print(f"{'':8}{'what':30}{'median ms':>10}{'p90 ms':>10}{'n':>7}")
    for name, r in results.items():
        print(f"{name:8}{labels[name]:30}{r['median_ms']:10.3f}{r['p90_ms']:10.3f}{r['n']:7d}")
    print()
    print(
        f"ratio ours/floor = {ours_floor:.2f} (median of the {len(per_round)} rounds' ratios; target <= "
        f"{TARGET_OURS_FLOOR:.2f}; of the overall medians: {ours_floor_overall:.2f})\n"
        f"ours/plain = {ours_plain:.2f}   "
        f"curl/ours = {curl_ours:.1f}x (target >= {TARGET_SCRIPT_OURS:g})   "
        f"script-in-process/ours = {script_ours:.1f}x   {'OK' if ok else 'MISSED'}"
    )

    write_json(
        args.json,
        {
            "consul": info,
            "rounds": args.rounds,
            "iterations": args.iterations,
            "warmup": WARMUP,
            "results": results,
            "ratios": {
                "ours_floor": ours_floor,
                "ours_floor_overall": ours_floor_overall,
                "ours_plain": ours_plain,
                "curl_ours": curl_ours,
                "script_ours": script_ours,
            },
            "targets": {"ours_floor_max": TARGET_OURS_FLOOR, "curl_ours_min": TARGET_SCRIPT_OURS},
            "ok": ok,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
