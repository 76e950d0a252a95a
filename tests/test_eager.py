"""Eager and direct calls of a locked task (``consul_lock_eager``): how a project's own tests
call its tasks, in one process, outside any worker."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from celery import Celery

from celery_consul_lock import ConsulLock, ConsulLockedTask, ConsulSettings, InvalidSetting, is_skipped

from .servers import free_port


def make_task(**conf: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A locked task of an in-process Celery app (``conf``), and the list where its body records what it saw."""
    app = Celery("eager", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True, **conf)
    seen: list[dict[str, Any]] = []

    @app.task(bind=True, base=ConsulLockedTask, name="eager.double", lock_key="locks/eager-{x}/.lock")
    def double(self, x: int) -> int:
        lock = self.lock
        seen.append(
            {
                "lock": lock,
                "held": lock.held if lock is not None else None,
                "fencing_token": self.fencing_token,
                "check_lock": self.check_lock(),
                "request_id": self.request.id,
                "args": self.request.args,
            }
        )
        return 2 * x

    return double, seen


def test_eager_and_direct_calls_run_unlocked_by_default_without_any_agent(caplog: pytest.LogCaptureFixture):
    # Nothing listens at this address, and the fail policy is closed: a call that tried to
    # lock would raise ConsulUnavailable (or requeue) instead of returning.
    double, seen = make_task(consul_lock_address=f"127.0.0.1:{free_port()}", consul_lock_fail_policy="closed")
    with caplog.at_level(logging.DEBUG, logger="celery_consul_lock"):
        assert double.delay(1).get() == 2  # task_always_eager
        assert double.apply((2,)).get() == 4
        assert double(3) == 6  # a direct call
        assert double.run(4) == 8
    assert [s["lock"] for s in seen] == [None] * 4
    assert [s["fencing_token"] for s in seen] == [None] * 4
    assert [s["check_lock"] for s in seen] == [None] * 4  # a no-op, not an error
    # The eager calls have their task id; the direct call its own pushed request, as in Celery.
    assert seen[0]["request_id"] and seen[1]["request_id"]
    assert seen[2]["args"] == (3,)
    ours = [r for r in caplog.records if r.name.startswith("celery_consul_lock")]
    assert [r.getMessage() for r in ours if r.levelno >= logging.WARNING] == []  # no warning per call


def test_bypass_named_explicitly_is_the_default():
    double, seen = make_task(consul_lock_address=f"127.0.0.1:{free_port()}", consul_lock_eager="bypass")
    assert double.delay(5).get() == 10
    assert seen[0]["lock"] is None


def test_consul_mode_locks_eager_and_direct_calls_on_a_real_agent(consul):
    settings = ConsulSettings(address=consul.address, key_prefix="eager-test/")
    double, seen = make_task(
        consul_lock_address=consul.address, consul_lock_key_prefix="eager-test/", consul_lock_eager="consul"
    )

    assert double.delay(7).get() == 14
    assert double(8) == 16
    assert [s["held"] for s in seen] == [True, True]
    assert all(isinstance(s["fencing_token"], int) and s["fencing_token"] > 0 for s in seen)
    assert ConsulLock.holder("locks/eager-7/.lock", settings=settings) is None  # released after the run

    # A key held elsewhere: the eager call is skipped, as a worker's run would be.
    with ConsulLock("locks/eager-9/.lock", settings=settings, private_session=True, name="someone else"):
        result = double.delay(9).get()
    assert is_skipped(result), result
    assert result["reason"] == "held"
    assert len(seen) == 2  # the body did not run


def test_an_unknown_eager_mode_is_refused_naming_the_setting():
    double, seen = make_task(consul_lock_address=f"127.0.0.1:{free_port()}", consul_lock_eager="skip")
    with pytest.raises(InvalidSetting, match="consul_lock_eager") as caught:
        double.delay(1).get()
    assert caught.value.value == "skip"
    assert seen == []
