"""What a worker does when its Consul agent cannot be reached: hand locked work to another.

Two parts, one idea:

* :func:`requeue_or_raise` — a locked run whose agent is unreachable (``fail_policy=closed``)
  sends a copy of its message back to the queue, with the same task id, arguments and headers
  (tick, leader, ``consul_lock`` options) and no ETA, and ends as ``RETRY``. The copy counts
  its requeues in the header :data:`~.protocol.REQUEUE_HEADER`, not in Celery's ``retries``
  (that is the user's ``max_retries``). Past :attr:`AvailabilityConfig.requeue_max` requeues or
  :attr:`AvailabilityConfig.requeue_deadline` seconds after the tick's due time (after the
  first requeue for a message without a tick) the run fails with ``ConsulUnavailable``, as
  it did before. A TLS or ACL failure is a configuration error and fails at once.
* :class:`ConsulAgentWatch` — a consumer bootstep in the worker's main process that asks the
  agent who leads (``/v1/status/leader``) every ``probe_interval`` seconds. While it gets no
  answer, or an empty one, the worker stops consuming from its task queues; when the agent
  answers again it consumes again. A pool process that hits ``ConsulUnavailable`` wakes it at
  once and waits until the worker has stopped consuming before it sends its copy, so the
  copy goes to another worker instead of coming straight back.

Guarantee: with at least one worker whose agent answers, a locked message taken by a worker
whose agent is down runs on another worker, late by the hand-off (milliseconds when the
agent refuses connections; up to ``consul_lock_timeout`` when it hangs).

Limits: the watch pauses the worker's whole queues, so unlocked tasks on those queues pause
on that worker too (give locked tasks a queue of their own). A copy that arrives after a
newer tick of the same entry completed still runs: the tick mark keeps which ticks completed
(:mod:`.ticks`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from celery import bootsteps
from celery.concurrency.solo import TaskPool as SoloPool
from celery.exceptions import Retry
from celery.signals import worker_init

from . import signals
from .consul import ConsulClient
from .errors import ConsulLockError, ConsulUnavailable
from .protocol import REQUEUE_HEADER, requeue_header, requeues
from .settings import ConsulSettings, Setting, address_source, boolean, read_celery, seconds, whole

if TYPE_CHECKING:
    from .protocol import Tick

__all__ = ["REQUEUE_HEADER", "AvailabilityConfig", "ConsulAgentWatch", "requeue_or_raise"]

log = logging.getLogger("celery_consul_lock.availability")


#: Default bound on requeues of one message. Each requeue is one publish; with the watch, a
#: message comes back to a worker whose agent is down about once (the watch stops the worker
#: before the copy is sent), so 100 is reached only without a healthy worker for minutes,
#: or without the watch — and it keeps a message from bouncing for ever even then.
DEFAULT_REQUEUE_MAX = 100
#: Default deadline, seconds after the tick's due time: a restarted agent answers within
#: seconds and a rebooted node within a minute or two; a run later than five minutes is no
#: longer the scheduled run its user expects, and an operator must look (it fails, visibly).
DEFAULT_REQUEUE_DEADLINE = 300.0
#: Default probe interval of the watch: a probe is one tiny local request, and one second
#: keeps the time a dead agent can draw work from the queue short beside any schedule.
DEFAULT_PROBE_INTERVAL = 1.0
#: Accepted probe intervals: faster than 0.1 s only adds load; slower than a minute lets a
#: worker with a dead agent draw work for too long.
PROBE_INTERVAL_MIN, PROBE_INTERVAL_MAX = 0.1, 60.0
#: Longest wait for the agent's answer to a probe: it reads one in-memory value, so an agent
#: slower than this is overloaded or hung, and a lock taken through it would be as slow.
PROBE_TIMEOUT = 2.0
#: How long a pool process waits for its worker to stop consuming before it sends its copy
#: anyway: a probe (at most PROBE_TIMEOUT) plus one pass of a worker's loop without an event
#: hub (solo, threads: it takes pending operations every 2 s), with a margin.
HANDOFF_WAIT = 5.0

#: The watch's address, one per worker main process (Linux abstract socket namespace).
_WATCH_ADDRESS = "\0celery-consul-lock-watch-{pid}"
_HANDOFF, _PAUSED, _ANSWERS = b"handoff", b"paused", b"answers"


#: The settings of :class:`AvailabilityConfig` (see :class:`~celery_consul_lock.settings.Setting`).
AVAILABILITY_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "requeue_max",
        whole(0, "expected a whole number of requeues >= 0 (0: never requeue)"),
        DEFAULT_REQUEUE_MAX,
        "requeues of one message whose worker cannot reach Consul, before it fails; `0`: fail at once. Each is one "
        "publish, and with the agent watch a message meets a worker whose agent is down about once; the bound stops a "
        "message bouncing for ever without it",
    ),
    Setting(
        "requeue_deadline",
        seconds(above=0, why="expected seconds > 0"),
        DEFAULT_REQUEUE_DEADLINE,
        "no requeue later than this after the tick's due time (or the first requeue): a restarted agent answers in "
        "seconds, a rebooted node in a minute or two; a run later than 5 min is not the run its user scheduled, and "
        "fails visibly",
    ),
    Setting(
        "agent_watch",
        boolean,
        True,
        "stop consuming while the worker's agent is down (workers of apps with `ConsulLockedTask` tasks)",
    ),
    Setting(
        "agent_probe_interval",
        seconds(
            at_least=PROBE_INTERVAL_MIN,
            at_most=PROBE_INTERVAL_MAX,
            why=f"expected seconds between {PROBE_INTERVAL_MIN:g} and {PROBE_INTERVAL_MAX:g}",
        ),
        DEFAULT_PROBE_INTERVAL,
        "how often the watch asks the agent `/v1/status/leader`, 0.1 .. 60 s: one tiny local request, and it bounds "
        "the time a worker with a dead agent draws work (the probe's own timeout is min(`consul_lock_timeout`, 2 s))",
    ),
)


@dataclass(frozen=True)
class AvailabilityConfig:
    """Settings ``consul_lock_requeue_*`` and ``consul_lock_agent_*`` (:data:`AVAILABILITY_SETTINGS`),
    read once, validated."""

    #: Requeues allowed per message; 0 fails at once, as before requeueing existed.
    requeue_max: int = DEFAULT_REQUEUE_MAX
    #: Seconds after the tick's due time (or the first requeue) past which a run fails.
    requeue_deadline: float = DEFAULT_REQUEUE_DEADLINE
    #: Run the agent watch in workers of apps with ConsulLockedTask tasks.
    agent_watch: bool = True
    #: Seconds between the watch's probes.
    agent_probe_interval: float = DEFAULT_PROBE_INTERVAL

    @classmethod
    def from_celery(cls, conf: Any) -> AvailabilityConfig:
        return cls(**read_celery(conf, AVAILABILITY_SETTINGS))


# -- the run: requeue -------------------------------------------------------------------


def requeue_or_raise(task: Any, exc: ConsulUnavailable, request: Any, tick: Tick | None, config: AvailabilityConfig) -> NoReturn:
    """Send the run's message back for another worker and raise ``Retry``; or raise ``exc``
    when waiting cannot help (TLS), the run is not a worker's (``apply()``), or the bounds
    are spent."""
    if not exc.transient or request.called_directly or request.is_eager:
        raise exc
    headers = dict(getattr(request, "headers", None) or {})
    count, since = requeues(headers.get(REQUEUE_HEADER))
    now = time.time()
    since = now if since is None else since
    start = tick.epoch if tick is not None else since
    name = f"{task.name}[{request.id}]"
    if count >= config.requeue_max or now - start > config.requeue_deadline:
        log.error(
            "%s fails: Consul is unreachable and it was requeued %d times already (at most %d), %.0f s after %s "
            "(at most %g s): %s",
            name, count, config.requeue_max, now - start, "its tick's due time" if tick else "its first requeue",
            config.requeue_deadline, exc,
        )  # fmt: skip
        raise exc
    handed = hand_off()
    headers[REQUEUE_HEADER] = requeue_header(count + 1, since)
    copy = task.signature_from_request(request, retries=request.retries, headers=headers)
    try:
        copy.apply_async()
    except Exception as publish_error:
        log.error("%s fails: Consul is unreachable and its copy could not be sent back to the queue: %r", name, publish_error)
        raise exc from publish_error
    log.warning(
        "%s sent back to the queue for another worker (requeue %d of at most %d; %s): %s",
        name, count + 1, config.requeue_max, handed, exc,
    )  # fmt: skip
    raise Retry(f"Consul unreachable here; requeued for another worker ({count + 1}/{config.requeue_max})", exc=exc, sig=copy)


def hand_off(wait: float = HANDOFF_WAIT) -> str:
    """Tell this worker's agent watch that Consul failed here, and wait until the worker has
    stopped consuming (so a copy sent now goes to another worker). Returns what happened,
    for the log: the watch's answer, or why there was none."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    except (AttributeError, OSError):
        return "no agent watch on this platform"
    with sock:
        try:
            sock.bind("")  # an abstract address of our own, for the answer (Linux)
        except OSError:
            return "no agent watch on this platform"
        for pid in dict.fromkeys((os.getppid(), os.getpid())):  # prefork: the parent; solo/threads: us
            try:
                sock.sendto(_HANDOFF, _WATCH_ADDRESS.format(pid=pid))
                break
            except OSError:
                continue
        else:
            return "no agent watch in this worker"
        sock.settimeout(wait)
        started = time.monotonic()
        try:
            answer = sock.recv(64)
        except OSError:
            return f"the agent watch did not answer within {wait:g} s"
    took = time.monotonic() - started
    if answer == _PAUSED:
        return f"this worker stopped consuming {took * 1000:.0f} ms later"
    return "the agent answers the watch's probe"


# -- the worker: stop consuming while the agent is down ----------------------------------------


class ConsulAgentWatch(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Consumer bootstep: stops consuming while the worker's agent is down (see the module doc).

    Added to every worker of an app that has ConsulLockedTask tasks (``consul_lock_agent_watch
    = False`` turns it off); in any other app, add it yourself:
    ``app.steps["consumer"].add(ConsulAgentWatch)``.
    """

    label = "Consul agent watch"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        # Read and validated here, at the worker's start-up: a bad value stops the worker.
        self.config = AvailabilityConfig.from_celery(parent.app.conf)
        self.settings = ConsulSettings.from_celery(parent.app.conf)
        self.watch: _Watch | None = None

    def include_if(self, parent: Any) -> bool:
        return self.config.agent_watch

    def start(self, parent: Any) -> None:
        if self.watch is None:
            self.watch = _Watch(parent, self.settings, self.config.agent_probe_interval, address_source(parent.app.conf))
        self.watch.start()

    def stop(self, parent: Any) -> None:
        if self.watch is not None:
            self.watch.stop()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


class _Watch:
    """The watch's thread and state. Probing happens in the thread; stopping and resuming
    consumption in the consumer's own thread (``consumer.call_soon``), as kombu requires."""

    def __init__(self, consumer: Any, settings: ConsulSettings, interval: float, address_from: str = "") -> None:
        self.consumer = consumer
        self.settings = settings
        #: Where the agent's address came from, for the start-up line (settings.address_source).
        self.address_from = address_from
        self.interval = interval
        #: Pool processes run tasks in the consumer's own thread (solo): a pause it has
        #: been asked for happens before it takes the next message, so nobody need wait.
        self.inline = isinstance(getattr(consumer, "pool", None), SoloPool)
        self.down = False
        self.down_since = 0.0
        #: The queues the watch stopped consuming from; None while consuming.
        self.paused: tuple[str, ...] | None = None
        self.waiters: list[Any] = []
        self.mutex = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    def start(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.stopping.clear()
        self.sock = self._listen()
        self._probe_before_consuming()
        self.thread = threading.Thread(target=self._run, name="consul-agent-watch", daemon=True)
        self.thread.start()
        log.info("watching the Consul agent at %s every %g s", self.settings.base_url, self.interval)

    def _probe_before_consuming(self) -> None:
        """Probe once in the consumer's thread, before it takes its first message (the step
        starts after the task consumer, before the event loop and ``ready``): a worker whose
        agent does not answer at start does not consume until it does, as after an outage."""
        client = ConsulClient(self.settings, timeout=min(self.settings.timeout, PROBE_TIMEOUT))
        try:
            reason = self._down_reason(client)
        finally:
            client.close()
        if not reason:
            return
        with self.mutex:
            was_down, self.down = self.down, True
            if not was_down:
                self.down_since = time.monotonic()
        if not was_down:
            queues = self._queue_names()
            log.warning(
                "Consul agent at %s does not answer (%s): this worker does not consume from %s until it answers (%s)",
                self.settings.base_url, reason, ", ".join(queues) or "its queues", self.address_from,
            )  # fmt: skip
            signals.send(signals.worker_agent_unavailable, self.consumer, address=self.settings.base_url, reason=reason)
        self._pause()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(PROBE_TIMEOUT + 1)
        self.thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _listen(self) -> socket.socket | None:
        """The socket pool processes wake us on (None where abstract sockets do not exist)."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except (AttributeError, OSError):
            return None
        try:
            sock.bind(_WATCH_ADDRESS.format(pid=os.getpid()))
        except OSError as exc:
            sock.close()
            log.info("the agent watch cannot listen for pool processes (%s); it probes every %g s only", exc, self.interval)
            return None
        return sock

    def _run(self) -> None:
        client: ConsulClient | None = None
        while not self.stopping.is_set():
            try:
                client = client or ConsulClient(self.settings, timeout=min(self.settings.timeout, PROBE_TIMEOUT))
                self._wait_for_probe()
                if not self.stopping.is_set():
                    self._probe(client)
            except Exception:  # never die silently: log, and keep watching
                log.exception("the Consul agent watch failed; it keeps watching")
                self.stopping.wait(self.interval)
        if client is not None:
            client.close()

    def _wait_for_probe(self) -> None:
        """Sleep one interval, or less if a pool process asks for a hand-off."""
        sock = self.sock
        if sock is None:
            self.stopping.wait(self.interval)
            return
        readable, _, _ = select.select([sock], [], [], self.interval)
        if readable:
            try:
                _, sender = sock.recvfrom(64)
            except OSError:
                return
            with self.mutex:
                self.waiters.append(sender)

    def _probe(self, client: ConsulClient) -> None:
        reason = self._down_reason(client)
        if reason:
            self._went_down(reason)
        else:
            self._came_back()
        self._answer_waiters()

    @staticmethod
    def _down_reason(client: ConsulClient) -> str:
        """Why the agent counts as down ("" if it answers with a leader)."""
        try:
            leader = client.status_leader()
            return "" if leader else "it knows no cluster leader"
        except ConsulUnavailable as exc:
            # TLS is a configuration error, not an outage: tasks report it themselves.
            return exc.detail if exc.transient else ""
        except ConsulLockError as exc:
            return str(exc)

    def _queue_names(self) -> tuple[str, ...]:
        task_consumer = self.consumer.task_consumer
        return tuple(q.name for q in task_consumer.queues) if task_consumer else ()

    def _went_down(self, reason: str) -> None:
        with self.mutex:
            if self.down:
                if self.paused is None:  # a pause that a consumer restart dropped: ask again
                    self.consumer.call_soon(self._pause)
                return
            self.down, self.down_since = True, time.monotonic()
        queues = self._queue_names()
        log.warning(
            "Consul agent at %s is unreachable (%s): this worker stops consuming from %s until it answers",
            self.settings.base_url, reason, ", ".join(queues) or "its queues",
        )  # fmt: skip
        signals.send(signals.worker_agent_unavailable, self.consumer, address=self.settings.base_url, reason=reason)
        self.consumer.call_soon(self._pause)

    def _came_back(self) -> None:
        with self.mutex:
            if not self.down:
                if self.paused is not None:  # a resume that a consumer restart dropped: ask again
                    self.consumer.call_soon(self._resume)
                return
            self.down = False
            downtime = time.monotonic() - self.down_since
        log.warning(
            "Consul agent at %s answers again after %.1f s: this worker consumes from its queues again",
            self.settings.base_url, downtime,
        )  # fmt: skip
        signals.send(signals.worker_agent_available, self.consumer, address=self.settings.base_url, downtime=downtime)
        self.consumer.call_soon(self._resume)

    # In the consumer's thread:

    def _pause(self) -> None:
        with self.mutex:
            if not self.down or self.paused is not None:
                return
        queues = tuple(q.name for q in self.consumer.task_consumer.queues)
        for name in queues:
            self.consumer.cancel_task_queue(name)
        with self.mutex:
            self.paused = queues
        self._answer_waiters()

    def _resume(self) -> None:
        with self.mutex:
            if self.down or self.paused is None:
                return
            queues, self.paused = self.paused, None
        for name in queues:
            self.consumer.add_task_queue(name)

    def _answer_waiters(self) -> None:
        """Answer the pool processes waiting for a hand-off: ``paused`` once this worker
        consumes no more, ``answers`` if the agent answered the probe they caused."""
        with self.mutex:
            if self.down and self.paused is None and not self.inline:
                return  # the pause is pending in the consumer's thread; it answers then
            answer = _PAUSED if self.down else _ANSWERS
            waiters, self.waiters = self.waiters, []
        sock = self.sock
        for sender in waiters:
            if sock is not None:
                with contextlib.suppress(OSError):  # that pool process stopped waiting
                    sock.sendto(answer, sender)


def _watch_locked_workers(sender: Any = None, **_: Any) -> None:
    """Add the watch to the consumer of every worker whose app has ConsulLockedTask tasks.
    (Sent after the app's task modules are imported, before the consumer is built.)"""
    from .task import ConsulLockedTask

    app = getattr(sender, "app", None)
    if app is not None and any(isinstance(task, ConsulLockedTask) for task in app.tasks.values()):
        app.steps["consumer"].add(ConsulAgentWatch)


worker_init.connect(_watch_locked_workers, weak=False)
