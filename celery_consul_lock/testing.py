"""Real Consul agents, Redis servers and Celery processes for tests, benchmarks and demos.

One harness, used by the pytest plugin (:mod:`celery_consul_lock.pytest_plugin`), this
project's own tests, its benchmarks and ``make demo``. Every process it starts:

- runs in a session (and process group) of its own, on free ports, in a working directory
  given by the caller, with its output written to ``<workdir>/<name>.log``;
- is a :class:`Proc`, stopped by its pid (:meth:`Proc.stop`: SIGCONT and SIGTERM, then
  SIGKILL of its process group), never by name;
- is waited on with :func:`wait_for`, which has a deadline and fails at once, with the tail of
  the process's log, when a process it watches exits.

Binaries: ``consul`` from the ``CONSUL_BIN`` environment variable or else ``PATH``;
``redis-server`` from ``REDIS_BIN`` or else ``PATH``. Neither found raises
:class:`BinaryNotFound` naming both places. Nothing here fakes Consul: the agents are real.
"""

from __future__ import annotations

import contextlib
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
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConsulLockError

__all__ = [
    "BinaryNotFound",
    "ConsulAgent",
    "ConsulCluster",
    "Proc",
    "ProcessDied",
    "RedisServer",
    "Worker",
    "consul_binary",
    "free_port",
    "http_json",
    "redis_binary",
    "spawn",
    "start_beat",
    "start_client_agent",
    "start_cluster",
    "start_consul",
    "start_redis",
    "start_worker",
    "wait_for",
]

T = TypeVar("T")

#: Where the binaries are looked up first; ``PATH`` is the fallback.
CONSUL_BIN_ENV = "CONSUL_BIN"
REDIS_BIN_ENV = "REDIS_BIN"
#: A dev agent elects itself in about 2 s; a loaded 2-core machine has been seen to take 10.
AGENT_READY_TIMEOUT = 30.0
#: Three servers elect a leader within ~10 s here; a client agent joins within seconds.
CLUSTER_READY_TIMEOUT = 60.0
#: redis-server answers PING within a second of its start.
REDIS_READY_TIMEOUT = 15.0
#: A `celery worker` imports its project and answers a ping within ~5 s alone; on a 2-core
#: machine shared by several test runs (load 10) an import alone took 10 s and workers missed 60 s.
WORKER_READY_TIMEOUT = 120.0
#: A worker's warm shutdown lets running tasks finish; the behaviour tests' run for seconds.
WORKER_STOP_TIMEOUT = 30.0
#: SIGTERM first, so a process can shut down warm; SIGKILL of its group after this long.
STOP_TIMEOUT = 10.0
#: How much of a log an error quotes.
LOG_TAIL = 3000
#: Consul's own minimum session TTL is 10 s; tests of expiry want shorter ones.
SESSION_TTL_MIN_HCL = 'session_ttl_min = "1s"'
#: No gRPC listener (its fixed default port would clash between agents on one host).
NO_GRPC_HCL = "ports { grpc = -1 }"


# -- errors -----------------------------------------------------------------------------------


class BinaryNotFound(ConsulLockError, FileNotFoundError):
    """No ``consul`` (or ``redis-server``) binary: names the variable and PATH it searched, or
    the variable's value (``given``) when that is not an executable file."""

    def __init__(self, program: str, env_var: str, given: str | None = None) -> None:
        super().__init__(program, env_var, given)
        self.program = program
        self.env_var = env_var
        self.given = given

    def __str__(self) -> str:
        if self.given is not None:
            return (
                f"no `{self.program}` binary found: {self.env_var}={self.given!r} is not an executable file; "
                f"set {self.env_var} to the binary's path, or unset it to use `{self.program}` on PATH"
            )
        return (
            f"no `{self.program}` binary found: {self.env_var} is not set and `{self.program}` is not on PATH; "
            f"set {self.env_var} to the binary's path or put its directory on PATH"
        )


class ProcessDied(AssertionError):
    """A process that was waited on exited; carries its name, exit code and log tail."""

    def __init__(self, name: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(name, returncode, log_tail)
        self.name, self.returncode, self.log_tail = name, returncode, log_tail

    def __str__(self) -> str:
        return f"{self.name} exited (code {self.returncode}):\n{self.log_tail}"


# -- binaries, ports, waiting -------------------------------------------------------------------


def _binary(program: str, env_var: str) -> str:
    given = os.environ.get(env_var)
    found = shutil.which(given or program)  # a path, or a name looked up on PATH
    if not found:
        raise BinaryNotFound(program, env_var, given or None)
    return found


def consul_binary() -> str:
    """The ``consul`` binary: ``$CONSUL_BIN``, else ``consul`` on PATH; :class:`BinaryNotFound`."""
    return _binary("consul", CONSUL_BIN_ENV)


def redis_binary() -> str:
    """``redis-server``: ``$REDIS_BIN``, else on PATH; :class:`BinaryNotFound`."""
    return _binary("redis-server", REDIS_BIN_ENV)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice; racy only against others)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.05,
    procs: Iterable[Proc] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Fails with AssertionError naming ``what``, the last error and the end of each watched
    process's log after ``timeout`` seconds.
    Fails at once with :class:`ProcessDied` when one of ``procs`` has exited, and with any
    AssertionError the predicate raises (its way to say waiting is pointless). Other
    exceptions (a server not answering yet) are retried.
    """
    watched = list(procs)
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        for proc in watched:
            proc.check_alive()
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    logs = "".join(f"\n--- the end of {proc.name}'s log:\n{proc.log_text()[-LOG_TAIL:]}" for proc in watched)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_exc!r}){logs}")


def http_json(
    url: str,
    method: str = "GET",
    body: object | None = None,
    token: str | None = None,
    timeout: float = 5,
    context: ssl.SSLContext | None = None,
) -> Any:
    """One HTTP request with a JSON body; the decoded JSON answer (None for an empty one).
    HTTP errors raise :class:`urllib.error.HTTPError` (already closed)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as exc:
        # Close the error answer's connection here: a caller that only looks at exc.code
        # would leave the socket to the garbage collector, and its ResourceWarning would
        # fail whichever test runs at that moment.
        exc.close()
        raise
    return json.loads(text) if text.strip() else None


# -- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """A process we started (its own session and process group), its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    #: Where and with what environment it was started (:meth:`restart` starts it so again).
    cwd: Path | None = None
    #: Not in the repr: an environment may hold a token (CONSUL_HTTP_TOKEN).
    env: Mapping[str, str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited and been reaped (:meth:`alive`, :meth:`wait`),
        else None; ``-N`` if signal N ended it."""
        return self.popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait up to ``timeout`` s (None: for ever) for it to exit; its exit status.
        Raises :class:`subprocess.TimeoutExpired` if it still runs then (it is left running)."""
        return self.popen.wait(timeout)

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (see :meth:`log_size`)."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def check_alive(self) -> None:
        """Raise :class:`ProcessDied` with the log's tail if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ProcessDied(self.name, code, self.log_text()[-LOG_TAIL:])

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group)."""
        os.kill(self.pid, sig)

    def children(self) -> list[int]:
        """Pids of its direct children (a worker's pool processes)."""
        out = subprocess.run(["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def restart(self) -> None:
        """Start the same command again (same ports, data directory and log) after it exited."""
        assert not self.alive(), f"{self.name} still runs"
        self.popen = _popen(list(self.popen.args), self.log, "ab", self.cwd or self.workdir, self.env)  # type: ignore[arg-type]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGCONT (if frozen) and SIGTERM, wait up to ``timeout`` s, then SIGKILL the process
        group (children left behind go too) and reap the process."""
        leader = self.popen.pid  # the group's leader: start_new_session
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL of the whole process group (a crash, or what is left after a stop), and
        reap the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def _popen(args: list[str], log: Path, mode: str, cwd: Path, env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    with log.open(mode) as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True
        )


P = TypeVar("P", bound=Proc)


def spawn(
    name: str,
    args: list[str],
    workdir: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    kind: type[P] = Proc,  # type: ignore[assignment]
) -> P:
    """Start ``args`` in a session of its own, output to ``log`` (``workdir/<name>.log``),
    in ``cwd`` (default ``workdir``), with ``env`` (default: ours); a ``kind`` (a Proc)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or workdir / f"{name}.log"
    cwd = cwd or workdir
    return kind(name, _popen(args, log, "wb", cwd, env), workdir, log, cwd, env)


# -- Consul -----------------------------------------------------------------------------------


@dataclass
class ConsulAgent:
    """One Consul agent process, its HTTP API at :attr:`address` (``host:port``)."""

    proc: Proc
    bind: str
    http_port: int
    node: str
    #: The ports it listens on, by name ("http", "serf_lan", "serf_wan", "server").
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``host:port``, as ``ConsulLock(address=...)`` and ``consul_lock_address`` take it."""
        return f"{self.bind}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def api(self, path: str, method: str = "GET", body: object | None = None, token: str | None = None) -> Any:
        """A call of the agent's HTTP API (``path`` starts with ``/v1/``); the JSON answer."""
        return http_json(self.url + path, method, body, token)

    def leader(self) -> str:
        """The raft leader's address, or "" when there is none (or the agent is down)."""
        try:
            return str(self.api("/v1/status/leader") or "")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = AGENT_READY_TIMEOUT, token: str | None = None) -> None:
        """Ready = a leader is known and a session can be created (the serfHealth check
        passes). Fails at once if the agent exits."""

        def ready() -> bool:
            if not self.leader():
                return False
            sid = self.api("/v1/session/create", "PUT", {"TTL": "10s"}, token=token)["ID"]
            self.api(f"/v1/session/destroy/{sid}", "PUT", token=token)
            return True

        wait_for(ready, timeout, f"consul agent {self.address} to be ready", interval=0.2, procs=[self.proc])

    def celery_settings(self, **settings: Any) -> dict[str, Any]:
        """Celery settings pointing an app at this agent: ``{"consul_lock_address": ...,
        "consul_lock_eager": "consul"}`` (a test that starts an agent wants real locks, also
        for eager and direct calls, which bypass the lock by default), plus ``settings`` given
        without their prefix (``lock_delay=1`` becomes ``consul_lock_lock_delay``;
        ``eager="bypass"`` restores the default)."""
        given = {f"consul_lock_{k}": v for k, v in settings.items()}
        return {"consul_lock_address": self.address, "consul_lock_eager": "consul", **given}

    def configure(self, app: Any, **settings: Any) -> None:
        """Point the Celery ``app`` at this agent (``app.conf.update(self.celery_settings(...))``)."""
        app.conf.update(self.celery_settings(**settings))

    def stop(self) -> None:
        self.proc.stop()


def _agent_args(consul: str, node: str, bind: str, ports: Mapping[str, int], hcl: Iterable[str]) -> list[str]:
    args = [consul, "agent", f"-node={node}", f"-bind={bind}", f"-client={bind}", "-dns-port=-1", "-log-level=warn"]
    names = {"http": "-http-port", "serf_lan": "-serf-lan-port", "serf_wan": "-serf-wan-port", "server": "-server-port"}
    args += [f"{names[name]}={port}" for name, port in ports.items()]
    for h in (NO_GRPC_HCL, *hcl):
        args += ["-hcl", h]
    return args


def _start_agent(
    workdir: Path, *, node: str, bind: str, ports: Mapping[str, int], hcl: Iterable[str], extra: list[str]
) -> ConsulAgent:
    args = _agent_args(consul_binary(), node, bind, ports, hcl) + extra
    return ConsulAgent(spawn(f"consul-{node}", args, workdir), bind, ports["http"], node, dict(ports))


def _data_dir(workdir: Path, node: str) -> Path:
    data = workdir / f"data-{node}"
    data.mkdir(parents=True, exist_ok=True)
    return data


def start_consul(
    workdir: Path,
    *,
    dev: bool = True,
    bind: str = "127.0.0.1",
    node: str = "node1",
    server_args: list[str] | None = None,
    hcl: list[str] | None = None,
) -> ConsulAgent:
    """Start an agent on free ports of ``bind``: ``-dev`` (in memory), or a server with a data
    directory in ``workdir`` (``server_args``, default ``-bootstrap-expect=1``). Sessions may
    have TTLs down to 1 s. Returns at once: call :meth:`ConsulAgent.wait_ready`."""
    ports = {n: free_port(bind) for n in ("http", "serf_lan", "serf_wan", "server")}
    extra = ["-dev"] if dev else ["-server", f"-data-dir={_data_dir(workdir, node)}", *(server_args or ["-bootstrap-expect=1"])]
    return _start_agent(workdir, node=node, bind=bind, ports=ports, hcl=[SESSION_TTL_MIN_HCL, *(hcl or [])], extra=extra)


@dataclass
class ConsulCluster:
    """Consul servers on 127.0.0.11, .12, ..., joined to each other."""

    agents: list[ConsulAgent]

    def alive(self) -> list[ConsulAgent]:
        return [a for a in self.agents if a.proc.alive()]

    def leader_agent(self) -> ConsulAgent:
        """The server that leads now (waits up to 30 s for one)."""
        leader = wait_for(lambda: self.alive()[0].leader(), 30, "a cluster leader")
        for agent in self.agents:
            if leader.startswith(agent.bind + ":"):
                return agent
        raise AssertionError(f"leader {leader} is none of ours")

    def heal(self, timeout: float = 90) -> None:
        """Restart every stopped server, resume frozen ones, and wait until all are healthy
        raft voters (a server that came back is promoted after it has been stable for a
        while; until then losing one more would lose the quorum)."""
        for agent in self.agents:
            if agent.proc.alive():
                agent.proc.signal(signal.SIGCONT)
            else:
                agent.proc.restart()
        for agent in self.agents:
            agent.wait_ready(timeout=timeout)

        def healthy() -> bool:
            try:
                health = self.leader_agent().api("/v1/operator/autopilot/health")
            except OSError:  # 429 while unhealthy
                return False
            servers = health["Servers"]
            return len(servers) == len(self.agents) and all(s["Healthy"] and s["Voter"] for s in servers)

        wait_for(healthy, timeout, "a healthy raft of every server", interval=0.2)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()


def start_cluster(workdir: Path, size: int = 3, *, hcl: Iterable[str] = ()) -> ConsulCluster:
    """``size`` servers on 127.0.0.11 onwards (Linux routes all of 127/8 to lo), with data
    directories in ``workdir`` (file-backed: every Raft write is fsynced, as in production)
    and ``raft_multiplier = 1`` (Consul's advice for production servers: the fastest leader
    failure detection), plus the agent configuration lines ``hcl`` (e.g. ``telemetry``);
    returns once each is ready."""
    binds = [f"127.0.0.{11 + i}" for i in range(size)]
    serf = {b: free_port(b) for b in binds}
    agents = []
    try:
        for i, bind in enumerate(binds):
            node = f"server{i + 1}"
            ports = {"http": free_port(bind), "serf_lan": serf[bind], "serf_wan": free_port(bind), "server": free_port(bind)}
            joins = [f"-retry-join={b}:{serf[b]}" for b in binds if b != bind]
            extra = ["-server", f"-bootstrap-expect={size}", f"-data-dir={_data_dir(workdir, node)}", *joins]
            config = [SESSION_TTL_MIN_HCL, "performance { raft_multiplier = 1 }", *hcl]
            agents.append(_start_agent(workdir, node=node, bind=bind, ports=ports, hcl=config, extra=extra))
        cluster = ConsulCluster(agents)
        for agent in agents:
            agent.wait_ready(timeout=CLUSTER_READY_TIMEOUT)
    except BaseException:
        for agent in agents:
            agent.stop()
        raise
    return cluster


def start_client_agent(workdir: Path, cluster: ConsulCluster, bind: str, node: str, *, hcl: Iterable[str] = ()) -> ConsulAgent:
    """A client agent (no ``-server``) on ``bind``, joined to ``cluster``: one simulated node
    of Consul's standard topology, whose processes talk to it; plus the agent configuration
    lines ``hcl``. ``agent.proc.restart()`` starts it again with the same node name, ports
    and data directory. Returns at once."""
    ports = {"http": free_port(bind), "serf_lan": free_port(bind), "serf_wan": free_port(bind)}
    joins = [f"-retry-join={a.bind}:{a.ports['serf_lan']}" for a in cluster.agents]
    # Stopped at a test's end: exit at once rather than leave the cluster gracefully (about
    # 5 s per agent); the servers mark the node failed, which no later test looks at.
    config = ["leave_on_terminate = false", *hcl]
    return _start_agent(
        workdir, node=node, bind=bind, ports=ports, hcl=config, extra=[f"-data-dir={_data_dir(workdir, node)}", *joins]
    )


# -- Redis ------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server without persistence, on a free port of 127.0.0.1."""

    proc: Proc
    port: int

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``: a broker_url / result_backend."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.stop()


def start_redis(workdir: Path) -> RedisServer:
    """Start redis-server (no RDB, no AOF) and return once it answers PING."""
    port = free_port()
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = RedisServer(spawn("redis", args, workdir), port)

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        wait_for(ready, REDIS_READY_TIMEOUT, f"redis on port {port}", procs=[server.proc])
    except BaseException:
        server.stop()
        raise
    return server


# -- Celery -----------------------------------------------------------------------------------


@dataclass
class Worker(Proc):
    """A `celery worker` process; :attr:`name` is its node name (``-n``)."""

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT) -> None:
        """Warm shutdown (SIGTERM: running tasks finish), then SIGKILL of the group."""
        super().stop(timeout)


def _celery(app_path: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", app_path, *args]


def start_worker(
    app: Any,
    workdir: Path,
    env: Mapping[str, str],
    *,
    app_path: str,
    pool: str = "prefork",
    concurrency: int = 4,
    extra_args: list[str] | None = None,
    hostname: str | None = None,
    cwd: Path | None = None,
    timeout: float = WORKER_READY_TIMEOUT,
) -> Worker:
    """Start `celery -A app_path worker` and return once it answers a ping of ``app`` (a
    Celery app on the same broker); fails at once if it exits. With ``hostname``, in a UTS
    namespace of its own with that host name (needs root: a worker on "another host")."""
    name = f"w{uuid.uuid4().hex[:6]}@test"
    args = _celery(app_path, "worker", "-n", name, "-P", pool, "-c", str(concurrency), "-l", "INFO")
    args += ["--without-heartbeat", "--without-mingle", "--without-gossip", *(extra_args or [])]
    if hostname is not None:
        args = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *args]
    log = workdir / f"worker-{name.split('@')[0]}.log"
    worker = spawn(name, args, workdir, cwd=cwd, env=env, log=log, kind=Worker)
    try:
        wait_for(
            lambda: bool(app.control.ping(destination=[name], timeout=0.5)),
            timeout,
            f"worker {name} to answer ping",
            interval=0.2,
            procs=[worker],
        )
    except BaseException:
        worker.stop(timeout=30)
        raise
    return worker


def start_beat(
    name: str,
    workdir: Path,
    env: Mapping[str, str],
    *,
    app_path: str,
    scheduler: str = "consul",
    cwd: Path | None = None,
    kind: type[P] = Proc,  # type: ignore[assignment]
) -> P:
    """Start `celery -A app_path beat -S scheduler` (log level INFO, no pid file, its schedule
    file in ``workdir``). Returns at once; wait on its log (e.g. for "joining the election")."""
    args = _celery(app_path, "beat", "-S", scheduler, "-l", "INFO", "--pidfile=", "-s", str(workdir / f"{name}-schedule"))
    return spawn(name, args, workdir, cwd=cwd, env=env, kind=kind)
