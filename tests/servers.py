"""Real Consul agents and Redis servers for the tests, the demo and the benchmarks.

Each server runs as a child process on free ports, in its own directory, and is stopped
by its pid. Binaries come from scripts/provision.sh (``.servers/env``), or from the
``CONSUL_BIN`` / ``REDIS_BIN`` environment variables, or from PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def binaries() -> tuple[str, str]:
    """(consul, redis-server) paths, provisioning them if needed."""
    found = {k: os.environ.get(k) for k in ("CONSUL_BIN", "REDIS_BIN")}
    env_file = ROOT / ".servers" / "env"
    if not all(found.values()):
        if not env_file.exists():
            subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], check=True, stdout=subprocess.DEVNULL)
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            found[name] = found.get(name) or value
    consul, redis = found["CONSUL_BIN"], found["REDIS_BIN"]
    assert consul and redis, f"no consul/redis binaries: {found}"
    return consul, redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` at the deadline.

    Other exceptions (a server not answering yet) are retried; an AssertionError is the
    predicate saying that waiting is pointless (the process it waits on exited), so it
    propagates at once, with the log excerpt it carries.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_exc!r})")


@dataclass
class Proc:
    """A server process we started; stop() kills it by pid."""

    name: str
    popen: subprocess.Popen
    workdir: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def restart(self) -> None:
        """Start the same command again (same ports, same data directory) after it died."""
        self.popen = _popen(self.popen.args, self.workdir, self.log, "ab")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout)
        except ProcessLookupError:
            pass


def _spawn(name: str, args: list[str], workdir: Path) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    return Proc(name, _popen(args, workdir, log, "wb"), workdir, log)


def _popen(args: list[str], workdir: Path, log: Path, mode: str) -> subprocess.Popen:
    """Start ``args`` in its own session, its output written (``mode``) to ``log``."""
    with log.open(mode) as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)


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
    proc = _spawn("http-server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], workdir)
    server = WebServer(proc, f"127.0.0.1:{port}")

    def answers() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"http.server exited: {proc.log.read_text()[-2000:]}")
        with urllib.request.urlopen(f"http://{server.address}/", timeout=2) as resp:
            return resp.status == 200

    try:
        wait_for(answers, 15, "python -m http.server to answer")
    except BaseException:
        server.stop()
        raise
    return server


def http_json(
    url: str,
    method: str = "GET",
    body: object | None = None,
    token: str | None = None,
    timeout: float = 5,
    context: ssl.SSLContext | None = None,
):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as exc:
        # Close the error answer's connection here: a caller that only looks at exc.code
        # (or a wait_for that keeps the exception) would leave the socket to the garbage
        # collector, and its ResourceWarning would fail whichever test runs at that moment.
        exc.close()
        raise
    return json.loads(text) if text.strip() else None


@dataclass
class ConsulAgent:
    """One Consul agent process."""

    proc: Proc
    bind: str
    http_port: int
    node: str
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def api(self, path: str, method: str = "GET", body: object | None = None, token: str | None = None):
        return http_json(self.url + path, method, body, token)

    def leader(self) -> str:
        try:
            return self.api("/v1/status/leader") or ""
        except OSError:
            return ""

    def stop(self) -> None:
        self.proc.stop()


def start_consul(
    workdir: Path,
    *,
    dev: bool = True,
    bind: str = "127.0.0.1",
    node: str = "node1",
    server_args: list[str] | None = None,
    hcl: list[str] | None = None,
) -> ConsulAgent:
    """Start an agent: ``-dev`` (in memory), or a server with a data directory."""
    consul, _ = binaries()
    ports = {n: free_port(bind) for n in ("http", "serf_lan", "serf_wan", "server")}
    args = [
        consul,
        "agent",
        f"-node={node}",
        f"-bind={bind}",
        f"-client={bind}",
        f"-http-port={ports['http']}",
        "-dns-port=-1",
        f"-serf-lan-port={ports['serf_lan']}",
        f"-serf-wan-port={ports['serf_wan']}",
        f"-server-port={ports['server']}",
        "-log-level=warn",
        "-hcl",
        'session_ttl_min = "1s"',
        "-hcl",
        "ports { grpc = -1 }",
    ]
    for h in hcl or []:
        args += ["-hcl", h]
    if dev:
        args.append("-dev")
    else:
        data = workdir / f"data-{node}"
        data.mkdir(parents=True, exist_ok=True)
        args += ["-server", f"-data-dir={data}"] + (server_args or ["-bootstrap-expect=1"])
    agent = ConsulAgent(_spawn(f"consul-{node}", args, workdir), bind, ports["http"], node, {"ports": ports})
    return agent


def wait_consul_ready(agent: ConsulAgent, timeout: float = 30, token: str | None = None) -> None:
    """Ready = a leader is known and a session can be created (the serfHealth check passes)."""

    def ready() -> bool:
        if agent.proc.popen.poll() is not None:
            raise AssertionError(f"consul exited: {agent.proc.log.read_text()[-2000:]}")
        if not agent.leader():
            return False
        sid = agent.api("/v1/session/create", "PUT", {"TTL": "10s"}, token=token)["ID"]
        agent.api(f"/v1/session/destroy/{sid}", "PUT", token=token)
        return True

    wait_for(ready, timeout, f"consul agent {agent.address} to be ready", interval=0.2)


@dataclass
class RedisServer:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()


def start_redis(workdir: Path) -> RedisServer:
    _, redis = binaries()
    port = free_port()
    proc = _spawn("redis", [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], workdir)
    server = RedisServer(proc, port)

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_for(ready, 15, f"redis on port {port}")
    return server


@dataclass
class ConsulCluster:
    """Three Consul servers on 127.0.0.11-13, joined to each other."""

    agents: list[ConsulAgent]

    def leader_agent(self) -> ConsulAgent:
        leader = wait_for(lambda: self.alive()[0].leader(), 30, "a cluster leader")
        for agent in self.agents:
            if leader.startswith(agent.bind + ":"):
                return agent
        raise AssertionError(f"leader {leader} is none of ours")

    def alive(self) -> list[ConsulAgent]:
        return [a for a in self.agents if a.proc.popen.poll() is None]

    def restart(self, agent: ConsulAgent) -> None:
        """Start a stopped server again with its own arguments (same data dir and ports)."""
        old = agent.proc
        assert old.popen.poll() is not None, f"{agent.node} still runs"
        with old.log.open("ab") as out:
            popen = subprocess.Popen(
                old.popen.args, stdout=out, stderr=subprocess.STDOUT, cwd=old.workdir, start_new_session=True
            )
        agent.proc = Proc(old.name, popen, old.workdir, old.log)

    def heal(self, timeout: float = 90) -> None:
        """Restart every stopped server, resume frozen ones, and wait until all three are
        healthy raft voters (a server that came back is promoted after it has been stable
        for a while; until then losing one more would lose the quorum)."""
        for agent in self.agents:
            if agent.proc.popen.poll() is not None:
                self.restart(agent)
            else:
                agent.proc.signal(signal.SIGCONT)
        for agent in self.agents:
            wait_consul_ready(agent, timeout=timeout)

        def healthy() -> bool:
            try:
                health = self.leader_agent().api("/v1/operator/autopilot/health")
            except OSError:  # 429 while unhealthy
                return False
            servers = health["Servers"]
            return len(servers) == len(self.agents) and all(s["Healthy"] and s["Voter"] for s in servers)

        wait_for(healthy, timeout, "a healthy three-server raft", interval=0.2)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()


def start_cluster(workdir: Path, size: int = 3) -> ConsulCluster:
    binds = [f"127.0.0.{11 + i}" for i in range(size)]
    serf = {b: free_port(b) for b in binds}
    agents = []
    for i, bind in enumerate(binds):
        joins = [f"-retry-join={b}:{serf[b]}" for b in binds if b != bind]
        consul, _ = binaries()
        ports = {"http": free_port(bind), "serf_lan": serf[bind], "serf_wan": free_port(bind), "server": free_port(bind)}
        data = workdir / f"data-{i}"
        data.mkdir(parents=True, exist_ok=True)
        args = [
            consul, "agent", "-server", f"-bootstrap-expect={size}", f"-node=server{i + 1}",
            f"-bind={bind}", f"-client={bind}", f"-data-dir={data}",
            f"-http-port={ports['http']}", "-dns-port=-1", f"-serf-lan-port={ports['serf_lan']}",
            f"-serf-wan-port={ports['serf_wan']}", f"-server-port={ports['server']}",
            "-log-level=warn", "-hcl", 'session_ttl_min = "1s"', "-hcl", "ports { grpc = -1 }",
            "-hcl", "performance { raft_multiplier = 1 }",
            *joins,
        ]  # fmt: skip
        agents.append(
            ConsulAgent(_spawn(f"consul-server{i + 1}", args, workdir), bind, ports["http"], f"server{i + 1}", {"ports": ports})
        )
    cluster = ConsulCluster(agents)
    for agent in agents:
        wait_consul_ready(agent, timeout=60)
    return cluster


def start_client_agent(workdir: Path, cluster: ConsulCluster, bind: str, node: str) -> ConsulAgent:
    """A client agent (no ``-server``) on ``bind``, joined to ``cluster``: one simulated node
    of Consul's standard topology, whose processes talk to it. ``agent.proc.restart()``
    starts it again with the same node name, ports and data directory."""
    consul, _ = binaries()
    ports = {"http": free_port(bind), "serf_lan": free_port(bind), "serf_wan": free_port(bind)}
    data = workdir / f"data-{node}"
    data.mkdir(parents=True, exist_ok=True)
    joins = [f"-retry-join={a.bind}:{a.extra['ports']['serf_lan']}" for a in cluster.agents]
    args = [
        consul, "agent", f"-node={node}", f"-bind={bind}", f"-client={bind}", f"-data-dir={data}",
        f"-http-port={ports['http']}", "-dns-port=-1", f"-serf-lan-port={ports['serf_lan']}",
        f"-serf-wan-port={ports['serf_wan']}", "-log-level=warn", "-hcl", "ports { grpc = -1 }",
        # Stopped at a test's end: exit at once rather than leave the cluster gracefully (about
        # 5 s per agent); the servers mark the node failed, which no later test looks at.
        "-hcl", "leave_on_terminate = false",
        *joins,
    ]  # fmt: skip
    return ConsulAgent(_spawn(f"consul-{node}", args, workdir), bind, ports["http"], node, {"ports": ports})


def have_loopback_aliases() -> bool:
    """Linux routes all of 127.0.0.0/8 to lo; check we can bind 127.0.0.11."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.11", 0))
        return True
    except OSError:
        return False


def which(name: str) -> str | None:
    return shutil.which(name)


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
    consul, _ = binaries()
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
    return TLSConsulAgent(plain.proc, plain.bind, https, node, plain.extra, tls)
