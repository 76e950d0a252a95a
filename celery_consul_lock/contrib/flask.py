"""Flask: :class:`LockedFlaskTask`, a :class:`ConsulLockedTask` that runs inside the Flask app
context.

Flask's documented Celery set-up (``celery_init_app``) gives the Celery app a ``FlaskTask``
base class whose ``__call__`` pushes the app context. ``@shared_task(base=ConsulLockedTask)``
replaces that base, so the body would run without ``current_app`` and every Flask extension
would fail. Use this class instead, and link the two apps once in ``celery_init_app``::

    celery_app = Celery(app.name, task_cls=FlaskTask)
    ...
    celery_app.flask_app = app          # the Flask app LockedFlaskTask runs in

    @shared_task(bind=True, base=LockedFlaskTask)
    def nightly_backup(self): ...

Guarantee: the whole locked call (lock, body, tick mark, release, and the ``task_lock_*``
signal receivers) runs inside the app context of ``celery_app.flask_app``. Without that
attribute, a call made inside an app context already pushed (an eager call in a view or a
test) runs in that one; anywhere else the run fails with a RuntimeError saying what to set,
and a worker of such an app does not start (:func:`tasks_without_flask_app`, checked at the
worker's start with the settings).

Flask is imported only when a task of this class runs: importing this module does not need it.
"""

from __future__ import annotations

from typing import Any

from ..task import ConsulLockedTask

__all__ = ["FLASK_APP_ATTRIBUTE", "LockedFlaskTask", "tasks_without_flask_app"]

#: The Celery app's attribute naming its Flask app (set in ``celery_init_app``).
FLASK_APP_ATTRIBUTE = "flask_app"
#: What a run, or a worker's start, says when that attribute is missing.
MISSING_FLASK_APP = (
    f"LockedFlaskTask needs the Flask app to run in: set celery_app.{FLASK_APP_ATTRIBUTE} = app "
    "where the Celery app is created (celery_init_app)"
)


class LockedFlaskTask(ConsulLockedTask):
    """ConsulLockedTask inside the Flask app context of ``<celery app>.flask_app`` (see the
    module doc)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flask_app = getattr(self.app, FLASK_APP_ATTRIBUTE, None)
        if flask_app is None:
            import flask

            if not flask.has_app_context():
                raise RuntimeError(f"{self.name}: {MISSING_FLASK_APP}")
            return super().__call__(*args, **kwargs)
        with flask_app.app_context():
            return super().__call__(*args, **kwargs)


def tasks_without_flask_app(app: Any) -> list[str]:
    """The names of ``app``'s LockedFlaskTask tasks, sorted, if ``app`` has no Flask app to run
    them in (``app.flask_app`` unset): in a worker, where no app context is pushed, every run
    of them would fail. Empty when it has one, or no such task. Finalizes the app."""
    if getattr(app, FLASK_APP_ATTRIBUTE, None) is not None:
        return []
    return sorted(name for name, task in app.tasks.items() if isinstance(task, LockedFlaskTask))
