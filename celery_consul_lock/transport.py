"""A lean keep-alive HTTP/1.1 connection to the Consul agent.

Taking a lock is two small requests to a local agent, so the HTTP client's own cost
matters: ``requests`` spends about 1 ms a request here and ``http.client`` (through the
``email`` header parser) about 0.2 ms of CPU, both more than Consul's KV write itself.
This speaks just the HTTP/1.1 that Consul's agent answers: one request at a time on one
connection, ``Content-Length`` or chunked bodies, reconnecting when the agent closed an
idle connection. TLS goes through :mod:`ssl` with the context the caller builds.

Under gevent, the real OS threads of :mod:`.native` (renewer, watcher) speak TLS through an
:class:`ssl.SSLObject` over memory buffers (:class:`_TLSOverBIO`), not ``wrap_socket``: the
unpatched ``ssl.SSLSocket._create`` calls ``super(SSLSocket, self)`` with the module-global
name, which gevent's patching has pointed at gevent's class, so wrapping a real socket
raises ``TypeError``. An ``SSLObject`` does no I/O of its own: the real socket carries its
bytes (with its timeout, and :meth:`Connection.interrupt` still shuts it down), and its
errors are the same ``ssl`` exceptions. Everywhere else ``wrap_socket`` is used, as before.

:class:`ConnectionPool` shares a few such connections between the threads (or greenlets) of
a process: a request takes one for its own duration only, so the connections a process
keeps open to its agent are bounded by the pool's size, not by its number of threads.
"""

from __future__ import annotations

import collections
import contextlib
import io
import socket
import ssl
from collections.abc import Callable
from typing import Any, BinaryIO

from . import native as _native

__all__ = ["MAX_HEADER_BYTES", "Connection", "ConnectionPool", "Headers", "Interrupted", "NotHTTP", "read_response"]

#: Never read a header block larger than this (Consul's are a few hundred bytes).
MAX_HEADER_BYTES = 64 * 1024


class Headers(dict[str, str]):
    """Response headers, looked up case-insensitively (keys stored lower-case)."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())


class Connection:
    """One keep-alive connection; one request at a time (a :class:`ConnectionPool` lends it
    to one caller at a time).

    ``native=True``: a real OS socket even under gevent's monkey-patching, for the real
    threads of :mod:`.native` (give it an ``ssl_context`` of ``native.ssl_context_class()``).
    """

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, native: bool = False) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.native = native
        self._sock: socket.socket | None = None
        self._file: object | None = None
        #: Sends a request's bytes (the socket's sendall, or through TLS on its own).
        self._send: Callable[[bytes], object] = _not_connected
        #: Set by interrupt(): every request raises Interrupted until resume().
        self._interrupted = False
        self._host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    def __del__(self) -> None:
        # A dropped pool's connections (a forked child's copies, a private client) close quietly.
        self.close()

    def close(self) -> None:
        # No module globals here: the process's shared pools are dropped at interpreter exit,
        # after the modules' globals (contextlib) are gone.
        sock, file, self._sock, self._file = self._sock, self._file, None, None
        for closable in (file, sock):
            if closable is not None:
                try:  # noqa: SIM105 (no contextlib at interpreter exit, see above)
                    closable.close()  # type: ignore[attr-defined]
                except OSError:
                    pass

    def interrupt(self) -> None:
        """From another thread: make the request in progress (a blocking query) end now,
        and every later one, with :class:`Interrupted`, until :meth:`resume`. The socket
        is shut down, not closed: the request's own thread closes it."""
        self._interrupted = True
        sock = self._sock
        if sock is not None:
            # The raw socket's shutdown, also under TLS; a real socket's under gevent (gevent's
            # socket class is not a real socket's, and its shutdown raises AttributeError).
            raw = _native.socket_class() if self.native else socket.socket
            with contextlib.suppress(OSError):
                raw.shutdown(sock, socket.SHUT_RDWR)

    def resume(self) -> None:
        """Let requests through again after :meth:`interrupt`."""
        self._interrupted = False

    def request(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, Headers, bytes]:
        """Send one request and read its answer; reconnects once if a reused connection
        turns out to have been closed by the agent before it answered.

        Why sending the request again is safe, also for a PUT: it happens only on a
        connection that served an earlier request and then failed before a single byte of
        this answer arrived (reset, or closed). Nearly always that is an agent that closed
        the connection as idle (Go's HTTP server does, and the close races our request),
        so the request was never read and nothing happened. Only if the agent read it and
        then died (killed or restarted mid-request) may it have been applied, and every
        write this package makes has the same effect twice or a bounded, visible one:
        acquire and release by the same session, renew and destroy of a session, passing
        or failing a check, registering a service under a fixed ID and the fenced ``set``
        writes repeat harmlessly; a ``check-not-exists`` acquire that was applied answers
        "exists" and is retried as a re-acquire by the same session; a fenced ``cas``
        answers "stale index" and is re-read and retried by its caller (tick marks); a
        session created twice leaves one unused session that its TTL removes.
        """
        head = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}", f"Content-Length: {len(body or b'')}"]
        head.extend(f"{k}: {v}" for k, v in headers.items())
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
        for attempt in (1, 2):
            reused = self._sock is not None
            sock = self._sock or self._connect(timeout)
            try:
                if self._interrupted:  # checked once the socket is known: interrupt() shuts it down
                    raise Interrupted("the request was interrupted")
                if sock.gettimeout() != timeout:
                    sock.settimeout(timeout)
                self._send(payload)
                status, resp_headers, content, close = read_response(self._file, method)  # type: ignore[arg-type]
            except BaseException as exc:
                self.close()
                if self._interrupted and isinstance(exc, Exception):
                    raise Interrupted("the request was interrupted") from None
                if not isinstance(exc, (ConnectionResetError, BrokenPipeError, _ClosedEarly)):
                    raise
                if reused and attempt == 1:
                    continue
                raise ConnectionResetError("the agent closed the connection without answering") from None
            if close:
                self.close()
            return status, resp_headers, content
        raise AssertionError("unreachable")

    def _connect(self, timeout: float) -> socket.socket:
        if self.native:
            sock = _native.create_connection((self.host, self.port), timeout)
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.ssl_context is not None and self.native and _native.green():
                tls = _TLSOverBIO(sock, self.ssl_context, self.host)
                self._file, self._send = io.BufferedReader(tls), tls.write
            else:
                if self.ssl_context is not None:
                    sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
                self._file, self._send = sock.makefile("rb"), sock.sendall
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock


def _not_connected(data: bytes) -> None:
    raise AssertionError("not connected")


class _TLSOverBIO(io.RawIOBase):
    """TLS on a connected real socket through an :class:`ssl.SSLObject` (see the module's
    docstring for why): the handshake (verifying ``server_hostname``) happens here, then
    :meth:`readinto` and :meth:`write` move bytes between the socket and the TLS object.
    The socket's timeout bounds every wait (TimeoutError); ssl errors pass through as
    ``wrap_socket``'s would. The peer's end of the stream, with or without TLS's
    close_notify, reads as the end (as ``wrap_socket``'s default ``suppress_ragged_eofs``).
    Closing sends close_notify if it can; the caller closes the socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        super().__init__()
        self._sock = sock
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self._step(self._tls.do_handshake)

    def _step(self, operation: Callable[..., Any], *args: Any) -> Any:
        """``operation(*args)``, feeding it bytes from the socket until it has enough, and
        sending what it wrote."""
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                data = self._sock.recv(_RECV_BYTES)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
            except ssl.SSLWantWriteError:  # memory BIOs grow, but the protocol allows it
                self._flush()
            else:
                self._flush()
                return result

    def _flush(self) -> None:
        if self._outgoing.pending:
            self._sock.sendall(self._outgoing.read())

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return int(self._step(self._tls.read, len(buffer), buffer))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def write(self, data: Any) -> int:
        """Send all of ``data`` (as ``socket.sendall``); returns its length."""
        return int(self._step(self._tls.write, data))

    def close(self) -> None:
        if not self.closed:
            # No module globals (interpreter exit, see Connection.close); any failure is a
            # connection that is going away anyway. unwrap() raises SSLWantReadError once it
            # has written close_notify (it would wait for the peer's): send it, wait for none.
            steps: tuple[Callable[[], object], ...] = (lambda: self._tls.unwrap(), self._flush)  # no _tls if wrap_bio failed
            for step in steps:
                try:  # noqa: SIM105 (no contextlib at interpreter exit)
                    step()
                except Exception:
                    pass
        super().close()


#: Bytes read from the socket at a time under TLS (a TLS record is at most 16 KiB).
_RECV_BYTES = 32 * 1024


def read_response(f: BinaryIO, method: str) -> tuple[int, Headers, bytes, bool]:
    """Read one HTTP/1.1 answer from ``f``: (status, headers, body, whether the connection
    must be closed after it). The body is framed by ``Content-Length``, chunked transfer
    encoding, or (neither) the end of the stream.

    Raises _ClosedEarly when ``f`` ends before the status line, ConnectionError when it
    ends inside the answer or the header block passes MAX_HEADER_BYTES, and NotHTTP when
    the bytes are not HTTP (the status line, a length or a chunk's framing).
    """
    line = f.readline(MAX_HEADER_BYTES)
    if not line:
        raise _ClosedEarly
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise NotHTTP(line[:80])
    status = int(parts[1])
    headers = Headers()
    size = 0
    while True:
        line = f.readline(MAX_HEADER_BYTES)
        size += len(line)
        if not line or size > MAX_HEADER_BYTES or not line.endswith(b"\n"):
            raise ConnectionError("truncated or oversized HTTP headers")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    close = str(headers.get("connection", "")).lower() == "close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", close
    if str(headers.get("transfer-encoding", "")).lower() == "chunked":
        return status, headers, _read_chunked(f), close
    length = headers.get("content-length")
    if length is None:  # the body runs until the agent closes
        return status, headers, f.read(), True
    if not str(length).isdigit():
        raise NotHTTP(f"Content-Length: {length}"[:80].encode("latin-1", "replace"))
    content = f.read(int(str(length)))
    if len(content) != int(str(length)):
        raise ConnectionError("connection closed in the middle of a response")
    return status, headers, content, close


def _read_chunked(f: BinaryIO) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = f.readline(MAX_HEADER_BYTES)
        if not size_line.endswith(b"\n"):
            raise ConnectionError("connection closed in the middle of a chunked response")
        digits = size_line.split(b";", 1)[0].strip()
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            raise NotHTTP(size_line[:80])
        size = int(digits, 16)
        if size == 0:
            while True:  # trailer fields, up to the blank line that ends the answer
                line = f.readline(MAX_HEADER_BYTES)
                if not line.endswith(b"\n"):
                    raise ConnectionError("connection closed in the middle of a chunked response")
                if line in (b"\r\n", b"\n"):
                    return b"".join(chunks)
        chunk = f.read(size)
        if len(chunk) != size:
            raise ConnectionError("connection closed in the middle of a chunked response")
        chunks.append(chunk)
        end = f.readline(MAX_HEADER_BYTES)
        if not end.endswith(b"\n"):
            raise ConnectionError("connection closed in the middle of a chunked response")
        if end not in (b"\r\n", b"\n"):
            raise NotHTTP(end[:80])


class ConnectionPool:
    """Up to ``size`` keep-alive connections to one agent, shared by the threads (or the
    greenlets) of a process: :meth:`take` lends one to a caller for one request, and
    :meth:`give` takes it back. When all are lent, a caller waits for the first one given
    back (first come, first served), however long: every request has a timeout, so every
    wait ends. Connections are opened when first needed and the most recently used are
    lent first, so a process that makes few requests at a time keeps few open.

    ``native``: the connections are real OS sockets under gevent, and a waiter blocks its
    OS thread (for the real threads of :mod:`.native`); otherwise a waiting greenlet yields
    to the others.
    """

    def __init__(
        self, host: str, port: int, *, size: int, ssl_context: ssl.SSLContext | None = None, native: bool = False
    ) -> None:
        self.size = size
        self._mutex = _native.lock()
        #: Connections not lent now; the last one given back is lent first.
        self._idle = [Connection(host, port, ssl_context=ssl_context, native=native) for _ in range(size)]
        self._all = tuple(self._idle)
        #: Callers waiting for a connection, in arrival order (each gets the one given back).
        self._waiters: collections.deque[_native.Wakeup] = collections.deque()

    def take(self) -> Connection:
        """A connection for one request; give it back with :meth:`give` (in a ``finally``)."""
        with self._mutex:
            if self._idle:
                return self._idle.pop()
            waiter = _native.Wakeup()
            self._waiters.append(waiter)
        try:
            waiter.wait(None)
        except BaseException:  # killed while waiting (a greenlet, an abort): lose no connection
            with self._mutex:
                handed = waiter.value
                if handed is None:
                    self._waiters.remove(waiter)
            if handed is not None:
                self.give(handed)
            raise
        return waiter.value  # type: ignore[no-any-return]

    def give(self, conn: Connection) -> None:
        """Take back a connection lent by :meth:`take`: to the first waiter, else idle."""
        with self._mutex:
            if not self._waiters:
                self._idle.append(conn)
                return
            waiter = self._waiters.popleft()
            waiter.value = conn
        waiter.set()

    def busy(self) -> int:
        """How many connections are lent now."""
        return self.size - len(self._idle)

    def interrupt(self) -> None:
        """:meth:`Connection.interrupt` every connection (see there)."""
        for conn in self._all:
            conn.interrupt()

    def resume(self) -> None:
        for conn in self._all:
            conn.resume()

    def close(self) -> None:
        """Close the connections not lent now (a lent one stays usable: it is closed when
        its caller is done, or when the pool is dropped)."""
        with self._mutex:
            idle = list(self._idle)
        for conn in idle:
            conn.close()


class Interrupted(ConnectionError):
    """A request ended by :meth:`Connection.interrupt` (from another thread)."""


class NotHTTP(Exception):
    """The peer sent bytes that are not an HTTP/1.1 answer (``args[0]``: the first of them)."""


class _ClosedEarly(Exception):
    """The agent closed the connection before sending a status line."""
