"""The one fork-reset registry (native.at_fork): what a forked child resets, in order."""

from __future__ import annotations

import json
import os

from celery_consul_lock import native


def test_a_forked_child_runs_every_reset_in_order_even_after_one_fails(monkeypatch):
    monkeypatch.setattr(native, "_FORK_RESETS", [])  # only this test's resets, and only during it
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise RuntimeError("boom")

    native.at_fork(lambda: calls.append("first"))
    native.at_fork(failing)
    native.at_fork(lambda: calls.append("last"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the resets have run before this line
        try:
            os.write(w, json.dumps(calls).encode())
        finally:
            os._exit(0)
    os.close(w)
    seen = json.loads(os.read(r, 1000))
    os.waitpid(pid, 0)
    assert seen == ["first", "failing", "last"]
    assert calls == []  # the parent runs none of them
