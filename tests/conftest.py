"""Fixtures that run real servers: a Consul dev agent, a three-server Consul cluster and Redis.

Every process is started by the shared harness (celery_consul_lock.testing) on free ports in
the test's temporary directory and stopped by its pid at teardown, also when the test fails.
The dev agent is the package's own pytest plugin's ``consul_agent`` (celery_consul_lock.
pytest_plugin, loaded through its entry point), with the binaries scripts/provision.sh found.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_consul_lock import ConsulSettings, close_sessions
from celery_consul_lock.errors import name_settings

from .beats import Harness
from .servers import ConsulAgent, ConsulCluster, RedisServer, WebServer, binaries, start_cluster, start_redis, start_web_server
from .workers import Worker, start_worker, worker_env

pytest_plugins = ["pytester"]


def pytest_configure(config: pytest.Config) -> None:
    binaries()  # CONSUL_BIN and REDIS_BIN: the provisioned ones, for the harness and the plugin


@pytest.fixture(autouse=True)
def _no_shared_tasks_between_tests() -> Iterator[None]:
    """A task a test defines on a throwaway app is "shared" by default: Celery adds it to
    every app finalized later in the process (proj's too), where two tests' tasks of one
    name raise DuplicateTaskNameWarning in whichever test finalizes next. Forget them."""
    from celery import _state

    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


@pytest.fixture(scope="session")
def consul(consul_agent: ConsulAgent) -> ConsulAgent:
    """The plugin's Consul dev agent, shared by the session's tests (each uses its own keys)."""
    return consul_agent


@pytest.fixture(scope="session")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulCluster]:
    c = start_cluster(tmp_path_factory.mktemp("consul-cluster"))
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(_cluster: ConsulCluster) -> ConsulCluster:
    """Three Consul servers on 127.0.0.11-13 (started on first use), all running and healthy
    voters at the start of each test, whatever the previous test killed or froze."""
    _cluster.heal()
    return _cluster


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[WebServer]:
    """A real HTTP server that is not a Consul agent (``python -m http.server``)."""
    server = start_web_server(tmp_path / "web")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proj(redis_server: RedisServer):
    """The Celery project of the behaviour tests (tests/proj), on the test Redis, emptied."""
    from .proj import app as proj_module

    proj_module.app.conf.broker_url = redis_server.url
    proj_module.app.conf.result_backend = redis_server.url
    store = redis.Redis.from_url(redis_server.url)
    store.flushdb()
    yield proj_module
    store.flushdb()


@pytest.fixture
def harness(proj, redis_server: RedisServer, tmp_path: Path) -> Iterator[Harness]:
    """Starts `celery beat -S consul` processes and workers of tests/proj for a test, and
    stops all of them at its end; prints their logs (shown when the test fails)."""
    h = Harness(proj, redis_server.url, tmp_path)
    try:
        yield h
    finally:
        h.stop()
        print(h.logs())


@pytest.fixture
def workers(proj, redis_server: RedisServer, consul: ConsulAgent, tmp_path: Path):
    """``workers(n, consul_address=None, env={...}, **start_worker options)`` starts n real
    `celery worker` processes of tests/proj; all are stopped at the test's end."""
    started: list[Worker] = []

    def start(n: int = 1, consul_address: str | None = None, **kw) -> list[Worker]:
        env = worker_env(redis_server.url, consul_address or consul.address, **kw.pop("env", {}))
        for _ in range(n):
            started.append(start_worker(proj.app, tmp_path, env, **kw))
        return started[-n:]

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    """A client of the test Redis, where task bodies record what they did."""
    return redis.Redis.from_url(redis_server.url)


@pytest.fixture
def settings(consul: ConsulAgent) -> ConsulSettings:
    """Settings for the dev agent, with a short lock-delay so tests run fast."""
    return ConsulSettings(address=consul.address, lock_delay=2.0)


@pytest.fixture
def key(request: pytest.FixtureRequest) -> str:
    """A lock key of this test's own, in the `consul lock` layout: locks/NAME/.lock."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return f"locks/{name}-{uuid.uuid4().hex[:8]}/.lock"


@pytest.fixture(autouse=True)
def _end_sessions() -> Iterator[None]:
    """Each test ends with this process's shared sessions destroyed, and its errors naming
    the settings by their default names again (a test may have checked a Django app)."""
    yield
    close_sessions()
    name_settings()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
