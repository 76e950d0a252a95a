"""The beat leader election: which of N beat instances may send.

Every instance runs an :class:`Election` thread that waits (with Consul blocking queries) for
the leader lock ``<prefix>locks/<beat name>/beat/.lock``. The leader's session is tied to a
short-TTL health check that the leader keeps passing, so a leader that dies or is cut off is
replaced within *check TTL + lock-delay + 0.25 s* (default 2 + 1.5 + 0.25 s); one that stops
normally releases the lock and is replaced at once. The check is passed only while the
scheduler loop (:class:`LoopWatch`) comes back: a leader stuck inside one tick or send for
longer than the stall timeout steps down, and is replaced within *stall timeout + the crash
bound*.

:class:`BeatConfig` holds the beat's settings (``consul_lock_beat_*``), read once; the
scheduler guard that uses the election is in :mod:`.beat`, the schedule state kept in Consul
in :mod:`.beat_state`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from . import signals
from .backoff import Backoff
from .consul import ConsulClient, shared_client
from .errors import ConsulLockError, InvalidSetting
from .lock import LOCK_DELAY_RETRY, ConsulLock
from .session import LockSession, renewal_interval
from .settings import ConsulSettings, Setting, as_written, one_of, read_celery, seconds, text, validate_key

__all__ = ["BeatConfig", "Election", "ElectionState", "LoopWatch", "MissedPolicy"]

log = logging.getLogger("celery_consul_lock.beat")

#: Default TTL of the leader's health check: with the lock-delay below, a crashed leader is
#: replaced in about 4 s.
DEFAULT_CHECK_TTL = 2.0
#: Default lock-delay of beat sessions: short for fast failover, yet long enough that a
#: leader renewing every 0.5 s fences itself (1 s after its last renewal) before it ends.
DEFAULT_BEAT_LOCK_DELAY = 1.5
#: Longest single wait for the leader lock, so a stopping standby is not held up for long.
ELECTION_WAIT = 10.0
#: Backoff bounds while Consul cannot be reached.
BACKOFF_MIN, BACKOFF_MAX = 0.5, 15.0
#: What a new leader does with ticks that fell due while nobody led: send one (as Celery
#: does) or skip them.
MissedPolicy = Literal["run-once", "skip"]
MISSED_POLICIES: tuple[MissedPolicy, ...] = get_args(MissedPolicy)
#: Where this instance stands in the election (logged once per change).
ElectionState = Literal["starting", "standby", "leader", "unreachable", "stalled", "lost"]
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
#: Default interval of the leader's sweep of the key prefix (see :mod:`.reap`): each sweep
#: reads the whole prefix once (20-40 ms per 1,000 keys, bench/reap_cost.py), so every five
#: minutes costs nothing noticeable, and a key whose releaser is gone leaves at most that
#: long after its keep time.
DEFAULT_REAP_INTERVAL = 300.0


#: The beat's settings (see :class:`~celery_consul_lock.settings.Setting`); BeatConfig.validate
#: checks what holds between them and the connection settings.
BEAT_SETTINGS: tuple[Setting, ...] = (
    Setting("beat_name", text, None, "election and state namespace of the beats", shown_default="the app's main name"),
    Setting(
        "beat_check_ttl",
        seconds(),
        DEFAULT_CHECK_TTL,
        "TTL of the leader's health check: at least 1 s and twice the renewal interval; no upper bound (a crashed "
        "leader is replaced after about this plus the lock-delay)",
    ),
    Setting("beat_lock_delay", seconds(), DEFAULT_BEAT_LOCK_DELAY, "lock-delay of beat sessions"),
    Setting("beat_missed", one_of(*MISSED_POLICIES), "run-once", "ticks missed while nobody led: `run-once` or `skip`"),
    Setting(
        "beat_stall_timeout",
        seconds(),
        DEFAULT_STALL_TIMEOUT,
        "the leader steps down when its scheduler loop has been inside one tick or send this long; at least "
        "`consul_lock_timeout` + 3 s",
    ),
    Setting(
        "beat_reap_interval",
        seconds(above=0, why="expected seconds, more than 0"),
        DEFAULT_REAP_INTERVAL,
        "how often the leader sweeps the key prefix for free lock keys and the state of removed entries "
        "([KV layout](concepts.md#kv-layout))",
    ),
)


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
    missed: MissedPolicy
    #: Longest time the leader's scheduler loop may stay inside one tick or send before the
    #: leader stops passing its health check and steps down.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    #: How often the leader sweeps the key prefix (see :mod:`.reap`).
    reap_interval: float = DEFAULT_REAP_INTERVAL

    @classmethod
    def from_app(cls, app: Any) -> BeatConfig:
        """Read and validate the beat's settings from ``app.conf``; InvalidSetting names the
        setting as the user wrote it (``CELERY_CONSUL_LOCK_BEAT_CHECK_TTL`` under Django)."""
        conf = app.conf
        with as_written(conf):
            beat = read_celery(conf, BEAT_SETTINGS)
            base = ConsulSettings.from_celery(conf)
            settings = ConsulSettings.resolve({"lock_delay": beat["beat_lock_delay"]}, env={}, names="consul_lock_beat_{}")
            settings = base.replace(lock_delay=settings.lock_delay)
            name = beat["beat_name"] or app.main or "celery"
            config = cls(
                str(name),
                settings,
                beat["beat_check_ttl"],
                beat["beat_missed"],
                beat["beat_stall_timeout"],
                beat["beat_reap_interval"],
            )
            config.validate()
        return config

    def validate(self) -> None:
        validate_key(self.settings.key_prefix + self.leader_key_name, "consul_lock_beat_name")
        if self.missed not in MISSED_POLICIES:
            raise InvalidSetting("consul_lock_beat_missed", self.missed, "expected 'run-once' or 'skip'")
        renew_every = renewal_interval(self.settings.fence_window)
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
        self._state: ElectionState = "starting"
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
            lock.declare_lost(reason)

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
        return self.config.stall_timeout * float(2 ** min(self._stalls, STALL_ESCALATION_MAX))

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
        client = shared_client(self.config.settings)
        if registered and service_id is not None:
            try:
                client.agent_check_fail(f"service:{service_id}")
                client.agent_deregister_service(service_id)
            except ConsulLockError as exc:
                log.warning("beat %s: could not end the health check %s: %s", self.instance, service_id, exc)
        session.destroy(client)

    def _set_state(self, state: ElectionState, message: str, *args: Any, level: int = logging.INFO) -> None:
        if state != self._state:
            self._state = state
            log.log(level, message, *args)

    def _run(self) -> None:
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while not self._stop.is_set():
            try:
                if self._stalled_step is not None:
                    self._sit_out_stall()
                    continue
                self._campaign()
                backoff.reset()
            except ConsulLockError as exc:
                self.leading.clear()
                if self._stop.is_set():
                    return  # stopping: our own session was just destroyed
                self._set_state(
                    "unreachable", "beat %s: cannot take part in the election: %s", self.instance, exc, level=logging.WARNING
                )
                self._stop.wait(backoff.next())
            except Exception:  # never die silently: log and go on
                log.exception("beat election thread error; retrying")
                self.leading.clear()
                self._stop.wait(backoff.next())

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
