"""The runtime schedule: periodic entries kept in Consul KV beside a beat's state, edited from
Python (:class:`RuntimeSchedule`) or ``celery consul-lock schedule``, taken up by the leader
within about a second, without restarting any beat.

Layout, under ``<key_prefix>celery-consul-lock/beat/<beat name>/schedule/`` (the folder the
leader watches with one blocking query):

- ``entries/<entry>``: one entry as JSON (:meth:`EntryDefinition.to_json`). A *runtime* entry
  holds its whole definition; a *config* entry (one of ``beat_schedule``) may only have an
  override here, ``{"name": ..., "source": "config", "enabled": false}``, written by
  ``disable`` and deleted by ``enable``.
- ``paused``: present while every beat of this name must send nothing (``pause``/``resume``).
- ``run/<entry>.<id>``: a request for one extra run ("run now"), deleted by the leader once sent.

Rules: ``beat_schedule`` stays the static source. A runtime write may disable, enable or run a
config entry, never change or remove it; a runtime entry cannot be created under a config
entry's name. If a deploy later adds a config entry with a runtime entry's name, the config
entry wins and the beat logs that the runtime one is shadowed.

Every write is a check-and-set on the key's ModifyIndex: :meth:`RuntimeSchedule.save` of an
entry read earlier fails with :class:`EntryConflict` if anyone changed it since, so two
operators cannot lose each other's update. Every field is validated before anything is written
(:class:`InvalidEntry` names the field and the value).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo

from celery.exceptions import ImproperlyConfigured
from celery.schedules import BaseSchedule, crontab, solar
from celery.schedules import schedule as interval_schedule

from .backoff import Backoff
from .consul import ConsulClient, KVEntry, shared_client
from .election import BeatConfig
from .errors import ConsulLockError, EntryConflict, EntryNotFound, InvalidEntry
from .protocol import Tick
from .settings import ConsulSettings, validate_key
from .ticks import key_part

__all__ = [
    "EntryDefinition",
    "RuntimeSchedule",
    "ScheduleSnapshot",
    "ScheduleWatch",
    "once",
    "schedule_from_json",
    "schedule_to_json",
]

log = logging.getLogger("celery_consul_lock.entries")

#: Names a runtime entry may have: one KV key segment as it is (no escaping), so the key, the
#: tick id and the command line all show the same name.
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
#: Options a runtime entry may carry (passed to ``apply_async``); others are refused rather
#: than silently ignored.
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "queue": (str,),
    "routing_key": (str,),
    "exchange": (str,),
    "priority": (int,),
    "expires": (int, float),
}
#: Longest single wait of the watch's blocking query: long enough to cost nothing while
#: nothing changes, short enough that a stopping beat is not held up for long.
WATCH_WAIT = 30.0
#: The least time between two answers of the watch, so a prefix that changes all the time
#: (or an agent that answers at once) cannot make it spin.
WATCH_MIN_INTERVAL = 0.05
#: Backoff bounds of the watch while Consul cannot be reached.
WATCH_BACKOFF_MIN, WATCH_BACKOFF_MAX = 0.5, 15.0
#: Check-and-set attempts of one enable/disable (a read-modify-write that re-reads on a race).
CAS_TRIES = 5

Source = Literal["config", "runtime"]


# -- schedules --------------------------------------------------------------------------------


class once(BaseSchedule):  # type: ignore[misc]  # Celery is untyped; named like its schedule classes
    """Due once, at ``at`` (aware datetime): due when ``now >= at`` and the entry has not run
    since ``at`` (its ``last_run_at`` is before ``at``). An entry created after ``at`` runs at
    once. After its run the runtime schedule disables the entry (see the scheduler)."""

    def __init__(self, at: datetime, nowfun: Any = None, app: Any = None) -> None:
        if at.tzinfo is None:
            raise ValueError("once needs an aware datetime")
        self.at = at.astimezone(timezone.utc)
        super().__init__(nowfun=nowfun, app=app)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        if _aware(last_run_at) >= self.at:
            return timedelta(days=365 * 100)
        return self.at - _aware(self.now())

    def is_due(self, last_run_at: datetime) -> tuple[bool, float]:
        if _aware(last_run_at) >= self.at:
            return False, 3600.0  # ran: never due again (re-checked hourly, cheaply)
        rem = (self.at - _aware(self.now())).total_seconds()
        return (True, 3600.0) if rem <= 0 else (False, rem)

    def __repr__(self) -> str:
        return f"<once: {self.at.isoformat()}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, once) and other.at == self.at

    def __hash__(self) -> int:
        return hash(self.at)

    def __reduce__(self) -> Any:
        return (self.__class__, (self.at,))


#: When a never-run one-off entry last ran, for ``once.is_due``: before any ``at``.
NEVER = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _aware(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def schedule_to_json(sched: Any) -> dict[str, Any]:
    """A Celery schedule as stored: ``{"every": seconds}``, ``{"crontab": "m h dom mon dow"}``,
    ``{"solar": event, "lat": deg, "lon": deg}`` or ``{"at": ISO 8601 UTC}``. Raises
    InvalidEntry for any other kind."""
    if isinstance(sched, once):
        return {"at": sched.at.isoformat()}
    if isinstance(sched, crontab):
        fields = (sched._orig_minute, sched._orig_hour, sched._orig_day_of_month, sched._orig_month_of_year)
        return {"crontab": " ".join(str(f) for f in (*fields, sched._orig_day_of_week))}
    if isinstance(sched, solar):
        return {"solar": sched.event, "lat": sched.lat, "lon": sched.lon}
    if isinstance(sched, interval_schedule):
        return {"every": sched.run_every.total_seconds()}
    if isinstance(sched, int | float) and not isinstance(sched, bool):
        return schedule_to_json(interval_schedule(timedelta(seconds=sched)))
    if isinstance(sched, timedelta):
        return schedule_to_json(interval_schedule(sched))
    raise InvalidEntry("schedule", sched, "expected seconds, a timedelta, a crontab, a solar or a once schedule")


def schedule_from_json(data: object, app: Any = None) -> BaseSchedule:
    """The Celery schedule of a stored (or typed) ``schedule`` field; InvalidEntry if it does
    not parse, naming the field and the value."""
    if not isinstance(data, dict) or len(set(data) & {"every", "crontab", "solar", "at"}) != 1:
        raise InvalidEntry("schedule", data, "expected one of {'every': s}, {'crontab': '...'}, {'solar': ...}, {'at': ...}")
    if "every" in data:
        every = data["every"]
        if isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every) or every <= 0:
            raise InvalidEntry("every", every, "an interval must be a number of seconds above 0")
        return interval_schedule(timedelta(seconds=every), app=app)
    if "crontab" in data:
        return parse_crontab(data["crontab"], app)
    if "solar" in data:
        return _parse_solar(data, app)
    return once(parse_at(data["at"], app), app=app)


def parse_crontab(text: object, app: Any = None) -> crontab:
    """``"MIN HOUR DOM MON DOW"`` (five fields, Celery's crontab syntax) as a crontab, in the
    app's timezone; InvalidEntry if it does not parse."""
    parts = text.split() if isinstance(text, str) else []
    if len(parts) != 5:
        raise InvalidEntry("crontab", text, "expected five fields: 'MINUTE HOUR DAY_OF_MONTH MONTH DAY_OF_WEEK'")
    try:
        sched = crontab(*parts[:2], day_of_week=parts[4], day_of_month=parts[2], month_of_year=parts[3], app=app)
    except (ValueError, TypeError, IndexError) as exc:
        raise InvalidEntry("crontab", text, f"does not parse: {exc}") from None
    for name in ("minute", "hour", "day_of_week", "day_of_month", "month_of_year"):
        if not getattr(sched, name):
            raise InvalidEntry("crontab", text, f"its {name} field matches no value")
    return sched


def parse_at(text: object, app: Any = None) -> datetime:
    """An ISO 8601 time for a one-off entry; without an offset it is in the app's timezone
    (``timezone`` setting, UTC by default). InvalidEntry if it does not parse."""
    if isinstance(text, datetime):
        when = text
    else:
        try:
            when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEntry("at", text, "expected an ISO 8601 time, e.g. 2026-12-01T03:00:00+01:00") from None
    if when.tzinfo is None:
        zone = (app.conf.timezone if app is not None else None) or "UTC"
        when = when.replace(tzinfo=ZoneInfo(str(zone)))
    return when.astimezone(timezone.utc)


def _parse_solar(data: dict[str, Any], app: Any) -> solar:
    event, lat, lon = data.get("solar"), data.get("lat"), data.get("lon")
    for name, value, bound in (("lat", lat, 90), ("lon", lon, 180)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not -bound <= value <= bound:
            raise InvalidEntry(name, value, f"expected degrees between -{bound} and {bound}")
    try:
        return solar(event, lat, lon, app=app)
    except ImproperlyConfigured:
        raise InvalidEntry("solar", event, "solar schedules need the 'ephem' package (celery[solar])") from None
    except ValueError as exc:
        raise InvalidEntry("solar", event, str(exc)) from None


# -- entries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryDefinition:
    """One periodic entry of the runtime schedule (or the override of a config entry).

    ``schedule``: a Celery schedule (``schedule``/seconds/timedelta, ``crontab``, ``solar``,
    :class:`once`). ``options``: ``apply_async`` options among ``queue``, ``routing_key``,
    ``exchange``, ``priority`` (int) and ``expires`` (seconds). ``index``: the key's
    ModifyIndex when read from Consul (None: not read, so :meth:`RuntimeSchedule.save`
    creates it and refuses to overwrite one that exists).
    """

    name: str
    task: str
    schedule: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    source: Source = "runtime"
    index: int | None = None

    @property
    def timing(self) -> dict[str, Any]:
        """What decides when the entry runs: the task and the schedule (not args, kwargs or
        options, so editing those keeps the entry's timing)."""
        return {"task": self.task, "schedule": schedule_to_json(self.schedule)}

    def to_json(self) -> dict[str, Any]:
        if self.source == "config":
            return {"name": self.name, "source": "config", "enabled": self.enabled}
        return {
            "name": self.name,
            "source": "runtime",
            "task": self.task,
            "schedule": schedule_to_json(self.schedule),
            "args": list(self.args),
            "kwargs": self.kwargs,
            "options": self.options,
            "enabled": self.enabled,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], index: int, app: Any = None) -> EntryDefinition:
        if data.get("source") == "config":
            return cls(str(data["name"]), "", None, enabled=bool(data.get("enabled")), source="config", index=index)
        return cls(
            name=str(data["name"]),
            task=str(data["task"]),
            schedule=schedule_from_json(data["schedule"], app),
            args=tuple(data.get("args") or ()),
            kwargs=dict(data.get("kwargs") or {}),
            options=dict(data.get("options") or {}),
            enabled=bool(data.get("enabled", True)),
            index=index,
        )


@dataclass(frozen=True)
class RunRequest:
    """A "run now" request: one extra run of ``name``, with tick id ``name@requested_at``."""

    key: str
    name: str
    requested_at: datetime
    index: int


@dataclass(frozen=True)
class ScheduleSnapshot:
    """The runtime schedule as one read saw it: entries (runtime and config overrides) by name,
    whether sending is paused (and the pause record), and the pending run-now requests."""

    index: int
    entries: dict[str, EntryDefinition]
    paused: dict[str, Any] | None
    runs: list[RunRequest]

    def refusal(self, name: str, config_names: set[str] | frozenset[str]) -> str | None:
        """Why the entry ``name`` must not be sent now, or None if it may."""
        if self.paused is not None:
            return "sending is paused"
        entry = self.entries.get(name)
        if name in config_names:
            return None if entry is None or entry.enabled else "disabled at runtime"
        if entry is None:
            return "removed from the runtime schedule"
        return None if entry.enabled else "disabled"


class RuntimeSchedule:
    """Read and edit the runtime schedule of one beat name (every beat of that name shares it).

    ``RuntimeSchedule.from_app(app)`` uses the app's settings and beat name. Errors:
    :class:`InvalidEntry` (bad field; nothing written), :class:`EntryConflict` (changed by
    someone else since read, or a config entry's name), :class:`EntryNotFound`, and the
    package's Consul errors (ConsulUnavailable, ACLDenied).
    """

    def __init__(self, settings: ConsulSettings, beat_name: str, app: Any = None) -> None:
        self.settings = settings
        self.beat_name = beat_name
        self.app = app
        #: The folder the leader watches.
        self.prefix = validate_key(f"{settings.key_prefix}celery-consul-lock/beat/{beat_name}/schedule/x", "beat name")[:-1]

    @classmethod
    def from_app(cls, app: Any) -> RuntimeSchedule:
        config = BeatConfig.from_app(app)
        return cls(config.settings, config.name, app)

    # -- keys ---------------------------------------------------------------------------------

    def entry_key(self, name: str) -> str:
        return f"{self.prefix}entries/{key_part(name)}"

    @property
    def paused_key(self) -> str:
        return self.prefix + "paused"

    @property
    def config_names(self) -> frozenset[str]:
        return frozenset((self.app.conf.beat_schedule or {}) if self.app is not None else ())

    def client(self) -> ConsulClient:
        """The process's shared client (see :func:`~celery_consul_lock.consul.shared_client`)."""
        return shared_client(self.settings)

    # -- reading ------------------------------------------------------------------------------

    def snapshot(self, *, index: int | None = None, wait: float | None = None, consistent: bool = False) -> ScheduleSnapshot:
        """Everything under the folder in one read (with ``index``, a blocking query)."""
        idx, kvs = self.client().kv_list(self.prefix, index=index, wait=wait, consistent=consistent)
        return self._parse(idx, kvs)

    def _parse(self, idx: int, kvs: list[KVEntry]) -> ScheduleSnapshot:
        entries: dict[str, EntryDefinition] = {}
        runs: list[RunRequest] = []
        paused = None
        for kv in kvs:
            rest = kv.key[len(self.prefix) :]
            try:
                data = json.loads(kv.value or b"{}")
                if rest == "paused":
                    paused = data if isinstance(data, dict) else {}
                elif rest.startswith("entries/"):
                    entry = EntryDefinition.from_json(data, kv.modify_index, self.app)
                    entries[entry.name] = entry
                elif rest.startswith("run/"):
                    when = datetime.fromisoformat(data["requested_at"])
                    runs.append(RunRequest(kv.key, str(data["name"]), when, kv.modify_index))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("runtime schedule: ignoring %s, which cannot be read: %s", kv.key, exc)
        return ScheduleSnapshot(idx, entries, paused, sorted(runs, key=lambda r: r.requested_at))

    def get(self, name: str) -> EntryDefinition:
        """The stored entry ``name`` (with its index, for :meth:`save`); EntryNotFound if none."""
        _, kv = self.client().kv_get(self.entry_key(name), consistent=True)
        if kv is None:
            raise EntryNotFound(self.beat_name, name)
        return EntryDefinition.from_json(json.loads(kv.value or b"{}"), kv.modify_index, self.app)

    def list(self) -> list[EntryDefinition]:
        """Every stored entry (runtime entries and config overrides), by name."""
        return sorted(self.snapshot(consistent=True).entries.values(), key=lambda e: e.name)

    # -- writing ------------------------------------------------------------------------------

    def save(self, entry: EntryDefinition, *, replace_existing: bool = False) -> EntryDefinition:
        """Create or replace a runtime entry, after validating every field. An entry read with
        :meth:`get` is written only if unchanged since (its ``index``); a new one (index None)
        only if no entry has its name, unless ``replace_existing`` (then whatever is stored
        now is replaced, still by check-and-set). Returns the entry with its new index."""
        entry = self.validate(entry)
        key = self.entry_key(entry.name)
        cas = entry.index
        if cas is None:
            cas = 0
            if replace_existing:
                _, kv = self.client().kv_get(key, consistent=True)
                cas = kv.modify_index if kv is not None else 0
        return self._write(key, entry, cas)

    def _write(self, key: str, entry: EntryDefinition, cas: int) -> EntryDefinition:
        body = json.dumps(entry.to_json()).encode()
        if not self.client().kv_put(key, body, cas=cas):
            what = "already exists" if cas == 0 else "was changed by someone else since it was read"
            raise EntryConflict(self.beat_name, entry.name, f"{what}; read it again and retry")
        _, kv = self.client().kv_get(key, consistent=True)
        return replace(entry, index=kv.modify_index if kv is not None else None)

    def enable(self, name: str) -> None:
        """Enable a runtime entry, or take back the runtime disabling of a config entry."""
        self._set_enabled(name, True)

    def disable(self, name: str) -> None:
        """Disable an entry (runtime or config): no beat sends it until it is enabled; its
        timing state is kept. Once this returns, the leader sends it no more (see docs/beat.md)."""
        self._set_enabled(name, False)

    def _set_enabled(self, name: str, enabled: bool) -> None:
        key, client = self.entry_key(name), self.client()
        for _ in range(CAS_TRIES):
            _, kv = client.kv_get(key, consistent=True)
            index = kv.modify_index if kv is not None else 0
            if name in self.config_names:
                if enabled:  # the override goes away
                    if kv is None or client.kv_delete(key, cas=index):
                        return
                    continue
                entry = EntryDefinition(name, "", None, enabled=False, source="config")
            elif kv is None:
                raise EntryNotFound(self.beat_name, name)
            else:
                stored = EntryDefinition.from_json(json.loads(kv.value or b"{}"), index, self.app)
                entry = replace(stored, enabled=enabled)
            if client.kv_put(key, json.dumps(entry.to_json()).encode(), cas=index):
                return
        raise EntryConflict(self.beat_name, name, f"changed under {CAS_TRIES} attempts in a row; try again")

    def remove(self, name: str, *, index: int | None = None) -> None:
        """Delete a runtime entry (with ``index``: only if unchanged since read). Config
        entries cannot be removed at runtime (EntryConflict): disable them."""
        if name in self.config_names:
            raise EntryConflict(
                self.beat_name, name, "is defined in beat_schedule (a config entry); it can be disabled at runtime, not removed"
            )
        key = self.entry_key(name)
        _, kv = self.client().kv_get(key, consistent=True)
        if kv is None or (kv.value and json.loads(kv.value).get("source") == "config"):
            raise EntryNotFound(self.beat_name, name)
        if not self.client().kv_delete(key, cas=kv.modify_index if index is None else index):
            raise EntryConflict(self.beat_name, name, "was changed by someone else since it was read; read it again and retry")

    def run_now(self, name: str) -> str:
        """Ask the leader for one extra run of ``name`` (runtime or config; sent also when
        disabled, not while paused) with its own tick id ``name@<request time>``; returns
        that tick id. The leader sends it within about a second and deletes the request."""
        if name not in self.config_names:
            entry = self.get(name)
            if entry.source == "config":
                raise EntryNotFound(self.beat_name, name)
        now = datetime.now(timezone.utc)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        key = f"{self.prefix}run/{key_part(name)}.{uuid.uuid4().hex[:12]}"
        self.client().kv_put(key, json.dumps({"name": name, "requested_at": now.isoformat()}).encode(), cas=0)
        return str(Tick.of(name, now))

    def pause(self, by: str = "") -> None:
        """Stop all sending by the beats of this name (kept in Consul: survives a failover)."""
        record = {"paused_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": by}
        self.client().kv_put(self.paused_key, json.dumps(record).encode())

    def resume(self) -> None:
        """Start sending again; ticks missed while paused follow ``consul_lock_beat_missed``."""
        self.client().kv_delete(self.paused_key)

    def paused(self) -> dict[str, Any] | None:
        """The pause record (``paused_at``, ``by``) while paused, else None."""
        _, kv = self.client().kv_get(self.paused_key, consistent=True)
        return json.loads(kv.value or b"{}") if kv is not None else None

    # -- validation ---------------------------------------------------------------------------

    def validate(self, entry: EntryDefinition) -> EntryDefinition:
        """``entry`` with its schedule normalised, or InvalidEntry naming the bad field."""
        if not isinstance(entry.name, str) or not NAME_RE.match(entry.name):
            raise InvalidEntry(
                "name",
                entry.name,
                "expected 1-200 characters among letters, digits, '_', '.', '-' (not starting with '.' or '-')",
            )
        if entry.name in self.config_names:
            raise EntryConflict(
                self.beat_name,
                entry.name,
                "is defined in beat_schedule (a config entry), which wins; a runtime write may only disable, enable or run it",
            )
        if entry.source != "runtime":
            raise InvalidEntry("source", entry.source, "only runtime entries are saved whole")
        if not isinstance(entry.task, str) or not entry.task:
            raise InvalidEntry("task", entry.task, "expected a task name")
        if self.app is not None and entry.task not in self.app.tasks:
            raise InvalidEntry("task", entry.task, f"the app {self.app.main!r} has no task of that name")
        sched = schedule_from_json(schedule_to_json(entry.schedule), self.app)
        if not isinstance(entry.args, list | tuple):
            raise InvalidEntry("args", entry.args, "expected a JSON array")
        if not isinstance(entry.kwargs, dict) or not all(isinstance(k, str) for k in entry.kwargs):
            raise InvalidEntry("kwargs", entry.kwargs, "expected a JSON object")
        for name, arguments in (("args", entry.args), ("kwargs", entry.kwargs)):
            try:
                json.dumps(arguments)
            except (TypeError, ValueError):
                raise InvalidEntry(name, arguments, "must be JSON-serialisable") from None
        if not isinstance(entry.options, dict):
            raise InvalidEntry("options", entry.options, "expected a JSON object")
        for key, option in entry.options.items():
            kinds = OPTION_TYPES.get(key)
            if kinds is None:
                raise InvalidEntry("options", key, f"unknown option; expected one of {sorted(OPTION_TYPES)}")
            if (
                isinstance(option, bool)
                or not isinstance(option, kinds)
                or (key == "expires" and isinstance(option, (int, float)) and option <= 0)
            ):
                raise InvalidEntry(
                    key, option, f"expected {' or '.join(k.__name__ for k in kinds)}" + (" above 0" * (key == "expires"))
                )
        if not isinstance(entry.enabled, bool):
            raise InvalidEntry("enabled", entry.enabled, "expected true or false")
        return replace(entry, schedule=sched, args=tuple(entry.args))


class ScheduleWatch:
    """A daemon thread blocking on the runtime schedule's folder: sets ``changed`` whenever its
    index moves (an edit, a pause, a run-now request), so the leader's loop wakes within the
    blocking query's latency (milliseconds) instead of at its next due time. Never dies: an
    error is logged once per change of state and retried with backoff."""

    def __init__(self, store: RuntimeSchedule) -> None:
        self.store = store
        # A connection of its own: its blocking query must not hold one of the process's
        # shared connections for up to WATCH_WAIT.
        self._client = ConsulClient(store.settings)
        self.changed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"consul-beat-schedule-{store.beat_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        index, backoff, failing = 0, Backoff(WATCH_BACKOFF_MIN, WATCH_BACKOFF_MAX), False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                idx, _ = self._client.kv_list(self.store.prefix, index=index or None, wait=WATCH_WAIT)
            except Exception as exc:  # never die silently: log once per outage, retry with backoff
                if not isinstance(exc, ConsulLockError):
                    log.exception("runtime schedule: watch error; retrying")
                elif not failing:
                    log.warning("runtime schedule: cannot watch %s: %s; retrying", self.store.prefix, exc)
                failing = True
                self._stop.wait(backoff.next())
                continue
            if failing:
                log.info("runtime schedule: watching %s again", self.store.prefix)
            failing = False
            backoff.reset()
            if idx != index:
                self.changed.set()
            index = idx if idx >= index and idx > 0 else 0  # an index that went back: start over
            self._stop.wait(max(0.0, WATCH_MIN_INTERVAL - (time.monotonic() - started)))
        self._client.close()
