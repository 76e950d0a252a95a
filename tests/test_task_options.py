"""The task lock options' validation and app-wide defaults (pure logic: no servers)."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_consul_lock import ConsulLockedTask, InvalidSetting


def make_app(**conf) -> Celery:
    app = Celery("options", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lock_limit", 0),
        ("lock_limit", -2),
        ("lock_limit", 1.5),
        ("lock_limit", True),
        ("lock_cooldown", -1),
        ("lock_cooldown", "soon"),
        ("lock_on_held", "explode"),
    ],
)
def test_a_bad_option_fails_when_the_task_is_defined_naming_task_and_option(option, value):
    app = make_app()
    with pytest.raises(InvalidSetting) as info:

        @app.task(base=ConsulLockedTask, name="opts.bad", **{option: value})
        def bad() -> None: ...

        bad.name  # noqa: B018 (defining the task: Celery creates it on first use)
    assert info.value.setting == f"opts.bad.{option}" and info.value.value == value


def test_a_cooldown_with_a_limit_above_one_is_refused():
    app = make_app()
    with pytest.raises(InvalidSetting) as info:

        @app.task(base=ConsulLockedTask, name="opts.both", lock_limit=2, lock_cooldown=5)
        def both() -> None: ...

        both.name  # noqa: B018
    assert info.value.setting == "opts.both.lock_cooldown" and "lock_limit=1" in str(info.value)


def test_app_defaults_apply_to_tasks_that_do_not_set_the_option():
    app = make_app(consul_lock_on_held="fail", consul_lock_wait_timeout=7, consul_lock_abort_on_lock_lost=True)

    @app.task(base=ConsulLockedTask, name="opts.plain")
    def plain() -> None: ...

    @app.task(base=ConsulLockedTask, name="opts.own", lock_on_held="skip", lock_wait_timeout=3)
    def own() -> None: ...

    options = plain.lock_options()
    assert (options.on_held, options.wait_timeout, options.abort_on_lock_lost) == ("fail", 7, True)
    options = own.lock_options()
    assert (options.on_held, options.wait_timeout, options.abort_on_lock_lost) == ("skip", 3, True)


@pytest.mark.parametrize(("setting", "value"), [("consul_lock_on_held", "sometimes"), ("consul_lock_retry_countdown", -5)])
def test_a_bad_app_default_is_refused_naming_the_celery_setting(setting, value):
    app = make_app(**{setting: value})

    @app.task(base=ConsulLockedTask, name="opts.defaulted")
    def defaulted() -> None: ...

    with pytest.raises(InvalidSetting) as info:
        defaulted.check_lock_options()
    assert info.value.setting == setting and info.value.value == value


def test_a_per_call_limit_override_is_validated():
    app = make_app()

    @app.task(base=ConsulLockedTask, name="opts.limited", lock_limit=3)
    def limited() -> None: ...

    class Request:
        headers = {"consul_lock": {"limit": 0}}

    with pytest.raises(InvalidSetting) as info:
        limited.lock_options(Request())
    assert info.value.setting == "opts.limited.lock_limit"
    Request.headers = {"consul_lock": {"limit": 5}}
    assert limited.lock_options(Request()).limit == 5


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"lock_at": "sometimes"}, "lock_at"),
        ({"lock_at": "send", "lock_limit": 2}, "lock_at"),
        ({"lock_at": "both", "lock_cooldown": 60}, "lock_at"),
        ({"lock_at": "send", "lock_reserve_ttl": 5}, "lock_reserve_ttl"),
    ],
)
def test_bad_send_time_options_fail_when_the_task_is_defined(options, option):
    app = make_app()
    with pytest.raises(InvalidSetting) as info:

        @app.task(base=ConsulLockedTask, name="opts.sent", **options)
        def sent() -> None: ...

        sent.name  # noqa: B018
    assert info.value.setting == f"opts.sent.{option}"


def test_a_reservation_lasts_the_ttl_after_the_message_is_due_but_not_past_its_expiry():
    from datetime import datetime, timedelta, timezone

    from celery_consul_lock.reservation import reservation_ttl

    assert reservation_ttl(600, {}) == 600
    assert reservation_ttl(600, {"countdown": 60}) == 660
    eta = datetime.now(timezone.utc) + timedelta(seconds=120)
    assert 719 <= reservation_ttl(600, {"eta": eta}) <= 720
    assert reservation_ttl(600, {"countdown": 60, "expires": 30}) == 30
    assert reservation_ttl(600, {"expires": 1}) == 10  # Consul's shortest TTL
    assert reservation_ttl(86400, {"countdown": 10}) == 86400  # and its longest
