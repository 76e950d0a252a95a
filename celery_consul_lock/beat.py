"""Leader-elected celery beat: run the same beat on N nodes, one dispatches.

    celery -A proj beat -S celery_consul_lock.beat:ConsulLeaderScheduler     # or: -S consul

This module is the scheduler guard: :class:`LeaderElectedMixin` wraps a Celery scheduler so
that only the elected leader sets up, ticks, sends and syncs. Who leads is decided by the
election (:mod:`.election`: a leader that dies or is cut off is replaced within *check TTL +
lock-delay + 0.25 s*, one stuck inside a tick or send within *stall timeout* more); what a
message carries is the beat-to-worker protocol (:mod:`.protocol`); where
:class:`ConsulLeaderScheduler` keeps its schedule state is :mod:`.beat_state`.

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

import logging
import os
import signal
import threading
import time
from collections.abc import Collection
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

from .beat_state import ScheduleState, definition_hash, skip_missed
from .election import BeatConfig, Election, LoopWatch
from .entries import RuntimeSchedule, once
from .errors import ConsulLockError
from .internals import check_celery_scheduler, check_heap_rebuilt
from .protocol import LEADER_HEADER, TICK_HEADER, Tick, crontab_tick, interval_tick, leader_header
from .reap import EntryCleanup, Sweeper
from .runtime import RuntimeEntries
from .startup import check_app, refuse_a_foreign_agent, refused_at_start, warn_unknown_settings
from .task import ConsulLockedTask
from .ticks import key_part

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
    "leader_elected_scheduler",
]

log = logging.getLogger("celery_consul_lock.beat")

#: How often a standby's tick looks at the election's outcome.
STANDBY_POLL = 0.25
#: After a send failed because the broker could not be reached, try again this soon (the
#: failed attempt itself takes about 0.6 s of Celery's publish retries).
SEND_RETRY = 1.0
#: The signal an embedded beat gets when its worker dies: the one its stop handler turns into
#: leaving the election (the send in progress finished, the lock released), as at a warm
#: shutdown, so a standby leads at once instead of after the crash bound.
WORKER_DEATH_SIGNAL = signal.SIGTERM
#: Where Celery finds beat schedulers by short name (``-S consul``).
SCHEDULER_ALIASES = "celery.beat_schedulers"


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
        check_celery_scheduler()  # loud at start if Celery changed the heap we rebuild
        app: Any = kwargs.get("app") or (args[0] if args else None)
        # A bad setting ends the beat here with one line, before it joins the election.
        with refused_at_start("beat"):
            self.beat_config = BeatConfig.from_app(app)
            check_app(app)
        refuse_a_foreign_agent("beat", self.beat_config.settings, app.conf, "it could never lead")
        #: Set in an embedded beat (``worker -B``), whose worker warned about names already.
        self.embedded = False
        self.election: Election | None = None
        self._seen_generation = 0
        self._setup_pending = False
        self._sending = False
        self._exit_pending = False
        self._loop = LoopWatch()
        self._send_failed = False
        self._sweeper: Sweeper | None = None
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
            elected = election.generation != self._seen_generation
            if elected:
                self._start_sweeper()
                self._seen_generation = election.generation
                if self._setup_pending:
                    self._setup_pending = False
                    super().setup_schedule()  # type: ignore[misc]
                self._heap = None
                self.on_elected()
            self._send_failed = False
            interval = float(super().tick(*args, **kwargs))  # type: ignore[misc]
            if elected:
                check_heap_rebuilt(self)
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
        headers[LEADER_HEADER] = leader_header(
            self.beat_config.name, election.token, election.instance, election.elected_at, sent_at=time.time()
        )
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
                Scheduler.close(self)
            else:
                super().close()  # type: ignore[misc]  # sync is guarded above
        finally:
            if self._sweeper is not None:
                self._sweeper.stop()
            if self.election is not None:
                self.election.stop()

    @property
    def led_generation(self) -> int:
        """The election generation this scheduler last took over as leader (set up its
        schedule, loaded its state): 0 until it has led once."""
        return self._seen_generation

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
        self.embedded = True
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

    def reap_entries(self) -> EntryCleanup | None:
        """What the leader's sweep cleans besides free lock keys (see :mod:`.reap`): the tick
        marks naming this beat (``consul_lock_beat_name``) of entries that are not in
        :meth:`entry_names` any more."""
        return EntryCleanup(None, self._entry_segments, self._fence, beat=self.beat_config.name)

    def entry_names(self) -> Collection[str] | None:
        """The names of every entry this beat has now, disabled ones included (called from
        the sweeper's thread); None while it cannot tell, and then the sweep removes no
        mark. This default says None: a scheduler wrapped by :func:`leader_elected` that
        does not say which entries it has keeps the marks of removed ones."""
        return None

    # -- internals -----------------------------------------------------------------------------

    def _entry_segments(self) -> set[str] | None:
        """The KV key segments (``ticks.key_part``) of :meth:`entry_names`."""
        names = self.entry_names()
        return None if names is None else {key_part(name) for name in names}

    def _fence(self) -> tuple[str, str] | None:
        """(leader lock key, session) while leading: what the sweep's deletes are fenced by."""
        lock = self.election.lock if self.election is not None else None
        sid = lock.session_id if lock is not None and self._leading() else None
        return (lock.key, sid) if lock is not None and sid is not None else None

    def _start_sweeper(self) -> None:
        """Once first elected: sweep the key prefix every consul_lock_beat_reap_interval while
        leading (see :mod:`.reap`)."""
        if self._sweeper is None:
            config = self.beat_config
            leading = self._leading
            self._sweeper = Sweeper(config.settings, config.reap_interval, leading, self.reap_entries())
            self._sweeper.start()

    def _start_election(self) -> Election:
        if self.election is None:
            if not self.embedded:  # logging is set up by now (unlike in __init__)
                warn_unknown_settings(self.app.conf)
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


def _tie_embedded_beat_to_its_worker(sender: Any = None, **_: Any) -> None:
    # Sent in the beat's child process, after Service.start built the scheduler.
    scheduler = getattr(sender, "scheduler", None)
    if isinstance(scheduler, LeaderElectedMixin):
        scheduler.end_with_worker()


beat_embedded_init.connect(_tie_embedded_beat_to_its_worker, weak=False)


def _check_embedded_beat(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # Sent in the worker's main process once logging is set up, before the beat starts.
    options = getattr(instance, "options", None) or {}
    if instance is None or not options.get("beat"):
        return
    problem = embedded_beat_problem(instance.app, instance.scheduler, getattr(instance, "statedb", None))
    if problem is not None:
        log.warning("%s", problem)


celeryd_after_setup.connect(_check_embedded_beat, weak=False)


def leader_elected_scheduler(scheduler: Any) -> bool:
    """True if ``scheduler`` (a name as ``--scheduler`` takes it, or a class) is leader-elected
    (one of ours, or a subclass); False also if it cannot be imported."""
    try:
        cls = symbol_by_name(scheduler, aliases=_aliases())  # type: ignore[no-untyped-call]  # kombu's is untyped
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, LeaderElectedMixin)


def _aliases() -> dict[str, str]:
    return dict(load_extension_class_names(SCHEDULER_ALIASES))


def embedded_beat_problem(app: Any, scheduler: Any, statedb: str | None) -> str | None:
    """Why a ``celery worker -B`` of ``app``, with the scheduler (name or class) and state
    database the worker was given, would run a beat that is not leader-elected where one is
    meant: every such worker would then send every tick. None if it is leader-elected, if the
    app shows no sign of this package (no ConsulLockedTask task, no ``-S consul``), or if the
    scheduler cannot be imported here (the beat will report that itself)."""
    aliases = _aliases()
    try:
        cls = symbol_by_name(scheduler, aliases=aliases)  # type: ignore[no-untyped-call]  # kombu's is untyped
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
    the second) after its last run; see docs/task.md for crontab and interval entries."""
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


class LeaderPersistentScheduler(leader_elected(PersistentScheduler)):  # type: ignore[misc]  # Celery is untyped
    """Celery's default scheduler (local shelve file), leader-elected: only the leader sends;
    each instance's file holds its own last-run times, so a new leader goes by its own file
    (or none): ticks may be repeated or skipped at a failover. Prefer ConsulLeaderScheduler."""

    #: The schedule's entry names as the leader last saw them, in its main thread (the
    #: sweeper's thread must not read the shelve file while the scheduler writes it).
    _names: frozenset[str] | None = None

    def on_elected(self) -> None:
        self._names = frozenset(self.schedule)

    def after_send(self, entry: Any) -> None:
        self._names = frozenset(self.schedule)

    def entry_names(self) -> frozenset[str] | None:
        return self._names


class ConsulLeaderScheduler(LeaderElectedMixin, Scheduler):  # type: ignore[misc]  # Celery is untyped
    """Leader-elected beat whose schedule state (last run, run count) lives in Consul.

    Definitions come from ``beat_schedule`` and from the runtime schedule in Consul
    (:mod:`.entries`, merged by :class:`~celery_consul_lock.runtime.RuntimeEntries`); the
    state of each entry is kept in Consul (see :mod:`.beat_state`) with a hash of its timing
    (task and schedule): when those change, the stored state is ignored and the entry starts
    afresh; args, kwargs and options may change freely.
    """

    #: The runtime schedule as this leader applies it (made when first elected).
    runtime: RuntimeEntries | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The entries' state in Consul.
        self.state = ScheduleState(self.beat_config)

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
                runtime.wait(self.max_interval)
                return 0.0
        interval = float(super().tick(*args, **kwargs))
        # Read again: the first leading tick makes the runtime schedule (in on_elected), and
        # must wait on its watch too, else a fresh beat sleeps until its next due entry (up to
        # beat_max_loop_interval with an empty beat_schedule) before taking up an added entry.
        runtime = self.runtime
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
                    self._send_failed = True  # tried again in SEND_RETRY, not in a hot loop
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

    def reap_entries(self) -> EntryCleanup:
        """The marks and the schedule state (in Consul) of removed entries."""
        return EntryCleanup(self.beat_config.state_prefix, self._entry_segments, self._fence, beat=self.beat_config.name)

    def entry_names(self) -> set[str] | None:
        """Config entries, runtime ones (disabled ones too: their timing is kept), what the
        schedule holds now; None until the runtime schedule has been read (then a removed
        entry cannot be told apart)."""
        runtime = self.runtime
        if runtime is None or runtime.snapshot is None:
            return None
        return {*self.schedule.copy(), *(self.app.conf.beat_schedule or {}), *runtime.snapshot.entries}

    # -- runtime schedule ----------------------------------------------------------------------

    def _runtime_sync(self, force: bool = False) -> None:
        """Take up changes of the runtime schedule, then send the run-now requests."""
        if self.runtime is None:
            config = self.beat_config
            self.runtime = RuntimeEntries(
                RuntimeSchedule(config.settings, config.name, self.app),
                self.schedule,
                lambda **fields: self.Entry(app=self.app, **fields),
                self.state.read,
                definition_hash,
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
                if skip_missed(entry, now):
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

    def _load_state(self) -> None:
        try:
            count = self.state.load(self.schedule, self.app.now())
        except ConsulLockError as exc:
            log.error("beat: could not read the schedule state (%s); standing down", exc)
            assert self.election is not None
            self.election.step_down("could not read the schedule state")
            return
        self._heap = None
        log.info("beat: loaded the schedule state of %d entries from Consul", count)

    def _write_state(self, entries: list[Any]) -> None:
        election = self.election
        lock = election.lock if election is not None else None
        if lock is None or lock.session_id is None:
            return
        try:
            ok, errors = self.state.write(entries, lock)
        except ConsulLockError as exc:
            log.error("beat: could not record the schedule state: %s", exc)
            return
        if not ok:
            log.error("beat: our session no longer holds the leader lock (%s); standing down", errors)
            assert election is not None
            election.step_down("a fenced write of the schedule state was refused")


def _broker_unreachable(exc: BaseException) -> bool:
    """True if ``exc`` (Celery's SchedulingError) was caused by the broker connection: kombu
    wraps those in its OperationalError, and the cause chain ends in an OSError."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (KombuOperationalError, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
