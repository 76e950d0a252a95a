"""The Celery project that bench/peers.py runs under every system it compares.

One app, configured from the environment the benchmark sets:

REDIS_URL         broker, results, and the peers' lock store (the same Redis for all);
CONSUL_HTTP_ADDR  the Consul agent (ours);
BENCH_SYSTEM      which system this process runs for (a key of :data:`TUNING`);
BENCH_VARIANT     ``defaults`` or ``tuned``: the system's settings from :data:`TUNING`;
BENCH_RUNS_KEY    beat processes: the Redis list the periodic job records its runs in
                  (the job is scheduled every BENCH_INTERVAL seconds, default 2).

Every task body records what it did in a Redis list, so the benchmark reads the outcome
from outside. A peer that is not installed leaves its tasks undefined; the benchmark says
so instead of measuring it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.signals import before_task_publish, task_postrun, task_prerun

from celery_consul_lock import ConsulLockedTask

OURS, REDBEAT, SINGLE_BEAT, ONCE, SINGLETON, CURL = (
    "celery-consul-lock",
    "redbeat",
    "single-beat",
    "celery-once",
    "celery-singleton",
    "curl-script",
)
#: How long the held task of the stuck-lock case runs if nothing kills it (s).
HOLD_SECONDS = 20.0
#: The peers whose lock is a timeout must outlive the task they guard (or a second copy runs
#: while the first still runs): their best tuning is the task's run time + 25 %.
HOLD_EXPIRY = int(HOLD_SECONDS * 1.25)

#: Per system and variant, the settings used: Celery settings (``conf``), environment
#: variables of the process that runs it (``env``), task options (``task``). "defaults" is
#: what each documents as its default, spelled out; "tuned" is its best documented tuning
#: for fast failover and short stuck locks.
TUNING: dict[str, dict[str, dict[str, Any]]] = {
    OURS: {
        "defaults": {
            "conf": {
                "consul_lock_beat_check_ttl": 2.0,
                "consul_lock_beat_lock_delay": 1.5,
                "consul_lock_ttl": 15.0,
                "consul_lock_lock_delay": 15.0,
            }
        },
        "tuned": {
            "conf": {
                "consul_lock_beat_check_ttl": 1.0,
                "consul_lock_beat_lock_delay": 1.0,
                "consul_lock_ttl": 10.0,  # Consul's least session TTL (session_ttl_min's default)
                "consul_lock_lock_delay": 1.0,
            }
        },
    },
    REDBEAT: {
        # beat_max_loop_interval unset: Celery's 300 s; lock timeout 5 x that; a standby
        # tries the lock every max_loop_interval.
        "defaults": {"conf": {"beat_max_loop_interval": 300, "redbeat_lock_timeout": 1500}},
        "tuned": {"conf": {"beat_max_loop_interval": 1, "redbeat_lock_timeout": 3}},
    },
    SINGLE_BEAT: {
        # Integers only; the heartbeat must be shorter than half the lock time.
        "defaults": {"env": {"SINGLE_BEAT_LOCK_TIME": "5", "SINGLE_BEAT_HEARTBEAT_INTERVAL": "1"}},
        "tuned": {"env": {"SINGLE_BEAT_LOCK_TIME": "3", "SINGLE_BEAT_HEARTBEAT_INTERVAL": "1"}},
    },
    ONCE: {
        "defaults": {"task": {"timeout": 3600}},  # celery-once's default_timeout
        "tuned": {"task": {"timeout": HOLD_EXPIRY}},
    },
    SINGLETON: {
        "defaults": {"conf": {"singleton_lock_expiry": None}},  # the lock never expires
        "tuned": {"conf": {"singleton_lock_expiry": HOLD_EXPIRY}},
    },
    CURL: {"defaults": {}, "tuned": {}},
}

SYSTEM = os.environ.get("BENCH_SYSTEM", "")
INTERVAL = float(os.environ.get("BENCH_INTERVAL", "2"))


def settings(system: str, variant: str) -> dict[str, Any]:
    """The tuning record of ``system`` in ``variant`` (empty parts filled in)."""
    found = TUNING.get(system, {}).get(variant, {})
    return {"conf": dict(found.get("conf", {})), "env": dict(found.get("env", {})), "task": dict(found.get("task", {}))}


app = Celery("peers")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def configure(redis_url: str, variant: str) -> None:
    """Point the app at ``redis_url`` and give every system its ``variant`` settings (the
    benchmark calls it again in its own process once its Redis runs)."""
    global _url, _redis
    _url, _redis = redis_url, None
    app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        consul_lock_beat_name=f"peers-{variant}",
        redbeat_redis_url=redis_url,
        redbeat_key_prefix=f"redbeat-{variant}:",
        singleton_backend_url=redis_url,
        singleton_key_prefix=f"SINGLETON-{variant}_",
        ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": redis_url, "default_timeout": 3600}},
    )
    for system in (OURS, SINGLETON):  # both read Celery settings on the worker and the sender
        app.conf.update(settings(system, variant)["conf"])
    if SYSTEM == REDBEAT:  # beat_max_loop_interval would change every other beat too
        app.conf.update(settings(REDBEAT, variant)["conf"])
    for name in ("peers.once_noop", "peers.once_hold", "peers.once_dup"):
        if name in app.tasks:
            app.tasks[name].once = dict(settings(ONCE, variant)["task"])


if os.environ.get("BENCH_RUNS_KEY"):
    app.conf.beat_schedule = {
        "tick": {
            "task": "peers.tick_locked" if SYSTEM == OURS else "peers.tick",
            "schedule": INTERVAL,
            "kwargs": {"key": os.environ["BENCH_RUNS_KEY"]},
        }
    }

_redis: redis.Redis | None = None


def store() -> redis.Redis:
    global _redis
    if _redis is None or _redis.connection_pool.pid != os.getpid():
        _redis = redis.Redis.from_url(_url)
    return _redis


def record(key: str, **data: object) -> None:
    store().rpush(key, json.dumps({"t": time.time(), "pid": os.getpid(), **data}))


@before_task_publish.connect
def _stamp(headers: dict | None = None, **_: object) -> None:
    """Every message says when and by which process group it was sent (a beat instance is a
    process group: single-beat's child beat shares its group)."""
    if headers is not None:
        headers.setdefault("bench_sent", time.time())
        headers.setdefault("bench_pgrp", os.getpgrp())


#: The no-ops whose worker-side time the benchmark reads (prerun -> postrun).
NOOPS = ("peers.noop", "peers.ours_noop", "peers.once_noop", "peers.singleton_noop")
_began: dict[str, float] = {}


@task_prerun.connect
def _begin(task_id: str | None = None, task: Task | None = None, **_: object) -> None:
    if task is not None and task.name in NOOPS and task_id:
        _began[task_id] = time.perf_counter()


@task_postrun.connect
def _end(task_id: str | None = None, task: Task | None = None, **_: object) -> None:
    """A no-op's time in the worker from before its lock to after its unlock (after_return and
    on_success run before postrun), recorded in ``spans``."""
    began = _began.pop(task_id or "", None)
    if began is not None:
        dt = time.perf_counter() - began
        store().rpush("spans", json.dumps({"id": task_id, "dt": dt}))


def _tick(task: Task, key: str) -> None:
    req = task.request
    record(
        key,
        sent=getattr(req, "bench_sent", None),
        pgrp=getattr(req, "bench_pgrp", None),
        tick=getattr(req, "consul_lock_tick", None),
    )


# ---- beat HA: the periodic job --------------------------------------------------------------


@app.task(bind=True, name="peers.tick")
def tick(self: Task, key: str) -> None:
    _tick(self, key)


@app.task(bind=True, base=ConsulLockedTask, name="peers.tick_locked")
def tick_locked(self: Task, key: str) -> None:
    """Ours: the beat's tick ids make each run once (docs/task.md: exactly once per scheduled tick)."""
    _tick(self, key)


# ---- task locks: a no-op, a held task, a task sent by several nodes -------------------------


def _hold(task: Task, seconds: float) -> str:
    """Runs ``seconds``, or until the benchmark sets ``peers:hold:stop`` (its clean-up)."""
    record("holds", task=task.name, id=task.request.id)
    end = time.monotonic() + seconds
    while time.monotonic() < end and not store().exists("peers:hold:stop"):
        time.sleep(0.05)
    return "held"


def _dup(task: Task, trial: int) -> int:
    record("dups", task=task.name, trial=trial, id=task.request.id)
    time.sleep(1.0)
    return trial


@app.task(name="peers.noop")
def noop(n: int) -> int:
    return n


@app.task(bind=True, name="peers.plain_dup")
def plain_dup(self: Task, trial: int) -> int:
    return _dup(self, trial)


def _noop(task: Task, n: int) -> int:
    return n


def lock_tasks(prefix: str, base: type[Task], **lock_keys: str) -> None:
    """``peers.<prefix>_noop``, ``_hold`` and ``_dup`` with ``base`` (a lock_key per kind for
    ours: one key per no-op and per trial, one key for the held task)."""
    for kind, body in (("noop", _noop), ("hold", _hold), ("dup", _dup)):
        options = {"lock_key": lock_keys[kind]} if kind in lock_keys else {}
        app.task(bind=True, base=base, name=f"peers.{prefix}_{kind}", **options)(body)


lock_tasks(
    "ours",
    ConsulLockedTask,
    noop="locks/peers-noop-{n}/.lock",
    hold="locks/peers-hold/.lock",
    dup="locks/peers-dup-{trial}/.lock",
)


@app.task(bind=True, base=ConsulLockedTask, name="peers.ours_job")
def ours_job(self: Task, seconds: float = 0.3) -> str | None:
    """The curl-script case's job under ConsulLockedTask: records its tick id and runs a while."""
    tick_id = getattr(self.request, "consul_lock_tick", None)
    record("job-runs", tick=tick_id, id=self.request.id)
    time.sleep(seconds)
    return tick_id


try:  # celery-once: the lock is taken when the task is sent, released when it returns
    from celery_once import AlreadyQueued, QueueOnce

    lock_tasks("once", QueueOnce)
except ImportError:
    AlreadyQueued = None  # type: ignore[assignment,misc]

try:  # celery-singleton: the lock is taken when the task is sent, released when it ends
    from celery_singleton import Singleton

    lock_tasks("singleton", Singleton)
except ImportError:
    pass


configure(_url, os.environ.get("BENCH_VARIANT", "defaults"))
