"""What only this project's tests (and its benchmarks and demo) add to the shared harness.

The harness itself (Consul agents, clusters, client agents, Redis, Celery processes, waits)
is :mod:`celery_consul_lock.testing`, re-exported here. This module adds the binaries
scripts/provision.sh installs (``.servers/env``), TLS agents, and an HTTP server that is not
Consul.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from celery_consul_lock.testing import (
    CONSUL_BIN_ENV,
    REDIS_BIN_ENV,
    ConsulAgent,
    ConsulCluster,
    Proc,
    RedisServer,
    consul_binary,
    free_port,
    http_json,
    redis_binary,
    spawn,
    start_client_agent,
    start_cluster,
    start_consul,
    start_redis,
    wait_for,
)

__all__ = [
    "ROOT",
    "ConsulAgent",
    "ConsulCluster",
    "Proc",
    "RedisServer",
    "TLSConsulAgent",
    "TLSFiles",
    "WebServer",
    "bench_module",
    "binaries",
    "free_port",
    "have_loopback_aliases",
    "http_json",
    "make_tls_files",
    "start_client_agent",
    "start_cluster",
    "start_consul",
    "start_consul_tls",
    "start_redis",
    "start_web_server",
    "wait_consul_ready",
    "wait_for",
]

ROOT = Path(__file__).resolve().parent.parent


def binaries() -> tuple[str, str]:
    """(consul, redis-server) paths: ``$CONSUL_BIN``/``$REDIS_BIN``, else those
    scripts/provision.sh found (``.servers/env``, provisioning them if needed). Exports both
    variables, so the harness (and the pytest plugin, and child processes) use them too."""
    if not (os.environ.get(CONSUL_BIN_ENV) and os.environ.get(REDIS_BIN_ENV)):
        env_file = ROOT / ".servers" / "env"
        if not env_file.exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], check=True, stdout=subprocess.DEVNULL)
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            if name in (CONSUL_BIN_ENV, REDIS_BIN_ENV) and not os.environ.get(name):
                os.environ[name] = value
    return consul_binary(), redis_binary()


@contextlib.contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """``bench/<name>.py`` imported as the module ``bench_<name>``, with ``bench/`` on sys.path
    for its own imports (``common``), for a test of a benchmark's own logic; both undone after."""
    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)
    module_name = f"bench_{name}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)
        sys.path.remove(bench)


def wait_consul_ready(agent: ConsulAgent, timeout: float = 30, token: str | None = None) -> None:
    """``agent.wait_ready(...)``."""
    agent.wait_ready(timeout, token)


@dataclass
class WebServer:
    """``python -m http.server``: answers HTTP, but is not a Consul agent (HTML error pages:
    404 for a GET of an unknown path, 501 for a PUT)."""

    proc: Proc
    address: str

    def stop(self) -> None:
        self.proc.stop()


def start_web_server(workdir: Path) -> WebServer:
    port = free_port()
    proc = spawn("http-server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], workdir)
    server = WebServer(proc, f"127.0.0.1:{port}")

    def answers() -> bool:
        with urllib.request.urlopen(f"http://{server.address}/", timeout=2) as resp:
            return resp.status == 200

    try:
        wait_for(answers, 15, "python -m http.server to answer", procs=[proc])
    except BaseException:
        server.stop()
        raise
    return server


def have_loopback_aliases() -> bool:
    """Linux routes all of 127.0.0.0/8 to lo; check we can bind 127.0.0.11."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.11", 0))
        return True
    except OSError:
        return False


@dataclass
class TLSFiles:
    """A CA and the agent and client certificates ``consul tls`` made with it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(workdir: Path) -> TLSFiles:
    """``consul tls ca create``, ``cert create -server`` and ``cert create -client`` in ``workdir``
    (the server certificate names ``localhost`` and ``127.0.0.1``)."""
    consul = consul_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    for args in (["ca", "create"], ["cert", "create", "-server"], ["cert", "create", "-client"]):
        subprocess.run([consul, "tls", *args], cwd=workdir, check=True, capture_output=True)
    return TLSFiles(
        ca=workdir / "consul-agent-ca.pem",
        server_cert=workdir / "dc1-server-consul-0.pem",
        server_key=workdir / "dc1-server-consul-0-key.pem",
        client_cert=workdir / "dc1-client-consul-0.pem",
        client_key=workdir / "dc1-client-consul-0-key.pem",
    )


@dataclass
class TLSConsulAgent(ConsulAgent):
    """An agent serving its API over HTTPS only; :meth:`api` presents the client certificate."""

    tls: TLSFiles | None = None

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    def api(self, path: str, method: str = "GET", body: object | None = None, token: str | None = None):
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return http_json(self.url + path, method, body, token, context=context)


def start_consul_tls(workdir: Path, tls: TLSFiles, *, node: str = "tlsnode", require_client_cert: bool = True) -> TLSConsulAgent:
    """A dev agent whose HTTP API listens on HTTPS only (plain HTTP off), with ``tls``'s
    server certificate; with ``require_client_cert``, it refuses clients without a
    certificate signed by ``tls.ca`` (``verify_incoming_https``)."""
    https = free_port()
    hcl = [
        f"ports {{ https = {https}, http = -1 }}",
        f'ca_file = "{tls.ca}"',
        f'cert_file = "{tls.server_cert}"',
        f'key_file = "{tls.server_key}"',
        f"verify_incoming_https = {str(require_client_cert).lower()}",
    ]
    plain = start_consul(workdir, node=node, hcl=hcl)
    return TLSConsulAgent(plain.proc, plain.bind, https, node, plain.ports, tls)
