"""Settings checked when a worker or a beat starts (celery_consul_lock.startup), not at the
first task: a bad value ends the process with one line naming the setting as the user wrote
it; a name nobody reads is warned with the nearest valid one; a worker whose agent does not
answer says so and does not consume until it does.

The process tests run real `celery worker` / `celery beat` processes of a small project
written into the test's directory: a plain Celery app, or a Django one configured with
``config_from_object("django.conf:settings", namespace="CELERY")``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from celery import Celery

from celery_consul_lock import ConsulSettings, InvalidSetting
from celery_consul_lock.consul import ConsulClient
from celery_consul_lock.election import BeatConfig
from celery_consul_lock.errors import ACLDenied, ConsulUnavailable, name_settings
from celery_consul_lock.settings import written_name
from celery_consul_lock.startup import check_app, unknown_settings
from celery_consul_lock.testing import Proc, spawn, start_beat, start_consul

from .servers import wait_for
from .workers import ROOT, start_worker, worker_env

#: A worker or beat refusing its settings exits within this long: an import of Celery (and
#: Django) on a loaded 2-core machine, no broker or Consul needed.
EXIT_TIMEOUT = 90

# -- the projects -------------------------------------------------------------------------------

PLAIN_APP = """\
import os
from celery import Celery
from celery_consul_lock import ConsulLockedTask

app = Celery("startproj")
app.conf.update(broker_url=os.environ["REDIS_URL"], result_backend=os.environ["REDIS_URL"])
app.conf.update({settings})

@app.task(bind=True, base=ConsulLockedTask, name="startproj.locked")
def locked(self):
    return "ran"
"""

DJANGO_APP = """\
import os
import django
from celery import Celery
from celery_consul_lock import ConsulLockedTask

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "startproj.settings")
django.setup()
app = Celery("startproj")
app.config_from_object("django.conf:settings", namespace="CELERY")

@app.task(bind=True, base=ConsulLockedTask, name="startproj.locked")
def locked(self):
    return "ran"
"""

DJANGO_SETTINGS = """\
import os
SECRET_KEY = "test-only"
INSTALLED_APPS = []
USE_TZ = True
CELERY_BROKER_URL = os.environ["REDIS_URL"]
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
"""


def write_project(root: Path, settings: dict[str, object], *, django: bool) -> str:
    """Write the package ``startproj`` under ``root`` with ``settings`` (names as written: in
    Django's settings.py, or ``app.conf.update`` of a plain app); its app's import path."""
    package = root / "startproj"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if django:
        lines = "".join(f"{name} = {value!r}\n" for name, value in settings.items())
        (package / "settings.py").write_text(DJANGO_SETTINGS + lines)
        (package / "app.py").write_text(DJANGO_APP)
    else:
        (package / "app.py").write_text(PLAIN_APP.format(settings=repr(settings)))
    return "startproj.app"


def project_env(root: Path, redis_url: str, consul_address: str, **extra: str) -> dict[str, str]:
    env = worker_env(redis_url, consul_address, **extra)
    env["PYTHONPATH"] = f"{root}{os.pathsep}{ROOT}"
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def celery(root: Path, name: str, app_path: str, env: dict[str, str], *args: str) -> Proc:
    """`celery -A app_path ARGS` in ``root``, its output in ``root/<name>.log``."""
    command = [sys.executable, "-m", "celery", "-A", app_path, *args]
    return spawn(name, command, root, cwd=root, env=env)


def refusal(proc: Proc) -> tuple[str, str]:
    """(the log, our one line) of a process that refused to start: it exited with status 1,
    printed exactly one line of ours, no traceback, and never said ready nor joined an
    election."""
    try:
        code = proc.wait(EXIT_TIMEOUT)
    finally:
        proc.stop()
    log = proc.log_text()
    ours = [line for line in log.splitlines() if "celery-consul-lock" in line]
    assert code == 1 and len(ours) == 1 and ours[0].startswith("celery-consul-lock: "), log[-3000:]
    assert "Traceback" not in log and "ready." not in log and "joining the election" not in log, log[-3000:]
    return log, ours[0]


# -- unit: names, as the user wrote them --------------------------------------------------------


def namespaced_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: str) -> Celery:
    """A Celery app configured as Django does: a settings object read with namespace CELERY."""
    module = f"startcfg_{abs(hash(lines)) % 10**8}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(lines))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Celery("t", set_as_current=False)
    app.config_from_object(module, namespace="CELERY")
    return app


def test_a_typo_is_warned_with_the_nearest_setting():
    app = Celery("t", set_as_current=False)
    app.conf.update(consul_lock_tll=20, consul_lock_lock_delay=5, consul_lock_colour="blue", broker_url="memory://")
    assert unknown_settings(app.conf) == [
        "consul_lock_colour is not a celery-consul-lock setting and is ignored; see the configuration page for the settings",
        "consul_lock_tll is not a celery-consul-lock setting and is ignored; did you mean consul_lock_ttl?",
    ]


def test_django_names_are_checked_as_django_spells_them(tmp_path, monkeypatch):
    app = namespaced_app(
        tmp_path,
        monkeypatch,
        """
        CELERY_CONSUL_LOCK_TLL = 20          # a typo
        CONSUL_LOCK_LOCK_DELAY = 5           # the namespace missing: Celery never reads it
        CELERY_CONSUL_LOCK_BEAT_NAME = "ok"  # read
        CELERY_BROKER_URL = "memory://"
        """,
    )
    app.conf.consul_lock_timeout = 3  # set in code, without the namespace: read too
    assert unknown_settings(app.conf) == [
        "CELERY_CONSUL_LOCK_TLL is not a celery-consul-lock setting and is ignored; did you mean CELERY_CONSUL_LOCK_TTL?",
        "CONSUL_LOCK_LOCK_DELAY is ignored: this app reads its settings with namespace='CELERY' (app.config_from_object); "
        "write CELERY_CONSUL_LOCK_LOCK_DELAY",
    ]


def test_a_namespaced_name_in_an_app_without_a_namespace_is_warned():
    app = Celery("t", set_as_current=False)
    app.conf.update(CELERY_CONSUL_LOCK_TTL=20, consul_lock_ttl=30)
    assert unknown_settings(app.conf) == [
        "CELERY_CONSUL_LOCK_TTL is ignored: this app reads its settings without a namespace (app.config_from_object); "
        "write consul_lock_ttl"
    ]


def test_a_bad_value_is_named_as_the_django_user_wrote_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    app = namespaced_app(tmp_path, monkeypatch, "CELERY_CONSUL_LOCK_TTL = 5\n")
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.from_celery(app.conf)
    assert str(info.value).startswith("CELERY_CONSUL_LOCK_TTL=5 is invalid: Consul accepts a session TTL"), str(info.value)
    # The beat's own settings too; and one set in code without the namespace is named as set.
    app = namespaced_app(tmp_path, monkeypatch, "CELERY_CONSUL_LOCK_BEAT_CHECK_TTL = 0.5\n")
    with pytest.raises(InvalidSetting) as info:
        BeatConfig.from_app(app)
    assert str(info.value).startswith("CELERY_CONSUL_LOCK_BEAT_CHECK_TTL=0.5 is invalid: must be at least 1 s")
    app.conf.consul_lock_timeout = 0
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.from_celery(app.conf)
    assert str(info.value).startswith("consul_lock_timeout=0 is invalid: expected seconds, more than 0"), str(info.value)
    assert written_name(app.conf, "CONSUL_HTTP_ADDR") == "CONSUL_HTTP_ADDR"


def test_after_the_start_up_check_errors_name_the_address_and_token_settings_as_the_django_user_wrote_them(tmp_path, monkeypatch):
    """A run-time error (an agent gone, an ACL refusal) says where to fix it with the names the
    user wrote: CELERY_CONSUL_LOCK_ADDRESS under Django, not consul_lock_address."""
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    app = namespaced_app(tmp_path, monkeypatch, "CELERY_CONSUL_LOCK_ADDRESS = '127.0.0.1:1'\n")
    settings = check_app(app)
    with pytest.raises(ConsulUnavailable) as info:
        ConsulClient(settings).agent_self()
    assert "point CELERY_CONSUL_LOCK_ADDRESS / CONSUL_HTTP_ADDR at it" in str(info.value), str(info.value)
    denied = str(ACLDenied(settings.base_url, "acquiring k", "key:write", "k"))
    assert "set CELERY_CONSUL_LOCK_TOKEN / CONSUL_HTTP_TOKEN to a token" in denied, denied
    # The cron wrapper has no Celery settings: it names Consul's variables alone.
    name_settings(address="CONSUL_HTTP_ADDR", token="CONSUL_HTTP_TOKEN")
    denied = str(ACLDenied(settings.base_url, "acquiring k", "key:write", "k", token_unknown=True))
    assert "Set CONSUL_HTTP_TOKEN to a token that exists" in denied and "consul_lock" not in denied, denied


# -- a worker -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("django", "settings", "env", "expected"),
    [
        pytest.param(
            True,
            {"CELERY_CONSUL_LOCK_KEY_PREFIX": "mysite"},
            {},
            "CELERY_CONSUL_LOCK_KEY_PREFIX='mysite' is invalid: a key prefix must end with '/', or the keys would be "
            "'mysitelocks/...'; write 'mysite/'; the worker does not start",
            id="django-key-prefix",
        ),
        pytest.param(
            False,
            {"consul_lock_on_held": "sometimes"},  # read at the first run before
            {},
            "consul_lock_on_held='sometimes' is invalid: expected one of skip, wait, retry, fail; the worker does not start",
            id="task-default",
        ),
        pytest.param(
            False,
            {},
            {"CONSUL_HTTP_ADDR": "consul.internal"},
            "CONSUL_HTTP_ADDR='consul.internal' is invalid: expected host:port or http(s)://host:port, e.g. "
            "127.0.0.1:8500; the worker does not start",
            id="environment",
        ),
    ],
)
def test_a_worker_with_a_bad_setting_exits_with_one_line_naming_it(
    tmp_path, redis_server, consul, django, settings, env, expected
):
    app_path = write_project(tmp_path, settings, django=django)
    proc_env = project_env(tmp_path, redis_server.url, consul.address, **env)
    worker = celery(tmp_path, "worker", app_path, proc_env, "worker", "-P", "solo", "-l", "INFO", "--without-mingle")
    _, line = refusal(worker)
    assert line == f"celery-consul-lock: {expected}", line


@pytest.mark.parametrize("process", ["worker", "worker-B-open", "beat"])
def test_a_process_pointed_at_something_that_is_not_consul_does_not_start(tmp_path, redis_server, web_server, process):
    """Waiting does not fix an address: under fail_policy closed, every locked run would fail
    at once (and a worker failing every run is always free to take the next); a beat, also
    one embedded in a fail-open worker, could never lead."""
    settings = {"consul_lock_fail_policy": "open"} if process == "worker-B-open" else {}
    app_path = write_project(tmp_path, settings, django=False)
    env = project_env(tmp_path, redis_server.url, web_server.address)
    args = ("worker", "-P", "solo", "-l", "INFO", "--without-mingle")
    if process == "worker":
        proc = celery(tmp_path, "worker", app_path, env, *args)
        why = "(with consul_lock_fail_policy 'closed', every locked run would fail); the worker"
    elif process == "worker-B-open":
        proc = celery(tmp_path, "worker", app_path, env, *args, "-B", "--scheduler", "consul")
        why = "(its embedded beat could never lead); the worker"
    else:
        proc = start_beat("beat", tmp_path, env, app_path=app_path, cwd=tmp_path)
        why = "(it could never lead); the beat"
    _, line = refusal(proc)
    assert f"http://{web_server.address}" in line and line.endswith(f"{why} does not start"), line
    assert "is not a Consul agent" in line, line


def test_a_worker_without_the_agent_watch_warns_at_start_that_its_agent_does_not_answer(proj, workers, tmp_path):
    agent = start_consul(tmp_path / "down", node="down")
    try:
        agent.wait_ready()
    finally:
        agent.stop()
    (worker,) = workers(1, concurrency=1, consul_address=agent.address, env={"TEST_AGENT_WATCH": "false"})
    wait_for(lambda: "ready." in worker.log_text(), 30, "ready", procs=[worker])
    log = worker.log_text()
    warning = "this worker consumes anyway (consul_lock_agent_watch is off): its locked runs go back to the queue"
    assert log.count(warning) == 1 and log.index(warning) < log.index("ready."), log[-3000:]
    assert f"Consul agent at http://{agent.address} is unreachable" in log.split(warning)[0].splitlines()[-1], log[-3000:]


def test_a_django_worker_warns_of_misspelt_and_unnamespaced_settings_and_starts(tmp_path, proj, redis_server, consul):
    settings = {"CELERY_CONSUL_LOCK_TLL": 20, "CONSUL_LOCK_LOCK_DELAY": 5, "CELERY_CONSUL_LOCK_TIMEOUT": 4}
    app_path = write_project(tmp_path, settings, django=True)
    env = project_env(tmp_path, redis_server.url, consul.address)
    worker = start_worker(proj.app, tmp_path, env, app_path=app_path, cwd=tmp_path, pool="solo", concurrency=1)
    try:
        wait_for(lambda: "ready." in worker.log_text(), 30, "ready", procs=[worker])
        log = worker.log_text()
    finally:
        worker.stop()
    typo = "WARNING/MainProcess] CELERY_CONSUL_LOCK_TLL is not a celery-consul-lock setting and is ignored; did you mean "
    typo += "CELERY_CONSUL_LOCK_TTL?"
    unread = "WARNING/MainProcess] CONSUL_LOCK_LOCK_DELAY is ignored: this app reads its settings with namespace='CELERY' "
    unread += "(app.config_from_object); write CELERY_CONSUL_LOCK_LOCK_DELAY"
    assert log.count(typo) == 1 and log.count(unread) == 1, log[-3000:]
    assert log.index(typo) < log.index("ready.") and "CELERY_CONSUL_LOCK_TIMEOUT" not in log, log[-3000:]


def test_a_worker_whose_agent_does_not_answer_at_start_says_so_and_consumes_only_once_it_does(proj, workers, tmp_path):
    """Not `ready` and then a failed first run: the worker says, before `ready`, that it does
    not consume until its agent answers; a locked message sent meanwhile waits in the queue
    (it is never taken and handed back) and runs once the agent answers."""
    agent = start_consul(tmp_path / "down", node="down")
    try:
        agent.wait_ready()
        agent.stop()
        (worker,) = workers(1, concurrency=1, consul_address=agent.address)
        result = proj.backup.delay(0.1)
        log = worker.log_text()
        down = (
            f"Consul agent at http://{agent.address} does not answer (connection refused): this worker does not consume "
            "from celery until it answers (address from CONSUL_HTTP_ADDR)"
        )
        assert down in log and log.index(down) < log.index("ready."), log[-3000:]
        agent.proc.restart()
        agent.wait_ready()
        assert result.get(timeout=60) == "done"
        log = worker.log_text()  # before the agent stops again below
    finally:
        agent.stop()
    assert log.count(down) == 1 and log.count(f"Consul agent at http://{agent.address} answers again after") == 1, log[-3000:]
    assert "sent back to the queue" not in log and "unreachable" not in log, log[-3000:]


def test_consul_lock_check_warns_of_the_same_names_and_refuses_the_same_values(tmp_path, redis_server, consul):
    """`celery consul-lock check` judges the settings as a worker's start does."""
    app_path = write_project(tmp_path, {"CELERY_CONSUL_LOCK_TLL": 20, "CELERY_CONSUL_LOCK_KEY_PREFIX": "mysite"}, django=True)
    env = project_env(tmp_path, redis_server.url, consul.address)
    argv = [sys.executable, "-m", "celery", "-A", app_path, "consul-lock", "check", "--no-beat"]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "warning: CELERY_CONSUL_LOCK_TLL is not a celery-consul-lock setting and is ignored; did you mean " in done.stderr
    assert "check FAILED: invalid setting: CELERY_CONSUL_LOCK_KEY_PREFIX='mysite' is invalid" in done.stderr, done.stderr


# -- a beat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True], ids=["beat", "worker-B"])
def test_a_beat_with_a_bad_setting_exits_with_one_line_not_a_traceback(tmp_path, redis_server, consul, embedded):
    app_path = write_project(tmp_path, {"CELERY_CONSUL_LOCK_BEAT_CHECK_TTL": 0.5}, django=True)
    env = project_env(tmp_path, redis_server.url, consul.address)
    expected = "CELERY_CONSUL_LOCK_BEAT_CHECK_TTL=0.5 is invalid: must be at least 1 s and twice the renewal interval"
    if embedded:
        args = ("worker", "-B", "--scheduler", "consul", "-P", "solo", "-l", "INFO", "--without-mingle")
        proc = celery(tmp_path, "worker", app_path, env, *args)
    else:
        proc = start_beat("beat", tmp_path, env, app_path=app_path, cwd=tmp_path)
    _, line = refusal(proc)
    process = "worker" if embedded else "beat"
    assert line.startswith(f"celery-consul-lock: {expected}") and line.endswith(f"; the {process} does not start"), line


def test_a_beat_warns_of_a_misspelt_setting_and_runs(tmp_path, redis_server, consul):
    app_path = write_project(tmp_path, {"consul_lock_beat_check_tll": 3}, django=False)
    beat = start_beat("beat", tmp_path, project_env(tmp_path, redis_server.url, consul.address), app_path=app_path, cwd=tmp_path)
    try:
        wait_for(lambda: "joining the election" in beat.log_text(), 120, "the beat to join", procs=[beat])
        log = beat.log_text()
    finally:
        beat.stop()
    warning = (
        "consul_lock_beat_check_tll is not a celery-consul-lock setting and is ignored; did you mean consul_lock_beat_check_ttl?"
    )
    assert log.count(warning) == 1 and "WARNING" in log.split(warning)[0].splitlines()[-1], log[-3000:]
