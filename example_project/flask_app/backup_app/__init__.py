"""The example Flask application: an application factory with Celery wired the way Flask's
docs show (``celery_init_app``), and :class:`LockedFlaskTask` for tasks that hold a Consul lock.

    celery -A make_celery worker -l INFO
    celery -A make_celery beat -S consul -l INFO        # on every node: one leads
"""

import os

from celery import Celery, Task
from celery.schedules import crontab
from flask import Flask

from celery_consul_lock import ConsulLockedTask


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    celery_app.flask_app = app  # for LockedFlaskTask
    app.extensions["celery"] = celery_app
    return celery_app


class LockedFlaskTask(ConsulLockedTask):
    """ConsulLockedTask inside the Flask app context.

    ``base=ConsulLockedTask`` replaces the app's ``FlaskTask``, whose ``__call__`` is what
    pushes the app context; this class pushes it around the whole locked run instead: the
    lock is taken, the body run, the tick recorded and the lock released inside the context
    of the app that ``celery_init_app`` wired to this Celery app (so ``current_app`` and
    extensions work in the body and in ``task_lock_*`` signal receivers). A Celery app that
    ``celery_init_app`` did not make fails the run with a RuntimeError saying so.
    """

    def __call__(self, *args: object, **kwargs: object) -> object:
        flask_app = getattr(self.app, "flask_app", None)
        if flask_app is None:
            raise RuntimeError(f"{self.name}: its Celery app has no Flask app; create it with celery_init_app")
        with flask_app.app_context():
            return super().__call__(*args, **kwargs)


def create_app() -> Flask:
    app = Flask(__name__)
    broker = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    app.config.from_mapping(
        CELERY={
            "broker_url": broker,
            "result_backend": broker,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            "beat_schedule": {
                "nightly-backup": {"task": "backup_app.tasks.nightly_backup", "schedule": crontab(hour=3, minute=0)},
                "report-customer-42": {"task": "backup_app.tasks.report", "schedule": crontab(hour=6, minute=0), "args": (42,)},
                "heartbeat": {"task": "backup_app.tasks.heartbeat", "schedule": 2.0},
            },
            # celery-consul-lock (the agent's address: CONSUL_HTTP_ADDR, default 127.0.0.1:8500)
            "consul_lock_key_prefix": os.environ.get("CONSUL_LOCK_KEY_PREFIX", "backups/"),
            "consul_lock_ttl": 15,
            "consul_lock_lock_delay": 5,
        },
    )
    celery_init_app(app)

    from . import views  # imports the tasks

    app.register_blueprint(views.bp)
    return app
