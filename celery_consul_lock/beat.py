"""Leader-elected celery beat: run the same beat on N nodes, one dispatches.

    celery -A proj beat -S celery_consul_lock.beat:ConsulLeaderScheduler     # or: -S consul

Every instance runs an :class:`Election` thread that waits (with Consul blocking queries) for
the leader lock ``<prefix>locks/<beat name>/beat/.lock``. The leader's session is tied to a
short-TTL health check that the leader keeps passing, so a leader that dies or is cut off is
replaced within *check TTL + lock-delay + 0.25 s* (default 2 + 1.5 + 0.25 s); one that stops
normally releases the lock and is replaced at once. The check is passed only while the
scheduler loop comes back: a leader stuck inside one tick or send for longer than the stall
timeout steps down, and is replaced within *stall timeout + the crash bound*.

Guarantees: a standby sends nothing and writes no shared state; the leader checks its lease
(the lock's self-fencing deadline) right before every send and stops sending, and rejoins as a
standby, when it cannot confirm it; every message carries its tick id and the leader's fencing
token. :class:`ConsulLeaderScheduler` keeps each entry's last run time and run count in Consul
KV, written by the leader only, fenced by its session, so a new leader continues where the old
one stopped.

Limit: the one window where a tick can be *sent* twice is a leader that dies between sending it
and recording it (a millisecond); the copy carries the same tick id, so ConsulLockedTask runs it
once.

Embedded (``celery worker -B --scheduler consul``): Celery runs the beat as a child process
forked from the worker (billiard), stopped with SIGTERM at the worker's warm or cold shutdown,
which releases the lock. The beat is tied to its worker's life (:meth:`~LeaderElectedMixin.
end_with_worker`), so a worker killed outright does not leave an orphaned beat leading; and
a worker told ``-S consul`` (there: the state database, not the scheduler) logs a warning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import billiard.process
from billiard.util import set_pdeathsig
from celery.beat import PersistentScheduler, Scheduler
from celery.schedules import crontab, solar
from celery.schedules import schedule as interval_schedule
from celery.signals import beat_embedded_init, celeryd_after_setup
from celery.utils.imports import load_extension_class_names
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils.imports import symbol_by_name

from . import signals
from .consul import ConsulClient, thread_client
from .entries import RuntimeSchedule, once
from .errors import ConsulLockError, InvalidSetting
from .lock import LOCK_DELAY_RETRY, ConsulLock
from .runtime import PAUSED_POLL, RuntimeEntries, read_state
from .session import FENCE_MARGIN_MIN, FENCE_MARGIN_RATIO, RENEWALS_PER_WINDOW, LockSession
from .settings import ConsulSettings, parse_seconds, validate_key
from .task import LEADER_HEADER, ConsulLockedTask
from .ticks import TICK_HEADER, Tick, crontab_tick, interval_tick, key_part

__all__ = [
    "LEADER_HEADER",
    "BeatConfig",
    "ConsulLeaderScheduler",
    "Election",
    "LeaderElectedMixin",
    "LeaderPersistentScheduler",
    "LoopWatch",
    "embedded_beat_problem",
    "leader_elected",
]

log = logging.getLogger("celery_consul_lock.beat")

#: Default TTL of the leader's health check: with the lock-delay below, a crashed leader is
#: replaced in about 4 s.
DEFAULT_CHECK_TTL = 2.0
#: Default lock-delay of beat sessions: short for fast failover, yet long enough that a
#: leader renewing every 0.5 s fences itself (1 s after its last renewal) before it ends.
DEFAULT_BEAT_LOCK_DELAY = 1.5
#: How often a standby's tick looks at the election's outcome.
STANDBY_POLL = 0.25
#: Longest single wait for the leader lock, so a stopping standby is not held up for long.
ELECTION_WAIT = 10.0
#: Backoff bounds while Consul cannot be reached.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 15.0
MISSED_POLICIES = ("run-once", "skip")
#: Default stall timeout: how long the leader's scheduler loop may stay inside one tick or
#: one send before the leader steps down. Longer than a healthy step takes — a send to Redis
#: took 1 ms (median; 155 ms at worst of 2000 on our VM), the fenced state write after it is
#: bounded by consul_lock_timeout (5 s) — and than the 20 s a beat's send was held by Celery's
#: publish retries (20, 1 s apart) against a restarting Redis, so a broker blip of that size
#: moves no leadership; yet a hung leader is replaced within about half a minute (+ the crash
#: bound), which costs a once-a-minute schedule at most one late run.
DEFAULT_STALL_TIMEOUT = 30.0
#: The least a send step is allowed beyond one Consul request (consul_lock_timeout): about
#: five times the longest bounded send measured here (0.62 s, a send to a restarting Redis
#: failing through Celery's publish retries). A stall timeout below consul_lock_timeout +
#: this could depose a healthy leader whose state write is merely slow, so it is refused.
STALL_SEND_ALLOWANCE = 3.0
#: A beat deposed for a stall rejoins as soon as its loop returns; if it stalls again before
#: it completes a send as leader, its stall timeout doubles, up to 2**this times the setting,
#: so a cause every beat shares (a broker that makes every send hang) moves leadership a few
#: times in all, not on every stall timeout.
STALL_ESCALATION_MAX = 4
#: How often a beat sitting out a stall looks whether its loop has returned.
STALL_POLL = 0.1
#: After a send failed because the broker could not be reached, try again this soon (the
#: failed attempt itself takes about 0.6 s of Celery's publish retries).
SEND_RETRY = 1.0
#: The signal an embedded beat gets when its worker dies: the one its stop handler turns into
#: leaving the election (the send in progress finished, the lock released), as at a warm
#: shutdown, so a standby leads at once instead of after the crash bound.
WORKER_DEATH_SIGNAL = signal.SIGTERM
#: Where Celery finds beat schedulers by short name (``-S consul``).
SCHEDULER_ALIASES = "celery.beat_schedulers"


@dataclass(frozen=True)
class BeatConfig:
    """Beat settings (``consul_lock_beat_*``), read once and validated at start-up."""

    #: Names the election and the state: instances with the same name share one leader.
    name: str
    #: Connection and session settings for the leader lock.
    settings: ConsulSettings
    #: TTL of the health check the leader's session is tied to.
    check_ttl: float
    #: Ticks that fell due while nobody led: "run-once" (send one, as Celery does) or "skip".
    missed: str
    #: Longest time the leader's scheduler loop may stay inside one tick or send before the
    #: leader stops passing its health check and steps down.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT

    @classmethod
    def from_app(cls, app: Any) -> BeatConfig:
        conf = app.conf
        name = conf.get("consul_lock_beat_name") or app.main or "celery"
        base = ConsulSettings.from_celery(conf)
        lock_delay = conf.get("consul_lock_beat_lock_delay")
        settings = ConsulSettings.resolve(
            {"lock_delay": DEFAULT_BEAT_LOCK_DELAY if lock_delay is None else lock_delay},
            env={},
            names="consul_lock_beat_{}",
        )
        settings = base.replace(lock_delay=settings.lock_delay)
        check_ttl = conf.get("consul_lock_beat_check_ttl")
        check_ttl = DEFAULT_CHECK_TTL if check_ttl is None else parse_seconds("consul_lock_beat_check_ttl", check_ttl)
        missed = conf.get("consul_lock_beat_missed") or "run-once"
        stall = conf.get("consul_lock_beat_stall_timeout")
        stall_timeout = DEFAULT_STALL_TIMEOUT if stall is None else parse_seconds("consul_lock_beat_stall_timeout", stall)
        config = cls(str(name), settings, check_ttl, missed, stall_timeout)
        config.validate()
        return config

    def validate(self) -> None:
        validate_key(self.settings.key_prefix + self.leader_key_name, "consul_lock_beat_name")
        if self.missed not in MISSED_POLICIES:
            raise InvalidSetting("consul_lock_beat_missed", self.missed, "expected 'run-once' or 'skip'")
        window = self.settings.fence_window
        renew_every = (window - max(FENCE_MARGIN_MIN, window * FENCE_MARGIN_RATIO)) / RENEWALS_PER_WINDOW
        if self.check_ttl < 2 * renew_every or self.check_ttl < 1:
            raise InvalidSetting(
                "consul_lock_beat_check_ttl",
                self.check_ttl,
                f"must be at least 1 s and twice the renewal interval ({renew_every:.2f} s), or a "
                "healthy leader's check could expire between passes",
            )
        if self.stall_timeout <= 0:
            raise InvalidSetting("consul_lock_beat_stall_timeout", self.stall_timeout, "must be more than 0 s")
        if self.stall_timeout < self.stall_timeout_floor:
            raise InvalidSetting(
                "consul_lock_beat_stall_timeout",
                self.stall_timeout,
                f"must be at least {self.stall_timeout_floor:g} s: one send may take {STALL_SEND_ALLOWANCE:g} s to "
                f"publish plus consul_lock_timeout ({self.settings.timeout:g} s) to record, and a shorter value "
                "would depose a healthy leader",
            )

    @property
    def leader_key_name(self) -> str:
        return f"locks/{self.name}/beat/.lock"

    @property
    def state_prefix(self) -> str:
        return f"{self.settings.key_prefix}celery-consul-lock/beat/{self.name}/entries/"

    @property
    def crash_failover_bound(self) -> float:
        """Seconds from a leader's crash until a standby leads: check TTL + lock-delay + retry."""
        return self.check_ttl + self.settings.lock_delay + LOCK_DELAY_RETRY

    @property
    def stall_timeout_floor(self) -> float:
        """The shortest stall timeout accepted: one Consul request plus a publish allowance."""
        return self.settings.timeout + STALL_SEND_ALLOWANCE

    @property
    def stall_failover_bound(self) -> float:
        """Seconds from the moment the leader's loop stops coming back until a standby leads."""
        return self.stall_timeout + self.crash_failover_bound


class LoopWatch:
    """Where the scheduler loop (the thread that ticks and sends) is, as the leader's health
    check sees it: since when it has been inside one step of leader work — a tick, a send, a
    sync — without coming back, or None while it is between ticks (a standby's polls and the
    sleep between ticks are never steps). Written by the loop, read by the session renewer.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: ``clock()`` when the current step began, or None between steps.
        self.busy_since: float | None = None
        #: Sends completed (published without an error), ever.
        self.sends = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        """One step of leader work; a step inside a step (a send inside a tick) marks progress
        on entering and on leaving, so each is measured on its own."""
        outer = self.busy_since is None
        self.busy_since = self.clock()
        try:
            yield
        finally:
            self.busy_since = None if outer else self.clock()

    def sent(self) -> None:
        self.sends += 1

    def busy_for(self) -> float:
        since = self.busy_since
        return 0.0 if since is None else self.clock() - since


class Election:
    """This instance's part in the election, run by a daemon thread.

    For each session it registers a service with a TTL check on the agent and ties the
    session to it (and to the node's ``serfHealth``); it waits for the leader lock, holds it
    while the lock stays held, and re-enters the election when it is lost — no restart
    needed. A session it gives up has its check failed and deregistered, so Consul ends it
    (and frees what it holds) as soon as the servers can, not after 2 x TTL. Logs once per
    change of state (standby, leader, unreachable, stalled), never per attempt.

    The check is passed only while the scheduler loop (``loop``) comes back: a leader whose
    loop has been inside one step for longer than the stall timeout steps down (its lock
    marked lost, then released), stops passing its check, and sits the election out until
    its loop returns from that step.
    """

    def __init__(self, config: BeatConfig, loop: LoopWatch | None = None) -> None:
        self.config = config
        #: The scheduler loop whose progress the health check vouches for.
        self.loop = loop or LoopWatch()
        host = socket.gethostname()
        self.instance = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.leading = threading.Event()
        self.generation = 0
        #: When this instance was last elected (epoch s): sent with every message.
        self.elected_at = 0.0
        self.lock: ConsulLock | None = None
        self._sessions = 0
        self._service_id: str | None = None
        self._registered = False
        self._session: LockSession | None = None
        self._stop = threading.Event()
        self._state = "starting"
        #: Stalls in a row without a completed send as leader (each doubles the stall timeout).
        self._stalls = 0
        #: ``loop.busy_since`` of the step we stepped down for, while the loop is still in it.
        self._stalled_step: float | None = None
        self._sends_at_election = 0
        self._thread = threading.Thread(target=self._run, name=f"consul-beat-election-{config.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_leader(self) -> bool:
        """True while we hold the leader lock inside its self-fencing deadline."""
        lock = self.lock
        return self.leading.is_set() and lock is not None and lock.held

    @property
    def token(self) -> int | None:
        lock = self.lock
        return lock.fencing_token if lock is not None and self.leading.is_set() else None

    def step_down(self, reason: str) -> None:
        """Stop leading now (the election thread releases and re-enters)."""
        lock = self.lock
        self.leading.clear()
        if lock is not None:
            lock._mark_lost(reason)

    def stop(self) -> None:
        """Leave the election: release the lock (no lock-delay for the successor), destroy
        the session, deregister the health check."""
        self._stop.set()
        self.leading.clear()
        lock = self.lock
        released = lock.release() if lock is not None else False
        if released:
            signals.send(signals.beat_leader_lost, self, scheduler=self.config.name, instance=self.instance, reason="stopped")
        self._retire_session()
        log.info("beat %s: left the election%s", self.instance, " (released the leader lock)" if released else "")

    # -- the thread ------------------------------------------------------------------------

    def _new_session(self) -> LockSession:
        """A fresh session tied to a fresh health check (never one shared with an old
        session, whose passing would keep that session alive)."""
        self._retire_session()
        self._sessions += 1
        service_id = f"celery-beat-{self.config.name}-{self.instance}-{self._sessions}"
        self._service_id, self._registered = service_id, False

        def heartbeat(client: ConsulClient) -> None:
            if not self._registered:
                client.agent_register_ttl_service(service_id, f"celery-beat-{self.config.name}", check_ttl=self.config.check_ttl)
                self._registered = True
            if self._loop_stalled():
                return  # no pass: Consul ends the session within the check's TTL
            client.agent_check_pass(f"service:{service_id}")

        settings = self.config.settings.replace(session_checks=("serfHealth", f"service:{service_id}"))
        self._session = LockSession(settings, name=f"celery beat {self.config.name} {self.instance}", heartbeat=heartbeat)
        return self._session

    @property
    def stall_timeout(self) -> float:
        """The stall timeout now in force: the setting, doubled for each stall in a row."""
        return self.config.stall_timeout * 2 ** min(self._stalls, STALL_ESCALATION_MAX)

    def _loop_stalled(self) -> bool:
        """Called before each check pass (from the session renewer): True while the loop is
        stuck in the step we stepped down for; steps down when the leader's loop has been
        inside one step for longer than the stall timeout."""
        loop = self.loop
        since = loop.busy_since
        if since is not None and since == self._stalled_step:
            return True
        if not self.leading.is_set():
            return False
        if loop.sends > self._sends_at_election:
            self._stalls = 0  # a send completed as leader: not stalled in a row
        busy = loop.busy_for()
        limit = self.stall_timeout
        if since is None or busy <= limit:
            return False
        self._stalled_step = since
        self._stalls += 1
        log.error(
            "beat %s: the scheduler loop has been inside one tick or send for %.1f s (stall timeout %g s, "
            "consul_lock_beat_stall_timeout=%g); stepping down, and not passing the health check until it returns",
            self.instance,
            busy,
            limit,
            self.config.stall_timeout,
        )
        self.step_down(f"the scheduler loop stalled for {busy:.1f} s inside one tick or send")
        return True

    def _sit_out_stall(self) -> None:
        """Out of the election until the loop leaves the step it stalled in: no session, no
        check, so this instance cannot be elected while it could not send anyway."""
        self._retire_session()
        self._set_state(
            "stalled",
            "beat %s: out of the election until the scheduler loop returns (next stall timeout %g s)",
            self.instance,
            self.stall_timeout,
            level=logging.WARNING,
        )
        started = time.monotonic()
        while not self._stop.is_set() and self.loop.busy_since == self._stalled_step:
            self._stop.wait(STALL_POLL)
        self._stalled_step = None
        log.warning(
            "beat %s: the scheduler loop returned after %.1f s more; rejoining the election",
            self.instance,
            time.monotonic() - started,
        )

    def _retire_session(self) -> None:
        """End the current session for good: fail and deregister its check (the local agent
        does both even while the servers have no leader), then destroy it."""
        session, service_id, registered = self._session, self._service_id, self._registered
        self._session, self._service_id, self._registered = None, None, False
        if session is None or session.pid != os.getpid():
            return  # none, or inherited through fork: the parent's to end
        # Ours to end: say so before failing its check, so that an acquire still waiting in
        # the election thread, which Consul now answers "invalid session", is not reported
        # as a session lost.
        session.retire("retired by the beat")
        client = thread_client(self.config.settings)
        if registered and service_id is not None:
            try:
                client.agent_check_fail(f"service:{service_id}")
                client.agent_deregister_service(service_id)
            except ConsulLockError as exc:
                log.warning("beat %s: could not end the health check %s: %s", self.instance, service_id, exc)
        session.destroy(client)

    def _set_state(self, state: str, message: str, *args: Any, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            log.log(level, message, *args)

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                if self._stalled_step is not None:
                    self._sit_out_stall()
                    continue
                self._campaign()
                backoff = BACKOFF_MIN
            except ConsulLockError as exc:
                self.leading.clear()
                if self._stop.is_set():
                    return  # stopping: our own session was just destroyed
                self._set_state(
                    "unreachable", "beat %s: cannot take part in the election: %s", self.instance, exc, level=logging.WARNING
                )
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            except Exception:  # never die silently: log and go on
                log.exception("beat election thread error; retrying")
                self.leading.clear()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)

    def _campaign(self) -> None:
        session = self._session
        if session is None or session.lost_reason is not None:
            session = self._new_session()
        lock = ConsulLock(
            self.config.leader_key_name,
            settings=self.config.settings,
            name=f"celery beat {self.config.name}",
            value={"instance": self.instance, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            session=session,
        )
        # A quick try first, so a new standby says at once who leads; then a blocking wait.
        if not lock.acquire(blocking=False):
            self._set_state("standby", "beat %s: standing by (leader: %s)", self.instance, lock.last_holder or "none yet")
            if not lock.acquire(timeout=ELECTION_WAIT):
                return
        self.lock = lock
        self.elected_at = time.time()
        self.generation += 1
        self._sends_at_election = self.loop.sends
        self.leading.set()
        self._set_state(
            "leader", "beat %s: elected leader of %s (fencing token %s)", self.instance, self.config.name, lock.fencing_token
        )
        signals.send(
            signals.beat_leader_elected,
            self,
            scheduler=self.config.name,
            instance=self.instance,
            fencing_token=lock.fencing_token,
        )
        while not self._stop.is_set() and lock.held:
            lock.lost.wait(0.1)
        if self._stop.is_set():
            return
        self.leading.clear()
        self.lock = None
        reason = lock.lost_reason or "fencing deadline passed"
        log.warning("beat %s: lost leadership: %s; rejoining as a standby", self.instance, reason)
        signals.send(signals.beat_leader_lost, self, scheduler=self.config.name, instance=self.instance, reason=reason)
        self._state = "lost"
        lock.release()


class LeaderElectedMixin:
    """Adds the election to a celery beat Scheduler: on a standby, ``setup_schedule``,
    ``tick``, ``sync`` and ``close`` change nothing shared and nothing is sent.

    Hooks for subclasses: :meth:`on_elected` (after winning, before the first send),
    :meth:`after_send` (after each send, still leading), :meth:`on_send_failed` (a send
    raised).

    The leader's ticks, sends and syncs are timed (:class:`LoopWatch`): a leader stuck in
    one of them for longer than ``consul_lock_beat_stall_timeout`` steps down (see
    :class:`Election`). A send already under way when that happens may still reach the
    broker once the loop wakes; its message carries the deposed leader's token and the same
    tick id as the new leader's, so ConsulLockedTask runs that tick once. Nothing after it
    is sent: the lease is checked before every send.
    """

    app: Any
    max_interval: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        app = kwargs.get("app") or (args[0] if args else None)
        self.beat_config = BeatConfig.from_app(app)
        self.election: Election | None = None
        self._seen_generation = 0
        self._setup_pending = False
        self._sending = False
        self._exit_pending = False
        self._loop = LoopWatch()
        self._send_failed = False
        super().__init__(*args, **kwargs)

    # -- guarded Scheduler methods -------------------------------------------------------------

    def setup_schedule(self) -> None:
        if self._leading():
            super().setup_schedule()  # type: ignore[misc]
        else:
            self._setup_pending = True  # done once elected: it may write shared state

    def tick(self, *args: Any, **kwargs: Any) -> float:
        election = self._start_election()
        if not election.is_leader():
            return min(STANDBY_POLL, self.max_interval)
        with self._loop.step():
            if election.generation != self._seen_generation:
                self._seen_generation = election.generation
                if self._setup_pending:
                    self._setup_pending = False
                    super().setup_schedule()  # type: ignore[misc]
                self._heap = None
                self.on_elected()
            self._send_failed = False
            interval = float(super().tick(*args, **kwargs))  # type: ignore[misc]
        # A send that could not reach the broker is tried again soon, not in a hot loop.
        return max(interval, min(SEND_RETRY, self.max_interval)) if self._send_failed else interval

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        election = self.election
        if election is None or not election.is_leader():
            log.warning("beat: not sending %s: leadership is not confirmed (self-fencing); standing by", entry.name)
            if election is not None:
                election.step_down("could not confirm leadership before a send")
            return None
        headers = dict(entry.options.get("headers") or {})
        headers[TICK_HEADER] = str(tick_of(entry))
        headers[LEADER_HEADER] = {
            "scheduler": self.beat_config.name,
            "token": election.token,
            "instance": election.instance,
            # Workers judge a message by when it was sent, against when newer leaders were
            # elected (see task._stale_leader): a retry of it may arrive much later.
            "sent_at": time.time(),
            "elected_at": election.elected_at,
        }
        # Entries of other schedulers (django-celery-beat's ModelEntry) cannot be copied:
        # lend this send our headers and put the entry's own options back afterwards.
        own_options = entry.options
        entry.options = {**own_options, "headers": headers}
        with self._loop.step():
            self._sending = True
            try:
                result = super().apply_async(entry, producer=producer, advance=advance, **kwargs)  # type: ignore[misc]
            except Exception as exc:
                self._send_failed = True
                self.on_send_failed(entry, exc)
                raise
            finally:
                entry.options = own_options
                self._sending = False
            self._loop.sent()
            self.after_send(entry)
        if self._exit_pending:
            raise SystemExit()
        return result

    def sync(self) -> None:
        if self._leading():
            with self._loop.step():
                super().sync()  # type: ignore[misc]

    def close(self) -> None:
        try:
            if self._setup_pending:  # never led: the wrapped scheduler's storage was never opened
                Scheduler.close(self)  # type: ignore[arg-type]
            else:
                super().close()  # type: ignore[misc]  # sync is guarded above
        finally:
            if self.election is not None:
                self.election.stop()

    def _leading(self) -> bool:
        return self.election is not None and self.election.is_leader()

    # -- hooks -----------------------------------------------------------------------------

    def on_elected(self) -> None:
        """Called in the main thread after this instance won, before it sends anything."""

    def after_send(self, entry: Any) -> None:
        """Called after each send while leading."""

    def on_send_failed(self, entry: Any, exc: Exception) -> None:
        """Called in the main thread when sending ``entry`` raised ``exc`` (Celery then logs
        it and, by default, counts the run as done)."""

    def end_with_worker(self) -> None:
        """Tie this embedded beat (``celery worker -B``) to its worker: when the worker
        process dies, even by SIGKILL, the beat gets ``WORKER_DEATH_SIGNAL`` and leaves the
        election as at a warm shutdown (release, no lock-delay). Without it, a worker killed
        alone leaves its beat running as an orphan, leading on while the worker is restarted
        beside it. Linux only (``PR_SET_PDEATHSIG``); elsewhere it logs that it cannot."""
        worker = getattr(billiard.process.current_process(), "_parent_pid", None) or os.getppid()
        try:
            set_pdeathsig(WORKER_DEATH_SIGNAL)
        except OSError as exc:
            log.warning("beat: embedded in worker pid %s, but cannot follow its death (%s): kill both together", worker, exc)
            return
        if os.getppid() != worker:  # it died before the line above: no signal will come
            log.warning("beat: the worker (pid %s) that started this embedded beat is gone; exiting", worker)
            raise SystemExit(1)
        log.info("beat: embedded in worker pid %s: leaves the election when that worker ends, also if it is killed", worker)

    # -- internals -----------------------------------------------------------------------------

    def _start_election(self) -> Election:
        if self.election is None:
            self.election = Election(self.beat_config, self._loop)
            self._defer_exit_during_sends()
            log.info(
                "beat %s: joining the election for %s (crash failover bound %.2f s, stall timeout %g s)",
                self.election.instance,
                self.beat_config.name,
                self.beat_config.crash_failover_bound,
                self.beat_config.stall_timeout,
            )
            self.election.start()
        return self.election

    def _defer_exit_during_sends(self) -> None:
        """SIGTERM/SIGINT during a send: finish the send (and record it), then exit."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def handler(num: int, frame: Any, previous: Any = previous) -> None:
                if self._sending:
                    self._exit_pending = True
                    return
                if callable(previous):
                    previous(num, frame)
                raise SystemExit()

            signal.signal(signum, handler)


@beat_embedded_init.connect(weak=False)
def _tie_embedded_beat_to_its_worker(sender: Any = None, **_: Any) -> None:
    # Sent in the beat's child process, after Service.start built the scheduler.
    scheduler = getattr(sender, "scheduler", None)
    if isinstance(scheduler, LeaderElectedMixin):
        scheduler.end_with_worker()


@celeryd_after_setup.connect(weak=False)
def _check_embedded_beat(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # Sent in the worker's main process once logging is set up, before the beat starts.
    options = getattr(instance, "options", None) or {}
    if instance is None or not options.get("beat"):
        return
    problem = embedded_beat_problem(instance.app, instance.scheduler, getattr(instance, "statedb", None))
    if problem is not None:
        log.warning("%s", problem)


def embedded_beat_problem(app: Any, scheduler: Any, statedb: str | None) -> str | None:
    """Why a ``celery worker -B`` of ``app``, with the scheduler (name or class) and state
    database the worker was given, would run a beat that is not leader-elected where one is
    meant: every such worker would then send every tick. None if it is leader-elected, if the
    app shows no sign of this package (no ConsulLockedTask task, no ``-S consul``), or if the
    scheduler cannot be imported here (the beat will report that itself)."""
    aliases = dict(load_extension_class_names(SCHEDULER_ALIASES))
    try:
        cls = symbol_by_name(scheduler, aliases=aliases)
    except Exception:
        return None
    if isinstance(cls, type) and issubclass(cls, LeaderElectedMixin):
        return None
    statedb_is_ours = bool(statedb) and _names_leader_elected(str(statedb), aliases)
    if not statedb_is_ours and not any(isinstance(task, ConsulLockedTask) for task in app.tasks.values()):
        return None
    name = f"{cls.__module__}:{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
    why = (
        f"-S {statedb} was taken as the worker's state database (-S is --statedb for `celery worker`)"
        if statedb_is_ours
        else "no leader-elected scheduler was given"
    )
    return (
        f"celery worker -B runs its embedded beat with {name}, which is not leader-elected, so every worker "
        f"started with -B sends every tick: {why}. Use --scheduler consul"
    )


def _names_leader_elected(name: str, aliases: dict[str, str]) -> bool:
    """True if ``name`` is a short name or path of one of this package's schedulers."""
    return aliases.get(name, name).startswith(__name__.partition(".")[0])


def tick_of(entry: Any) -> Tick:
    """The tick id of the run of ``entry`` being sent now (before it is reserved): a run-now
    copy carries its own; a one-off entry's is its time; a solar entry's the event's time (to
    the second) after its last run; see the README for crontab and interval entries."""
    forced = getattr(entry, "consul_lock_tick", None)
    if isinstance(forced, Tick):
        return forced
    sched = entry.schedule
    if isinstance(sched, once):
        return Tick.of(entry.name, sched.at)
    if isinstance(sched, solar) and entry.last_run_at is not None:
        # The event's time: "now" as the schedule sees it, plus what remains until the event.
        due = sched.maybe_make_aware(sched.now()) + sched.remaining_estimate(entry.last_run_at)
        return Tick.of(entry.name, due.replace(microsecond=0) + timedelta(seconds=round(due.microsecond / 1e6)))
    if isinstance(sched, crontab):
        return crontab_tick(entry.name, datetime.now(timezone.utc))
    if isinstance(sched, interval_schedule) and entry.last_run_at is not None:
        return interval_tick(entry.name, entry.last_run_at, sched.run_every)
    return Tick.of(entry.name, datetime.now(timezone.utc))


def leader_elected(scheduler_cls: type[Scheduler]) -> type[Scheduler]:
    """``scheduler_cls`` with the election added (see :class:`LeaderElectedMixin`)."""
    return type(f"LeaderElected{scheduler_cls.__name__}", (LeaderElectedMixin, scheduler_cls), {"__module__": __name__})


LeaderPersistentScheduler = leader_elected(PersistentScheduler)
"""Celery's default scheduler (local shelve file), leader-elected: only the leader sends; each
instance's file holds its own last-run times, so a new leader goes by its own file (or none):
ticks may be repeated or skipped at a failover. Prefer ConsulLeaderScheduler."""


class ConsulLeaderScheduler(LeaderElectedMixin, Scheduler):
    """Leader-elected beat whose schedule state (last run, run count) lives in Consul.

    Definitions come from ``beat_schedule`` and from the runtime schedule in Consul
    (:mod:`.entries`, merged by :class:`~celery_consul_lock.runtime.RuntimeEntries`); the
    state of an entry is kept at ``<prefix>celery-consul-lock/beat/<name>/entries/<entry>``
    with a hash of its timing (task and schedule): when those change, the stored state is
    ignored and the entry starts afresh; args, kwargs and options may change freely.
    """

    #: The runtime schedule as this leader applies it (made when first elected).
    runtime: RuntimeEntries | None = None

    def on_elected(self) -> None:
        self._load_state()
        if self._leading():
            self._runtime_sync(force=True)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        runtime = self.runtime
        if runtime is not None and self._leading() and self.election.generation == self._seen_generation:  # type: ignore[union-attr]
            with self._loop.step():
                self._runtime_sync()
            if runtime.paused:
                runtime.wait(min(PAUSED_POLL, self.max_interval))
                return 0.0
        interval = float(super().tick(*args, **kwargs))
        if interval > 0 and runtime is not None and self._leading():
            runtime.wait(interval)  # woken at once by a change of the runtime schedule
            return 0.0
        return interval

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        runtime = self.runtime
        if runtime is not None and self._leading():
            try:
                why = runtime.refusal(entry)
                put_back = why == "sending is paused"
            except ConsulLockError as exc:
                why, put_back = f"the runtime schedule could not be read ({exc})", True
            if why is not None:
                log.warning("beat: not sending %s: %s", entry.name, why)
                if put_back and getattr(entry, "consul_lock_tick", None) is None and entry.name in self.schedule:
                    self.schedule[entry.name] = entry  # not sent: due again once sending resumes
                    self._heap = None
                return None
        return super().apply_async(entry, producer=producer, advance=advance, **kwargs)

    def after_send(self, entry: Any) -> None:
        current = self.schedule.get(entry.name)
        if current is not None:
            self._write_state([current])
        if self.runtime is not None:
            self.runtime.after_send(entry)

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
        super().close()

    # -- runtime schedule ----------------------------------------------------------------------

    def _runtime_sync(self, force: bool = False) -> None:
        """Take up changes of the runtime schedule, then send the run-now requests."""
        if self.runtime is None:
            config = self.beat_config
            self.runtime = RuntimeEntries(
                RuntimeSchedule(config.settings, config.name, self.app),
                self.schedule,
                lambda **fields: self.Entry(app=self.app, **fields),
                lambda name: read_state(config.settings, config.state_prefix, name),
                _definition_hash,
            )
        runtime = self.runtime
        was_paused = runtime.paused
        try:
            if runtime.sync(force=force):
                self._heap = None
        except ConsulLockError as exc:
            log.error("beat: could not read the runtime schedule: %s", exc)
            return
        if runtime.paused:
            return
        if was_paused and self.beat_config.missed == "skip":
            now = self.app.now()
            for name, entry in self.schedule.items():
                if self._skip_missed(entry, now):
                    log.info("beat: skipping the ticks of %s missed while paused", name)
            self._heap = None
        for request, entry in runtime.run_requests():
            if self.apply_async(entry, producer=self.producer, advance=False) is None:
                break  # not leading, or paused meanwhile: the request stays for later
            lock = self.election.lock if self.election is not None else None
            runtime.done(request, (lock.key, lock.session_id) if lock is not None and lock.session_id else None)

    def on_send_failed(self, entry: Any, exc: Exception) -> None:
        """A send the broker did not take (down or restarting) does not use up its tick
        under ``run-once``: the entry goes back to before the send, so it is sent again (same
        tick id) until the broker answers — one late run, as for ticks missed while nobody
        led. Under ``skip`` the tick is dropped, as Celery does. Other errors (a task that
        cannot be serialised, say) are left to Celery: retrying them would never end."""
        if self.beat_config.missed != "run-once" or not _broker_unreachable(exc):
            return
        if self.schedule.get(entry.name) is not entry:
            self.schedule[entry.name] = entry
            self._heap = None
            if self._leading():
                self._write_state([entry])  # in case a sync recorded the reserved run
        log.warning("beat: the broker did not take %s (%s); sending it again in %g s", entry.name, exc, SEND_RETRY)

    def sync(self) -> None:
        if self._leading():
            self._write_state(list(self.schedule.values()))

    # -- state ---------------------------------------------------------------------------------

    def _state_key(self, name: str) -> str:
        return self.beat_config.state_prefix + key_part(name)

    def _load_state(self) -> None:
        client = thread_client(self.beat_config.settings)
        try:
            stored = {e.key: e for e in client.kv_keys(self.beat_config.state_prefix)}
        except ConsulLockError as exc:
            log.error("beat: could not read the schedule state (%s); standing down", exc)
            assert self.election is not None
            self.election.step_down("could not read the schedule state")
            return
        now = self.app.now()
        for name, entry in self.schedule.items():
            kv = stored.get(self._state_key(name))
            if kv is None or not kv.value:
                continue
            data = json.loads(kv.value)
            if data.get("definition") != _definition_hash(entry):
                log.info("beat: the schedule of %s changed; it starts afresh", name)
                continue
            entry.last_run_at = datetime.fromisoformat(data["last_run_at"])
            entry.total_run_count = int(data.get("total_run_count", 0))
            if self.beat_config.missed == "skip" and self._skip_missed(entry, now):
                log.info("beat: skipping the ticks of %s missed while nobody led", name)
        self._heap = None
        log.info("beat: loaded the schedule state of %d entries from Consul", len(stored))

    @staticmethod
    def _skip_missed(entry: Any, now: datetime) -> bool:
        """Under ``skip``: an interval entry more than one interval overdue resumes from now."""
        due, _ = entry.is_due()
        if due and isinstance(entry.schedule, interval_schedule):
            missed_from = entry.last_run_at + entry.schedule.run_every
            if (now - missed_from).total_seconds() > entry.schedule.run_every.total_seconds():
                entry.last_run_at = now
                return True
        return False

    def _write_state(self, entries: list[Any]) -> None:
        election = self.election
        lock = election.lock if election is not None else None
        if lock is None or lock._sid is None:
            return
        ops: list[dict[str, Any]] = [{"KV": {"Verb": "check-session", "Key": lock.key, "Session": lock._sid}}]
        for entry in entries:
            value = json.dumps(
                {
                    "last_run_at": entry.last_run_at.isoformat() if entry.last_run_at else None,
                    "total_run_count": entry.total_run_count,
                    "definition": _definition_hash(entry),
                    "token": lock._token,
                }
            )
            ops.append(
                {"KV": {"Verb": "set", "Key": self._state_key(entry.name), "Value": base64.b64encode(value.encode()).decode()}}
            )
        client = thread_client(self.beat_config.settings)
        try:
            for start in range(1, len(ops), 63):  # Consul allows 64 operations per transaction
                ok, _, errors = client.txn([ops[0], *ops[start : start + 63]], action="recording the schedule state")
                if not ok:
                    log.error("beat: our session no longer holds the leader lock (%s); standing down", errors)
                    assert election is not None
                    election.step_down("a fenced write of the schedule state was refused")
                    return
        except ConsulLockError as exc:
            log.error("beat: could not record the schedule state: %s", exc)


def _broker_unreachable(exc: BaseException) -> bool:
    """True if ``exc`` (Celery's SchedulingError) was caused by the broker connection: kombu
    wraps those in its OperationalError, and the cause chain ends in an OSError."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (KombuOperationalError, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _definition_hash(entry: Any) -> str:
    """A hash of what decides an entry's timing: its task and schedule (not args, kwargs or
    options, so editing those keeps the timing)."""
    text = repr((entry.task, repr(entry.schedule)))
    return hashlib.sha1(text.encode()).hexdigest()[:16]
