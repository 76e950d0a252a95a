"""Settings checked when a worker or a beat starts, not at its first task.

A worker of an app with :class:`~celery_consul_lock.task.ConsulLockedTask` tasks (or with the
agent watch) is checked at Celery's ``worker_init`` — its task modules imported, before it
builds its consumer or says ``ready``; a leader-elected beat when its scheduler is made
(:mod:`.beat`). Three things are checked, and in a worker a fourth:

* **Every setting's value** (:func:`check_app`): the connection and session settings, the
  worker's availability settings, the app-wide task defaults, ``consul_lock_eager``, and each
  locked task's own options and key template. The first one refused ends the process with
  one line on stderr and exit status 1, no traceback (:func:`refused_at_start`)::

      celery-consul-lock: CELERY_CONSUL_LOCK_TTL=5 is invalid: Consul accepts a session TTL
      between 10 s and 86400 s (24 h); the worker does not start

  (one line, wrapped here). The setting is named as the user wrote it (:func:`~.settings.written_name`: the Django name
  under ``namespace="CELERY"``, the environment variable when the value came from there).
* **Names** (:func:`unknown_settings`): a name that looks like one of this package's settings
  but is read by nobody — a typo (``consul_lock_tll``), or a Django setting without the app's
  namespace (``CONSUL_LOCK_TTL`` where the app reads ``CELERY_CONSUL_LOCK_TTL``) — is logged
  as a warning naming the setting meant (the nearest valid name, by :mod:`difflib`). A
  warning, not a refusal: an unknown name changes nothing, and a settings module may be
  shared with other programs.
* **The agent** (:func:`probe_agent`): a worker whose agent answers, but not as a Consul
  agent over the settings given (a TLS failure, a web server at the address), does not start
  under ``fail_policy="closed"``: waiting does not fix a setting, and a worker whose every
  locked run fails at once would be always free and draw the queue. A beat does not start
  then under any policy: it could never lead. An agent that does not
  answer at all (down, no cluster leader yet) is an outage, not a setting: the worker's agent
  watch keeps it from consuming until the agent answers (:mod:`.availability`).
* **Flask** (:func:`~.contrib.flask.tasks_without_flask_app`): a worker of an app with
  ``LockedFlaskTask`` tasks but no ``celery_app.flask_app`` does not start (one line naming
  the tasks): no app context is pushed in a worker, so every run of them would fail.

Limit: a callable ``lock_key`` is checked only when it is called (by a run), and settings
read by the user's own code (``ConsulLock(...)`` in a task body) only when that code runs.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, NoReturn

from celery.signals import celeryd_after_setup, worker_init

from .availability import AVAILABILITY_SETTINGS, PROBE_TIMEOUT, AvailabilityConfig, ConsulAgentWatch
from .consul import ConsulClient
from .contrib.flask import MISSING_FLASK_APP, tasks_without_flask_app
from .election import BEAT_SETTINGS, BeatConfig
from .errors import ConsulLockError, ConsulUnavailable, InvalidSetting, name_settings
from .settings import CELERY_PREFIX, CONSUL_SETTINGS, ConsulSettings, Setting, namespaced_name, written_name
from .task import EAGER_SETTINGS, TASK_SETTINGS, ConsulLockedTask, eager_mode, task_defaults

__all__ = [
    "ALL_SETTINGS",
    "check_app",
    "locked_tasks",
    "probe_agent",
    "refuse",
    "refuse_a_foreign_agent",
    "refused_at_start",
    "unknown_settings",
    "warn_unknown_settings",
]

log = logging.getLogger("celery_consul_lock.startup")

#: Every setting of the package, each declared once beside what it configures.
ALL_SETTINGS: tuple[Setting, ...] = (
    *CONSUL_SETTINGS,
    *AVAILABILITY_SETTINGS,
    *BEAT_SETTINGS,
    *TASK_SETTINGS,
    *EAGER_SETTINGS,
)
#: How close (difflib's ratio, 0..1) a name's tail must be to a setting's to be suggested:
#: ``tll`` is 0.67 from ``ttl``; ``colour`` is at most 0.35 from any setting.
SUGGESTION_CUTOFF = 0.6

#: The process a refusal ends.
Process = Literal["worker", "beat"]


# -- values -------------------------------------------------------------------------------------


def locked_tasks(app: Any) -> list[ConsulLockedTask]:
    """The app's ConsulLockedTask tasks (finalizes the app, as a worker does at start)."""
    return [task for task in app.tasks.values() if isinstance(task, ConsulLockedTask)]


def check_app(app: Any) -> ConsulSettings:
    """Read and validate every setting of ``app`` the way its workers use them, and each
    locked task's own options; the app's connection settings. Raises InvalidSetting naming
    the first refused one as the user wrote it. From then on, this process's errors name the
    address and token settings as the app spells them (:func:`~.errors.name_settings`)."""
    conf = app.conf
    settings = ConsulSettings.from_celery(conf)
    AvailabilityConfig.from_celery(conf)
    task_defaults(conf)
    eager_mode(conf)
    for task in locked_tasks(app):
        task.check_lock_options()
    name_settings(
        address=_written_with_env(conf, "address", "CONSUL_HTTP_ADDR"),
        token=_written_with_env(conf, "token", "CONSUL_HTTP_TOKEN"),
    )
    return settings


def _written_with_env(conf: Any, name: str, env: str) -> str:
    """``CELERY_CONSUL_LOCK_ADDRESS / CONSUL_HTTP_ADDR``: the setting as ``conf`` spells it, and
    the environment variable that stands in for it."""
    return f"{written_name(conf, CELERY_PREFIX + name)} / {env}"


@contextmanager
def refused_at_start(process: Process) -> Iterator[None]:
    """An InvalidSetting raised inside ends the process: one line on stderr, exit status 1
    (a SystemExit with the message: no traceback; Celery's worker and beat let it through)."""
    try:
        yield
    except InvalidSetting as exc:
        refuse(process, str(exc))


def refuse(process: Process, problem: str) -> NoReturn:
    """End the process with ``celery-consul-lock: <problem>; the <process> does not start``."""
    raise SystemExit(f"celery-consul-lock: {problem}; the {process} does not start")


def probe_agent(settings: ConsulSettings) -> ConsulUnavailable | None:
    """Ask the agent of ``settings`` who leads (one request, at most min(``timeout``,
    PROBE_TIMEOUT) s): None if it answers, else why not. A ``transient`` failure is an
    outage (down, no cluster leader yet); any other is a setting (TLS refused, not Consul
    at that address), which waiting does not fix."""
    client = ConsulClient(settings, timeout=min(settings.timeout, PROBE_TIMEOUT))
    try:
        client.status_leader()
    except ConsulUnavailable as exc:
        return exc
    except ConsulLockError:  # it answered as Consul (an ACL refusal, say): the runs report the rest
        return None
    finally:
        client.close()
    return None


# -- names --------------------------------------------------------------------------------------


def unknown_settings(conf: Any, declared: tuple[Setting, ...] = ALL_SETTINGS) -> list[str]:
    """One message per name in the app's configuration that looks like one of ``declared``
    (it contains ``consul_lock_``, in any case) but is read by nobody: a typo, with the
    nearest valid name, or a valid name spelt for another namespace than the app reads, with
    the spelling it reads. Names as the configuration spells them; sorted."""
    conf.get(CELERY_PREFIX + "address")  # Celery loads the configuration at its first read
    prefix: str = getattr(conf, "prefix", None) or ""
    written = {key for mapping in conf.maps[:-1] for key in mapping if isinstance(key, str)}  # not Celery's defaults
    known = {s.name for s in declared}
    return [m for m in (_name_problem(key, prefix, known) for key in sorted(written)) if m]


def _name_problem(key: str, prefix: str, known: set[str]) -> str | None:
    lower = key.lower()
    at = lower.find(CELERY_PREFIX)
    if at < 0:
        return None
    name = lower[at + len(CELERY_PREFIX) :]
    if name in known:
        expected = namespaced_name(CELERY_PREFIX + name, prefix)
        if key in (expected, CELERY_PREFIX + name):
            return None  # read by Celery (with the namespace, or as set in app.conf)
        if prefix:
            how = f"this app reads its settings with namespace={prefix.rstrip('_')!r}"
        else:
            how = "this app reads its settings without a namespace"
        return f"{key} is ignored: {how} (app.config_from_object); write {expected}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=SUGGESTION_CUTOFF)
    hint = "see the configuration page for the settings"
    if close:
        hint = f"did you mean {namespaced_name(CELERY_PREFIX + close[0], prefix)}?"
    return f"{key} is not a celery-consul-lock setting and is ignored; {hint}"


def warn_unknown_settings(conf: Any) -> None:
    """Log :func:`unknown_settings` as warnings, one line each."""
    for message in unknown_settings(conf):
        log.warning("%s", message)


# -- the worker ---------------------------------------------------------------------------------


def _uses_the_package(app: Any) -> bool:
    return bool(locked_tasks(app)) or ConsulAgentWatch in app.steps["consumer"]


def _embeds_our_beat(worker: Any) -> bool:
    """True for a ``celery worker -B`` whose beat is leader-elected (``--scheduler consul``)."""
    if not (getattr(worker, "options", None) or {}).get("beat"):
        return False
    from .beat import leader_elected_scheduler  # here: beat imports this module

    return leader_elected_scheduler(worker.scheduler)


def _check_worker(sender: Any = None, **_: Any) -> None:
    """worker_init, in the worker's main process: refuse to start on a bad setting (the
    embedded beat's too: better than a worker whose beat child dies)."""
    app = getattr(sender, "app", None)
    embedded = app is not None and _embeds_our_beat(sender)
    if app is None or not (embedded or _uses_the_package(app)):
        return
    with refused_at_start("worker"):
        settings = check_app(app)
        if embedded:
            BeatConfig.from_app(app)
    unlinked = tasks_without_flask_app(app)
    if unlinked:
        refuse("worker", f"{', '.join(unlinked)}: {MISSING_FLASK_APP}, or every run of them fails")
    if settings.fail_policy == "closed":
        policy = written_name(app.conf, CELERY_PREFIX + "fail_policy")
        refuse_a_foreign_agent("worker", settings, app.conf, f"with {policy} 'closed', every locked run would fail")
    elif embedded:  # under fail_policy "open" too: else the worker would run on without its beat
        refuse_a_foreign_agent("worker", settings, app.conf, "its embedded beat could never lead")


def refuse_a_foreign_agent(process: Process, settings: ConsulSettings, conf: Any, why: str) -> None:
    """End the process (:func:`refuse`) if the agent of ``settings`` answers, but not as a
    Consul agent over them (:func:`probe_agent`: a failure that is not ``transient``);
    ``why`` says what would follow. An agent that does not answer at all is left to wait for."""
    problem = probe_agent(settings)
    if problem is not None and not problem.transient:
        refuse(process, f"{_described(problem, conf)} ({why})")


def _warn_worker(sender: Any = None, instance: Any = None, conf: Any = None, **_: Any) -> None:
    """celeryd_after_setup, once logging is set up: warn about names nobody reads, and about
    an agent that does not answer where no agent watch keeps the worker from consuming (the
    watch says so itself, and waits)."""
    app = getattr(instance, "app", None)
    if conf is None or app is None:
        return
    warn_unknown_settings(conf)
    if not _uses_the_package(app) or AvailabilityConfig.from_celery(conf).agent_watch:
        return
    problem = probe_agent(ConsulSettings.from_celery(conf))
    if problem is not None and problem.transient:
        log.warning(
            "%s; this worker consumes anyway (%s is off): its locked runs go back to the queue for "
            "other workers (fail_policy closed) or run without a lock (open) until the agent answers",
            _described(problem, conf), written_name(conf, CELERY_PREFIX + "agent_watch"),
        )  # fmt: skip


def _described(problem: ConsulUnavailable, conf: Any) -> str:
    """``problem``'s message naming the address setting as the app spells it, without its
    final full stop (a line goes on after it)."""
    return problem.message(_written_with_env(conf, "address", "CONSUL_HTTP_ADDR")).rstrip(".")


worker_init.connect(_check_worker, weak=False)
celeryd_after_setup.connect(_warn_worker, weak=False)
