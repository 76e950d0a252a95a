"""The HTTP transport (celery_consul_lock/transport.py) on its own.

Against a real agent: a recursive read of many keys, which Consul answers with chunked
transfer encoding. Against a small socket server in this process, on a free loopback port:
the answers a real agent gives only when something breaks (an idle connection closed under
a request, headers or a body cut short, a header block past the limit). That server tests our
parser and our reconnecting; it stands in for no Consul semantics. And, with Hypothesis, the
response parser itself: every well-formed answer comes back whole, a cut one never comes back
as a wrong one, and no bytes make it fail other than with the transport's own errors.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_consul_lock import ConsulSettings, ConsulUnavailable
from celery_consul_lock.consul import FAILURES, ConsulClient
from celery_consul_lock.transport import MAX_HEADER_BYTES, Connection, NotHTTP, _ClosedEarly, read_response

from .servers import ConsulAgent, start_consul, wait_consul_ready

#: What the parser may raise on bytes it cannot take: nothing else.
PARSER_ERRORS = (NotHTTP, ConnectionError, _ClosedEarly)

#: In a ScriptedServer's script: read the request, answer nothing.
HANG = b"<hang>"

OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\ntrue"


# -- a scripted server: for each connection, what to do with each request -------------------


class ScriptedServer:
    """Accepts connections one after another on a free loopback port. ``script[i]`` says
    what connection i does with its requests, in order: bytes to send as the answer, None
    to close the connection right after reading the request, or HANG to answer nothing
    until the server is closed (a hung agent). When a connection's
    script runs out it is closed (an agent dropping an idle connection). Records every
    request it read, per connection."""

    def __init__(self, script: list[list[bytes | None]]) -> None:
        self.script = script
        self.requests: list[list[bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answers in self.script:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            seen: list[bytes] = []
            self.requests.append(seen)
            with conn, conn.makefile("rb") as f:
                for answer in answers:
                    request = _read_request(f)
                    if request is None:
                        break
                    seen.append(request)
                    if answer is None:
                        break
                    if answer is HANG:
                        self.closing.wait(30)
                        break
                    conn.sendall(answer)

    def close(self) -> None:
        self.closing.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a pending accept()
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _read_request(f: io.BufferedReader) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = f.readline()
        if not line:
            return None
        head += line
    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
    return head + f.read(length)


@pytest.fixture
def scripted() -> Iterator[Callable[[list[list[bytes | None]]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: list[list[bytes | None]]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _connection(server: ScriptedServer) -> Connection:
    host, port = server.address.rsplit(":", 1)
    return Connection(host, int(port))


# -- a real agent: chunked bodies -------------------------------------------------------------


def test_a_recursive_read_of_many_keys_comes_back_chunked_and_whole(consul: ConsulAgent, settings: ConsulSettings, key):
    prefix = key.replace(".lock", "many/")
    values = {f"{prefix}{i:04d}": f"value {i} ".encode() * 20 for i in range(400)}
    client = ConsulClient(settings)
    try:
        items = list(values.items())
        for start in range(0, len(items), 64):  # Consul's limit per transaction
            ops = [{"KV": {"Verb": "set", "Key": k, "Value": base64.b64encode(v).decode()}} for k, v in items[start : start + 64]]
            assert client.txn(ops)[0]
        conn = Connection(consul.bind, consul.http_port)
        try:
            status, headers, body = conn.request("GET", f"/v1/kv/{prefix}?recurse=1", None, {}, 10)
            # The same connection serves the next request: the chunked body was read to its end.
            again = conn.request("GET", f"/v1/kv/{prefix}0000", None, {}, 10)
        finally:
            conn.close()
        assert status == 200 and headers["Transfer-Encoding"] == "chunked" and "content-length" not in headers
        assert [(e["Key"], base64.b64decode(e["Value"])) for e in json.loads(body)] == items
        assert again[0] == 200 and json.loads(again[2])[0]["Key"] == f"{prefix}0000"
        assert {e.key: e.value for e in client.kv_keys(prefix)} == values
    finally:
        client.close()


# -- a connection the agent closed ----------------------------------------------------------


def test_a_connection_the_agent_closed_while_idle_is_replaced_and_the_request_sent_once_more(scripted):
    # Connection 0 answers one request, then the server closes it as idle; connection 1 answers.
    server = scripted([[OK_ANSWER], [OK_ANSWER]])
    conn = _connection(server)
    try:
        assert conn.request("PUT", "/v1/kv/a", b"1", {}, 5)[2] == b"true"
        assert conn.request("PUT", "/v1/kv/b", b"2", {}, 5)[2] == b"true"
    finally:
        conn.close()
    assert len(server.requests) == 2
    assert server.requests[0][0].startswith(b"PUT /v1/kv/a ") and server.requests[1][0].startswith(b"PUT /v1/kv/b ")
    assert server.requests[1][0].endswith(b"\r\n\r\n2")


def test_the_connection_a_restarted_agent_closed_is_replaced_by_the_next_request(tmp_path):
    """A real agent closes its connections when it stops: the client's idle keep-alive
    connection is dead, and the next request goes out on a new one, to the new agent."""
    agent = start_consul(tmp_path)
    try:
        wait_consul_ready(agent)
        client = ConsulClient(ConsulSettings(address=agent.address, timeout=5))
        try:
            assert client.status_leader()
            agent.proc.stop()
            agent.proc.restart()
            wait_consul_ready(agent)
            assert client.status_leader()  # on the same client, whose connection the old agent closed
        finally:
            client.close()
    finally:
        agent.stop()


def test_a_new_connection_closed_without_an_answer_is_not_sent_again(scripted):
    server = scripted([[None], [OK_ANSWER]])
    conn = _connection(server)
    try:
        with pytest.raises(ConnectionResetError, match="closed the connection without answering"):
            conn.request("PUT", "/v1/kv/a", b"1", {}, 5)
    finally:
        conn.close()
    assert [len(r) for r in server.requests] == [1]


def test_a_reused_connection_is_replaced_only_once(scripted):
    # Connection 0 answers, then closes; connection 1 reads the request and closes unanswered.
    server = scripted([[OK_ANSWER], [None], [OK_ANSWER]])
    client = ConsulClient(ConsulSettings(address=server.address, timeout=5))
    try:
        assert client.kv_put("a", b"1") is True
        with pytest.raises(ConsulUnavailable) as info:
            client.kv_put("b", b"2")
    finally:
        client.close()
    assert f"http://{server.address}" in str(info.value) and "closed the connection without answering" in str(info.value)
    assert [len(r) for r in server.requests] == [1, 1]


# -- answers cut short or too large -------------------------------------------------------------

BROKEN_ANSWERS = {
    "headers cut short": b"HTTP/1.1 200 OK\r\nContent-Type: appl",
    "no blank line after the headers": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
    "headers past the limit": b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"x" * MAX_HEADER_BYTES + b"\r\n\r\n",
    "many headers past the limit": b"HTTP/1.1 200 OK\r\n" + b"X-Padding: 0123456789\r\n" * (MAX_HEADER_BYTES // 20) + b"\r\n",
    "body cut short": b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{"Key":',
    "chunk cut short": b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n[{"Key":',
    "chunked body without its last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ntrue\r\n",
}


@pytest.mark.parametrize("answer", sorted(BROKEN_ANSWERS))
def test_an_answer_cut_short_or_too_large_is_an_error_naming_the_agent(scripted, answer: str):
    server = scripted([[BROKEN_ANSWERS[answer]]])
    client = ConsulClient(ConsulSettings(address=server.address, timeout=5))
    try:
        with pytest.raises(ConsulUnavailable) as info:
            client.kv_get("locks/x/.lock")
    finally:
        client.close()
    text = str(info.value)
    assert f"http://{server.address}" in text and "reading a key" in text and len(text) < 400, text
    expected = "truncated or oversized HTTP headers" if "header" in answer or "blank line" in answer else "in the middle of a"
    assert expected in text, text


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\ntrue",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4x\r\n\r\ntrue",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-4\r\ntrue\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\ntrue\r\n0\r\n\r\n",
    ],
    ids=["negative length", "length not a number", "negative chunk size", "chunk longer than its size"],
)
def test_framing_that_is_not_http_is_not_consul(scripted, answer: bytes):
    server = scripted([[answer]])
    client = ConsulClient(ConsulSettings(address=server.address, timeout=5))
    try:
        with pytest.raises(ConsulUnavailable) as info:
            client.kv_put("a", b"1")
    finally:
        client.close()
    assert f"the server at http://{server.address} is not a Consul agent" in str(info.value), str(info.value)


def test_an_agent_that_never_answers_is_unavailable_after_the_timeout(scripted):
    server = scripted([[HANG]])
    client = ConsulClient(ConsulSettings(address=server.address, timeout=0.5))
    try:
        with pytest.raises(ConsulUnavailable) as info:
            client.status_leader()
    finally:
        client.close()
    assert info.value.transient and "no answer within the timeout" in str(info.value)
    assert f"http://{server.address}" in str(info.value)


def test_no_row_of_the_failure_table_is_shadowed_by_an_earlier_one():
    """FAILURES is read first match wins: a row without a condition must come after every
    row for a subclass of what it matches, or that row could never apply."""
    for i, (kind, when, _) in enumerate(FAILURES):
        if when is None:
            later = [k for k, _, _ in FAILURES[i + 1 :] if issubclass(k, kind)]
            assert not later, f"row {i} ({kind.__name__}) hides the rows for {later}"


# -- the parser, property-based ----------------------------------------------------------------

_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection")
)
_VALUES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


@st.composite
def answers(draw: st.DrawFn, framings: tuple[str, ...] = ("length", "chunked", "close")) -> tuple[bytes, int, dict, bytes, str]:
    """An HTTP/1.1 answer as bytes, with what it carries: (wire, status, headers, body, framing)."""
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    headers = draw(st.dictionaries(_NAMES, _VALUES, max_size=6))
    headers = {k.lower(): v for k, v in headers.items()}
    body = draw(st.binary(max_size=3000))
    framing = draw(st.sampled_from(framings))
    head = f"HTTP/1.1 {status} {draw(st.sampled_from(['OK', 'Not Found', '']))}\r\n"
    head += "".join(f"{k}:{draw(st.sampled_from(['', ' ', '  ']))}{v}\r\n" for k, v in headers.items())
    if framing == "length":
        wire = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    elif framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        chunks = b"".join(
            f"{len(p):{draw(st.sampled_from(['x', 'X']))}}{draw(st.sampled_from(['', ';ext=1']))}\r\n".encode() + p + b"\r\n"
            for p in pieces
        )
        trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
        wire = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n" + trailer + b"\r\n"
    else:
        wire = (head + "\r\n").encode() + body
    return wire, status, headers, body, framing


def _parse(data: bytes) -> tuple[int, dict, bytes, bool]:
    return read_response(io.BufferedReader(io.BytesIO(data)), "GET")  # type: ignore[return-value]


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=answers(("length", "chunked")), second=answers())
def test_the_parser_returns_every_well_formed_answer_whole_and_stops_at_its_end(first, second):
    """Two answers back to back on one connection: each comes back as sent, the first read
    exactly to its end (keep-alive depends on it), the second as far as its framing says."""
    f = io.BufferedReader(io.BytesIO(first[0] + second[0]))
    for _, status, headers, body, framing in (first, second):
        got_status, got_headers, got_body, close = read_response(f, "GET")  # type: ignore[arg-type]
        assert (got_status, got_body) == (status, body)
        assert all(got_headers[k] == v.strip() for k, v in headers.items())
        assert close == (framing == "close")


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers(("length", "chunked")), data=st.data())
def test_an_answer_cut_anywhere_is_an_error_never_a_shorter_answer(answer, data):
    wire = answer[0]
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(PARSER_ERRORS):
        _parse(wire[:cut])


@settings(max_examples=500, deadline=None, database=None)
@given(
    data=st.one_of(
        st.binary(max_size=400),
        st.builds(lambda tail: b"HTTP/1.1 200 OK\r\n" + tail, st.binary(max_size=400)),
        st.builds(
            lambda head, tail: b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + tail,
            st.sampled_from([b"Transfer-Encoding: chunked", b"Content-Length: 5", b"Content-Length: x"]),
            st.binary(max_size=200),
        ),
    )
)
def test_no_bytes_make_the_parser_fail_other_than_with_the_transports_errors(data: bytes):
    try:
        status, headers, body, _ = _parse(data)
    except PARSER_ERRORS:
        return
    assert isinstance(status, int) and isinstance(body, bytes) and all(isinstance(v, str) for v in headers.values())
