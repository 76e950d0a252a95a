"""A pytest plugin: a throwaway Consul dev agent for the tests that want real locks.

Installed with the package and loaded by pytest on its own (the ``pytest11`` entry point
``consul_lock``; ``-p no:consul_lock`` turns it off). Its fixtures:

``consul_agent`` (session scope)
    A Consul dev agent (in memory) on free ports of 127.0.0.1, started on first use, ready
    (a leader, sessions accepted) before the first test that asks for it, and stopped by its
    pid at the end of the session. The tests of a session share it: give each its own keys.
    It is a :class:`~celery_consul_lock.testing.ConsulAgent`: ``consul_agent.address`` is
    ``"127.0.0.1:PORT"``, as ``ConsulLock(address=...)`` and ``consul_lock_address`` take it;
    ``consul_agent.api("/v1/kv/...")`` calls its HTTP API; ``consul_agent.configure(app)``
    points a Celery app at it. The binary is ``$CONSUL_BIN``, else ``consul`` on PATH; with
    neither, the fixture errors (it does not skip) with a message naming both.

``consul_lock_celery_config`` (session scope)
    ``{"consul_lock_address": consul_agent.address, "consul_lock_eager": "consul"}``: merge
    it into your Celery settings, e.g. into the ``celery_config`` fixture of Celery's own
    plugin (``celery.contrib.pytest``); eager and direct calls of locked tasks then take real
    locks (without it they run unlocked: ``consul_lock_eager``'s default, ``"bypass"``).

``consul_lock_app`` (function scope)
    Takes Celery's ``celery_app`` fixture (so ``celery.contrib.pytest`` must be loaded) and
    points it at the agent for the test.

The guarantee is a real agent, not a fake: locks, sessions, TTLs and lock-delay behave as
in production (a dev agent's TTL floor is lowered to 1 s). The limit: one agent, no cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .session import close_sessions
from .testing import ConsulAgent, start_consul

__all__ = ["consul_agent", "consul_lock_app", "consul_lock_celery_config"]


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """A Consul dev agent on free ports for this test session (see the module docstring)."""
    agent = start_consul(tmp_path_factory.mktemp("consul-agent"), node="pytest")
    try:
        agent.wait_ready()
        yield agent
    finally:
        # This process's shared sessions end while their agent still answers (at exit, they
        # would be destroyed against a stopped agent, with a warning each).
        try:
            close_sessions()
        finally:
            agent.stop()


@pytest.fixture(scope="session")
def consul_lock_celery_config(consul_agent: ConsulAgent) -> dict[str, Any]:
    """The Celery settings that point an app's locks and beats at ``consul_agent``."""
    return consul_agent.celery_settings()


@pytest.fixture
def consul_lock_app(celery_app: Any, consul_agent: ConsulAgent) -> Any:
    """Celery's ``celery_app`` test app, pointed at ``consul_agent``."""
    consul_agent.configure(celery_app)
    return celery_app
