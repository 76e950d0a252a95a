"""Pointed at something that answers HTTP but is not a Consul agent, every call gives one
clear error, NotConsul, naming the address and quoting at most a short excerpt of what
came back: never a traceback, a page of HTML, or an answer taken for "nothing there".

The servers are real: ``python -m http.server`` (the ``web_server`` fixture, its own
process, stopped by pid) and, for answers it cannot give, a small HTTP server in this
process on a free loopback port, closed at the end of each test.
"""

from __future__ import annotations

import pickle
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from celery_consul_lock import ConsulLock, ConsulSettings, ConsulUnavailable, NotConsul
from celery_consul_lock.consul import ConsulClient

from .servers import WebServer

#: A well-formed session id that no server knows.
SID = "00000000-0000-4000-8000-000000000000"
TOKEN = "3f1c2d9e-secret-token-0b7a"

#: What a foreign server answers to every request: (status, content type, body).
ANSWERS: dict[str, tuple[int, str | None, bytes]] = {
    "html page": (200, "text/html", b"<!DOCTYPE html><html><body>" + b"<p>Welcome to nginx!</p>" * 200 + b"</body></html>"),
    "empty 404": (404, None, b""),
    "go default 404": (404, "text/plain; charset=utf-8", b"404 page not found\n"),
    "text junk": (200, "text/plain", b"OK: all systems go"),
    "json-typed junk": (200, "application/json", b"OK: all systems go"),
    "JSON of another API": (200, "application/json", b'{"status": "ok", "items": []}'),
    "proxy error page": (502, "text/html", b"<html><head><title>502 Bad Gateway</title></head></html>"),
}

#: Every kind of call the adapter makes, as the lock, the session, the beat and the command make it.
CALLS: dict[str, Callable[[ConsulClient], Any]] = {
    "status leader": lambda c: c.status_leader(),
    "agent self": lambda c: c.agent_self(),
    "session create": lambda c: c.session_create("t", ttl=10, lock_delay=1, checks=[]),
    "session renew": lambda c: c.session_renew(SID),
    "session info": lambda c: c.session_info(SID),
    "session list": lambda c: c.session_list(),
    "kv get": lambda c: c.kv_get("locks/x/.lock"),
    "kv get (blocking)": lambda c: c.kv_get("locks/x/.lock", index=7, wait=1, consistent=True),
    "kv keys": lambda c: c.kv_keys("locks/"),
    "kv lock": lambda c: c.kv_lock("locks/x/.lock", SID, b"{}"),
    "kv lock (new key)": lambda c: c.kv_lock("locks/x/.lock", SID, b"{}", exists=False),
    "kv release": lambda c: c.kv_release("locks/x/.lock", SID, b""),
    "txn": lambda c: c.txn([{"KV": {"Verb": "get", "Key": "locks/x/.lock"}}]),
    "agent register service": lambda c: c.agent_register_ttl_service("s-1", "s", check_ttl=2),
    "agent check pass": lambda c: c.agent_check_pass("service:s-1"),
    "agent deregister service": lambda c: c.agent_deregister_service("s-1"),
}

#: Consul's agent endpoints answer 200 with no body, which they do not read: JSON of
#: another API is the one answer they cannot tell from Consul's.
AGENT_WRITES = {"agent register service", "agent check pass", "agent deregister service"}


class _Foreign(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    answer: tuple[int, str | None, bytes] = (200, None, b"")

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, content_type, body = self._answer()
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> tuple[int, str | None, bytes]:
        return self.answer

    do_GET = do_PUT = do_DELETE = do_POST = _reply

    def log_message(self, *args: object) -> None:
        pass


class _Echo(_Foreign):
    """Sends the request's headers back (as some debugging endpoints do), token first."""

    def _answer(self) -> tuple[int, str | None, bytes]:
        body = "".join(f"{k}: {v}\n" for k, v in sorted(self.headers.items(), key=lambda kv: kv[0] != "X-Consul-Token"))
        return (200, "text/plain", body.encode())


class _NotHTTP(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"-ERR unknown command 'PUT', with args beginning with: '/v1/session/create'\r\n")


@pytest.fixture
def foreign() -> Iterator[Callable[[type], str]]:
    """Start a server with a handler class on a free loopback port; returns its address."""
    servers: list[socketserver.TCPServer] = []
    threads: list[threading.Thread] = []

    def start(handler: type) -> str:
        server_class = ThreadingHTTPServer if issubclass(handler, BaseHTTPRequestHandler) else socketserver.ThreadingTCPServer
        server = server_class(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append(server)
        threads.append(thread)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(5)


def _answering(answer: tuple[int, str | None, bytes]) -> type:
    return type("Answering", (_Foreign,), {"answer": answer})


def _assert_clear(exc: BaseException, address: str) -> None:
    text = str(exc)
    assert isinstance(exc, NotConsul), f"{type(exc).__name__}: {text}"
    assert f"the server at http://{address} is not a Consul agent" in text, text
    assert len(text) < 400, f"the error quotes too much of the answer ({len(text)} chars): {text}"
    assert text.count("Welcome to nginx!") < 5 and "\n" not in text, text  # the page has 200


def _calling(address: str, call: str) -> ConsulUnavailable:
    """The clear error that ``call`` against the server at ``address`` must raise."""
    client = ConsulClient(ConsulSettings(address=address, timeout=5))
    try:
        with pytest.raises(ConsulUnavailable) as info:
            CALLS[call](client)
    finally:
        client.close()
    _assert_clear(info.value, address)
    return info.value


#: Every answer for every call, except another API's JSON to the agent writes: those calls
#: read no answer, so it is indistinguishable from Consul's empty 200 (any other call shows it).
PAIRS = [(a, c) for a in ANSWERS for c in CALLS if not (a == "JSON of another API" and c in AGENT_WRITES)]


@pytest.mark.parametrize(("answer", "call"), PAIRS)
def test_every_call_to_a_server_that_is_not_consul_raises_not_consul(foreign, answer: str, call: str) -> None:
    address = foreign(_answering(ANSWERS[answer]))
    error = _calling(address, call)
    assert error.transient is False


@pytest.mark.parametrize("call", ["status leader", "session create", "kv get", "kv lock", "agent check pass"])
def test_a_server_that_does_not_speak_http_raises_not_consul(foreign, call: str) -> None:
    error = _calling(foreign(_NotHTTP), call)
    assert "not HTTP" in str(error) and "-ERR unknown command" in str(error)


def test_the_excerpt_of_a_foreign_answer_never_shows_the_token(foreign) -> None:
    address = foreign(_Echo)
    client = ConsulClient(ConsulSettings(address=address, token=TOKEN, timeout=5))
    try:
        with pytest.raises(NotConsul) as info:
            client.session_create("t", ttl=10, lock_delay=1, checks=[])
    finally:
        client.close()
    _assert_clear(info.value, address)
    assert "X-Consul-Token: <token>" in str(info.value), str(info.value)  # the echo is quoted, redacted
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value.args)


def test_a_lock_pointed_at_a_web_server_fails_at_once_with_not_consul(web_server: WebServer, key: str) -> None:
    lock = ConsulLock(key, settings=ConsulSettings(address=web_server.address, lock_delay=1))
    with pytest.raises(NotConsul) as info:
        lock.acquire(blocking=False)
    _assert_clear(info.value, web_server.address)
    # Not transient: a blocking acquire does not wait through it as through an election.
    t0 = time.monotonic()
    with pytest.raises(NotConsul):
        lock.acquire(timeout=30)
    assert time.monotonic() - t0 < 10, "a blocking acquire retried an answer that no waiting can fix"


def test_not_consul_pickles_and_keeps_its_fields() -> None:
    exc = NotConsul("http://127.0.0.1:8080", "creating a session", "HTTP 404 typed text/html: '<html>'")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is NotConsul and str(back) == str(exc)
    assert (back.address, back.action, back.answer, back.transient) == (exc.address, exc.action, exc.answer, False)
