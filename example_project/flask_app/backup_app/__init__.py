"""The example Flask application: an application factory with Celery wired the way Flask's
docs show (``celery_init_app``); tasks that hold a Consul lock use the package's
:class:`~celery_consul_lock.LockedFlaskTask`.

    celery -A make_celery worker -l INFO
    celery -A make_celery beat -S consul -l INFO        # on every node: one leads
"""

import os

from celery import Celery, Task
from celery.schedules import crontab
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    celery_app.flask_app = app  # the app LockedFlaskTask runs the locked tasks in
    app.extensions["celery"] = celery_app
    return celery_app


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
