"""The shared harness's own helpers (celery_consul_lock.testing): waits and processes, no servers."""

from __future__ import annotations

import os
import sys
import time

import pytest

from celery_consul_lock.testing import ProcessDied, spawn, wait_for


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


def test_wait_for_fails_at_once_when_a_watched_process_exits(tmp_path) -> None:
    """A crashed worker or agent ends the wait with its exit code and log, not a timeout."""
    proc = spawn("crasher", [sys.executable, "-c", "print('ImportError: no module named proj'); raise SystemExit(3)"], tmp_path)
    proc.popen.wait(30)
    t0 = time.monotonic()
    with pytest.raises(ProcessDied, match=r"crasher exited \(code 3\):\nImportError: no module named proj") as info:
        wait_for(lambda: False, 30, "the crasher to answer", procs=[proc])
    assert info.value.returncode == 3
    assert time.monotonic() - t0 < 5, "wait_for polled on after the process it watched had exited"


def test_stop_ends_the_whole_process_group_by_the_leaders_pid(tmp_path) -> None:
    """A process's children (a worker's pool) go with it, also when the leader ignores SIGTERM."""
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    script += "print(c.pid, flush=True); time.sleep(600)"
    proc = spawn("stubborn", [sys.executable, "-c", script], tmp_path)
    child = int(wait_for(lambda: proc.log_text().strip(), 30, "the child's pid", procs=[proc]))
    proc.stop(timeout=0.5)
    assert proc.popen.returncode == -9, proc.popen.returncode

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child}/stat") as f:  # killed but not yet reaped by init: a zombie
            return f.read().split(") ")[1].startswith("Z")

    wait_for(gone, 10, "the child to be killed with its group")


def test_a_timed_out_wait_quotes_the_end_of_each_watched_process_log(tmp_path) -> None:
    script = "print('still importing the project', flush=True); import time; time.sleep(600)"
    proc = spawn("slow", [sys.executable, "-c", script], tmp_path)
    try:
        wait_for(lambda: "importing" in proc.log_text(), 30, "the first line", procs=[proc])
        quoted = r"waiting for the worker to answer ping.*\n--- the end of slow's log:\nstill importing"
        with pytest.raises(AssertionError, match=quoted):
            wait_for(lambda: False, 0.3, "the worker to answer ping", procs=[proc])
    finally:
        proc.stop()
    assert "env=" not in repr(proc), "a process's repr must not show its environment (it may hold a token)"
