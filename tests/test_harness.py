"""The test harness's own helpers (pure logic: no servers)."""

from __future__ import annotations

import time

import pytest

from .servers import wait_for


def test_wait_for_fails_at_once_with_the_assertion_a_predicate_raises() -> None:
    """A predicate raises AssertionError to say waiting is pointless (the process it waits
    on exited): that error, with its log excerpt, ends the wait at once."""
    calls = []

    def ready() -> bool:
        calls.append(1)
        raise AssertionError("worker exited:\nTraceback ... ImportError: no module named proj")

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="worker exited:\nTraceback") as info:
        wait_for(ready, 20, "the worker to answer ping")
    assert "timed out" not in str(info.value)
    assert len(calls) == 1, f"the predicate was called again after it failed fast: {len(calls)} calls"
    assert time.monotonic() - t0 < 10, "wait_for waited through a fail-fast assertion"


def test_wait_for_retries_other_errors_until_the_predicate_holds() -> None:
    answers = iter([ConnectionRefusedError("not up yet"), KeyError("ID"), None, "leader"])

    def leader() -> str | None:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for(leader, 20, "a leader", interval=0.01) == "leader"


def test_wait_for_names_what_it_waited_for_and_the_last_error_at_the_deadline() -> None:
    def down() -> bool:
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the agent \(last error: ConnectionRefused"):
        wait_for(down, 0.2, "the agent", interval=0.01)
