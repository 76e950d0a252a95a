"""Settings: where each value comes from, and the message every bad value gets."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from celery import Celery

from celery_consul_lock import ConsulLock, ConsulSettings, InvalidSetting
from celery_consul_lock.errors import ACLDenied, ConsulUnavailable, LockTimeout, SessionGone


def test_defaults_without_environment():
    s = ConsulSettings.resolve({}, env={})
    assert (s.address, s.scheme, s.token, s.ttl, s.lock_delay, s.fail_policy) == (
        "127.0.0.1:8500",
        "http",
        None,
        15.0,
        15.0,
        "closed",
    )
    assert s.session_checks == ("serfHealth",)


def test_environment_fills_what_is_not_given():
    env = {
        "CONSUL_HTTP_ADDR": "https://consul.example:8501",
        "CONSUL_HTTP_TOKEN": "env-token",
        "CONSUL_HTTP_SSL_VERIFY": "false",
    }
    s = ConsulSettings.resolve({}, env=env)
    assert (s.address, s.scheme, s.token, s.verify) == ("consul.example:8501", "https", "env-token", False)
    assert s.base_url == "https://consul.example:8501"


def test_address_without_scheme_and_consul_http_ssl():
    s = ConsulSettings.resolve({}, env={"CONSUL_HTTP_ADDR": "10.1.2.3:8500", "CONSUL_HTTP_SSL": "true"})
    assert s.base_url == "https://10.1.2.3:8500"


def test_explicit_values_win_over_environment_including_the_token():
    env = {"CONSUL_HTTP_ADDR": "10.0.0.1:8500", "CONSUL_HTTP_TOKEN": "env-token"}
    s = ConsulSettings.resolve({"address": "127.0.0.1:9500", "token": "mine"}, env=env)
    assert (s.address, s.token) == ("127.0.0.1:9500", "mine")


def test_celery_settings_are_read_from_app_conf_then_environment(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:9999")
    app = Celery("t", set_as_current=False)
    app.conf.consul_lock_ttl = "20s"
    app.conf.consul_lock_lock_delay = 5
    s = ConsulSettings.from_celery(app.conf)
    assert (s.ttl, s.lock_delay, s.address) == (20.0, 5.0, "127.0.0.1:9999")


def test_django_style_namespaced_settings(tmp_path, monkeypatch):
    (tmp_path / "djsettings_ccl.py").write_text(
        "CELERY_CONSUL_LOCK_ADDRESS = '127.0.0.1:8600'\nCELERY_CONSUL_LOCK_FAIL_POLICY = 'open'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Celery("t", set_as_current=False)
    app.config_from_object("djsettings_ccl", namespace="CELERY")
    s = ConsulSettings.from_celery(app.conf)
    assert (s.address, s.fail_policy) == ("127.0.0.1:8600", "open")


def test_consul_lock_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:8600")
    lock = ConsulLock("locks/x/.lock")
    assert lock.settings.address == "127.0.0.1:8600"
    assert ConsulLock("locks/x/.lock", address="127.0.0.1:8700").settings.address == "127.0.0.1:8700"


def test_durations_accept_numbers_and_go_style_strings():
    s = ConsulSettings.resolve({"ttl": "1m", "lock_delay": "500ms", "timeout": 2}, env={})
    assert (s.ttl, s.lock_delay, s.timeout) == (60.0, 0.5, 2.0)


@pytest.mark.parametrize(
    ("given", "env", "message"),
    [
        ({"ttl": 5}, {}, "consul_lock_ttl=5 is invalid: Consul accepts a session TTL between 10 s and 86400 s"),
        ({"ttl": "2d"}, {}, "consul_lock_ttl='2d' is invalid: expected seconds"),
        ({"ttl": 90000}, {}, "consul_lock_ttl=90000 is invalid"),
        ({"lock_delay": -1}, {}, "consul_lock_lock_delay=-1 is invalid: Consul accepts a lock-delay between 0 and 60 s"),
        ({"lock_delay": 61}, {}, "consul_lock_lock_delay=61 is invalid: Consul accepts a lock-delay between 0 and 60 s"),
        ({"lock_delay": 0}, {}, "consul_lock_lock_delay=0 is invalid: a lock-delay of 0 with session checks"),
        ({"fail_policy": "maybe"}, {}, "consul_lock_fail_policy='maybe' is invalid: expected 'closed' or 'open'"),
        ({"address": "localhost"}, {}, "consul_lock_address='localhost' is invalid: expected host:port"),
        ({"address": "h:99999"}, {}, "consul_lock_address='h:99999' is invalid"),
        ({}, {"CONSUL_HTTP_ADDR": "not an address"}, "CONSUL_HTTP_ADDR='not an address' is invalid: expected host:port"),
        ({}, {"CONSUL_HTTP_SSL_VERIFY": "perhaps"}, "CONSUL_HTTP_SSL_VERIFY='perhaps' is invalid: expected true or false"),
        ({}, {"CONSUL_CACERT": "/no/such/ca.pem"}, "CONSUL_CACERT='/no/such/ca.pem' is invalid: no such file"),
        ({"key_prefix": "/abs/"}, {}, "consul_lock_key_prefix='/abs/' is invalid: a key prefix must not start with '/'"),
        (
            {"key_prefix": "mysite"},
            {},
            "consul_lock_key_prefix='mysite' is invalid: a key prefix must end with '/', or the keys would be "
            "'mysitelocks/...'; write 'mysite/'",
        ),
        ({"key_prefix": "my site/"}, {}, "consul_lock_key_prefix='my site/' is invalid: a key prefix must not contain spaces"),
        ({"session_checks": 5}, {}, "consul_lock_session_checks=5 is invalid: must be a list of Consul check IDs"),
        ({"scheme": "ftp"}, {}, "consul_lock_scheme='ftp' is invalid: expected 'http' or 'https'"),
        ({"colour": "blue"}, {}, "consul_lock_colour='blue' is invalid: unknown setting"),
    ],
)
def test_each_bad_setting_is_refused_naming_setting_and_value(given, env, message):
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.resolve(given, env=env, names="consul_lock_{}")
    assert message in str(info.value)


def test_lock_delay_zero_is_allowed_for_ttl_only_sessions():
    s = ConsulSettings.resolve({"lock_delay": 0, "session_checks": []}, env={})
    assert s.session_checks == () and s.fence_window == s.ttl


@pytest.mark.parametrize("key", ["", "/locks/x", "locks/x/", "locks//x", "locks/../x", "locks/a b", "locks/x?y", "l" * 600])
def test_keys_consul_would_reject_are_refused(key):
    with pytest.raises(InvalidSetting) as info:
        ConsulLock(key, address="127.0.0.1:8500")
    assert "key=" in str(info.value)


def test_token_never_in_repr_or_errors():
    s = ConsulSettings.resolve({"token": "s3cr3t-token"}, env={})
    assert "s3cr3t" not in repr(s)
    lock = ConsulLock("locks/x/.lock", settings=s)
    assert "s3cr3t" not in repr(lock)
    with pytest.raises(InvalidSetting) as info:
        ConsulSettings.resolve({"token": 123}, env={})
    assert "123" not in str(info.value)


def test_fence_window_is_min_of_ttl_and_lock_delay_with_checks():
    assert ConsulSettings(ttl=15, lock_delay=3).fence_window == 3
    assert ConsulSettings(ttl=10, lock_delay=30).fence_window == 10


@pytest.mark.parametrize(
    "exc",
    [
        InvalidSetting("consul_lock_ttl", 5, "too short"),
        ConsulUnavailable("http://127.0.0.1:1", "renewing a session", "connection refused"),
        ACLDenied("http://127.0.0.1:8500", "acquiring a lock", "key:write", "locks/x/.lock"),
        SessionGone("abc", "http://127.0.0.1:8500"),
        LockTimeout("locks/x/.lock", 3.0, "someone"),
    ],
)
def test_errors_pickle_and_keep_their_message(exc):
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and str(again) == str(exc) and again.args == exc.args


def test_tick_ids_round_trip_and_order():
    from datetime import datetime, timezone

    from celery_consul_lock import Tick
    from celery_consul_lock.ticks import crontab_tick

    a = Tick.of("nightly", datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc))
    b = Tick.of("heartbeat", datetime(2026, 11, 26, 3, 0, 0, 830_123, tzinfo=timezone.utc))
    assert str(a) == "nightly@2026-11-26T03:00:00Z" and str(b) == "heartbeat@2026-11-26T03:00:00.830Z"
    assert Tick.parse(str(a)) == a and Tick.parse(str(b)) == b and Tick.parse(str(b)).epoch > a.epoch
    assert crontab_tick("c", datetime(2026, 11, 26, 3, 0, 41, tzinfo=timezone.utc)) == Tick.of(
        "c", datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
    )
    with pytest.raises(ValueError, match="consul_lock_tick"):
        Tick.parse("no-at-sign")


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"consul_lock_beat_check_ttl": 0.5}, "consul_lock_beat_check_ttl=0.5 is invalid: must be at least 1 s"),
        ({"consul_lock_beat_check_ttl": 0}, "consul_lock_beat_check_ttl=0.0 is invalid: must be at least 1 s"),
        ({"consul_lock_beat_check_ttl": "soon"}, "consul_lock_beat_check_ttl='soon' is invalid: expected seconds"),
        ({"consul_lock_beat_lock_delay": 10, "consul_lock_beat_check_ttl": 2}, "twice the renewal interval"),
        ({"consul_lock_beat_lock_delay": 0}, "a lock-delay of 0 with session checks"),
        ({"consul_lock_beat_missed": "catch-up"}, "consul_lock_beat_missed='catch-up' is invalid"),
        ({"consul_lock_beat_name": "bad name"}, "consul_lock_beat_name="),
        ({"consul_lock_beat_stall_timeout": "soon"}, "consul_lock_beat_stall_timeout='soon' is invalid: expected seconds"),
        ({"consul_lock_beat_stall_timeout": float("nan")}, "consul_lock_beat_stall_timeout=nan is invalid"),
        ({"consul_lock_beat_stall_timeout": 0}, "consul_lock_beat_stall_timeout=0.0 is invalid: must be more than 0"),
        ({"consul_lock_beat_stall_timeout": -5}, "consul_lock_beat_stall_timeout=-5.0 is invalid: must be more than 0"),
        ({"consul_lock_beat_stall_timeout": 7.5}, "consul_lock_beat_stall_timeout=7.5 is invalid: must be at least 8 s"),
        (
            {"consul_lock_beat_stall_timeout": "10s", "consul_lock_timeout": 9},
            "consul_lock_beat_stall_timeout=10.0 is invalid: must be at least 12 s",
        ),
    ],
)
def test_beat_settings_that_break_the_guarantees_are_refused_at_start(monkeypatch, conf, message):
    from celery_consul_lock.beat import BeatConfig

    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    app = Celery("t", set_as_current=False)
    app.conf.update(conf)
    with pytest.raises(InvalidSetting) as info:
        BeatConfig.from_app(app)
    assert message in str(info.value)


@pytest.mark.parametrize(("value", "seconds"), [(90, 90.0), ("2m", 120.0), ("61s", 61.0)])
def test_beat_check_ttl_is_its_own_setting_not_capped_like_the_connection_timeout(monkeypatch, value, seconds):
    """A check TTL above 60 s (the HTTP timeout's cap) is slow to fail over, but valid."""
    from celery_consul_lock.beat import BeatConfig

    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    app = Celery("t", set_as_current=False)
    app.conf.consul_lock_beat_check_ttl = value
    config = BeatConfig.from_app(app)
    assert config.check_ttl == seconds
    assert config.settings.timeout == 5.0  # the connection timeout is not touched


def test_beat_default_settings_give_the_documented_crash_bound():
    from celery_consul_lock.beat import BeatConfig

    config = BeatConfig.from_app(Celery("proj", set_as_current=False))
    assert (config.name, config.check_ttl, config.settings.lock_delay) == ("proj", 2.0, 1.5)
    assert config.crash_failover_bound == 3.75 and config.leader_key_name == "locks/proj/beat/.lock"
    assert (config.stall_timeout, config.stall_timeout_floor, config.stall_failover_bound) == (30.0, 8.0, 33.75)


@pytest.mark.parametrize(
    ("template", "args", "kwargs", "problem"),
    [
        ("locks/r-{customer_id}/.lock", (7,), {}, None),
        ("locks/r-{0}-{region}/.lock", (7,), {}, None),
        ("locks/r-{}/.lock", (7,), {}, None),
        ("locks/{task.name}/{customer_id.real}/.lock", (), {"customer_id": 7}, None),
        ("locks/r-{extra}/.lock", (7,), {}, None),  # the body's **extra: the dict of the rest
        ("locks/r-{customer}/.lock", (7,), {}, "names {customer}, which is not a parameter of the task's body"),
        ("locks/r-{customer_id}-{1}/.lock", (7,), {}, "uses positional argument 1, but the task's body takes 1"),
        ("locks/r-{}-{}/.lock", (7,), {}, "uses positional argument 1"),
        ("locks/r-{customer_id/.lock", (7,), {}, "not a valid key template"),
    ],
)
def test_check_lock_options_accepts_exactly_the_key_templates_a_run_can_fill(template, args, kwargs, problem):
    """check_lock_options (what `consul-lock check` runs) judges a template by the body's
    signature; a run fills it from the call. The two agree."""
    from celery_consul_lock import ConsulLockedTask

    app = Celery("t", set_as_current=False)

    @app.task(bind=True, base=ConsulLockedTask, name="t.report", lock_key=template)
    def report(self, customer_id: int, *, region: str = "eu", **extra: object) -> None:
        pass

    if problem is None:
        assert report.check_lock_options().key == template
        assert report.lock_key_for(args, kwargs).startswith("locks/")
    else:
        with pytest.raises(InvalidSetting) as info:
            report.check_lock_options()
        assert str(info.value).startswith(f"t.report.lock_key={template!r} is invalid: {problem}"), str(info.value)
        with pytest.raises(InvalidSetting, match=r"^t\.report\.lock_key="):
            report.lock_key_for(args, kwargs)


def test_a_callable_lock_key_is_called_with_the_task_args_and_kwargs():
    """``@app.task(lock_key=f)`` makes f a class attribute, which Python binds as a method:
    it is still called as documented, f(task, args, kwargs)."""
    from celery_consul_lock import ConsulLockedTask

    app = Celery("t", set_as_current=False)
    seen = []

    def key(task, args, kwargs) -> str:
        seen.append((task.name, args, kwargs))
        return f"locks/report-{args[0]}-{kwargs['region']}/.lock"

    @app.task(bind=True, base=ConsulLockedTask, name="t.report", lock_key=key)
    def report(self, customer_id: int, region: str = "eu") -> None:
        pass

    assert report.lock_key_for((42,), {"region": "us"}) == "locks/report-42-us/.lock"
    assert seen == [("t.report", (42,), {"region": "us"})]


def test_beat_stall_timeout_accepts_the_floor_and_durations():
    from celery_consul_lock.beat import BeatConfig

    app = Celery("proj", set_as_current=False)
    app.conf.consul_lock_beat_stall_timeout = 8
    assert BeatConfig.from_app(app).stall_timeout == 8.0
    app.conf.consul_lock_beat_stall_timeout = "2m"
    assert BeatConfig.from_app(app).stall_timeout == 120.0


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"consul_lock_requeue_max": -1}, "consul_lock_requeue_max=-1 is invalid: expected a whole number of requeues >= 0"),
        ({"consul_lock_requeue_max": True}, "consul_lock_requeue_max=True is invalid"),
        ({"consul_lock_requeue_max": 2.5}, "consul_lock_requeue_max=2.5 is invalid"),
        ({"consul_lock_requeue_deadline": 0}, "consul_lock_requeue_deadline=0 is invalid: expected seconds > 0"),
        ({"consul_lock_requeue_deadline": "soon"}, "consul_lock_requeue_deadline='soon' is invalid"),
        ({"consul_lock_agent_probe_interval": 0}, "consul_lock_agent_probe_interval=0 is invalid: expected seconds between"),
        ({"consul_lock_agent_probe_interval": "2m"}, "consul_lock_agent_probe_interval='2m' is invalid"),
        ({"consul_lock_agent_watch": "maybe"}, "consul_lock_agent_watch='maybe' is invalid: expected true or false"),
    ],
)
def test_requeue_and_agent_watch_settings_are_refused_at_start(conf, message):
    from celery_consul_lock.availability import AvailabilityConfig

    app = Celery("t", set_as_current=False)
    app.conf.update(conf)
    with pytest.raises(InvalidSetting) as info:
        AvailabilityConfig.from_celery(app.conf)
    assert message in str(info.value)


def test_requeue_and_agent_watch_defaults_and_durations():
    from celery_consul_lock.availability import AvailabilityConfig

    assert AvailabilityConfig.from_celery(Celery("t", set_as_current=False).conf) == AvailabilityConfig(100, 300.0, True, 1.0)
    app = Celery("t", set_as_current=False)
    app.conf.update(consul_lock_requeue_max=0, consul_lock_requeue_deadline="2m", consul_lock_agent_watch="false")
    app.conf.consul_lock_agent_probe_interval = "500ms"
    assert AvailabilityConfig.from_celery(app.conf) == AvailabilityConfig(0, 120.0, False, 0.5)


def _declared_settings():
    """Every declared setting: the list the start-up checks judge names against."""
    from celery_consul_lock.startup import ALL_SETTINGS

    return ALL_SETTINGS


def test_the_docs_configuration_table_is_the_one_the_declarations_give():
    """Each setting is declared once (settings.Setting); the table of docs/configuration.md is
    generated from the declarations, so a setting added, renamed or re-defaulted there must show here."""
    from celery_consul_lock.settings import configuration_table

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    start = page.index("| setting | environment fallback | default | |")
    documented = page[start : page.index("\n\n", start) + 1]
    expected = configuration_table(_declared_settings())
    assert documented == expected, f"docs/configuration.md's table is out of date; replace it with:\n{expected}"


def test_every_declared_setting_is_read_from_celery_and_names_itself_when_refused():
    """Each declaration's Celery setting reaches its config object, and a value its parser
    refuses is refused naming exactly that setting and the value as given."""
    from celery_consul_lock.availability import AvailabilityConfig
    from celery_consul_lock.beat import BeatConfig
    from celery_consul_lock.task import eager_mode, task_defaults

    def build(conf):
        app = Celery("proj", set_as_current=False)
        app.conf.update(conf)
        ConsulSettings.from_celery(app.conf)
        AvailabilityConfig.from_celery(app.conf)
        BeatConfig.from_app(app)
        task_defaults(app.conf)
        eager_mode(app.conf)

    build({})
    names = [s.celery_name for s in _declared_settings()]
    assert len(names) == len(set(names))
    for name in names:
        with pytest.raises(InvalidSetting) as info:
            build({name: object()})  # no parser accepts an arbitrary object
        assert str(info.value).startswith(f"{name}=") or name == "consul_lock_token", str(info.value)
        if name == "consul_lock_token":
            assert str(info.value).startswith("consul_lock_token='<redacted>'"), str(info.value)


def test_consul_settings_has_one_field_per_declaration_with_its_default():
    from dataclasses import fields

    from celery_consul_lock.settings import CONSUL_SETTINGS

    assert [(f.name, f.default) for f in fields(ConsulSettings)] == [(s.name, s.default) for s in CONSUL_SETTINGS]


def test_the_task_lock_options_are_declared_once_and_each_reaches_the_run():
    """LockOptions is the one list: each field is a task attribute with the field's default,
    and a value given as @app.task(...) argument arrives in the options a run uses."""
    from dataclasses import fields

    from celery_consul_lock import ConsulLockedTask
    from celery_consul_lock.task import LockOptions

    given = {"key": "locks/x/.lock", "on_held": "wait", "wait_timeout": 3.0, "retry_countdown": 4.0, "ttl": 20.0}
    given.update({"lock_delay": 2.0, "fail_policy": "open", "abort_on_lock_lost": True, "limit": 3, "cooldown": 0.0})
    given.update({"at": "run", "reserve_ttl": 60.0})
    assert sorted(given) == sorted(f.name for f in fields(LockOptions))
    for f in fields(LockOptions):
        assert getattr(ConsulLockedTask, LockOptions.attribute(f.name)) == f.default
    app = Celery("t", set_as_current=False)

    @app.task(bind=True, base=ConsulLockedTask, name="t.all", **{LockOptions.attribute(k): v for k, v in given.items()})
    def every_option(self) -> None:
        pass

    assert every_option.check_lock_options() == LockOptions(**given)


def test_the_docs_list_exactly_the_declared_task_lock_options():
    import re
    from dataclasses import fields

    from celery_consul_lock.task import LockOptions

    page = (Path(__file__).resolve().parent.parent / "docs" / "task.md").read_text()
    start = page.index("| option (task attribute / `@app.task(...)` argument) |")
    rows = page[start : page.index("\n\n", start)].splitlines()[2:]
    documented = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert documented == {LockOptions.attribute(f.name) for f in fields(LockOptions)}


def test_every_declared_environment_variable_fills_its_setting(tmp_path):
    from celery_consul_lock.settings import CONSUL_SETTINGS

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    samples = {  # setting: (the variable's text, the value it gives)
        "address": ("10.0.0.1:8501", "10.0.0.1:8501"),
        "token": ("env-token", "env-token"),
        "verify": ("false", False),
        "ca_file": (str(cert), str(cert)),
        "client_cert": (str(cert), str(cert)),
        "client_key": (str(key), str(key)),
    }
    declared = {s.name: s.env for s in CONSUL_SETTINGS if s.env}
    assert sorted(declared) == sorted(samples)
    s = ConsulSettings.resolve({}, env={declared[name]: text for name, (text, _) in samples.items()})
    assert {name: getattr(s, name) for name in samples} == {name: value for name, (_, value) in samples.items()}
