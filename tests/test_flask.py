"""LockedFlaskTask: a locked task's body runs inside its Flask app's context.

The example Flask app's test (test_examples.py) checks the same in a real worker; these
check it in one process: an eager call with the default bypass, and one locked against a
real dev agent. A real worker of an app that forgot the link does not start.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, Task
from flask import Flask, current_app

from celery_consul_lock import ConsulLockError, LockedFlaskTask
from celery_consul_lock.command import preflight

from .servers import free_port
from .test_startup import celery, project_env, refusal

#: A Flask app wired as Flask's docs show, with its locked task, but without the line
#: ``celery_app.flask_app = app``.
UNLINKED_APP = """\
import os
from celery import Celery, Task
from flask import Flask
from celery_consul_lock import LockedFlaskTask

flask_app = Flask("shop")


class FlaskTask(Task):
    def __call__(self, *args, **kwargs):
        with flask_app.app_context():
            return self.run(*args, **kwargs)


app = Celery("shop", task_cls=FlaskTask)
app.conf.update(broker_url=os.environ["REDIS_URL"], result_backend=os.environ["REDIS_URL"])


@app.task(bind=True, base=LockedFlaskTask, name="shop.report")
def report(self):
    return "ran"
"""


def flask_project(link: bool = True, **conf: Any) -> tuple[Flask, Any]:
    """A Flask app wired to an in-process Celery app the way Flask's docs show
    (``celery_init_app``), and a LockedFlaskTask task returning what its body saw."""
    flask_app = Flask("shop")

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(flask_app.name, task_cls=FlaskTask, broker="memory://", set_as_current=False)
    celery_app.conf.update(task_always_eager=True, task_eager_propagates=True, **conf)
    if link:
        celery_app.flask_app = flask_app

    @celery_app.task(bind=True, base=LockedFlaskTask, name="shop.report")
    def report(self, customer: int) -> dict[str, Any]:
        lock = self.lock
        return {"app": current_app.name, "customer": customer, "held": lock.held if lock is not None else None}

    return flask_app, report


def test_an_eager_call_runs_in_the_flask_app_context_without_a_lock():
    _, report = flask_project(consul_lock_address=f"127.0.0.1:{free_port()}")  # no agent there
    assert report.delay(1).get() == {"app": "shop", "customer": 1, "held": None}
    assert report(2) == {"app": "shop", "customer": 2, "held": None}  # a direct call


def test_a_locked_run_holds_its_lock_inside_the_flask_app_context(consul):
    _, report = flask_project(consul_lock_address=consul.address, consul_lock_key_prefix="flask/", consul_lock_eager="consul")
    assert report.delay(3).get() == {"app": "shop", "customer": 3, "held": True}


def test_without_the_link_a_run_inside_an_app_context_uses_it_and_any_other_is_refused():
    flask_app, report = flask_project(link=False, consul_lock_address=f"127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match=r"shop\.report: .*celery_app\.flask_app = app"):
        report.delay(4).get()
    with flask_app.app_context():
        assert report.delay(5).get()["app"] == "shop"


def test_a_worker_of_an_app_without_the_link_does_not_start(tmp_path, redis_server, consul):
    """Without ``celery_app.flask_app``, every run of a LockedFlaskTask in a worker would fail
    (no app context is pushed there): the worker says so in one line and does not start,
    rather than saying ``ready`` and failing each run."""
    (tmp_path / "shopapp.py").write_text(UNLINKED_APP)
    env = project_env(tmp_path, redis_server.url, consul.address)
    worker = celery(tmp_path, "worker", "shopapp", env, "worker", "-P", "solo", "-l", "INFO", "--without-mingle")
    _, line = refusal(worker)
    assert line == (
        "celery-consul-lock: shop.report: LockedFlaskTask needs the Flask app to run in: set celery_app.flask_app = app "
        "where the Celery app is created (celery_init_app), or every run of them fails; the worker does not start"
    ), line


def test_consul_lock_check_names_the_missing_link_as_the_worker_does():
    _, report = flask_project(link=False, consul_lock_address=f"127.0.0.1:{free_port()}")  # refused before any request
    missing = r"^shop\.report: LockedFlaskTask needs the Flask app to run in: set celery_app\.flask_app = app"
    with pytest.raises(ConsulLockError, match=missing):
        preflight(report.app, beat=False)
