"""ConsulLockedTask: a Celery task base class whose every run holds a Consul lock.

    @app.task(base=ConsulLockedTask)
    def nightly_backup(): ...

Guarantee: two runs of the task with the same lock key never run their bodies at the same
time while Consul works and the holder is alive; the lock is taken in the worker, around
the body, and released on every way out of it (return, exception, retry, soft time limit).
With a tick id (see :mod:`celery_consul_lock.ticks`) a scheduled tick runs to completion at
most once: its mark in Consul is advanced, fenced by the lock, when a run ends.

Limit: a lock is a lease. A holder that is paused or cut off past its self-fencing deadline
loses it (``self.lock.lost`` is set, ``self.check_lock()`` raises) while its body may still
be running; pass ``self.fencing_token`` to the resources it changes if a duplicate side
effect must be impossible, not just rare.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import re
import string
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, Literal, NoReturn, get_args

from celery import Task, uuid
from celery.exceptions import Ignore, Reject
from celery.signals import worker_process_shutdown, worker_shutdown

from . import native, signals
from .availability import AvailabilityConfig, requeue_or_raise
from .consul import shared_client
from .errors import ConsulUnavailable, InvalidSetting, LockHeld, LockLost
from .lock import ConsulLock, LockHolder
from .protocol import (
    LEADER_HEADER,
    LOCK_OPTIONS_HEADER,
    REQUEUE_HEADER,
    RESERVATION_HEADER,
    Tick,
    beat_of_request,
    header_value,
    options_override,
    requeues,
    retry_headers,
    stale_leader,
    tick_of_request,
)
from .reservation import Reservation, cancel, reservation_ttl, reserve
from .semaphore import SEMAPHORE_KEY, ConsulSemaphore, validate_limit
from .session import close_sessions
from .settings import FAIL_POLICIES, ConsulSettings, FailPolicy, Setting, boolean, one_of, read_celery, seconds, validate_key
from .ticks import Mark, attributed, change_mark, read_mark

__all__ = [
    "EAGER_MODES",
    "EAGER_SETTINGS",
    "LOCK_OPTIONS_HEADER",
    "SKIPPED",
    "TASK_SETTINGS",
    "ConsulLockedTask",
    "LockOptions",
    "eager_mode",
    "is_skipped",
]

log = logging.getLogger("celery_consul_lock.task")

#: The value a skipped run returns: ``{"consul_lock": "skipped", ...}`` (see is_skipped).
SKIPPED = "skipped"
#: What a run does when its lock is held elsewhere: skip, wait (then skip), retry, or fail
#: (raise LockHeld).
OnHeld = Literal["skip", "wait", "retry", "fail"]
ON_HELD: tuple[OnHeld, ...] = get_args(OnHeld)
#: Where a task's key is locked: in the worker around the run (today's behaviour), at send
#: time only (dedupe on the broker), or both.
LockAt = Literal["run", "send", "both"]
LOCK_AT: tuple[LockAt, ...] = get_args(LockAt)
#: Why a run did not run its body (the ``reason`` of its result and of task_lock_skipped):
#: the key held by another run; free but inside its lock-delay; sent by a deposed beat
#: leader; its tick already ran to completion; a duplicate delivery of a message whose run
#: is alive or finished; a run of the key ended less than ``lock_cooldown`` ago.
SkipReason = Literal["held", "lock-delay", "stale-leader", "duplicate-tick", "duplicate-delivery", "cooldown"]
#: How a run's acquire ended: the lock taken, held by another run, or held by a live run
#: of this same message (this copy is a duplicate delivery).
Acquired = Literal["acquired", "held", "duplicate"]
#: Which attempt of a message a run is: (Celery's ``retries``, our requeues); a message's
#: copies with the same attempt are duplicates, a larger one is new work.
Attempt = tuple[int, int]
#: Default for ``on_held="wait"``: long enough for most critical sections.
DEFAULT_WAIT_TIMEOUT = 30.0
#: Default countdown for ``on_held="retry"``.
DEFAULT_RETRY_COUNTDOWN = 5.0
#: Default TTL of a send-time reservation (``lock_at="send"``): how long a queued message
#: keeps later sends of its call off the broker before Consul frees the key (up to twice
#: this). Ten minutes: longer than a healthy queue's wait, short enough that a lost message
#: does not block its call for long.
DEFAULT_RESERVE_TTL = 600.0

#: App-wide defaults of task lock options (Celery settings ``consul_lock_<option>``), for
#: the tasks that do not set the option themselves; unset, the option's own default holds.
#: The other options (key, limit, cooldown, ...) belong to one task; ttl, lock_delay and
#: fail_policy have app-wide settings of their own (ConsulSettings).
_SECONDS = seconds(at_least=0, why="expected a number of seconds >= 0")
TASK_SETTINGS: tuple[Setting, ...] = tuple(
    Setting(name, parse, None, f"tasks' `{attribute}` where a task sets none", shown_default=shown)
    for name, parse, attribute, shown in (
        ("on_held", one_of(*ON_HELD), "lock_on_held", "`skip`"),
        ("wait_timeout", _SECONDS, "lock_wait_timeout", f"`{DEFAULT_WAIT_TIMEOUT:g}` s"),
        ("retry_countdown", _SECONDS, "lock_retry_countdown", f"`{DEFAULT_RETRY_COUNTDOWN:g}` s"),
        ("abort_on_lock_lost", boolean, "abort_on_lock_lost", "`false`"),
    )
)


def task_defaults(conf: Any) -> dict[str, Any]:
    """The app-wide task option defaults ``conf`` sets (TASK_SETTINGS), parsed; InvalidSetting
    names the Celery setting."""
    return {name: value for name, value in read_celery(conf, TASK_SETTINGS).items() if value is not None}


#: How a call outside a worker runs (setting ``consul_lock_eager``): an eager one
#: (``task_always_eager``, ``task.apply()``) or a direct one (``task(...)``). ``bypass`` runs
#: the body without a lock; ``consul`` locks it as a worker does.
EagerMode = Literal["consul", "bypass"]
EAGER_MODES: tuple[EagerMode, ...] = ("consul", "bypass")
#: Bypass by default: eager and direct calls are how a project's tests call its tasks, in one
#: process, usually without a Consul agent; a test expects the body to run as written (with
#: ``consul``, every such call needs an agent, or fails with ConsulUnavailable). The lock
#: exists to keep workers apart; an eager call runs in its caller, not in a worker.
DEFAULT_EAGER: EagerMode = "bypass"

#: The setting ``consul_lock_eager`` (see :class:`~celery_consul_lock.settings.Setting`): how
#: calls outside a worker run, app-wide (not a task option: it is not in LockOptions).
EAGER_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "eager",
        one_of(*EAGER_MODES),
        DEFAULT_EAGER,
        "eager (`task_always_eager`, `apply()`) and direct (`task()`) calls: `bypass` runs the body without a lock, "
        "`consul` locks it as a worker does ([Eager and direct calls](task.md#eager-and-direct-calls-your-projects-tests))",
    ),
)


def is_skipped(result: object) -> bool:
    """True if a task result is the value of a run skipped by its lock or tick mark."""
    return isinstance(result, Mapping) and result.get("consul_lock") == SKIPPED


@dataclass(frozen=True)
class LockOptions:
    """A task's lock options, validated; task attributes ``lock_<name>`` give the defaults
    and the ``consul_lock`` header overrides them per call."""

    #: Key template (``str.format`` with the task's arguments), or callable(task, args, kwargs).
    key: str | Callable[..., str] | None = None
    #: What to do when the lock is held elsewhere: skip, wait (then skip), retry, or fail
    #: (raise LockHeld).
    on_held: OnHeld = "skip"
    #: How long ``wait`` waits.
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    #: Countdown of ``retry``.
    retry_countdown: float = DEFAULT_RETRY_COUNTDOWN
    #: Session TTL / lock-delay / fail policy for this task (None: the app's settings).
    ttl: float | None = None
    lock_delay: float | None = None
    fail_policy: FailPolicy | None = None
    #: Raise LockLost inside the running body as soon as the lock is lost.
    abort_on_lock_lost: bool = False
    #: At most this many runs at once per key, cluster-wide (1: a lock; more: a semaphore).
    limit: int = 1
    #: After a run of the key ends, skip runs for this many seconds (reason "cooldown").
    cooldown: float = 0.0
    #: "run" (lock in the worker), "send" (reserve the key at apply_async: a call already
    #: queued or running is not sent again), or "both".
    at: LockAt = "run"
    #: A send-time reservation's session TTL (see :mod:`.reservation`), 10 s .. 24 h.
    reserve_ttl: float = DEFAULT_RESERVE_TTL

    @staticmethod
    def attribute(option: str) -> str:
        """The task attribute giving ``option``'s default: ``lock_<option>``, or the name
        itself when it already says lock (``lock_delay``, ``abort_on_lock_lost``)."""
        return option if "lock" in option else f"lock_{option}"

    def validated(self, task: str) -> LockOptions:
        def bad(name: str, value: object, why: str) -> InvalidSetting:
            return InvalidSetting(f"{task}.{LockOptions.attribute(name)}", value, why)

        validate_limit(f"{task}.lock_limit", self.limit)
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, int | float) or self.cooldown < 0:
            raise bad("cooldown", self.cooldown, "expected a number of seconds >= 0")
        if self.cooldown and self.limit > 1:
            raise bad("cooldown", self.cooldown, "a cooldown needs lock_limit=1 (it is kept in the lock's key)")
        if self.at not in LOCK_AT:
            raise bad("at", self.at, f"expected one of {', '.join(LOCK_AT)}")
        if self.at != "run" and (self.limit > 1 or self.cooldown):
            raise bad("at", self.at, "send-time dedupe needs lock_limit=1 and no lock_cooldown")
        if (
            isinstance(self.reserve_ttl, bool)
            or not isinstance(self.reserve_ttl, int | float)
            or not 10 <= self.reserve_ttl <= 86400
        ):
            raise bad("reserve_ttl", self.reserve_ttl, "expected seconds between 10 and 86400 (Consul's session TTL range)")

        if self.on_held not in ON_HELD:
            raise bad("on_held", self.on_held, f"expected one of {', '.join(ON_HELD)}")
        if self.fail_policy is not None and self.fail_policy not in FAIL_POLICIES:
            raise bad("fail_policy", self.fail_policy, "expected 'closed' or 'open'")
        for name in ("wait_timeout", "retry_countdown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise bad(name, value, "expected a number of seconds >= 0")
        if self.key is not None and not (isinstance(self.key, str) or callable(self.key)):
            raise bad("key", self.key, "expected a key template string or a callable(task, args, kwargs)")
        return self


class ConsulLockedTask(Task):  # type: ignore[misc]
    """A task whose runs are serialised cluster-wide by a Consul lock (see the module doc).

    Options: the fields of :class:`LockOptions`, as task attributes named by
    :func:`LockOptions.attribute` (``lock_key``, ``lock_on_held``, ..., ``abort_on_lock_lost``;
    their defaults are the fields' defaults) or ``@app.task(lock_on_held="wait", ...)``
    arguments, or per call in the ``consul_lock`` message header (by field name). A task
    that does not set ``lock_on_held``, ``lock_wait_timeout``, ``lock_retry_countdown`` or
    ``abort_on_lock_lost`` takes the app's ``consul_lock_<option>`` setting (TASK_SETTINGS).
    """

    _consul_settings: ConsulSettings | None = None
    _lock_options: LockOptions | None = None
    _eager: EagerMode | None = None
    _availability: AvailabilityConfig | None = None

    # -- what the body can use ------------------------------------------------------------

    @property
    def lock(self) -> ConsulLock | None:
        """The lock this run holds (None outside a run, or when run unguarded: fail open, or
        an eager or direct call under ``consul_lock_eager="bypass"``)."""
        return getattr(self.request, "consul_lock_held", None)

    @property
    def fencing_token(self) -> int | None:
        """The lock's fencing token for this run (the key's ModifyIndex at acquisition)."""
        lock = self.lock
        return lock.fencing_token if lock is not None else None

    def check_lock(self) -> None:
        """Raise :class:`LockLost` if this run no longer holds its lock (nothing for a run
        without one)."""
        lock = self.lock
        if lock is not None:
            lock.check()

    # -- options -----------------------------------------------------------------------------

    def lock_options(self, request: Any = None) -> LockOptions:
        """This call's options (``request``'s, default the current one): the task's, with
        the ``consul_lock`` header's on top."""
        if self._lock_options is None:
            self._lock_options = replace(self._own_options(), **self._app_defaults()).validated(self.name)
        override = options_override(self.request if request is None else request)
        if not override:
            return self._lock_options
        if not isinstance(override, Mapping):
            raise InvalidSetting(f"{self.name} header {LOCK_OPTIONS_HEADER}", override, "expected a mapping of lock options")
        known = {f.name for f in fields(LockOptions)}
        unknown = sorted(set(override) - known)
        if unknown:
            raise InvalidSetting(
                f"{self.name} header {LOCK_OPTIONS_HEADER}", override, f"unknown option(s) {unknown}; known: {sorted(known)}"
            )
        return replace(self._lock_options, **override).validated(self.name)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A task's own lock options are checked when it is defined (``@app.task``), so a
        bad value fails at import, naming the task and the option."""
        super().__init_subclass__(**kwargs)
        cls._own_options().validated(getattr(cls, "name", None) or cls.__name__)

    @classmethod
    def _own_options(cls) -> LockOptions:
        """The options the task's class sets (a function given as ``lock_key`` is read from
        the class, unbound: it is called as documented, f(task, args, kwargs))."""
        return LockOptions(**{f.name: getattr(cls, LockOptions.attribute(f.name)) for f in fields(LockOptions)})

    def _app_defaults(self) -> dict[str, Any]:
        """The app's ``consul_lock_<option>`` settings for the options this task's class
        does not set itself, validated (InvalidSetting names the Celery setting)."""
        defaults = task_defaults(self.app.conf)
        for name in list(defaults):
            attr = LockOptions.attribute(name)
            if next(c for c in type(self).__mro__ if attr in c.__dict__) is not ConsulLockedTask:
                del defaults[name]  # the task's class sets it
        return defaults

    def check_lock_options(self) -> LockOptions:
        """This task's own lock options, validated as a run would use them, without a run:
        each option, and a key template against the body's signature (every field it names
        must be one of the body's parameters, or ``task``; every index one of its
        positional ones), and its ``lock_ttl``, ``lock_delay`` and ``lock_fail_policy`` with
        the app's settings. Raises InvalidSetting naming the task, the setting and the value.

        Limit: a callable key can only be checked by calling it, and an index is checked
        against the body's parameters, not against how a caller will pass them."""
        options = self.lock_options(_NO_REQUEST)
        if isinstance(options.key, str):
            _check_key_template(options.key, _signature(self.run), f"{self.name}.lock_key")
        app_settings = ConsulSettings.from_celery(self.app.conf)  # read afresh: a check caches nothing
        try:
            app_settings.replace(ttl=options.ttl, lock_delay=options.lock_delay, fail_policy=options.fail_policy)
        except InvalidSetting as exc:
            if exc.setting not in ("ttl", "lock_delay", "fail_policy"):
                raise  # the app's own setting, named already
            raise InvalidSetting(f"{self.name}.{LockOptions.attribute(exc.setting)}", exc.value, exc.reason) from None
        return options

    def lock_settings(self, options: LockOptions) -> ConsulSettings:
        """The app's settings (read once per task object), with the task's TTL etc."""
        if self._consul_settings is None:
            self._consul_settings = ConsulSettings.from_celery(self.app.conf)
        return self._consul_settings.replace(ttl=options.ttl, lock_delay=options.lock_delay, fail_policy=options.fail_policy)

    def eager_mode(self) -> EagerMode:
        """The app's ``consul_lock_eager`` (read once per task object), validated."""
        if self._eager is None:
            self._eager = eager_mode(self.app.conf)
        return self._eager

    def lock_key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: LockOptions | None = None) -> str:
        """The key this call locks (before the configured prefix), validated."""
        key = (options or self.lock_options()).key
        setting = f"{self.name}.lock_key"
        if key is None:
            text = f"locks/{self.name}/.lock"
        elif callable(key):
            text = key(self, args, kwargs)
        else:
            try:
                text = key.format(*args, **_arguments(self.run, args, kwargs), task=self)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
                raise InvalidSetting(
                    setting, key, f"cannot fill the template from args={args!r} kwargs={kwargs!r}: {exc!r}"
                ) from None
        return validate_key(text, setting)

    # -- the run -----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request  # a lookup through Celery's request stack: done once
        if (request.called_directly or request.is_eager) and self.eager_mode() == "bypass":
            # Not in a worker: run the body as Celery would, without a lock. A direct call
            # gets its request pushed by Celery's own __call__; an eager one has it already.
            return super().__call__(*args, **kwargs) if request.called_directly else self.run(*args, **kwargs)
        options = self.lock_options(request)
        settings = self.lock_settings(options)
        key = self.lock_key_for(args, kwargs, options)
        tick = tick_of_request(request)
        task_id = request.id
        attempt = _attempt(request)
        stale = stale_leader(header_value(request, LEADER_HEADER))
        if stale:
            return self._skip(key, "stale-leader", None, tick, task_id, why=stale)
        value: dict[str, Any] = {"task_id": task_id}
        if attempt[0]:
            value["retries"] = attempt[0]
        if attempt[1]:
            value["requeues"] = attempt[1]
        if tick:
            value["tick"] = str(tick)
        lock = self._make_lock(key, options, settings, value)
        reserved = header_value(request, RESERVATION_HEADER) if options.at != "run" else None
        if isinstance(reserved, Mapping) and isinstance(reserved.get("session"), str):
            lock.reservation = reserved["session"]  # taken over by the acquire, atomically
        try:
            outcome = self._acquire(lock, options, task_id, attempt)
        except ConsulUnavailable as exc:
            if settings.fail_policy != "open":
                self._consul_unavailable(exc, request, tick)
            log.warning("running %s[%s] WITHOUT its lock %s (fail_policy=open): %s", self.name, task_id, lock.key, exc)
            return self.run(*args, **kwargs)
        if outcome == "duplicate":
            self._skip(lock.key, "duplicate-delivery", lock.last_holder, tick, task_id)
            raise Ignore()  # no result of its own: the task id's result is the live run's
        if outcome == "held" and options.at == "send":
            # Dedupe at send only: a copy that was not deduplicated (send_task by name, a
            # reservation that expired) runs, without the key.
            log.info("%s[%s]: %s is held by %s; running anyway (lock_at=send)", self.name, task_id, lock.key, lock.last_holder)
            return self.run(*args, **kwargs)
        if outcome == "held":
            return self._not_acquired(lock, options, tick, task_id, attempt)
        finished = True
        restore = False
        try:
            if _delivery_finished(lock.previous, task_id, attempt):
                self._skip(lock.key, "duplicate-delivery", None, tick, task_id)
                raise Ignore()  # the task id's result is the finished run's
            cooling = _cooling_down(lock.previous, options.cooldown)
            if cooling:
                restore = True  # a skipped run must not restart the cooldown
                return self._skip(lock.key, "cooldown", None, tick, task_id, why=cooling)
            mark: Mark | None = None
            beat = beat_of_request(request) if tick is not None else None
            if tick is not None:
                try:
                    opened = self._open_tick(lock, settings, tick, beat)
                except ConsulUnavailable as exc:
                    if settings.fail_policy != "open":
                        self._consul_unavailable(exc, request, tick)
                    log.warning("running %s[%s] WITHOUT its tick mark %s (fail_policy=open): %s", self.name, task_id, tick, exc)
                else:
                    if isinstance(opened, str):
                        return self._skip(lock.key, "duplicate-tick", None, tick, task_id, why=opened)
                    mark = opened
            request.consul_lock_held = lock
            signals.send(signals.task_lock_acquired, self, key=lock.key, fencing_token=lock.fencing_token, task_id=task_id)
            result = self._run_body(lock, options, task_id, args, kwargs)
            if tick is not None and mark is not None:
                self._record_tick(lock, settings, tick, mark, task_id, beat)
            return result
        except (SystemExit, KeyboardInterrupt):
            # The process is ending mid-run: a cold shutdown's SIGTERM to the pool process
            # (billiard turns it into SystemExit). Free the key at once, but not as a
            # finished run, so that a redelivery of this message (acks_late) runs the body
            # instead of being skipped as a copy of a run that finished.
            finished = False
            log.warning("%s[%s] interrupted by its process's exit: releasing %s unfinished", self.name, task_id, lock.key)
            raise
        except Reject as exc:
            # Reject(requeue=True) puts this very message back: its next delivery must run.
            finished = not exc.requeue
            raise
        finally:
            request.consul_lock_held = None
            lock.release(finished=finished, restore=restore)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        """Celery's ``apply_async``; with ``lock_at="send"`` or ``"both"``, the call's key is
        reserved in Consul first (see :mod:`.reservation`): when a copy of the call is
        already queued or running, nothing is published and its AsyncResult is returned."""
        headers = dict(options.get("headers") or {})
        lock_options = self.lock_options(_Headers(headers))
        if lock_options.at == "run" or self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        settings = self.lock_settings(lock_options)
        key = settings.full_key(self.lock_key_for(tuple(args or ()), dict(kwargs or {}), lock_options))
        task_id = task_id or uuid()
        try:
            reservation = reserve(settings, key, task_id, ttl=reservation_ttl(lock_options.reserve_ttl, options), name=self.name)
        except ConsulUnavailable as exc:
            if settings.fail_policy != "open":
                raise
            log.warning("sending %s[%s] unreserved (fail_policy=open): %s", self.name, task_id, exc)
            reservation = Reservation(key, False)
        if not reservation.made and reservation.task_id not in (None, task_id):
            log.info("not sending %s[%s]: %s is queued or running (%s)", self.name, task_id, reservation.task_id, key)
            return self.AsyncResult(reservation.task_id)
        if reservation.made:
            options["headers"] = {**headers, RESERVATION_HEADER: {"session": reservation.session}}
        try:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        except BaseException:
            cancel(settings, reservation)
            raise

    def _make_lock(self, key: str, options: LockOptions, settings: ConsulSettings, value: dict[str, Any]) -> ConsulLock:
        """The run's lock: a ConsulLock on ``key``, or with ``lock_limit`` above 1 a
        ConsulSemaphore whose prefix is ``key`` without its ``/.lock``."""
        if options.limit == 1:
            # The release record stays for the cooldown too: the next run reads it to keep it.
            return ConsulLock(key, settings=settings, name=self.name, value=value, keep_released=options.cooldown)
        prefix = key[: -len(SEMAPHORE_KEY) - 1] if key.endswith(f"/{SEMAPHORE_KEY}") else key
        return ConsulSemaphore(prefix, options.limit, settings=settings, name=self.name, value=value)

    def _consul_unavailable(self, exc: ConsulUnavailable, request: Any, tick: Tick | None) -> NoReturn:
        """fail_policy=closed and Consul cannot be reached: send the message back for another
        worker (see :mod:`.availability`), or fail with ``exc`` once its bounds are spent."""
        if self._availability is None:
            self._availability = AvailabilityConfig.from_celery(self.app.conf)
        requeue_or_raise(self, exc, request, tick, self._availability)

    def _acquire(self, lock: ConsulLock, options: LockOptions, task_id: str | None, attempt: Attempt) -> Acquired:
        """Take the lock by ``on_held``. When the holder is a run of this same message,
        decide by that run instead: a live run of the same delivery makes this copy a
        duplicate; a run that died holding the key, or a previous attempt (a retry's
        predecessor) still releasing it, is waited for, so that the run is not lost. A retry
        or requeue (``attempt`` above (0, 0)) that finds another message's run holding the
        key waits for it under ``skip`` too (then retries, see _not_acquired)."""
        if lock.acquire(blocking=False):
            twin = _same_message(lock.co_holders if isinstance(lock, ConsulSemaphore) else (), task_id)
            if twin is not None and _attempt_of(twin.extra) >= attempt:
                # A semaphore had a free slot, but a run of this same message holds another.
                lock.release(finished=False)
                lock.last_holder = twin
                log.info("%s[%s] is a duplicate delivery: a run of this message holds a slot of %s", self.name, task_id, lock.key)
                return "duplicate"
            return "acquired"
        holder = _same_message(lock.last_holders if isinstance(lock, ConsulSemaphore) else (), task_id) or lock.last_holder
        if not (holder and task_id and holder.extra.get("task_id") == task_id):
            if options.on_held == "wait":
                return "acquired" if lock.acquire(timeout=options.wait_timeout) else "held"
            if attempt == (0, 0) or options.on_held != "skip":
                return "held"
            # A retry or requeue is the way its message gets done: skipping it would lose
            # the run (a tick's retry would never complete). It waits, then retries.
            log.info(
                "%s[%s] is attempt %s of its message and finds %s held by %s; waiting up to %g s",
                self.name,
                task_id,
                attempt,
                lock.key,
                holder or "nobody (lock-delay)",
                options.wait_timeout,
            )
            return "acquired" if lock.acquire(timeout=options.wait_timeout) else "held"
        held = _attempt_of(holder.extra)
        alive = holder.alive()
        if held > attempt or (held == attempt and alive):
            log.info(
                "%s[%s] is a duplicate delivery: %s run of this message holds %s (%s)",
                self.name,
                task_id,
                "a later" if held > attempt else "the live",
                lock.key,
                holder,
            )
            return "duplicate"
        settings = lock.settings
        bound = 2 * settings.ttl + settings.lock_delay + 5
        if held < attempt:
            why = "its previous attempt still holds"
        elif alive is False:
            why = "its run died holding"
        else:
            why = "a run of this message on another host (or PID namespace) holds"
        log.info(
            "%s[%s]: %s %s; waiting up to %.0f s for the key (if that run finishes, this copy is skipped)",
            self.name,
            task_id,
            why,
            lock.key,
            bound,
        )
        return "acquired" if lock.acquire(timeout=bound) else "held"

    def _open_tick(self, lock: ConsulLock, settings: ConsulSettings, tick: Tick, beat: str | None) -> Mark | str:
        """Mark ``tick`` open before its body runs (a later retry or redelivery of it must
        run even if a later tick completes meanwhile), naming ``beat`` (the sending beat's
        name) as the beat whose entry it is. Returns the mark, or why the tick must not run."""
        client = shared_client(settings)
        opened = change_mark(  # writes nothing when the mark says the tick must not run
            client,
            settings,
            tick.entry,
            read_mark(client, settings, tick.entry),
            lambda m: None if m.covers(tick) else attributed(m.opened(tick, time.time()), beat),
            lock_key=lock.fence_key,
            session=lock.session_id or "",
        )
        if opened is None:
            raise LockLost(lock.key, f"lost before tick {tick} could start (its mark could not be updated)")
        return opened.verdict(tick) or opened

    def _not_acquired(
        self, lock: ConsulLock, options: LockOptions, tick: Tick | None, task_id: str | None, attempt: Attempt
    ) -> Any:
        """Skip, or retry: with ``on_held="retry"``, and for a retry or requeue of a message
        (``attempt`` above (0, 0)) under ``skip``, which would otherwise lose its run."""
        holder = lock.last_holder
        if options.on_held == "fail":
            log.info(
                "%s[%s]: %s is held by %s; failing (on_held=fail)", self.name, task_id, lock.key, holder or "nobody (lock-delay)"
            )
            raise LockHeld(lock.key, str(holder) if holder else None)
        if options.on_held == "retry" or (options.on_held == "skip" and attempt != (0, 0)):
            log.info(
                "%s[%s]: %s is held by %s; retrying in %g s",
                self.name,
                task_id,
                lock.key,
                holder or "nobody (lock-delay)",
                options.retry_countdown,
            )
            headers = retry_headers(tick, options_override(self.request))
            raise self.retry(
                countdown=options.retry_countdown, exc=LockHeld(lock.key, str(holder) if holder else None), headers=headers
            )
        return self._skip(lock.key, "held" if holder else "lock-delay", holder, tick, task_id)

    def _skip(
        self, key: str, reason: SkipReason, holder: LockHolder | None, tick: Tick | None, task_id: str | None, why: str = ""
    ) -> dict[str, Any]:
        """Log, signal and return the visible outcome of a run that did not run its body."""
        if reason == "stale-leader":
            log.warning("dropping %s[%s]: %s", self.name, task_id, why)
        elif reason in ("duplicate-tick", "cooldown"):
            log.info("skipping %s[%s]: %s", self.name, task_id, why)
        elif reason == "duplicate-delivery":
            log.info(
                "skipping %s[%s]: a duplicate delivery of a message whose run %s",
                self.name,
                task_id,
                f"is alive and holds {key}: {holder}" if holder else f"already finished under {key}",
            )
        elif holder is not None:
            log.info("skipping %s[%s]: %s is held by %s", self.name, task_id, key, holder)
        else:
            log.info("skipping %s[%s]: %s is free but inside its lock-delay", self.name, task_id, key)
        signals.send(signals.task_lock_skipped, self, key=key, reason=reason, holder=holder, task_id=task_id, tick=tick)
        return {
            "consul_lock": SKIPPED,
            "reason": reason,
            "key": key,
            "holder": str(holder) if holder else None,
            "holder_task_id": holder.extra.get("task_id") if holder else None,
            "tick": str(tick) if tick else None,
        }

    def _run_body(
        self, lock: ConsulLock, options: LockOptions, task_id: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        def lost(_lock: ConsulLock, reason: str) -> None:
            signals.send(signals.task_lock_lost, self, key=lock.key, reason=reason, task_id=task_id)

        lock.on_lost(lost)
        if not options.abort_on_lock_lost:
            return self.run(*args, **kwargs)
        try:
            with _AbortOnLoss(lock):
                return self.run(*args, **kwargs)
        except LockLostAbort as exc:
            if exc.key == lock.key:
                raise
            # Raised asynchronously as a bare class: give it the key and the reason.
            raise LockLostAbort(lock.key, lock.lost_reason or exc.reason) from None

    def _record_tick(
        self, lock: ConsulLock, settings: ConsulSettings, tick: Tick, mark: Mark, task_id: str | None, beat: str | None
    ) -> None:
        sid = lock.session_id
        extra = {"task_id": task_id}
        written = sid is not None and change_mark(
            shared_client(settings),
            settings,
            tick.entry,
            mark,
            lambda m: attributed(m.completed(tick, extra), beat),
            lock_key=lock.fence_key,
            session=sid,
        )
        if written:
            log.debug("tick %s recorded as completed", tick)
        else:
            log.error("tick %s ran but could not be recorded: the lock %s was lost meanwhile (it stays open)", tick, lock.key)


# The task attributes of the options, with the options' defaults: lock_key, lock_on_held, ...
for _option in fields(LockOptions):
    setattr(ConsulLockedTask, LockOptions.attribute(_option.name), _option.default)
del _option


class LockLostAbort(LockLost):
    """Raised inside a running body by ``abort_on_lock_lost`` when the lock is lost."""

    def __init__(self, key: str = "?", reason: str = "the lock was lost while the task ran") -> None:
        super().__init__(key, reason)


class _AbortOnLoss:
    """Raises LockLostAbort in the running body when the lock is lost.

    In a thread (prefork, threads, solo pools): an asynchronous exception, raised at the
    thread's next Python bytecode (a body blocked in C code sees it when that call returns).
    Under gevent, where ``threading.get_ident()`` names a greenlet, not a thread: thrown into
    the body's greenlet by its hub, at the body's next switch to gevent (a body that never
    yields sees it when it does, or when it returns: then ``held`` has been false since the
    loss, as ever)."""

    def __init__(self, lock: ConsulLock) -> None:
        self.lock = lock
        self.owner = native.owner()
        self.target: Any = sys.modules["gevent"].getcurrent() if self.owner is not None else threading.get_ident()
        self.mutex = native.lock()
        self.running = False
        self.sent = False

    def __enter__(self) -> None:
        self.running = True
        self.lock.on_lost(self._abort)
        if self.lock.lost.is_set() or self.lock.lost_reason is not None:
            raise LockLostAbort(self.lock.key, self.lock.lost_reason or "lost")

    def _abort(self, _lock: ConsulLock, reason: str) -> None:
        with self.mutex:
            if not self.running or self.sent:
                return
            self.sent = True
        exc = LockLostAbort(self.lock.key, reason)
        if self.owner is not None:
            self.owner.throw(self.target, exc, lambda: self.running)
        else:
            _set_async_exc(self.target, LockLostAbort, self.lock.key)

    def __exit__(self, *exc: object) -> None:
        with self.mutex:
            self.running = False
            sent = self.sent
        if sent and self.owner is None:  # clear an abort that has not fired yet
            _set_async_exc(self.target, None, self.lock.key)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None, key: str) -> None:
    """Raise ``exc`` (None: cancel a pending one) in the thread ``thread_id``; loud if that
    did not reach exactly one thread."""
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)
    if hit == 1 or exc is None:  # a cancel only fails for a thread that has ended: nothing to undo
        return
    if hit > 1:  # never leave an exception pending in threads that are not the body's
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
    log.error(
        "abort_on_lock_lost for %s: raising %s in thread %#x reached %d threads instead of 1; the body is NOT aborted "
        "(its lock is still lost: held is false and check_lock() raises)",
        key,
        exc.__name__ if exc else "nothing",
        thread_id,
        hit,
    )


def eager_mode(conf: Any) -> EagerMode:
    """``consul_lock_eager`` from a Celery app's ``conf`` (:data:`EAGER_SETTINGS`); a value
    other than ``"bypass"`` or ``"consul"`` raises InvalidSetting naming the setting."""
    mode: EagerMode = read_celery(conf, EAGER_SETTINGS)["eager"]
    return mode


class _Headers:
    """A send's headers as a request, to read the per-call lock options at send time."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers


#: A request without headers: the task's own options, with no per-call override.
_NO_REQUEST = object()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _check_key_template(template: str, signature: inspect.Signature, setting: str) -> None:
    """Raise InvalidSetting unless every field of ``template`` can be filled by a call that
    matches ``signature``, the way lock_key_for fills it (``str.format(*args, **arguments by
    name, task=task)``)."""
    try:
        fields_ = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InvalidSetting(setting, template, f"not a valid key template: {exc}") from None
    params = signature.parameters
    names = set(params) | {"task"}
    listed = ", ".join(params) or "none"
    positional = sum(p.kind in _POSITIONAL for p in params.values())
    any_index = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())
    auto = 0
    for field in fields_:
        head = re.match(r"[^.\[]*", field).group()  # type: ignore[union-attr]
        if head and not head.isdigit():
            if head not in names:
                raise InvalidSetting(
                    setting, template, f"names {{{head}}}, which is not a parameter of the task's body ({listed}) nor 'task'"
                )
            continue
        index = int(head) if head else auto
        auto += not head
        if index >= positional and not any_index:
            raise InvalidSetting(
                setting, template, f"uses positional argument {index}, but the task's body takes {positional} ({listed})"
            )


def _arguments(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults included (for key templates)."""
    try:
        bound = _signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@functools.lru_cache(maxsize=1024)
def _signature(func: Callable[..., Any]) -> inspect.Signature:
    """A task body's signature, computed once (``inspect.signature`` costs about 0.1 ms, as
    much as the rest of a lock's bookkeeping; bound methods of one task compare equal)."""
    return inspect.signature(func)


def _delivery_finished(previous: Mapping[str, Any] | None, task_id: str | None, attempt: Attempt) -> bool:
    """True if the key's value before our acquire shows that a run of this same message
    (this attempt, or a later one) finished and released the key: we are a copy that
    arrived after it, and must not run the body again."""
    return bool(
        task_id
        and previous
        and "released_at" in previous
        and previous.get("task_id") == task_id
        and _attempt_of(previous) >= attempt
    )


def _same_message(holders: tuple[LockHolder, ...], task_id: str | None) -> LockHolder | None:
    """The holder among ``holders`` that is a run of the message ``task_id``, if any."""
    return next((h for h in holders if task_id and h.extra.get("task_id") == task_id), None)


def _cooling_down(previous: Mapping[str, Any] | None, cooldown: float) -> str | None:
    """Why a run must be skipped for the cooldown: the key's value before our acquire shows
    a run that finished (``released_at``) less than ``cooldown`` seconds ago."""
    if not cooldown or not previous or not isinstance(previous.get("released_at"), str):
        return None
    try:
        ended = datetime.fromisoformat(previous["released_at"]).timestamp()
    except ValueError:
        return None
    left = ended + cooldown - time.time()
    if left <= 0:
        return None
    return f"the last run ended at {previous['released_at']}; the cooldown of {cooldown:g} s has {left:.1f} s left"


def _attempt(request: Any) -> Attempt:
    """Which attempt of its message a run is: (Celery's retries, our requeues)."""
    count, _ = requeues(header_value(request, REQUEUE_HEADER))
    return _attempt_of({"retries": getattr(request, "retries", 0), "requeues": count})


def _attempt_of(data: Mapping[str, Any]) -> Attempt:
    """The attempt a lock value (or the like) names; absent counts are 0."""
    retries, requeues = data.get("retries") or 0, data.get("requeues") or 0
    return (retries if isinstance(retries, int) else 0, requeues if isinstance(requeues, int) else 0)


def _close_sessions_on_shutdown(**_: Any) -> None:
    # Pool processes end through os._exit, which skips atexit: end our sessions here.
    close_sessions()


worker_process_shutdown.connect(_close_sessions_on_shutdown, weak=False)
worker_shutdown.connect(_close_sessions_on_shutdown, weak=False)
