"""The Celery project the behaviour tests run in real `celery worker` processes.

Configured from the environment the test sets: REDIS_URL (broker and results),
CONSUL_HTTP_ADDR (the agent), TEST_TTL / TEST_LOCK_DELAY (session shape). Task bodies
record what they did in Redis, so the test can check it from outside.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import before_task_publish

from celery_consul_lock import ConsulLock, ConsulLockedTask, close_sessions
from celery_consul_lock.consul import LOCK_FLAG
from celery_consul_lock.signals import task_lock_skipped
from celery_consul_lock.transport import Connection

app = Celery("proj")
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    consul_lock_ttl=float(os.environ.get("TEST_TTL", "10")),
    consul_lock_lock_delay=float(os.environ.get("TEST_LOCK_DELAY", "2")),
)

if os.environ.get("TEST_VISIBILITY_TIMEOUT"):  # Redis gives unacked messages to others after this
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
# What a worker does when its agent is down (celery_consul_lock.availability): the tests of
# the old fail-closed behaviour turn requeueing and the agent watch off.
if os.environ.get("TEST_REQUEUE_MAX"):
    app.conf.consul_lock_requeue_max = int(os.environ["TEST_REQUEUE_MAX"])
if os.environ.get("TEST_AGENT_WATCH"):
    app.conf.consul_lock_agent_watch = os.environ["TEST_AGENT_WATCH"]
if os.environ.get("TEST_AGENT_PROBE_INTERVAL"):
    app.conf.consul_lock_agent_probe_interval = float(os.environ["TEST_AGENT_PROBE_INTERVAL"])

if os.environ.get("TEST_SOFT_SHUTDOWN_TIMEOUT"):  # Celery 5.5+: a cold shutdown waits this long first
    app.conf.worker_soft_shutdown_timeout = float(os.environ["TEST_SOFT_SHUTDOWN_TIMEOUT"])

app.conf.consul_lock_beat_name = os.environ.get("TEST_BEAT_NAME", "proj")
if os.environ.get("TEST_KEY_PREFIX"):  # a test's own part of the KV store
    app.conf.consul_lock_key_prefix = os.environ["TEST_KEY_PREFIX"]
if os.environ.get("TEST_REAP_AFTER"):
    app.conf.consul_lock_reap_after = float(os.environ["TEST_REAP_AFTER"])
if os.environ.get("TEST_REAP_INTERVAL"):
    app.conf.consul_lock_beat_reap_interval = float(os.environ["TEST_REAP_INTERVAL"])
if os.environ.get("TEST_BEAT_STALL_TIMEOUT"):
    app.conf.consul_lock_beat_stall_timeout = float(os.environ["TEST_BEAT_STALL_TIMEOUT"])
if os.environ.get("TEST_BEAT_INTERVAL"):
    app.conf.beat_schedule = {
        os.environ.get("TEST_BEAT_ENTRY", "heartbeat"): {
            "task": os.environ.get("TEST_BEAT_TASK", "proj.heartbeat"),
            "schedule": float(os.environ["TEST_BEAT_INTERVAL"]),
        },
    }

_redis: redis.Redis | None = None


def store() -> redis.Redis:
    global _redis
    if _redis is None or _redis.connection_pool.pid != os.getpid():
        _redis = redis.Redis.from_url(app.conf.broker_url)
    return _redis


def record(kind: str, **data: object) -> None:
    store().rpush("runs", json.dumps({"kind": kind, "pid": os.getpid(), "t": time.time(), **data}))


@before_task_publish.connect
def _stall_send(sender=None, headers=None, **_):
    """Test hook: a send from this process hangs while the file ``stall-<pid>`` exists in
    TEST_STALL_DIR (a broker publish that blocks). It writes ``stalled-<pid>`` (the time it
    began to hang, and the message's leader header) on entering and ``woke-<pid>`` on leaving."""
    folder = os.environ.get("TEST_STALL_DIR")
    if not folder:
        return
    pid = os.getpid()
    stall = Path(folder) / f"stall-{pid}"
    if not stall.exists():
        return
    leader = (headers or {}).get("consul_lock_leader")
    (Path(folder) / f"stalled-{pid}").write_text(json.dumps({"t": time.time(), "leader": leader}))
    while stall.exists():
        time.sleep(0.05)
    (Path(folder) / f"woke-{pid}").write_text(json.dumps({"t": time.time()}))


@task_lock_skipped.connect
def _count_skip(sender, key, reason, holder, task_id, **_):
    skip = {"task": sender.name, "key": key, "reason": reason, "task_id": task_id, "t": time.time(), "pid": os.getpid()}
    store().rpush("skips", json.dumps(skip))


@app.task(bind=True, base=ConsulLockedTask, name="proj.backup")
def backup(self, seconds: float = 1.0) -> str:
    record("start", task="backup", id=self.request.id, token=self.fencing_token)
    time.sleep(seconds)
    record("end", task="backup", id=self.request.id)
    return "done"


@app.task(bind=True, base=ConsulLockedTask, name="proj.limited", lock_limit=2, lock_wait_timeout=120)
def limited(self, seconds: float = 1.0) -> str:
    """At most two runs at once cluster-wide (a semaphore at locks/proj.limited)."""
    record("start", task="limited", id=self.request.id)
    time.sleep(seconds)
    record("end", task="limited", id=self.request.id)
    return "done"


@app.task(bind=True, base=ConsulLockedTask, name="proj.cooled", lock_cooldown=4)
def cooled(self) -> str:
    """Not more than once every 4 s, cluster-wide."""
    record("start", task="cooled", id=self.request.id)
    record("end", task="cooled", id=self.request.id)
    return "done"


@app.task(bind=True, base=ConsulLockedTask, name="proj.sent_once", lock_at="both", lock_reserve_ttl=10)
def sent_once(self, seconds: float = 2.0) -> str:
    """Deduplicated at send time: a call queued or running is not sent again."""
    record("start", task="sent_once", id=self.request.id)
    time.sleep(seconds)
    record("end", task="sent_once", id=self.request.id)
    return "done"


@app.task(bind=True, base=ConsulLockedTask, name="proj.sent_only", lock_at="send")
def sent_only(self) -> str:
    """Deduplicated at send time only: a copy that was not deduplicated runs regardless."""
    record("start", task="sent_only", id=self.request.id)
    return "done"


@app.task(bind=True, base=ConsulLockedTask, name="proj.report", lock_key="locks/report-{customer_id}/.lock")
def report(self, customer_id: int, seconds: float = 1.5) -> str:
    record("start", task="report", customer=customer_id, id=self.request.id)
    time.sleep(seconds)
    record("end", task="report", customer=customer_id, id=self.request.id)
    return f"report {customer_id}"


@app.task(
    bind=True,
    base=ConsulLockedTask,
    name="proj.ticked",
    acks_late=True,
    reject_on_worker_lost=True,
)
def ticked(self, seconds: float = 0.2) -> str:
    tick = getattr(self.request, "consul_lock_tick", None)
    record("start", task="ticked", tick=tick, id=self.request.id)
    time.sleep(seconds)
    record("end", task="ticked", tick=tick, id=self.request.id)
    return tick


if os.environ.get("TEST_EXTRA_LOCK_OPTIONS"):
    # A locked task with the options the test gives (JSON), e.g. a key template naming an
    # argument the body does not have, for `consul-lock check`.
    @app.task(bind=True, base=ConsulLockedTask, name="proj.configured", **json.loads(os.environ["TEST_EXTRA_LOCK_OPTIONS"]))
    def configured(self, customer_id: int, *, region: str = "eu") -> str:
        return f"{region}-{customer_id}"


@app.task(bind=True, base=ConsulLockedTask, name="proj.locked_noop", lock_key="locks/noop-{n}/.lock")
def locked_noop(self, n: int = 0) -> int:
    return n


@app.task(bind=True, base=ConsulLockedTask, name="proj.shared_noop", lock_key="locks/noop-shared/.lock")
def shared_noop(self, n: int = 0) -> int:
    return n


@app.task(name="proj.noop")
def noop(n: int = 0) -> int:
    return n


_floor: tuple[int, Connection, str] | None = None


@app.task(name="proj.floor_noop")
def floor_noop(n: int = 0) -> int:
    """The least any Consul-locked no-op can do, for bench/task_throughput.py: ``PUT
    ?acquire=`` and ``PUT ?release=`` of ``locks/floor-{n}/.lock`` for a session made once
    per pool process, on one keep-alive connection; no value, no checks, no bookkeeping."""
    global _floor
    if _floor is None or _floor[0] != os.getpid():
        host, _, port = os.environ["CONSUL_HTTP_ADDR"].rpartition(":")
        conn = Connection(host, int(port))
        # Consul's longest TTL, so that no renewal is needed (the benchmark's agent goes away).
        _, _, text = conn.request("PUT", "/v1/session/create", b'{"TTL": "86400s", "LockDelay": "0s"}', {}, 10.0)
        _floor = (os.getpid(), conn, json.loads(text)["ID"])
    _, conn, sid = _floor
    for verb in ("acquire", "release"):
        status, _, text = conn.request("PUT", f"/v1/kv/locks/floor-{n}/.lock?{verb}={sid}&flags={LOCK_FLAG}", b"", {}, 10.0)
        if status != 200 or text.strip() != b"true":
            raise RuntimeError(f"{verb} of locks/floor-{n}/.lock answered {status} {text!r}")
    return n


@app.task(bind=True, base=ConsulLockedTask, name="proj.heartbeat")
def heartbeat(self) -> str | None:
    tick = getattr(self.request, "consul_lock_tick", None)
    leader = getattr(self.request, "consul_lock_leader", None) or {}
    requeue = getattr(self.request, "consul_lock_requeue", None) or {}
    record(
        "tick",
        tick=tick,
        instance=leader.get("instance"),
        token=leader.get("token"),
        id=self.request.id,
        retries=self.request.retries,
        requeues=requeue.get("count", 0),
    )
    return tick


@app.task(bind=True, base=ConsulLockedTask, name="proj.guarded", abort_on_lock_lost=True)
def guarded(self, seconds: float = 20.0) -> str:
    record("start", task="guarded", id=self.request.id, key=self.lock.key)
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.05)
    record("end", task="guarded", id=self.request.id)
    return "finished"


@app.task(bind=True, base=ConsulLockedTask, name="proj.checked")
def checked(self, seconds: float = 20.0) -> str:
    record("start", task="checked", id=self.request.id, key=self.lock.key)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if self.lock.lost.is_set():
            record("lost", task="checked", id=self.request.id)
            self.check_lock()  # raises LockLost
        time.sleep(0.05)
    return "finished"


@app.task(bind=True, base=ConsulLockedTask, name="proj.retrying", lock_on_held="retry", lock_retry_countdown=0.5, max_retries=2)
def retrying(self, key_holder: str = "") -> str:
    record("start", task="retrying", id=self.request.id, retries=self.request.retries)
    return "ran"


@app.task(
    bind=True,
    base=ConsulLockedTask,
    name="proj.waiting",
    lock_key="locks/proj.retrying/.lock",
    lock_on_held="wait",
    lock_wait_timeout=10,
)
def waiting(self) -> str:
    record("start", task="waiting", id=self.request.id)
    return "ran"


#: Countdown of the first attempt's retry in the flaky tasks below.
RETRY_COUNTDOWN = float(os.environ.get("TEST_RETRY_COUNTDOWN", "3"))


@app.task(bind=True, base=ConsulLockedTask, name="proj.flaky_tick")
def flaky_tick(self) -> str | None:
    """Every tick's first attempt fails and retries (``self.retry``); the retry completes."""
    tick = getattr(self.request, "consul_lock_tick", None)
    leader = getattr(self.request, "consul_lock_leader", None) or {}
    record(
        "start", task="flaky_tick", tick=tick, id=self.request.id, retries=self.request.retries, instance=leader.get("instance")
    )
    if self.request.retries == 0:
        raise self.retry(countdown=RETRY_COUNTDOWN)
    record("end", task="flaky_tick", tick=tick, id=self.request.id, retries=self.request.retries)
    return tick


@app.task(
    bind=True,
    base=ConsulLockedTask,
    name="proj.autoretry_tick",
    autoretry_for=(ValueError,),
    default_retry_delay=RETRY_COUNTDOWN,
    retry_backoff=False,
    max_retries=3,
)
def autoretry_tick(self) -> str | None:
    """As flaky_tick, with Celery's ``autoretry_for`` doing the retry."""
    tick = getattr(self.request, "consul_lock_tick", None)
    record("start", task="autoretry_tick", tick=tick, id=self.request.id, retries=self.request.retries)
    if self.request.retries == 0:
        raise ValueError("the first attempt fails")
    record("end", task="autoretry_tick", tick=tick, id=self.request.id, retries=self.request.retries)
    return tick


@app.task(bind=True, base=ConsulLockedTask, name="proj.forking")
def forking(self, seconds: float = 1.5) -> str:
    """Forks a child that does what leaving the body and exiting do (the task's release of
    its lock, then the package's exit handler), then checks, in the parent, that the lock
    is still ours and still held in Consul."""
    record("start", task="forking", id=self.request.id)
    child = os.fork()
    if child == 0:
        code = 0
        try:
            self.lock.release()
            close_sessions()
        except BaseException:
            code = 1
        finally:
            os._exit(code)  # never back into Celery's pool code in a child
    _, status = os.waitpid(child, 0)
    if status != 0:
        record("child-failed", task="forking", id=self.request.id, status=status)
    deadline = time.time() + seconds
    while time.time() < deadline:
        holder = ConsulLock.holder(self.lock.key, settings=self.lock.settings)
        if not (self.lock.held and holder is not None and holder.session == self.lock.session_id):
            record("lost", task="forking", id=self.request.id, holder=str(holder))
            return "lost"
        time.sleep(0.1)
    record("end", task="forking", id=self.request.id)
    return "kept"


def _per_tick_key(task, args, kwargs) -> str:
    return f"locks/slow-{getattr(task.request, 'consul_lock_tick', None) or 'none'}/.lock"


@app.task(
    bind=True, base=ConsulLockedTask, name="proj.slow_tick", acks_late=True, reject_on_worker_lost=True, lock_key=_per_tick_key
)
def slow_tick(self) -> str | None:
    """A tick that takes TEST_SLOW_TICK_SECONDS (2 s), locked per tick, redelivered if its
    worker process dies (``acks_late``)."""
    tick = getattr(self.request, "consul_lock_tick", None)
    leader = getattr(self.request, "consul_lock_leader", None) or {}
    record("start", task="slow_tick", tick=tick, id=self.request.id, instance=leader.get("instance"))
    time.sleep(float(os.environ.get("TEST_SLOW_TICK_SECONDS", "2")))
    record("end", task="slow_tick", tick=tick, id=self.request.id)
    return tick


def _blocking_sleep(seconds: float) -> None:
    """Sleep without yielding to gevent (what an unpatched C driver's call does)."""
    if "gevent.monkey" in sys.modules:
        sys.modules["gevent.monkey"].get_original("time", "sleep")(seconds)
    else:
        time.sleep(seconds)


@app.task(bind=True, base=ConsulLockedTask, name="proj.blocking", lock_key="locks/blocking/.lock")
def blocking(self, seconds: float = 25.0) -> str:
    """Blocks its whole process for ``seconds`` under gevent (no greenlet runs meanwhile),
    then records whether it still holds its lock."""
    record("start", task="blocking", id=self.request.id, session=self.lock.session_id, token=self.fencing_token)
    _blocking_sleep(seconds)
    lock = self.lock
    record("end", task="blocking", id=self.request.id, held=lock.held, lost=lock.lost_reason, session=lock.session_id)
    return "finished"


@app.task(bind=True, base=ConsulLockedTask, name="proj.green_keyed", lock_key="locks/green-{n}/.lock")
def green_keyed(self, n: int, seconds: float = 2.0, until: str = "") -> int:
    """One key per argument; sleeps with ``time.sleep`` (a greenlet switch under gevent) for
    ``seconds``, or with ``until``, until that Redis key exists (``seconds`` at most)."""
    tick = getattr(self.request, "consul_lock_tick", None)
    record("start", task="green_keyed", key=self.lock.key, id=self.request.id, token=self.fencing_token, tick=tick)
    if until:
        deadline = time.monotonic() + seconds
        while not store().exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(seconds)
    record("end", task="green_keyed", key=self.lock.key, id=self.request.id, held=self.lock.held, tick=tick)
    return n


@app.task(bind=True, base=ConsulLockedTask, name="proj.green_shared", lock_key="locks/green-shared/.lock")
def green_shared(self, n: int, seconds: float = 0.3) -> int:
    """One key for every call."""
    tick = getattr(self.request, "consul_lock_tick", None)
    record("start", task="green_shared", key=self.lock.key, id=self.request.id, token=self.fencing_token, tick=tick)
    time.sleep(seconds)
    record("end", task="green_shared", key=self.lock.key, id=self.request.id, held=self.lock.held, tick=tick)
    return n


@app.task(bind=True, base=ConsulLockedTask, name="proj.rejecting", acks_late=True)
def rejecting(self) -> str:
    """Its first delivery puts the message back (``Reject(requeue=True)``); the next runs."""
    first = store().incr(f"rejects:{self.request.id}") == 1
    record("start", task="rejecting", id=self.request.id, first=first)
    if first:
        raise Reject("the first delivery is sent back", requeue=True)
    record("end", task="rejecting", id=self.request.id)
    return "ran"


def _echo_key(task, args, kwargs) -> str:
    return f"locks/echo-{getattr(task.request, 'consul_lock_tick', None) or task.request.id}/.lock"


@app.task(bind=True, base=ConsulLockedTask, name="proj.echo", lock_key=_echo_key)
def echo(self, *args, **kwargs) -> str | None:
    """Records its tick id, arguments and when its message was sent (the runtime schedule's
    tests); locked per tick, so entries firing together do not skip each other."""
    tick = getattr(self.request, "consul_lock_tick", None)
    leader = getattr(self.request, "consul_lock_leader", None) or {}
    record(
        "echo",
        tick=tick,
        entry=(tick or "").rpartition("@")[0],
        args=list(args),
        kwargs=kwargs,
        sent_at=leader.get("sent_at"),
        instance=leader.get("instance"),
    )
    return tick
