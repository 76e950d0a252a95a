"""``celery-consul-lock run``: the cron job on every node, run once per schedule slot.

    celery-consul-lock run --key locks/backup --cron "0 3 * * *" -- /usr/local/bin/backup --full

Put the same line in every node's crontab. Each invocation decides which slot of the
schedule it belongs to (the slot's due time, :func:`slot_of`), takes the lock, skips the slot
if it already ran to completion (its tick mark, :mod:`.ticks`), runs the command with the
lock held and renewed, records the slot as completed only if the command exits 0, and
releases. The lock is the ``consul lock`` key (``PREFIX/.lock``) and the slot's mark is the
one a :class:`~celery_consul_lock.ConsulLockedTask` uses for the same entry, so
``consul lock``, a curl script, a Celery task and this wrapper on one key exclude each
other, and the task and the wrapper agree on which slots ran.

Guarantee: while Consul works, a slot's command runs to a successful end at most once, on
one node at a time; a node that fires late, after another finished the slot, skips it.

Limit: the lock is a lease. The command is stopped (SIGTERM, then SIGKILL after
:data:`DEFAULT_KILL_GRACE`) as soon as the wrapper sees the lock lost, which is before
Consul can hand it on only if the command dies within the lock-delay. A command that does
side effects which must never happen twice passes ``CELERY_CONSUL_LOCK_FENCING_TOKEN`` to
the resource. If this wrapper is SIGKILLed, the kernel sends the command SIGTERM
(``PR_SET_PDEATHSIG``, Linux), but not the command's own children.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, NoReturn

from croniter import CroniterError, croniter
from dateutil.tz import tzlocal

from .consul import ConsulClient, shared_client
from .errors import ConsulLockError, ConsulUnavailable, InvalidSetting, LockConflict, name_settings
from .lock import ConsulLock
from .protocol import Tick
from .session import LockSession
from .settings import ConsulSettings, parse_seconds, validate_key
from .ticks import RUNNER_FIELD, Mark, change_mark, key_part, read_mark

__all__ = [
    "EXIT_BAD_ARGUMENTS",
    "EXIT_LOCK_LOST",
    "EXIT_SKIPPED",
    "EXIT_UNAVAILABLE",
    "CronSchedule",
    "EverySchedule",
    "RunOptions",
    "Schedule",
    "Slot",
    "main",
    "parse_args",
    "slot_of",
]

log = logging.getLogger("celery_consul_lock.cron")

PROG = "celery-consul-lock run"

# -- exit statuses ---------------------------------------------------------------------------
# The wrapper's own statuses come from sysexits.h where one fits, so that they rarely collide
# with a command's own failure status (which is passed through: 1, 2, 128 + N for signal N).

#: Bad arguments: nothing was taken (EX_USAGE).
EXIT_BAD_ARGUMENTS = 64
#: Consul could not be reached or refused a request (EX_UNAVAILABLE); the slot did not run, or
#: ran but could not be recorded (the stderr line says which).
EXIT_UNAVAILABLE = 69
#: The lock was lost while the command ran: it was stopped, or it ended but the slot could not
#: be recorded (EX_TEMPFAIL: a later invocation for the slot runs it again).
EXIT_LOCK_LOST = 75
#: Skipped: another holder has the lock, it is in its lock-delay, or the slot already ran to
#: completion. Just past sysexits' range; ``--skip-ok`` makes skips exit 0.
EXIT_SKIPPED = 79
#: The command cannot be found or run, as a shell says it (nothing was taken).
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126

# -- defaults ----------------------------------------------------------------------------------

#: An invocation this long before a due time belongs to that slot, not to the previous one:
#: nodes whose clocks are behind, or a scheduler on another clock, start a little early.
#: NTP keeps clocks within milliseconds; 10 s covers a node without it for a while. Never
#: more than a quarter of the gap before the due time (EARLY_SHARE_MAX), because lateness
#: is the common case and gets the rest: a slow node, a loaded host (the wrapper reads its
#: clock after starting up, which takes seconds there), a retry by hand.
DEFAULT_TOLERANCE = 10.0
#: The largest share of the gap between two due times that may count as early.
EARLY_SHARE_MAX = 0.25
#: Between SIGTERM and SIGKILL when the command must stop because the lock was lost. Below
#: the default lock-delay (15 s), so the command is gone before the next holder may start.
DEFAULT_KILL_GRACE = 5.0
#: The health check the wrapper's session is tied to is passed at every renewal; it goes
#: critical this many renewal intervals after the last pass (a SIGKILLed wrapper's lock frees
#: within that plus the lock-delay, instead of 2 x TTL plus the lock-delay).
CHECK_TTL_RENEWALS = 3
#: ... and never sooner than this.
CHECK_TTL_MIN = 2.0
#: How often the wrapper looks at the command and the lock while the command runs.
POLL = 0.05
#: Where the fake clock for tests and demos comes from: the ISO 8601 time the wrapper's
#: clock reads when it starts (it advances from there in real time).
NOW_ENV = "CELERY_CONSUL_LOCK_RUN_NOW"

#: What the command finds in its environment.
ENV_KEY = "CELERY_CONSUL_LOCK_KEY"
ENV_SLOT = "CELERY_CONSUL_LOCK_SLOT"
ENV_DUE = "CELERY_CONSUL_LOCK_DUE"
ENV_FENCING_TOKEN = "CELERY_CONSUL_LOCK_FENCING_TOKEN"
ENV_SESSION = "CELERY_CONSUL_LOCK_SESSION"

OnHeld = Literal["skip", "wait"]

# -- schedules and slots -------------------------------------------------------------------------


class Schedule:
    """When a job is due: :meth:`next` is the first due time strictly after ``when``. Due
    times are in UTC, so that arithmetic on them is in real seconds also across daylight
    saving time changes (Python subtracts two times of one zone by their wall clocks)."""

    def next(self, when: datetime) -> datetime:
        raise NotImplementedError

    def previous(self, due: datetime) -> datetime:
        """The latest due time strictly before the due time ``due``."""
        raise NotImplementedError


@dataclass(frozen=True)
class CronSchedule(Schedule):
    """A five-field crontab expression read by croniter as Vixie cron fires it (day of month
    OR day of week when both are restricted), in ``tz`` (default: the local zone, as cron).
    cron's nicknames are taken too (``@hourly``, ``@daily`` = ``@midnight``, ``@weekly``,
    ``@monthly``, ``@yearly`` = ``@annually``), but not ``@reboot``, which has no slots.

    Raises InvalidSetting naming ``--cron`` and why: the number of fields when it is not five
    (croniter would read a sixth as seconds, cron does not), else the field croniter refuses
    and croniter's reason."""

    expression: str
    tz: Any = None

    def __post_init__(self) -> None:
        problem = _cron_problem(self.expression)
        if problem is not None:
            raise InvalidSetting("--cron", self.expression, problem)
        if self.tz is None:
            object.__setattr__(self, "tz", tzlocal())

    def next(self, when: datetime) -> datetime:
        due: datetime = croniter(self.expression, when.astimezone(self.tz)).get_next(datetime)
        return due.astimezone(timezone.utc)

    def previous(self, due: datetime) -> datetime:
        before: datetime = croniter(self.expression, due.astimezone(self.tz)).get_prev(datetime)
        return before.astimezone(timezone.utc)


_CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day of week", "0-7 or SUN-SAT"),
)
_CRON_FORM = 'five crontab fields "MIN HOUR DOM MON DOW", e.g. "0 3 * * *", or a nickname such as @daily'


def _cron_problem(expression: str) -> str | None:
    """Why cron would not take ``expression`` (None: it would); see :class:`CronSchedule`."""
    fields = expression.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        if fields[0].lower() != "@reboot" and croniter.is_valid(fields[0]):
            return None
        why = "has no slots to run once in" if fields[0].lower() == "@reboot" else "is not a cron nickname"
        return f"{fields[0]} {why}; expected {_CRON_FORM}"
    if len(fields) != 5:
        return f"{len(fields)} field{'s' if len(fields) != 1 else ''} given; expected {_CRON_FORM}"
    try:
        croniter(expression)
    except (CroniterError, ValueError, KeyError) as exc:
        reason = str(exc) or type(exc).__name__
        for i, (name, values) in enumerate(_CRON_FIELDS):
            alone = " ".join(field if j == i else "*" for j, field in enumerate(fields))
            if not croniter.is_valid(alone):
                return f"the {name} field {fields[i]!r} is not acceptable (values {values}); croniter: {reason}"
        return f"croniter: {reason}"
    return None


@dataclass(frozen=True)
class EverySchedule(Schedule):
    """Every ``seconds``, aligned on the Unix epoch (``--every 300``: :00, :05, :10 ... UTC),
    so that nodes agree on the due times without sharing any state."""

    seconds: float

    def __post_init__(self) -> None:
        if not 1 <= self.seconds <= 366 * 86400:
            raise InvalidSetting("--every", self.seconds, "expected seconds between slots, from 1 to 31622400 (a year)")

    def next(self, when: datetime) -> datetime:
        n = when.timestamp() // self.seconds + 1
        return datetime.fromtimestamp(n * self.seconds, timezone.utc)

    def previous(self, due: datetime) -> datetime:
        return due - timedelta(seconds=self.seconds)


@dataclass(frozen=True)
class Slot:
    """The slot an invocation belongs to: its due time, and when its window ends (the next
    slot's window starts: its due time less the early tolerance)."""

    due: datetime
    window_end: datetime
    #: Seconds before ``due`` the invocation started (0 when on time or late).
    early: float


def slot_of(schedule: Schedule, now: datetime, tolerance: float = DEFAULT_TOLERANCE) -> Slot:
    """The slot an invocation at ``now`` belongs to.

    Due times d0 < d1 < d2 ...: the window of slot d1 is [d1 - e1, d2 - e2), where e is the
    early tolerance, min(``tolerance``, a quarter of the gap before that due time). So an
    invocation up to ``tolerance`` early (a clock behind the others) and one started any
    time later, up to the next window (a slow or late node, a retry by hand), agree on d1."""
    upcoming = schedule.next(now)
    current = schedule.previous(upcoming)
    after = schedule.next(upcoming)

    def early(due: datetime, before: datetime) -> float:
        return min(tolerance, (due - before).total_seconds() * EARLY_SHARE_MAX)

    ahead = (upcoming - now).total_seconds()
    if ahead <= early(upcoming, current):
        return Slot(upcoming, after - timedelta(seconds=early(after, upcoming)), ahead)
    return Slot(current, upcoming - timedelta(seconds=early(upcoming, current)), 0.0)


def now_from_env(env: Mapping[str, str] | None = None) -> Callable[[], datetime]:
    """The wrapper's clock: the real one, or the fake one :data:`NOW_ENV` sets."""
    fake = (os.environ if env is None else env).get(NOW_ENV)
    if not fake:
        return lambda: datetime.now(timezone.utc)
    try:
        start = datetime.fromisoformat(fake.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidSetting(NOW_ENV, fake, "expected an ISO 8601 time, e.g. 2026-11-30T03:00:00Z") from None
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    offset = start.timestamp() - time.time()
    return lambda: datetime.fromtimestamp(time.time() + offset, timezone.utc)


# -- arguments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """``run``'s arguments, validated (see :func:`parse_args`)."""

    key: str
    entry: str
    schedule: Schedule
    command: tuple[str, ...]
    on_held: OnHeld
    wait_timeout: float | None
    settings: ConsulSettings
    tolerance: float
    kill_grace: float
    skip_ok: bool
    quiet: bool


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run CMD once per schedule slot across the cluster, under a Consul lock. "
        "Consul's address and token come from CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN and the other CONSUL_HTTP_* variables.",
        epilog=f"exit statuses: 0 ran and succeeded; {EXIT_SKIPPED} skipped (0 with --skip-ok); the command's own "
        f"failure status; {EXIT_LOCK_LOST} lock lost; {EXIT_UNAVAILABLE} Consul unavailable; {EXIT_BAD_ARGUMENTS} bad "
        f"arguments; {EXIT_NOT_EXECUTABLE}/{EXIT_NOT_FOUND} the command cannot be run.",
    )
    p.add_argument("--key", help="lock prefix as `consul lock` takes it (the lock is KEY/.lock); default locks/<command name>")
    p.add_argument(
        "--entry",
        help="name the slot's tick mark is kept under (a Celery beat entry's name to share slots with a "
        "ConsulLockedTask); default: KEY without 'locks/' and '/.lock'",
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron", metavar='"MIN HOUR DOM MON DOW"', help="crontab schedule, in the local time zone as cron reads it"
    )
    when.add_argument("--every", metavar="SECONDS", help="a slot every SECONDS, aligned on the Unix epoch")
    p.add_argument(
        "--on-held",
        choices=("skip", "wait"),
        default="skip",
        help="when another node holds the lock: skip (default), or wait for it and then run the slot unless it completed",
    )
    p.add_argument("--wait-timeout", metavar="S", help="longest wait with --on-held wait (default: until the slot's window ends)")
    p.add_argument("--ttl", metavar="S", help="session TTL (Consul: 10 s to 24 h; default 15)")
    p.add_argument("--lock-delay", metavar="S", help="session lock-delay (0 to 60 s; default 15)")
    p.add_argument(
        "--key-prefix", metavar="P", help="prefix before KEY and the tick marks (a Celery app's consul_lock_key_prefix)"
    )
    p.add_argument(
        "--tolerance",
        metavar="S",
        default=DEFAULT_TOLERANCE,
        help=f"how early an invocation may start and still belong to the coming slot (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--kill-grace",
        metavar="S",
        default=DEFAULT_KILL_GRACE,
        help=f"SIGTERM to SIGKILL when the lock is lost mid-run (default {DEFAULT_KILL_GRACE:g})",
    )
    p.add_argument("--skip-ok", action="store_true", help=f"exit 0 instead of {EXIT_SKIPPED} when skipping")
    p.add_argument("--quiet", action="store_true", help="print nothing when skipping (cron mails any output)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log the library's messages too (-vv: debug)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return p


class _BadArguments(Exception):
    """Arguments refused: the message, and the status to exit with."""

    def __init__(self, message: str, status: int = EXIT_BAD_ARGUMENTS) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[RunOptions, int]:
    """Validate ``run``'s arguments (after ``run``); returns the options and the verbosity.
    Raises _BadArguments with a message naming the option and the value."""
    parser = _parser()
    parser.error = _refuse  # type: ignore[method-assign]
    args = parser.parse_args(list(argv))
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or not command[0]:
        raise _BadArguments("no command given: put it after --, e.g. `... -- /usr/local/bin/backup --full`")
    executable = shutil.which(command[0])
    if executable is None:
        status = EXIT_NOT_EXECUTABLE if os.path.exists(command[0]) else EXIT_NOT_FOUND
        why = "is not executable" if status == EXIT_NOT_EXECUTABLE else "is not found (not a file, nor on PATH)"
        raise _BadArguments(f"command {command[0]!r} {why}", status)
    try:
        schedule: Schedule = CronSchedule(args.cron) if args.cron is not None else _every(args.every)
        given = {"ttl": args.ttl, "lock_delay": args.lock_delay, "key_prefix": args.key_prefix}
        settings = ConsulSettings.resolve(given, names="--{}", env=os.environ if env is None else env)
        name_settings(address="CONSUL_HTTP_ADDR", token="CONSUL_HTTP_TOKEN")  # no Celery settings here
        key = _lock_key(args.key, command[0])
        settings.full_key(key)
        entry = args.entry if args.entry is not None else _entry_of(key)
        if not entry:
            raise InvalidSetting("--entry", entry, "must not be empty")
        options = RunOptions(
            key=key,
            entry=entry,
            schedule=schedule,
            command=tuple(command),
            on_held=args.on_held,
            wait_timeout=None if args.wait_timeout is None else parse_seconds("--wait-timeout", args.wait_timeout),
            settings=settings,
            tolerance=parse_seconds("--tolerance", args.tolerance),
            kill_grace=parse_seconds("--kill-grace", args.kill_grace),
            skip_ok=args.skip_ok,
            quiet=args.quiet,
        )
    except InvalidSetting as exc:
        raise _BadArguments(str(exc).replace("--lock_delay", "--lock-delay").replace("--key_prefix", "--key-prefix")) from None
    return options, args.verbose


def _every(text: str) -> EverySchedule:
    """``--every``'s schedule; a refusal quotes the value as typed (``--every='0'``)."""
    try:
        return EverySchedule(parse_seconds("--every", text))
    except InvalidSetting as exc:
        raise InvalidSetting("--every", text, exc.reason) from None


def _refuse(message: str) -> NoReturn:
    raise _BadArguments(message)


def _lock_key(given: str | None, command: str) -> str:
    """The lock key: ``KEY/.lock`` as ``consul lock KEY`` takes it (a KEY that already ends in
    ``/.lock`` is used as it is); by default ``locks/<command's file name>/.lock``."""
    if given is None:
        given = "locks/" + key_part(os.path.basename(command.rstrip("/")) or command)
    validate_key(given, "--key")
    return given if given.endswith("/.lock") else given + "/.lock"


def _entry_of(key: str) -> str:
    """``locks/backup/.lock`` -> ``backup``: the job's name in the key."""
    name = key[: -len("/.lock")]
    return name[len("locks/") :] if name.startswith("locks/") else name


# -- the run ---------------------------------------------------------------------------------------


class _Interrupted(BaseException):
    """SIGTERM or SIGINT before the command started: give up what was taken and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _HealthCheck:
    """A TTL health check on the local agent that the wrapper's session is tied to, passed
    before each renewal: a SIGKILLed wrapper stops passing it, and Consul ends the session
    when it goes critical (the agent deregisters it a minute later)."""

    def __init__(self, entry: str) -> None:
        self.service_id = f"celery-consul-lock-run-{key_part(entry)}-{uuid.uuid4().hex[:12]}"
        self.check_id = f"service:{self.service_id}"
        self.ttl = CHECK_TTL_MIN
        self.registered = False

    def heartbeat(self, client: ConsulClient) -> None:
        if not self.registered:
            client.agent_register_ttl_service(self.service_id, "celery-consul-lock-run", check_ttl=self.ttl)
            self.registered = True
        client.agent_check_pass(self.check_id)

    def remove(self, client: ConsulClient) -> None:
        if self.registered:
            try:
                client.agent_deregister_service(self.service_id)
            except ConsulLockError as exc:
                log.warning("could not deregister %s (the agent removes it a minute after it fails): %s", self.service_id, exc)


class Run:
    """One invocation: decide the slot, take the lock, run the command, record, release."""

    def __init__(self, options: RunOptions, now: Callable[[], datetime]) -> None:
        self.options = options
        self.started = now()
        self.slot = slot_of(options.schedule, self.started, options.tolerance)
        self.tick = Tick.of(options.entry, self.slot.due)
        self.check = _HealthCheck(options.entry)
        base = options.settings
        self.settings = base.replace(session_checks=(*base.session_checks, self.check.check_id))
        host = socket.gethostname()
        self.session = LockSession(
            self.settings, name=f"{PROG} {options.entry} {host} pid {os.getpid()}", heartbeat=self.check.heartbeat
        )
        self.check.ttl = max(CHECK_TTL_MIN, CHECK_TTL_RENEWALS * self.session.interval)
        self.lock = ConsulLock(
            options.key,
            settings=self.settings,
            session=self.session,
            name=f"{PROG} {options.entry}",
            value={"slot": str(self.tick), "command": os.path.basename(options.command[0])},
        )
        #: The command's process, once started; whether we stopped it because the lock was lost.
        self.child: subprocess.Popen[bytes] | None = None
        self.child_stopped = False
        #: The slot's mark as our _open read or wrote it.
        self.mark = Mark(None, 0, {})
        #: Signals received (SIGTERM, SIGINT), in order.
        self.signals: list[int] = []

    # -- output -------------------------------------------------------------------------

    def say(self, decision: str, holder: object, *, skip: bool = False) -> None:
        """The one stderr line of a decision, naming the key, the slot and the holder."""
        if skip and self.options.quiet:
            return
        print(f"{PROG}: key {self.lock.key}, slot {self.tick}: {decision}; holder: {holder}", file=sys.stderr, flush=True)

    def me(self) -> str:
        return f"this process ({socket.gethostname()} pid {os.getpid()}, fencing token {self.lock.fencing_token})"

    # -- the phases -------------------------------------------------------------------------

    def __call__(self) -> int:
        self._trap(self._interrupt)
        try:
            try:
                return self._locked()
            finally:
                self._trap(self._note)
                self._end()
        except _LostBeforeStart as exc:
            self.say(f"lock lost: {exc}; nothing ran", "-")
            return EXIT_LOCK_LOST
        except _Interrupted as exc:
            self.say(f"interrupted by {signal.Signals(exc.signum).name} before the command started; nothing ran", "-")
            return 128 + exc.signum
        except LockConflict as exc:
            self.say(f"refused: {exc}", "-")
            return EXIT_BAD_ARGUMENTS
        except ConsulUnavailable as exc:  # the wrapper takes the address from the environment only
            self.say(f"Consul unavailable: {exc.message('CONSUL_HTTP_ADDR')}", "unknown")
            return EXIT_UNAVAILABLE
        except ConsulLockError as exc:
            self.say(f"Consul unavailable: {exc}", "unknown")
            return EXIT_UNAVAILABLE

    def _locked(self) -> int:
        if not self._acquire():
            holder = self.lock.last_holder
            if holder is None:
                return self._skip("skipped: the key is in its lock-delay (its last holder's session ended)", "none")
            return self._skip("skipped: held by another holder", holder)
        opened = self._open()
        if isinstance(opened, str):
            return self._skip(f"skipped: {opened}", self._completed_by())
        early = f" ({self.slot.early:.1f} s before the slot's due time, within the tolerance)" if self.slot.early else ""
        self.say(f"running the command{early}", self.me())
        status = self._run_command()
        if self.child is None:  # it could not be started, and said so
            return status
        if self.lock.lost.is_set() or not self.lock.held:
            if self.child_stopped:
                return EXIT_LOCK_LOST
            if status == 0:
                self.say(f"the command succeeded but the lock was lost ({self.lock.lost_reason}); slot not recorded", self.me())
                return EXIT_LOCK_LOST
        if status != 0:
            passed = "".join(f" after {signal.Signals(s).name} was passed on to it" for s in self.signals[:1])
            self.say(
                f"the command failed with status {status}{passed}; slot not recorded (a later invocation runs it)", self.me()
            )
            return status
        if self._record(opened) is None:
            self.say(f"the command succeeded but the lock was lost ({self.lock.lost_reason}); slot not recorded", self.me())
            return EXIT_LOCK_LOST
        self.say("the command succeeded; slot recorded as completed", self.me())
        return 0

    def _acquire(self) -> bool:
        if self.options.on_held == "skip":
            return self.lock.acquire(blocking=False)
        timeout = self.options.wait_timeout
        if timeout is None:
            timeout = max(0.0, (self.slot.window_end - self.started).total_seconds())
        if self.lock.acquire(blocking=False):
            return True
        self.say(f"waiting up to {timeout:.1f} s for the lock", self.lock.last_holder or "none (lock-delay)", skip=True)
        return self.lock.acquire(timeout=timeout)

    def _open(self) -> Mark | str:
        """Mark the slot open (see :meth:`.ticks.Mark.opened`); returns the mark, or why the
        slot must not run."""
        client = shared_client(self.settings)
        entry, tick = self.options.entry, self.tick

        def open_slot(m: Mark) -> dict[str, Any] | None:
            data = None if m.covers(tick) else m.opened(tick, time.time())
            # Named as ours (no beat's sweep removes it); a completer named before stays.
            return None if data is None else {RUNNER_FIELD: self._runner, **data}

        opened = change_mark(
            client,
            self.settings,
            entry,
            read_mark(client, self.settings, entry),
            open_slot,
            lock_key=self.lock.key,
            session=self.lock.session_id or "",
        )
        if opened is None:
            raise _LostBeforeStart(self.lock.lost_reason or "its session no longer holds the key")
        self.mark = opened
        return opened.verdict(tick) or opened

    @property
    def _runner(self) -> str:
        """How this wrapper names itself in the marks it writes."""
        return f"{PROG} on {socket.gethostname()} pid {os.getpid()}"

    def _completed_by(self) -> str:
        """Who completed the entry's latest completed slot, as far as its mark says."""
        data = self.mark.data
        who = f"Celery task {data['task_id']}" if data.get("task_id") else str(data.get("runner") or "unknown")
        due = data.get("due")
        return who if due == str(self.tick).rpartition("@")[2] else f"{who} (for the latest completed slot, {due})"

    def _record(self, mark: Mark) -> Mark | None:
        extra = {"task_id": None, RUNNER_FIELD: self._runner}
        return change_mark(
            shared_client(self.settings),
            self.settings,
            self.options.entry,
            mark,
            lambda m: m.completed(self.tick, extra),
            lock_key=self.lock.key,
            session=self.lock.session_id or "",
        )

    def _skip(self, decision: str, holder: object) -> int:
        self.say(decision, holder, skip=True)
        return 0 if self.options.skip_ok else EXIT_SKIPPED

    # -- the command -------------------------------------------------------------------------

    def _run_command(self) -> int:
        env = dict(os.environ)
        env.update(
            {
                ENV_KEY: self.lock.key,
                ENV_SLOT: str(self.tick),
                ENV_DUE: str(self.tick).rpartition("@")[2],
                ENV_FENCING_TOKEN: str(self.lock.fencing_token),
                ENV_SESSION: self.lock.session_id or "",
            }
        )
        pdeathsig = _pdeathsig_setter()
        parent = os.getpid()

        # Runs in the child between fork and exec, while the parent has threads (the session's
        # renewer, the lock's watcher): only system calls, the prctl function resolved above.
        def child_setup() -> None:
            os.setpgid(0, 0)  # its own group: a terminal's ^C reaches it through us only, once
            pdeathsig()
            if os.getppid() != parent:  # the wrapper died before the line above
                os._exit(EXIT_LOCK_LOST)

        lost = self.lock.lost
        self._trap(self._forward)
        try:
            self.child = child = subprocess.Popen(self.options.command, env=env, preexec_fn=child_setup)
        except OSError as exc:  # removed or made unrunnable since the arguments were checked
            self._trap(self._note)
            status = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_NOT_EXECUTABLE
            self.say(f"the command could not be started: {exc.strerror}", self.me())
            return status
        while True:
            try:
                status = child.wait(POLL)
                break
            except subprocess.TimeoutExpired:
                pass
            if lost.is_set() or not self.lock.held:
                return self._stop(child)
        self._trap(self._note)
        return status if status >= 0 else 128 - status

    def _stop(self, child: subprocess.Popen[bytes]) -> int:
        """The lock is lost: SIGTERM the command's process group, SIGKILL after the grace."""
        self.child_stopped = True
        reason = self.lock.lost_reason or "the session's fencing deadline passed"
        grace = self.options.kill_grace
        self.say(f"lock lost ({reason}); stopping the command: SIGTERM, SIGKILL after {grace:g} s", self.me())
        _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            status = child.wait(grace)
        except subprocess.TimeoutExpired:
            status = None
        # The group's other processes (a script's children) get the same grace.
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(POLL)
        _signal_group(child, signal.SIGKILL)
        if status is None:
            status = child.wait()
        self._trap(self._note)
        return status if status >= 0 else 128 - status

    # -- signals -------------------------------------------------------------------------------

    @staticmethod
    def _trap(handler: Callable[[int, Any], None]) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)

    def _interrupt(self, signum: int, _frame: Any) -> None:
        raise _Interrupted(signum)

    def _forward(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)
        if self.child is not None:
            _signal_group(self.child, signum)

    def _note(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)  # finishing: release first, then exit

    def _end(self) -> None:
        """Release the lock (no lock-delay for the next holder), destroy the session, remove
        the health check; each step logs rather than raises."""
        client = shared_client(self.settings)
        self.lock.release()
        self.session.destroy(client)
        self.check.remove(client)


class _LostBeforeStart(ConsulLockError):
    """The lock was lost between its acquisition and the slot's mark."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"the lock was lost before the command started: {self.reason}"


def _signal_group(child: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the command's process group (it leads it), or the command if it has none yet."""
    try:
        os.killpg(child.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        child.send_signal(signum)


def _group_alive(pgid: int) -> bool:
    """True while the process group ``pgid`` has a process (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pdeathsig_setter() -> Callable[[], None]:
    """A function for the child (between fork and exec, so resolved here first) asking the
    kernel to SIGTERM it when the wrapper dies; does nothing where there is no prctl."""
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


# -- entry point ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``celery-consul-lock run [options] -- CMD [ARGS...]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        _parser().print_help()
        return 0
    if argv[:1] != ["run"]:
        print(f"usage: {PROG} [options] -- CMD [ARGS...]   ({PROG} --help for the options)", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    try:
        options, verbose = parse_args(argv[1:])
        now = now_from_env()
        run = Run(options, now)
    except _BadArguments as exc:
        print(f"{PROG}: refused, nothing taken: {exc.message}", file=sys.stderr)
        return exc.status
    except InvalidSetting as exc:
        print(f"{PROG}: refused, nothing taken: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROG}: %(name)s: %(message)s")
    status = run()
    if status == 0 or (status == EXIT_SKIPPED and options.skip_ok):
        return 0
    return status


if __name__ == "__main__":  # python -m celery_consul_lock.cron run ...
    sys.exit(main())
