"""The private parts of Celery and django-celery-beat this package relies on, checked.

Two private seams, both about rebuilding the beat's schedule heap:

* ``celery.beat.Scheduler._heap``: the leader-elected beat (:mod:`.beat`) sets it to None
  after an election and after loading or restoring state, so that ``Scheduler.tick`` rebuilds
  the heap (``populate_heap``) from the entries as they now are;
* django-celery-beat's ``DatabaseScheduler._heap_invalidated``: ``LeaderDatabaseScheduler``
  clears it on election (:mod:`.contrib.django_celery_beat`), after reading the change its own
  set-up made, so the first tick is not sent twice.

If a release renamed or dropped either, our writes would do nothing, without an error: ticks
sent late, early or twice. So a scheduler that relies on them checks, when it starts, that the
code still uses those names (:func:`check_celery_scheduler`, :func:`check_django_celery_beat`),
and after a tick that had to rebuild the heap, that it did (:func:`check_heap_rebuilt`); if
not, it raises :class:`~celery_consul_lock.errors.InternalsChanged` naming the package, its
version, what changed and the versions tested.

Limit: the start-up check looks at the names the code uses (its bytecode), not at what it does
with them; what it does is tested by ``make test-matrix`` on the versions in :data:`TESTED`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

from .errors import InternalsChanged

__all__ = ["TESTED", "check_celery_scheduler", "check_django_celery_beat", "check_heap_rebuilt", "require_names"]

#: The releases ``make test-matrix`` runs the task and beat tests against (docs/development.md,
#: "Tested versions"): the oldest claimed in pyproject.toml and the newest at the time of the run.
TESTED = {"celery": "5.3.0 to 5.7.0", "django-celery-beat": "2.5.0 to 2.9.0"}

_HEAP_WHY = "the leader-elected beat sets Scheduler._heap = None to make tick() rebuild the schedule heap"
_INVALIDATED_WHY = (
    "LeaderDatabaseScheduler clears DatabaseScheduler._heap_invalidated on election, so its first tick is not sent twice"
)


def require_names(package: str, func: Callable[..., Any], names: tuple[str, ...], why: str) -> None:
    """Raise InternalsChanged unless ``func`` (a function of ``package``) uses every attribute
    or global in ``names``."""
    code = getattr(func, "__code__", None)
    used = set(code.co_names) if code is not None else set()
    missing = tuple(name for name in names if name not in used)
    if missing:
        where = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
        raise InternalsChanged(package, _version(package), where, missing, why, TESTED.get(package, "?"))


def check_celery_scheduler() -> None:
    """Celery's Scheduler still keeps its heap in ``_heap`` and rebuilds it in ``tick`` when
    it is None."""
    from celery.beat import Scheduler

    require_names("celery", Scheduler.__init__, ("_heap",), _HEAP_WHY)
    require_names("celery", Scheduler.tick, ("_heap", "populate_heap"), _HEAP_WHY)


def check_heap_rebuilt(scheduler: Any) -> None:
    """After a ``tick`` that followed ``scheduler._heap = None``: the heap was rebuilt."""
    if getattr(scheduler, "_heap", None) is None:
        from celery.beat import Scheduler

        raise InternalsChanged(
            "celery", _version("celery"), f"{Scheduler.__module__}.Scheduler.tick", ("_heap",), _HEAP_WHY, TESTED["celery"]
        )


def check_django_celery_beat() -> None:
    """django-celery-beat's DatabaseScheduler still compares schedules through
    ``_heap_invalidated``, which its ``schedule`` property sets when the schedule changed."""
    from django_celery_beat.schedulers import DatabaseScheduler

    require_names("django-celery-beat", DatabaseScheduler.schedules_equal, ("_heap_invalidated",), _INVALIDATED_WHY)
    require_names(
        "django-celery-beat", DatabaseScheduler.schedule.fget, ("_heap_invalidated", "schedule_changed"), _INVALIDATED_WHY
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
