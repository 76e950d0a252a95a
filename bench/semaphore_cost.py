"""What a semaphore slot and a send-time reservation cost, beside a lock and the floor.

Run: ``python bench/semaphore_cost.py [--rounds N] [--iterations N] [--json PATH]``

Starts its own Consul *server* agent with a data directory (every Raft write persisted,
as in production) and a redis-server, in a temporary directory, and times per iteration:

lock        ``ConsulLock.acquire()`` + ``release()``, warm (bench/lock_cost.py's "ours");
lock_floor  the two writes a lock is made of, raw (``?acquire=``, ``?release=``);
sem         ``ConsulSemaphore(prefix, 3).acquire()`` + ``release()``, warm, as sole holder;
sem_floor   what the semaphore recipe needs at least, raw on one keep-alive connection with
            a session made beforehand: a read of the prefix, one transaction writing the
            contender key and ``.lock`` (check-and-set), one transaction taking them back;
send_run    ``apply_async`` of a ConsulLockedTask with ``lock_at="run"`` (publish only);
send_new    ``apply_async`` with ``lock_at="both"`` when the key is free: reserve, publish;
send_dup    ``apply_async`` with ``lock_at="both"`` while a copy is queued: one read, no
            publish, the queued copy's AsyncResult.

All flows run interleaved in rounds, in rotating order; ratios are the median over rounds
of the ratio of the two flows' medians within a round.
"""

from __future__ import annotations

import base64
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import interleave, interleaved_args, start_server_agent, write_json  # noqa: E402
from lock_cost import Floor, Ours  # noqa: E402

from celery_consul_lock import ConsulLockedTask, ConsulSemaphore, close_sessions  # noqa: E402
from celery_consul_lock.consul import SEMAPHORE_FLAG, ConsulClient  # noqa: E402
from celery_consul_lock.settings import ConsulSettings  # noqa: E402
from celery_consul_lock.transport import Connection  # noqa: E402
from tests.servers import ConsulAgent, start_redis  # noqa: E402

SEM_PREFIX = "locks/bench-sem"
FLOOR_PREFIX = "locks/bench-sem-floor"
WARMUP = 10


class Semaphore:
    """ConsulSemaphore acquire + release, the object reused (its session stays warm)."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.sem = ConsulSemaphore(SEM_PREFIX, 3, address=agent.address)

    def __call__(self) -> None:
        if not self.sem.acquire(blocking=False):
            raise RuntimeError("the semaphore was not free")
        self.sem.release()


class SemaphoreFloor:
    """The recipe's least: list the prefix; txn(lock contender, cas .lock); txn(delete-cas
    .lock, delete contender): sent raw on one connection, with a session made once."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.conn = Connection(agent.bind, agent.http_port)
        _, _, text = self.conn.request("PUT", "/v1/session/create", b'{"TTL": "86400s", "LockDelay": "0s"}', {}, 10.0)
        self.sid = json.loads(text)["ID"]
        self.contender = f"{FLOOR_PREFIX}/{self.sid}"
        self.value = json.dumps({"Limit": 3, "Holders": {self.sid: True}}, separators=(",", ":"))

    def request(self, method: str, target: str, body: bytes = b"") -> bytes:
        status, _, text = self.conn.request(method, target, body, {}, 5.0)
        if status not in (200, 404):
            raise RuntimeError(f"{method} {target} answered {status} {text!r}")
        return text

    def __call__(self) -> None:
        self.request("GET", f"/v1/kv/{FLOOR_PREFIX}/?recurse")
        enter = [
            {"KV": {"Verb": "lock", "Key": self.contender, "Value": "", "Flags": SEMAPHORE_FLAG, "Session": self.sid}},
            {
                "KV": {
                    "Verb": "cas",
                    "Key": f"{FLOOR_PREFIX}/.lock",
                    "Value": base64.b64encode(self.value.encode()).decode(),
                    "Flags": SEMAPHORE_FLAG,
                    "Index": 0,
                }
            },
        ]
        answer = json.loads(self.request("PUT", "/v1/txn", json.dumps(enter).encode()))
        index = answer["Results"][1]["KV"]["ModifyIndex"]
        leave = [
            {"KV": {"Verb": "delete-cas", "Key": f"{FLOOR_PREFIX}/.lock", "Index": index}},
            {"KV": {"Verb": "delete", "Key": self.contender}},
        ]
        self.request("PUT", "/v1/txn", json.dumps(leave).encode())

    def close(self) -> None:
        self.request("PUT", f"/v1/session/destroy/{self.sid}")
        self.conn.close()


class Sends:
    """apply_async of three tasks of one Celery app on the benchmark's Redis: lock_at="run",
    lock_at="both" with the key free (made free again after each, outside the timing), and
    lock_at="both" while a copy is queued."""

    def __init__(self, agent: ConsulAgent, redis_url: str) -> None:
        from celery import Celery

        self.app = Celery("bench", set_as_current=False)
        self.app.conf.update(broker_url=redis_url, consul_lock_address=agent.address, task_serializer="json")

        @self.app.task(base=ConsulLockedTask, name="bench.run")
        def run_task(n: int = 0) -> int:
            return n

        @self.app.task(base=ConsulLockedTask, name="bench.both", lock_at="both", lock_key="locks/bench-send-{n}/.lock")
        def both_task(n: int = 0) -> int:
            return n

        self.run_task, self.both_task = run_task, both_task
        self.client = ConsulClient(ConsulSettings(address=agent.address))
        self.both_task.delay(-1)  # the copy that send_dup finds queued
        self.counter = itertools.count()
        self.untimed: Callable[[], None] | None = None

    def send_run(self) -> None:
        self.run_task.delay(0)

    def send_new(self) -> None:
        n = next(self.counter)
        self.both_task.delay(n)
        self.untimed = lambda: self._free(n)

    def send_dup(self) -> None:
        self.both_task.delay(-1)

    def _free(self, n: int) -> None:
        _, entry = self.client.kv_get(f"locks/bench-send-{n}/.lock")
        if entry is None or not entry.session:
            raise RuntimeError("send_new did not reserve its key")
        self.client.session_destroy(entry.session)
        self.client.kv_delete(f"locks/bench-send-{n}/.lock")

    def after(self) -> None:
        untimed, self.untimed = self.untimed, None
        if untimed is not None:
            untimed()


def run(
    agent: ConsulAgent, redis_url: str, rounds: int, iterations: int
) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    sem_floor, lock_floor, sends = SemaphoreFloor(agent), Floor(agent), Sends(agent, redis_url)
    methods: dict[str, Callable[[], None]] = {
        "lock": Ours(agent),
        "lock_floor": lock_floor,
        "sem": Semaphore(agent),
        "sem_floor": sem_floor,
        "send_run": sends.send_run,
        "send_new": sends.send_new,
        "send_dup": sends.send_dup,
    }
    try:
        return interleave(methods, rounds, iterations, WARMUP, after=sends.after)
    finally:
        sem_floor.close()
        lock_floor.close()


def main(argv: list[str] | None = None) -> int:
    args = interleaved_args(__doc__.split("\n\n")[0], 10, 30, argv)

    with tempfile.TemporaryDirectory(prefix="semaphore-cost-") as tmp:
        agent, info = start_server_agent(Path(tmp))
        redis_server = start_redis(Path(tmp))
        try:
            print(f"Consul v{info['version']}, server agent with data dir {info['data_dir']} at {info['address']}")
            print(f"{args.rounds} rounds x {args.iterations} iterations of each, rotating order, after {WARMUP} warm-up cycles")
            results, per_round = run(agent, redis_server.url, args.rounds, args.iterations)
        finally:
            try:
                close_sessions()
            finally:
                redis_server.stop()
                agent.stop()

    def ratio(a: str, b: str) -> float:
        return statistics.median(r[a] / r[b] for r in per_round)

    ratios = {
        "sem/sem_floor": ratio("sem", "sem_floor"),
        "sem/lock": ratio("sem", "lock"),
        "sem_floor/lock_floor": ratio("sem_floor", "lock_floor"),
        "lock/lock_floor": ratio("lock", "lock_floor"),
        "send_new/send_run": ratio("send_new", "send_run"),
        "send_dup/send_run": ratio("send_dup", "send_run"),
    }
    added_ms = {
        "send_new - send_run": results["send_new"]["median_ms"] - results["send_run"]["median_ms"],
        "send_dup - send_run": results["send_dup"]["median_ms"] - results["send_run"]["median_ms"],
    }
    labels = {
        "lock": "ConsulLock acquire+release",
        "lock_floor": "raw acquire+release PUTs",
        "sem": "ConsulSemaphore acquire+release",
        "sem_floor": "raw list + 2 txns",
        "send_run": "apply_async, lock_at=run",
        "send_new": "apply_async, lock_at=both, new",
        "send_dup": "apply_async, lock_at=both, dup",
    }
    print()
    print(f"{'':12}{'what':34}{'median ms':>10}{'p90 ms':>10}{'n':>7}")
    for name, r in results.items():
        print(f"{name:12}{labels[name]:34}{r['median_ms']:10.3f}{r['p90_ms']:10.3f}{r['n']:7d}")
    print()
    print("   ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    print("   ".join(f"{k} = {v:+.3f} ms" for k, v in added_ms.items()))
    write_json(
        args.json,
        {
            "consul": info,
            "rounds": args.rounds,
            "iterations": args.iterations,
            "results": results,
            "ratios": ratios,
            "added_ms": added_ms,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
