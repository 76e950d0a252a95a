"""``celery -A proj consul-lock status|release|reap|check``: see who holds what, free a stuck
lock, remove free lock keys, check a deployment before it goes live.

Registered through the ``celery.commands`` entry point, so it reads the same Celery settings
(``consul_lock_*``, then ``CONSUL_HTTP_*``) as the workers and beats of ``proj``.

- ``status`` only reads. It shows the beat leader and standbys, every held lock under the key
  prefix, and each periodic entry's last sent and last completed tick (``--json`` for scripts).
- ``release KEY`` frees a lock the only way that cannot hurt a later holder: it destroys the
  session it showed the operator, never another one. Destroying that session also frees every
  other key the session holds, so those are listed first. The holder is not stopped: it notices
  the loss within its fencing window, but work it already started may still be running.
- ``reap`` sweeps the key prefix now, as the beat leader does every
  ``consul_lock_beat_reap_interval`` (see :mod:`.reap`): it removes the free lock keys whose
  keep time has passed and prints each (``--dry-run``: only prints them).
- ``check`` is a preflight for deploys. It validates the settings, reaches the agent, and
  tries on scratch keys every permission the workers and beats need. It exits 1 with the first
  failure, or 0 with a one-line summary. It cleans up after itself, also when it fails.

The ACL token is never printed: the output comes from Consul's data and our error messages,
and neither contains it.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

import click
from celery.bin.base import CeleryCommand

# Every `celery` process (a worker too) loads this command plugin at start-up, and with it
# the beat module, whose celeryd_after_setup handler warns about a `worker -B` whose beat is
# not leader-elected: the worker may import nothing else of the beat.
from . import beat as _beat_checks  # noqa: F401
from .consul import SEMAPHORE_FLAG, ConsulClient, KVEntry, kv_set
from .contrib.flask import MISSING_FLASK_APP, tasks_without_flask_app
from .election import BeatConfig
from .entries import NEVER, EntryDefinition, RuntimeSchedule, once, parse_at, parse_crontab, schedule_to_json
from .errors import ConsulLockError, EntryConflict, EntryNotFound, InvalidEntry, InvalidSetting
from .lock import LockHolder
from .reap import sweep
from .semaphore import SEMAPHORE_KEY, SemaphoreState
from .settings import ConsulSettings, parse_seconds
from .startup import check_app, locked_tasks, unknown_settings
from .ticks import MARKS_PREFIX, key_part

__all__ = ["collect_status", "consul_lock", "preflight"]

#: What beat sessions are called (see beat.Election): "celery beat <name> <instance>".
BEAT_SESSION = re.compile(r"^celery beat (?P<name>\S+) (?P<instance>\S+)$")
#: Scratch keys and services of ``check`` carry this, so they are recognisable if a killed
#: check leaves one behind (sessions it creates have lock-delay 0 and a short TTL).
SCRATCH = "celery-consul-lock-check"


# -- status ---------------------------------------------------------------------------------


def collect_status(app: Any) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-ready data: beats, held locks, semaphores
    (their limit and live holders), periodic entries.

    Reads the whole key prefix and the session list once each, so it sees one moment of
    the cluster (up to the few milliseconds between the two reads).
    """
    settings = ConsulSettings.from_celery(app.conf)
    beat_config = BeatConfig.from_app(app)
    beat_name = beat_config.name
    client = ConsulClient(settings)
    try:
        entries = client.kv_keys(settings.key_prefix)
        sessions = {s["ID"]: s for s in client.session_list()}
    finally:
        client.close()
    now = datetime.now(timezone.utc)
    prefix = settings.key_prefix
    leader_key = re.compile("^" + re.escape(prefix) + r"locks/(?P<name>[^/]+)/beat/\.lock$")

    beats: dict[str, dict[str, Any]] = {beat_name: _beat(beat_name, prefix)}
    locks = []
    for entry in entries:
        m = leader_key.match(entry.key)
        if m:
            beat = beats.setdefault(m["name"], _beat(m["name"], prefix))
            if entry.session:
                beat["leader"] = _leader(entry, sessions.get(entry.session))
        elif entry.session and entry.flags != SEMAPHORE_FLAG:
            locks.append(_held(entry, sessions.get(entry.session), now, prefix))
    for sid, info in sessions.items():
        m = BEAT_SESSION.match(info.get("Name") or "")
        if m and m["name"] in beats and (beats[m["name"]]["leader"] or {}).get("session") != sid:
            beats[m["name"]]["standbys"].append({"instance": m["instance"], "session": sid, "node": info.get("Node")})
    paused_key = RuntimeSchedule(settings, beat_name).paused_key
    beats[beat_name]["paused"] = next((_json(e.value) for e in entries if e.key == paused_key), None)
    return {
        "agent": settings.base_url,
        "key_prefix": prefix,
        "beats": sorted(beats.values(), key=lambda b: b["name"]),
        "locks": sorted(locks, key=lambda lock: lock["key"]),
        "semaphores": _semaphores(entries, sessions, now, prefix),
        "entries": _entries(app, entries, prefix, beat_config),
    }


def _beat(name: str, prefix: str) -> dict[str, Any]:
    return {"name": name, "key": f"{prefix}locks/{name}/beat/.lock", "leader": None, "standbys": []}


def _leader(entry: KVEntry, session: dict[str, Any] | None) -> dict[str, Any]:
    holder = LockHolder.from_entry(entry, session)
    return {
        "instance": holder.extra.get("instance"),
        "host": holder.host,
        "pid": holder.pid,
        "since": holder.extra.get("since") or holder.acquired_at,
        "fencing_token": holder.fencing_token,
        "session": holder.session,
        "node": holder.node,
    }


def _held(entry: KVEntry, session: dict[str, Any] | None, now: datetime, prefix: str) -> dict[str, Any]:
    holder = LockHolder.from_entry(entry, session)
    age = None
    if holder.acquired_at:
        with suppress(TypeError, ValueError):
            age = round((now - datetime.fromisoformat(holder.acquired_at)).total_seconds(), 1)
    return {
        "key": entry.key[len(prefix) :],
        "holder": str(holder),
        "host": holder.host,
        "pid": holder.pid,
        "name": holder.name or holder.session_name,
        "task_id": holder.extra.get("task_id"),
        "acquired_at": holder.acquired_at,
        "age_seconds": age,
        "session": holder.session,
        "session_ttl": (session or {}).get("TTL") or None,
        "node": holder.node,
        "fencing_token": holder.fencing_token,
    }


def _semaphores(entries: list[KVEntry], sessions: dict[str, Any], now: datetime, prefix: str) -> list[dict[str, Any]]:
    """Every semaphore under the prefix (a ``.lock`` key with the semaphore's flags): its
    limit and its live holders, each as a held lock row of its contender key."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        if entry.flags != SEMAPHORE_FLAG or not entry.key.endswith(f"/{SEMAPHORE_KEY}"):
            continue
        folder = entry.key[: -len(SEMAPHORE_KEY)]
        try:
            state = SemaphoreState.parse(entry.key, [e for e in entries if e.key.startswith(folder)])
        except ConsulLockError as exc:
            out.append({"prefix": folder[len(prefix) : -1], "limit": None, "holders": [], "error": str(exc)})
            continue
        holders = [
            _held(state.contenders[sid], sessions.get(sid), now, prefix)
            for sid in sorted(state.holders)
            if sid in state.contenders
        ]
        out.append({"prefix": folder[len(prefix) : -1], "limit": state.limit, "holders": holders})
    return sorted(out, key=lambda sem: sem["prefix"])


def _entries(app: Any, entries: list[KVEntry], prefix: str, beat: BeatConfig) -> list[dict[str, Any]]:
    """Per periodic entry: this app's beat's record of its last send, and the last completed
    tick (the mark ConsulLockedTask advances, shared by every sender of the entry). Entries
    are named as in ``beat_schedule`` where the stored key segment is one of those names,
    else by the segment."""
    names = {key_part(name): name for name in (app.conf.beat_schedule or {})}
    rows: dict[str, dict[str, Any]] = {}

    def row(segment: str) -> dict[str, Any]:
        name = names.get(segment, segment)
        return rows.setdefault(name, {"entry": name, "beat": None, "last_sent": None, "runs": None, "last_completed": None})

    for segment in names:
        row(segment)
    marks, states = prefix + MARKS_PREFIX, beat.state_prefix
    for entry in entries:
        data = _json(entry.value)
        if entry.key.startswith(marks):
            r = row(entry.key[len(marks) :])
            r.update(last_completed=data.get("due"), task_id=data.get("task_id"))
        elif entry.key.startswith(states):
            r = row(entry.key[len(states) :])
            r.update(beat=beat.name, last_sent=data.get("last_run_at"), runs=data.get("total_run_count"))
    return sorted(rows.values(), key=lambda r: r["entry"])


def _json(value: bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(value or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def render_status(status: dict[str, Any]) -> str:
    """The human form of :func:`collect_status`."""
    lines = [f"Consul agent {status['agent']}, key prefix {status['key_prefix']!r}", ""]
    for beat in status["beats"]:
        lines.append(f"Beat {beat['name']!r} (leader key {beat['key']})")
        leader = beat["leader"]
        if leader:
            lines.append(
                f"  leader:  {leader['instance'] or '?'} on {leader['host'] or '?'} pid {leader['pid'] or '?'}, "
                f"since {leader['since'] or '?'}, fencing token {leader['fencing_token']}, session {leader['session'][:8]}"
            )
        else:
            lines.append("  leader:  none (no beat is running, or a failover is under way)")
        for standby in beat["standbys"]:
            lines.append(f"  standby: {standby['instance']} on node {standby['node']}, session {standby['session'][:8]}")
        if not beat["standbys"]:
            lines.append("  standby: none")
        if beat.get("paused") is not None:
            lines.append(f"  {_paused_text(beat['paused'])}")
    lines += ["", f"Held locks: {len(status['locks'])}"]
    lines += _table(
        ["KEY", "HOLDER", "AGE", "SESSION TTL", "TOKEN"],
        [
            [
                lock["key"],
                lock["holder"],
                "?" if lock["age_seconds"] is None else f"{lock['age_seconds']:.1f}s",
                lock["session_ttl"] or "none",
                str(lock["fencing_token"]),
            ]
            for lock in status["locks"]
        ],
    )
    lines += ["", f"Semaphores: {len(status['semaphores'])}"]
    lines += _table(
        ["PREFIX", "HELD", "HOLDER", "AGE"],
        [
            [
                sem["prefix"] if i == 0 else "",
                f"{len(sem['holders'])}/{sem['limit'] or '?'}" if i == 0 else "",
                holder["holder"] if holder else sem.get("error", "-"),
                "" if not holder or holder["age_seconds"] is None else f"{holder['age_seconds']:.1f}s",
            ]
            for sem in status["semaphores"]
            for i, holder in enumerate(sem["holders"] or [None])
        ],
    )
    lines += ["", f"Periodic entries: {len(status['entries'])}"]
    lines += _table(
        ["ENTRY", "LAST SENT (BEAT)", "RUNS", "LAST COMPLETED TICK"],
        [
            [e["entry"], e["last_sent"] or "-", "-" if e["runs"] is None else str(e["runs"]), e["last_completed"] or "-"]
            for e in status["entries"]
        ],
    )
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


# -- release ----------------------------------------------------------------------------------


def find_held(client: ConsulClient, settings: ConsulSettings, key: str) -> KVEntry | None:
    """The held lock named ``key`` (relative to the prefix); ``locks/x`` also finds
    ``locks/x/.lock``, the key ``consul lock locks/x`` takes."""
    candidates = [key] if key.endswith("/.lock") else [key, key.rstrip("/") + "/.lock"]
    for name in candidates:
        _, entry = client.kv_get(settings.full_key(name), consistent=True)
        if entry is not None and entry.session:
            return entry
    return None


# -- check ------------------------------------------------------------------------------------


def preflight(app: Any, *, beat: bool = True, progress: Callable[[str], None] = lambda _: None) -> str:
    """Validate the settings and try every permission the workers (and beats) need, on
    scratch keys under the prefix. Returns a one-line summary; raises ConsulLockError (the
    message names the setting, the address or the missing permission) at the first failure.
    Leaves nothing behind when it returns or raises."""
    app.loader.import_default_modules()  # the task modules (Django: autodiscovery), as a worker does
    settings = check_app(app)  # every setting and each locked task's options, as a worker checks them at start
    unlinked = tasks_without_flask_app(app)  # as a worker checks it at start, too
    if unlinked:
        raise ConsulLockError(f"{', '.join(unlinked)}: {MISSING_FLASK_APP}, or every run of them fails in a worker")
    beat_config = BeatConfig.from_app(app) if beat else None
    locked = sorted(task.name for task in locked_tasks(app))
    client = ConsulClient(settings)
    try:
        progress(f"reaching {settings.base_url}")
        leader = client.status_leader()
        if not leader:
            raise ConsulLockError(f"Consul at {settings.base_url} answers but its servers have no leader; locks cannot be taken")
        agent = _agent_description(client)
        granted = _try_permissions(client, settings, beat_config, progress)
    finally:
        client.close()
    features = f"locked tasks: {len(locked)}" + (f", beat {beat_config.name!r}" if beat_config else "")
    return f"OK: {settings.base_url} ({agent}raft leader {leader}); {', '.join(granted)}; {features}"


def _agent_description(client: ConsulClient) -> str:
    try:
        info = client.agent_self()
    except ConsulLockError:  # agent:read is not needed to use locks; the policy may lack it
        return ""
    return f"node {info['node']}, {info['datacenter']}, Consul {info['version']}; "


def _try_permissions(
    client: ConsulClient, settings: ConsulSettings, beat: BeatConfig | None, progress: Callable[[str], None]
) -> list[str]:
    scratch = f"{SCRATCH}-{uuid.uuid4().hex[:8]}"
    lock_key = settings.full_key(f"locks/{scratch}/.lock")
    state_key = settings.full_key(f"celery-consul-lock/{scratch}")
    granted = []
    with _cleanup() as later:
        progress("creating a session (session:write)")
        sid = client.session_create(f"{SCRATCH} (preflight)", ttl=10, lock_delay=0, checks=settings.session_checks)
        later(lambda: client.session_destroy(sid))
        granted.append("session:write")
        progress(f"taking a scratch lock {lock_key} (key:write)")
        later(lambda: client.kv_delete(lock_key))
        attempt = client.kv_lock(lock_key, sid, b'{"name": "consul-lock check"}', exists=False)
        if not attempt.acquired:
            raise ConsulLockError(f"Consul at {settings.base_url} refused the scratch lock {lock_key} ({attempt.reason})")
        later(lambda: client.kv_release(lock_key, sid, b""))
        granted.append(f"key:write on {settings.key_prefix + 'locks/'!r}")
        progress(f"writing {state_key} fenced by the session (key:write)")
        later(lambda: client.kv_delete(state_key))
        done = client.kv_fenced(
            lock_key, sid, [kv_set(state_key, b"")], action="writing a fenced scratch key", resource=state_key
        )
        if not done.ok:
            raise ConsulLockError(f"Consul at {settings.base_url} refused a fenced write of {state_key}: {list(done.errors)}")
        granted.append(f"key:write on {settings.key_prefix + 'celery-consul-lock/'!r}")
        progress("listing sessions (session:read, for status)")
        client.session_list()
        if beat is not None:
            service = f"celery-beat-{beat.name}"
            service_id = f"{service}-{scratch}"
            progress(f"registering a health-check service {service} (service:write)")
            later(lambda: client.agent_deregister_service(service_id))
            check = client.agent_register_ttl_service(service_id, service, check_ttl=beat.check_ttl)
            client.agent_check_pass(check)
            granted.append(f"service:write on {service!r}")
    return granted


@contextmanager
def _cleanup() -> Iterator[Callable[[Callable[[], Any]], None]]:
    """Run the registered undo steps in reverse order on the way out; an undo that fails
    (e.g. nothing to undo because the step itself failed) does not hide the first error."""
    steps: list[Callable[[], Any]] = []
    try:
        yield steps.append
    finally:
        for step in reversed(steps):
            with suppress(ConsulLockError):
                step()


# -- the click command ------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    click.echo(f"consul-lock: {message}", err=True)
    sys.exit(1)


@click.group(name="consul-lock")
def consul_lock() -> None:
    """Inspect and operate celery-consul-lock's locks and beat election."""


@consul_lock.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """The beat leader and standbys, every held lock, each entry's last tick."""
    try:
        data = collect_status(ctx.obj.app)
    except ConsulLockError as exc:
        _fail(str(exc))
    click.echo(json.dumps(data, indent=2) if as_json else render_status(data))


@consul_lock.command(cls=CeleryCommand)
@click.argument("key")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def release(ctx: click.Context, key: str, yes: bool) -> None:
    """Free a stuck lock KEY by destroying its holder's session."""
    try:
        settings = ConsulSettings.from_celery(ctx.obj.app.conf)
        client = ConsulClient(settings)
        entry = find_held(client, settings, key)
        sid = entry.session if entry is not None else None
        if entry is None or sid is None:
            _fail(f"{settings.full_key(key)!r} is not held by anyone at {settings.base_url}; nothing to release")
        info = client.session_info(sid)
        others = [e.key for e in client.kv_keys(settings.key_prefix) if e.session == sid and e.key != entry.key]
    except ConsulLockError as exc:
        _fail(str(exc))
    holder = LockHolder.from_entry(entry, info)
    lock_delay = _from_nanoseconds((info or {}).get("LockDelay"))
    click.echo(f"{entry.key} is held by {holder}, fencing token {entry.modify_index}.")
    if others:
        click.echo("Destroying its session also frees: " + ", ".join(others))
    click.echo(
        "WARNING: this does not stop the holder. It may still be running and will only notice the loss "
        "at its next renewal or check; work it has started can overlap with the next holder's."
    )
    if not yes and not click.confirm(f"Destroy session {sid} to free {entry.key}?"):
        _fail("not released")
    try:
        client.session_destroy(sid)
        _, after = client.kv_get(entry.key, consistent=True)
    except ConsulLockError as exc:
        _fail(str(exc))
    finally:
        client.close()
    now_held = f"; it is held again, by session {after.session[:8]}" if after is not None and after.session else ""
    delay = f" Consul lets no one take it for {lock_delay:g} s (the session's lock-delay)." if lock_delay else ""
    click.echo(f"Released {entry.key}: session {sid} destroyed{now_held}.{delay}")


@consul_lock.command(cls=CeleryCommand)
@click.option("--dry-run", is_flag=True, help="Remove nothing: print what would be removed.")
@click.pass_context
def reap(ctx: click.Context, dry_run: bool) -> None:
    """Remove the free lock keys and dead semaphore keys under the key prefix whose time has come."""
    try:
        settings = ConsulSettings.from_celery(ctx.obj.app.conf)
        client = ConsulClient(settings)
        try:
            report = sweep(client, settings, dry_run=dry_run)
        finally:
            client.close()
    except ConsulLockError as exc:
        _fail(str(exc))
    verb = "would remove" if dry_run else "removed"
    for key in report.removed:
        click.echo(f"{verb} {key}")
    kept = ", ".join(f"{count} {why}" for why, count in sorted(report.kept.items())) or "none"
    under = f"{len(report.removed)} of {report.keys} keys under {settings.key_prefix!r}"
    click.echo(f"{verb} {under}; lock and semaphore keys kept: {kept}")


@consul_lock.command(cls=CeleryCommand)
@click.option("--no-beat", is_flag=True, help="Workers only: skip the beat's permissions (service:write).")
@click.option("-v", "--verbose", is_flag=True, help="Say each step.")
@click.pass_context
def check(ctx: click.Context, no_beat: bool, verbose: bool) -> None:
    """Preflight: settings, agent, permissions. Exits 1 at the first problem."""
    progress = (lambda text: click.echo(f"  {text}", err=True)) if verbose else (lambda _: None)
    for message in unknown_settings(ctx.obj.app.conf):
        click.echo(f"consul-lock check: warning: {message}", err=True)
    try:
        summary = preflight(ctx.obj.app, beat=not no_beat, progress=progress)
    except InvalidSetting as exc:
        _fail(f"check FAILED: invalid setting: {exc}")
    except ConsulLockError as exc:
        _fail(f"check FAILED: {exc}")
    click.echo(f"consul-lock check {summary}")


# -- the runtime schedule ---------------------------------------------------------------------

#: Exit codes of the schedule commands: bad input (nothing written), and a check-and-set
#: conflict or a config entry a runtime write may not change. Other failures exit 1.
EXIT_INVALID, EXIT_CONFLICT = 2, 3


def collect_schedule(app: Any) -> dict[str, Any]:
    """Every entry of the app's beat, config and runtime, as ``schedule list`` shows it:
    ``{"beat", "paused", "entries": [{"name", "task", "schedule", "source", "enabled",
    "last_run", "next_due", "runs"}]}`` (times ISO 8601 UTC; ``next_due`` None when disabled)."""
    store = RuntimeSchedule.from_app(app)
    config = BeatConfig.from_app(app)
    client = ConsulClient(config.settings)
    try:
        snap = store.snapshot(consistent=True)
        states = {e.key[len(config.state_prefix) :]: _json(e.value) for e in client.kv_keys(config.state_prefix)}
    finally:
        client.close()
    now = datetime.now(timezone.utc)
    rows = []
    config_entries = app.conf.beat_schedule or {}
    for name, spec in config_entries.items():
        override = snap.entries.get(name)
        enabled = override is None or override.source != "config" or override.enabled
        rows.append(_schedule_row(app, name, spec["task"], spec["schedule"], "config", enabled, states, now))
    for name, entry in snap.entries.items():
        if entry.source == "runtime" and name not in config_entries:
            rows.append(_schedule_row(app, name, entry.task, entry.schedule, "runtime", entry.enabled, states, now))
    return {"beat": config.name, "paused": snap.paused, "entries": sorted(rows, key=lambda r: r["name"])}


def _schedule_row(
    app: Any, name: str, task: str, sched: Any, source: str, enabled: bool, states: dict[str, Any], now: datetime
) -> dict[str, Any]:
    from celery.beat import ScheduleEntry
    from celery.schedules import maybe_schedule

    state = states.get(key_part(name)) or {}
    last = datetime.fromisoformat(state["last_run_at"]) if state.get("last_run_at") else None
    sched = maybe_schedule(sched, app=app)
    next_due = None
    if enabled:
        since = last or (NEVER if isinstance(sched, once) else now)
        entry = ScheduleEntry(name=name, task=task, schedule=sched, last_run_at=since, app=app)
        with suppress(Exception):  # a schedule of another kind may not estimate: shown as unknown
            # Rounded to the second: the estimate is taken a little after ``now``.
            due = max(now, now + entry.schedule.remaining_estimate(since) + timedelta(milliseconds=500))
            next_due = due.isoformat(timespec="seconds")
    return {
        "name": name,
        "task": task,
        "schedule": _describe(sched),
        "source": source,
        "enabled": enabled,
        "last_run": last.isoformat(timespec="seconds") if last else None,
        "next_due": next_due,
        "runs": state.get("total_run_count"),
    }


def _describe(sched: Any) -> str:
    try:
        data = schedule_to_json(sched)
    except InvalidEntry:
        return repr(sched)
    if "every" in data:
        return f"every {data['every']:g}s"
    if "crontab" in data:
        return f"crontab {data['crontab']}"
    if "solar" in data:
        return f"solar {data['solar']} {data['lat']},{data['lon']}"
    return f"once at {data['at']}"


def _paused_text(paused: dict[str, Any]) -> str:
    by = f" by {paused['by']}" if paused.get("by") else ""
    return f"PAUSED since {paused.get('paused_at') or '?'}{by}"


def render_schedule(data: dict[str, Any]) -> str:
    """The human form of :func:`collect_schedule`."""
    paused = data["paused"]
    head = f"Beat {data['beat']!r}: " + ("sending" if paused is None else _paused_text(paused))
    rows = [
        [
            e["name"],
            e["task"],
            e["schedule"],
            e["source"],
            "yes" if e["enabled"] else "no",
            e["last_run"] or "-",
            e["next_due"] or "-",
            "-" if e["runs"] is None else str(e["runs"]),
        ]
        for e in data["entries"]
    ]
    header = ["NAME", "TASK", "SCHEDULE", "SOURCE", "ENABLED", "LAST RUN", "NEXT DUE", "RUNS"]
    return "\n".join([head, *_table(header, rows)])


@contextmanager
def _schedule_errors() -> Iterator[None]:
    """Exit with the error's message and the schedule commands' exit code for it."""
    try:
        yield
    except InvalidEntry as exc:
        click.echo(f"consul-lock: {exc}; nothing was written", err=True)
        sys.exit(EXIT_INVALID)
    except EntryConflict as exc:
        click.echo(f"consul-lock: {exc}; nothing was written", err=True)
        sys.exit(EXIT_CONFLICT)
    except (EntryNotFound, ConsulLockError) as exc:
        _fail(str(exc))


def _json_arg(field: str, text: str | None, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidEntry(field, text, f"not valid JSON: {exc}") from None


@consul_lock.group()
def schedule() -> None:
    """The runtime schedule: entries kept in Consul beside beat_schedule."""


@schedule.command(cls=CeleryCommand)
@click.argument("name")
@click.option("--task", required=True, help="The task's registered name.")
@click.option("--every", type=str, help="Run every SECONDS (a number, or e.g. '90s', '500ms', '5m', '1h').")
@click.option("--crontab", "cron", help='Run at "MIN HOUR DOM MON DOW", in the app\'s timezone.')
@click.option("--at", help="Run once at ISO-TIME (without offset: the app's timezone).")
@click.option("--args", help="Positional arguments, a JSON array.")
@click.option("--kwargs", help="Keyword arguments, a JSON object.")
@click.option("--queue", help="The queue to send to.")
@click.option("--disabled", is_flag=True, help="Store it disabled.")
@click.option("--replace", is_flag=True, help="Replace the entry NAME if it exists (args-only edits keep its timing).")
@click.pass_context
def add(ctx: click.Context, /, name: str, task: str, every: str | None, cron: str | None, at: str | None, **rest: Any) -> None:
    """Add the runtime entry NAME; an existing NAME is refused (exit 3) unless --replace."""
    app = ctx.obj.app
    with _schedule_errors():
        given = [(f, v) for f, v in (("every", every), ("crontab", cron), ("at", at)) if v is not None]
        if len(given) != 1:
            raise InvalidEntry("schedule", dict(given) or None, "give exactly one of --every, --crontab, --at")
        field, value = given[0]
        if field == "every":
            try:
                sched: Any = parse_seconds("every", value)  # the durations `celery-consul-lock run --every` takes
            except InvalidSetting as exc:
                raise InvalidEntry("every", value, exc.reason) from None
        else:
            sched = parse_crontab(value, app) if field == "crontab" else once(parse_at(value, app))
        app.loader.import_default_modules()
        entry = EntryDefinition(
            name,
            task,
            sched,
            args=_json_arg("args", rest["args"], list),
            kwargs=_json_arg("kwargs", rest["kwargs"], dict),
            options={"queue": rest["queue"]} if rest["queue"] else {},
            enabled=not rest["disabled"],
        )
        store = RuntimeSchedule.from_app(app)
        try:
            saved = store.save(entry, replace_existing=rest["replace"])
        except EntryConflict:
            if rest["replace"] or name in store.config_names:
                raise
            raise EntryConflict(store.beat_name, name, "already exists; give --replace to replace it") from None
    click.echo(f"saved {name} (index {saved.index})")


def _entry_command(verb: str, method: str, help_text: str) -> None:
    """``schedule VERB NAME``: calls ``RuntimeSchedule.<method>(NAME)``."""

    @schedule.command(name=verb, cls=CeleryCommand, help=help_text)
    @click.argument("name")
    @click.pass_context
    def command(ctx: click.Context, name: str) -> None:
        with _schedule_errors():
            result = getattr(RuntimeSchedule.from_app(ctx.obj.app), method)(name)
        click.echo(f"{verb}: {name}" + (f" (tick {result})" if isinstance(result, str) else ""))


_entry_command("remove", "remove", "Delete the runtime entry NAME (config entries can only be disabled).")
_entry_command("enable", "enable", "Enable NAME (a runtime entry, or a config entry disabled at runtime).")
_entry_command("disable", "disable", "Disable NAME: no beat sends it until enabled; its timing is kept.")
_entry_command("run", "run_now", "Ask the leader for one extra run of NAME now, with its own tick id.")


@schedule.command(name="list", cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def list_entries(ctx: click.Context, as_json: bool) -> None:
    """Every entry: name, task, schedule, source, enabled, last run, next due, runs."""
    with _schedule_errors():
        data = collect_schedule(ctx.obj.app)
    click.echo(json.dumps(data, indent=2) if as_json else render_schedule(data))


@consul_lock.command(cls=CeleryCommand)
@click.option("--by", default="", help="Who pauses and why (shown by status).")
@click.pass_context
def pause(ctx: click.Context, by: str) -> None:
    """Stop all sending by the beats of this name (survives a failover)."""
    with _schedule_errors():
        RuntimeSchedule.from_app(ctx.obj.app).pause(by=by)
    click.echo("paused: the beats send nothing until `consul-lock resume`")


@consul_lock.command(cls=CeleryCommand)
@click.pass_context
def resume(ctx: click.Context) -> None:
    """Start sending again; ticks missed meanwhile follow consul_lock_beat_missed."""
    with _schedule_errors():
        store = RuntimeSchedule.from_app(ctx.obj.app)
        was_paused = store.paused() is not None
        store.resume()
    click.echo("resumed" if was_paused else "not paused: the beats were already sending")


def _from_nanoseconds(nanoseconds: object) -> float:
    """Session fields like LockDelay come as nanoseconds."""
    return int(nanoseconds) / 1e9 if isinstance(nanoseconds, int | float) else 0.0
