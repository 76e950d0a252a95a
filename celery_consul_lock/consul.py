"""The one door to Consul: every HTTP call this package makes goes through :class:`ConsulClient`.

One road: each method builds its request (path, query, body), sends it with
:meth:`ConsulClient._request` over a keep-alive
:class:`~celery_consul_lock.transport.Connection` lent by the client's
:class:`~celery_consul_lock.transport.ConnectionPool` for that one request, and reads the
answer. A process shares one client per settings (:func:`shared_client`, at most
``max_connections`` connections); the session renewers share one of their own
(:func:`renewal_client`), so a renewal never queues behind a task's request. Every failure on the
way, from a refused connection to an answer no Consul agent gives, becomes one of our errors
through one table, :data:`FAILURES` (as httpx maps its transport's exceptions): adding a case
is one line there. The token travels as a header on the connection (so it is in no URL, log
line or exception text), every request has a timeout, and every error names the agent's
address or the ACL permission involved. TLS contexts are built in :mod:`.tls`.

There is no Consul client library underneath (the package depends on none): the two that
exist, python-consul2 and its fork py-consul, differ exactly where this module has to decide
(which of ``CONSUL_HTTP_TOKEN`` and an explicit token wins, whether a request has a timeout,
whether a transaction carries the token), and the requests this package makes are a dozen
fixed endpoints.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

from . import native
from .errors import ACLDenied, ConsulLockError, ConsulUnavailable, NotConsul, SessionGone
from .settings import ConsulSettings
from .tls import tls_context, tls_failure
from .transport import ConnectionPool, Headers, Interrupted, NotHTTP

__all__ = [
    "FAILURES",
    "LOCK_FLAG",
    "SEMAPHORE_FLAG",
    "ConsulClient",
    "Fenced",
    "KVEntry",
    "LockAttempt",
    "kv_delete_cas",
    "kv_set",
    "kv_unlock",
    "renewal_client",
    "shared_client",
]


#: The flags value ``consul lock`` and the Go client write on a lock key
#: (``api.LockFlagValue``); a key with other non-zero flags is not a lock.
LOCK_FLAG = 0x2DDCCBC058A50C18
#: The flags value ``consul lock -n N`` and the Go client's semaphore write on a
#: semaphore's keys (``api.SemaphoreFlagValue``); a lock refuses them and they refuse a lock.
SEMAPHORE_FLAG = 0xE0F69A2BAA414DE0

#: kv_lock's transaction: ``get`` (or ``check-not-exists``) then ``lock``, on one key.
_LOCK_TXN = '[{"KV":{"Verb":"%s","Key":%s}},{"KV":{"Verb":"lock","Key":%s,"Value":"%s","Flags":%d,"Session":%s}}]'

#: Consul's answer to a token it does not know (not one that lacks a permission).
_ACL_NOT_FOUND = "ACL not found"
#: How a server says it is between leaders (an election): brief, worth retrying.
_NO_LEADER = ("No cluster leader", "rpc error", "leadership lost", "connection refused", "EOF")

#: How much of a foreign answer's body an error quotes: enough to recognise it, never a page.
EXCERPT_CHARS = 80

#: How much longer than ``wait`` a blocking query may take: Consul adds up to wait/16
#: of jitter before answering.
BLOCKING_JITTER = 1 / 16
#: Consul's limit on the operations of one transaction.
TXN_MAX_OPS = 64
#: A blocking query's wait when the caller gives none: Consul's own default (5 min).
DEFAULT_BLOCKING_WAIT = 300.0

_T = TypeVar("_T")

#: Connections of the client the session renewers of a process share (see renewal_client):
#: a renewal waits behind renewals only, and one slow renewal does not hold up the others.
RENEWAL_CONNECTIONS = 2

#: Answers that are not failures when nothing else is said: 200 only.
_OK = (200,)


@dataclass(frozen=True)
class KVEntry:
    """One key as Consul returns it."""

    key: str
    value: bytes | None
    flags: int
    session: str | None
    create_index: int
    modify_index: int
    lock_index: int

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> KVEntry:
        value = data.get("Value")
        if isinstance(value, str):
            value = base64.b64decode(value)
        return cls(
            key=data["Key"],
            value=value,
            flags=int(data.get("Flags") or 0),
            session=data.get("Session") or None,
            create_index=int(data.get("CreateIndex") or 0),
            modify_index=int(data.get("ModifyIndex") or 0),
            lock_index=int(data.get("LockIndex") or 0),
        )


@dataclass(frozen=True)
class LockAttempt:
    """The answer to one acquire: taken (with its fencing token) or why not."""

    acquired: bool
    #: The key's ModifyIndex written by this acquire: the fencing token.
    modify_index: int = 0
    #: When not acquired: "held" (another session has it), "lock-delay" (free, but inside
    #: a lock-delay), "session" (our session is gone), "missing" / "exists" (kv_lock's
    #: guess of whether the key exists was wrong).
    reason: str = ""
    #: When acquired a key whose flags say it is not a lock: the key as it was just before
    #: (to put it back).
    conflict: KVEntry | None = None
    #: When acquired a key that existed: its value just before, base64 as Consul gives it.
    previous: str | None = None


@dataclass(frozen=True)
class Fenced:
    """The answer to :meth:`ConsulClient.kv_fenced`: written, or why not."""

    #: Every write applied (each transaction is all or nothing).
    ok: bool
    #: Not applied because the session no longer holds the lock key (its check failed).
    lost: bool = False
    #: The written keys as Consul returns them, in the order of the writes (``ModifyIndex``:
    #: the index a later ``cas`` needs).
    results: tuple[dict[str, Any], ...] = ()
    #: When not ok: Consul's errors (``OpIndex`` counts from the session check, 0).
    errors: tuple[dict[str, Any], ...] = ()


def kv_set(key: str, value: bytes, *, index: int | None = None, flags: int | None = None) -> dict[str, Any]:
    """A write for :meth:`ConsulClient.kv_fenced`: ``set``, or with ``index`` a ``cas``
    (written only if the key's ModifyIndex is still ``index``; 0: only if absent)."""
    op: dict[str, Any] = {"Verb": "set" if index is None else "cas", "Key": key, "Value": base64.b64encode(value).decode()}
    if index is not None:
        op["Index"] = index
    if flags is not None:
        op["Flags"] = flags
    return op


def kv_delete_cas(key: str, index: int) -> dict[str, Any]:
    """A write for :meth:`ConsulClient.kv_fenced` or :meth:`ConsulClient.txn`: delete ``key``
    only if its ModifyIndex is still ``index``."""
    return {"Verb": "delete-cas", "Key": key, "Index": index}


def kv_unlock(key: str, session: str) -> dict[str, Any]:
    """A write for :meth:`ConsulClient.kv_fenced`: free ``key`` if ``session`` holds it."""
    return {"Verb": "unlock", "Key": key, "Session": session}


class ConsulClient:
    """Up to ``connections`` keep-alive connections to one agent, with our error handling
    around every call; safe to share between threads (each request borrows a connection
    for its own duration, see :class:`~celery_consul_lock.transport.ConnectionPool`).

    Most code uses the process's :func:`shared_client`. ``native``: for real OS threads
    under gevent (see :mod:`.native`), over real sockets.
    """

    def __init__(
        self, settings: ConsulSettings, *, timeout: float | None = None, native: bool = False, connections: int = 1
    ) -> None:
        self.settings = settings
        self.address = settings.base_url
        self.timeout = settings.timeout if timeout is None else timeout
        # The token goes in a header of every request, never in a URL.
        self._headers = {"X-Consul-Token": settings.token} if settings.token else {}
        context = tls_context(settings, native) if settings.scheme == "https" else None
        self._pool = ConnectionPool(settings.host, settings.port, size=connections, ssl_context=context, native=native)
        self._dc = f"dc={quote(settings.datacenter)}" if settings.datacenter else ""
        self._txn_target = self._target("/v1/txn")

    def __repr__(self) -> str:
        return f"<ConsulClient {self.address}>"

    def close(self) -> None:
        self._pool.close()

    def connections_in_use(self) -> int:
        """How many of the client's connections are lent to a request now."""
        return self._pool.busy()

    def interrupt(self) -> None:
        """From another thread: end the request in progress (a blocking query) with
        :class:`ConsulUnavailable` at once, and every later one, until :meth:`resume`."""
        self._pool.interrupt()

    def resume(self) -> None:
        self._pool.resume()

    # -- sessions -------------------------------------------------------------------

    def session_create(
        self,
        name: str,
        *,
        ttl: float,
        lock_delay: float,
        checks: Sequence[str],
        behavior: str = "release",
    ) -> str:
        """Create a session; returns its ID. ``ttl`` 0: a session without TTL."""
        body: dict[str, Any] = {
            "Name": name,
            "Checks": list(checks),
            "LockDelay": f"{_seconds(lock_delay)}s",
            "Behavior": behavior,
        }
        if ttl:
            body["TTL"] = f"{_seconds(ttl)}s"
        target = self._target("/v1/session/create")
        return self._request(
            "PUT", target, json.dumps(body).encode(), "creating a session", "session:write", "the agent's node", read=_read_id
        )

    def session_renew(self, session: str, *, timeout: float | None = None) -> float:
        """Renew a session; returns the TTL the server now uses. Raises SessionGone."""
        target = self._target(f"/v1/session/renew/{quote(session)}")
        action = "renewing a session"
        answer = self._request(
            "PUT", target, b"", action, "session:write", "the agent's node", session=session, timeout=timeout, read=_read_renewed
        )
        return _parse_go_duration(answer.get("TTL", "")) or self.settings.ttl

    def session_destroy(self, session: str) -> bool:
        """Destroy a session (its locks are released); True if Consul answered 200."""
        target = self._target(f"/v1/session/destroy/{quote(session)}")
        return self._request(
            "PUT", target, b"", "destroying a session", "session:write", "the agent's node", ok=_OK_404, read=_read_found
        )

    def session_info(self, session: str) -> dict[str, Any] | None:
        """The session's description (ID, Name, Node, TTL, LockDelay, Checks, ...), or None."""
        target = self._target(f"/v1/session/info/{quote(session)}")
        return self._request(
            "GET", target, None, "reading a session", "session:read", "the agent's node", ok=_OK_404, read=_read_first
        )

    def session_list(self) -> list[dict[str, Any]]:
        """Every session in the datacenter (ID, Name, Node, TTL, LockDelay, Checks, ...)."""
        target = self._target("/v1/session/list")
        return self._request(
            "GET", target, None, "listing sessions", "session:read", "the datacenter's nodes", read=_read_sessions
        )

    # -- agent and cluster ------------------------------------------------------------

    def agent_self(self) -> dict[str, Any]:
        """The agent's own description: node name, datacenter, Consul version."""
        config = self._request(
            "GET",
            "/v1/agent/self",
            None,
            "reading the agent's configuration",
            "agent:read",
            "the agent's node",
            read=_read_config,
        )
        return {"node": config.get("NodeName"), "datacenter": config.get("Datacenter"), "version": config.get("Version")}

    def status_leader(self) -> str:
        """The address of the servers' raft leader; empty while they have none."""
        return self._request(
            "GET", "/v1/status/leader", None, "asking for the cluster leader", "none", "the cluster", read=_read_leader
        )

    # -- agent: a TTL health check to tie a session to -----------------------------------

    def agent_register_ttl_service(self, service_id: str, name: str, *, check_ttl: float) -> str:
        """Register a service on the agent with a TTL check; returns the check's ID.

        Consul deregisters it one minute after its check goes critical (its minimum), so a
        crashed process leaves nothing behind for long.
        """
        body = {
            "ID": service_id,
            "Name": name,
            "Check": {"TTL": _go_duration(check_ttl), "DeregisterCriticalServiceAfter": "1m"},
        }
        self._agent_write("/v1/agent/service/register", json.dumps(body).encode(), "registering a health check", name)
        return f"service:{service_id}"

    def agent_check_pass(self, check_id: str) -> None:
        self._agent_write(f"/v1/agent/check/pass/{quote(check_id)}", b"", "passing a health check", check_id)

    def agent_check_fail(self, check_id: str) -> None:
        self._agent_write(f"/v1/agent/check/fail/{quote(check_id)}", b"", "failing a health check", check_id)

    def agent_deregister_service(self, service_id: str) -> None:
        self._agent_write(f"/v1/agent/service/deregister/{quote(service_id)}", b"", "deregistering a health check", service_id)

    def _agent_write(self, path: str, body: bytes, action: str, resource: str) -> None:
        """A PUT to the agent's own endpoints (no datacenter): they answer 200 and no body."""
        self._request("PUT", path, body, action, "service:write", resource, read=_read_nothing)

    # -- KV ---------------------------------------------------------------------------

    def kv_get(
        self,
        key: str,
        *,
        index: int | None = None,
        wait: float | None = None,
        consistent: bool = False,
    ) -> tuple[int, KVEntry | None]:
        """Read a key; with ``index``, a blocking query that returns when the key's index
        passes it or ``wait`` ends. Returns (X-Consul-Index, entry or None)."""
        query, timeout = self._read_query([], index, wait, consistent)
        target = self._target(_kv_path(key), query)
        return self._request("GET", target, None, "reading a key", "key:read", key, timeout=timeout, ok=_OK_404, read=_read_entry)

    def kv_list(
        self, prefix: str, *, index: int | None = None, wait: float | None = None, consistent: bool = False
    ) -> tuple[int, list[KVEntry]]:
        """Every key under ``prefix``; with ``index``, a blocking query that returns when the
        prefix's index passes it or ``wait`` ends. Returns (X-Consul-Index, entries)."""
        query, timeout = self._read_query(["recurse=1"], index, wait, consistent)
        target = self._target(_kv_path(prefix), query)
        return self._request(
            "GET", target, None, "listing keys", "key:read", prefix, timeout=timeout, ok=_OK_404, read=_read_indexed_entries
        )

    def _read_query(self, query: list[str], index: int | None, wait: float | None, consistent: bool) -> tuple[str, float | None]:
        """A KV read's query string (``query`` plus blocking and consistency parameters) and
        the request timeout a blocking read needs (None: the client's)."""
        timeout = None
        if index:
            query.append(f"index={index}")
            if wait is not None:
                query.append(f"wait={_go_duration(wait)}")
            timeout = self.timeout + (wait or DEFAULT_BLOCKING_WAIT) * (1 + BLOCKING_JITTER)
        if consistent:
            query.append("consistent=1")
        return "&".join(query), timeout

    def kv_keys(self, prefix: str) -> list[KVEntry]:
        """Every key under ``prefix``."""
        target = self._target(_kv_path(prefix), "recurse=1")
        return self._request("GET", target, None, "listing keys", "key:read", prefix, ok=_OK_404, read=_read_entries)

    def kv_put(self, key: str, value: bytes, *, cas: int | None = None, flags: int | None = None) -> bool:
        """Write a key; with ``cas``, only if its ModifyIndex is ``cas`` (0: if absent)."""
        query = "&".join(f"{name}={v}" for name, v in (("cas", cas), ("flags", flags)) if v is not None)
        target = self._target(_kv_path(key), query)
        return self._request("PUT", target, value, "writing a key", "key:write", key, read=_read_bool)

    def kv_delete(self, key: str, *, cas: int | None = None) -> bool:
        """Delete a key; with ``cas``, only if its ModifyIndex is still ``cas``."""
        target = self._target(_kv_path(key), "" if cas is None else f"cas={cas}")
        return self._request("DELETE", target, None, "deleting a key", "key:write", key, read=_read_bool)

    def kv_lock(self, key: str, session: str, value: bytes, flags: int = LOCK_FLAG, *, exists: bool = True) -> LockAttempt:
        """Acquire ``key`` for ``session`` in one transaction that also returns, atomically,
        the key as it was just before (to check it is a lock) and its new ModifyIndex (the
        fencing token). ``exists`` says which form to try: ``get`` + ``lock`` for a key that
        exists, ``check-not-exists`` + ``lock`` to create it; a wrong guess answers with
        reason "missing" / "exists" and writes nothing."""
        # The hot path of every lock: the body is formatted, not built as dicts and encoded.
        quoted = json.dumps(key)
        body = _LOCK_TXN % (
            "get" if exists else "check-not-exists",
            quoted,
            quoted,
            base64.b64encode(value).decode(),
            flags,
            json.dumps(session),
        )
        read = _read_lock_existing if exists else _read_lock_new
        return self._request("PUT", self._txn_target, body.encode(), "acquiring a lock", "key:write", key, ok=_OK_409, read=read)

    def kv_take_over(self, key: str, holder: str, session: str, value: bytes) -> LockAttempt:
        """Move ``key`` from session ``holder`` to ``session`` in one transaction (``unlock``
        then ``lock``: no moment where neither holds it, and no lock-delay); not acquired
        (reason "held") unless ``holder`` holds it now. Returns the previous value and the
        new ModifyIndex as :meth:`kv_lock` does."""
        encoded = base64.b64encode(value).decode()
        ops = [
            {"KV": {"Verb": "get", "Key": key}},
            {"KV": kv_unlock(key, holder)},
            {"KV": {"Verb": "lock", "Key": key, "Value": encoded, "Flags": LOCK_FLAG, "Session": session}},
        ]
        ok, results, _ = self.txn(ops, action="taking over a reserved lock", resource=key)
        if not ok:
            return LockAttempt(False, reason="held")
        before = results[0]["KV"]
        conflict = KVEntry.from_api(before) if int(before.get("Flags") or 0) not in (0, LOCK_FLAG) else None
        return LockAttempt(True, int(results[-1]["KV"]["ModifyIndex"]), conflict=conflict, previous=before.get("Value"))

    def kv_restore(self, key: str, session: str, previous: KVEntry) -> bool:
        """Undo a lock taken on a key that turned out not to be a lock: free it and put its
        value and flags back, in one transaction, only while our session holds it."""
        writes = [kv_unlock(key, session), kv_set(key, previous.value or b"", flags=previous.flags)]
        return self.kv_fenced(key, session, writes, action="restoring a key that is not a lock").ok

    def kv_fenced(
        self, lock_key: str, session: str, writes: Sequence[dict[str, Any]], *, action: str, resource: str | None = None
    ) -> Fenced:
        """Apply ``writes`` (KV operations, see :func:`kv_set`, :func:`kv_unlock`) only while
        ``session`` holds ``lock_key``: each transaction starts with a ``check-session`` on
        it, so a holder that lost its lock (paused past its TTL, cut off) writes nothing.

        Consul takes at most 64 operations per transaction: more writes go in several, in
        order, each fenced; it stops at the first refused, after the earlier ones applied.
        ``action`` and ``resource`` (default ``lock_key``) name the call in errors. Raises
        ACLDenied, ConsulUnavailable; a refusal is an answer (``ok`` False), not an error.

        Guarantee: Consul checks the session when it applies the transaction, so no write
        lands after the lock moved to another holder. Limit: it fences state kept in
        Consul only; a side effect elsewhere needs the lock's fencing token.
        """
        check = {"KV": {"Verb": "check-session", "Key": lock_key, "Session": session}}
        written: list[dict[str, Any]] = []
        for start in range(0, len(writes), TXN_MAX_OPS - 1):
            ops = [check, *({"KV": w} for w in writes[start : start + TXN_MAX_OPS - 1])]
            ok, results, errors = self.txn(ops, action=action, resource=resource or lock_key)
            if not ok:
                lost = any(e.get("OpIndex") == 0 for e in errors)
                return Fenced(False, lost=lost, results=tuple(written), errors=tuple(errors))
            written.extend(r["KV"] for r in results[1:])
        return Fenced(True, results=tuple(written))

    def kv_release(self, key: str, session: str, value: bytes, flags: int = LOCK_FLAG) -> bool:
        """``PUT ?release=``: frees the key only if ``session`` holds it (Consul checks);
        no lock-delay follows. True if we held it."""
        # The hot path of every lock: the target is cached per (key, session).
        target = _release_target(key, session, flags, self.settings.datacenter)
        return self._request("PUT", target, value, "releasing a lock", "key:write", key, session=session, read=_read_release)

    def txn(
        self, ops: list[dict[str, Any]], *, action: str = "running a transaction", resource: str = "the keys involved"
    ) -> tuple[bool, list[dict[str, Any]], list[dict[str, Any]]]:
        """``PUT /v1/txn``: all operations or none. Returns (ok, results, errors); a
        ``check-session`` that fails gives ok=False, not an exception."""
        return self._request(
            "PUT", self._txn_target, json.dumps(ops).encode(), action, "key:write", resource, ok=_OK_409, read=_read_txn
        )

    # -- the one road -------------------------------------------------------------------

    def _target(self, path: str, query: str = "") -> str:
        """``path?query``, with this client's datacenter added to the query."""
        query = f"{query}&{self._dc}" if query and self._dc else query or self._dc
        return f"{path}?{query}" if query else path

    def _request(
        self,
        method: str,
        target: str,
        body: bytes | None,
        action: str,
        permission: str,
        resource: str,
        *,
        session: str | None = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = _OK,
        read: Callable[[int, Headers, bytes], _T],
    ) -> _T:
        """Send one request and check its answer; every call of this module comes here.

        Returns what ``read(status, headers, body)`` makes of the answer. ``action``,
        ``permission`` and ``resource`` name the call in its errors ("creating a session",
        "session:write", "the agent's node"); ``session``, if the call is about one, lets a
        refusal for an unknown session become SessionGone. A status outside ``ok``, an
        answer no Consul agent gives, a body ``read`` cannot read and every failure of the
        connection become our errors through :data:`FAILURES`.
        """
        try:
            pool, conn = self._pool, None
            try:  # taken inside the try: an asynchronous exception (an abort) loses no connection
                conn = pool.take()
                status, headers, content = conn.request(
                    method, target, body, self._headers, self.timeout if timeout is None else timeout
                )
            finally:
                if conn is not None:
                    pool.give(conn)
            why = _foreign_answer(status, headers, content)
            if why is not None:
                raise _Foreign(f"{why}: {self._excerpt(content)}" if content else why)
            if status not in ok:
                raise _Refused(status, content.decode("utf-8", "replace"))
            try:
                return read(status, headers, content)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                # An answer of a shape Consul never sends.
                what = str(exc) if isinstance(exc, _Unreadable) else f"{type(exc).__name__} reading it"
                raise _Foreign(f"HTTP {status} with {self._excerpt(content)} ({what})") from None
        except Exception as exc:
            error = _failure(exc, Call(self, action, permission, resource, session))
            if error is None:
                raise
            raise error from None

    def _excerpt(self, body: str | bytes) -> str:
        return _excerpt(body, self.settings.token)


# -- failures: one table --------------------------------------------------------------------


class Call(NamedTuple):
    """What a failed request was doing: what its error names."""

    client: ConsulClient
    action: str
    permission: str
    resource: str
    session: str | None

    @property
    def address(self) -> str:
        return self.client.address

    def excerpt(self, body: str | bytes) -> str:
        return self.client._excerpt(body)


class _Refused(Exception):
    """Consul answered with a status the call does not expect (``status``, ``text``)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(status, text)
        self.status, self.text = status, text

    @property
    def acl_unknown(self) -> bool:
        """Consul does not know the token at all (not: the token lacks a permission)."""
        return _ACL_NOT_FOUND in self.text


class _Foreign(Exception):
    """An answer that cannot be a Consul agent's (``args[0]`` says how)."""


def _election(r: _Refused, c: Call) -> bool:
    """A server's answer during a raft election: brief, worth retrying."""
    return r.status >= 500 and any(m in r.text for m in _NO_LEADER)


def _unknown_session(r: _Refused, c: Call) -> bool:
    return c.session is not None and (r.status == 404 or "invalid session" in r.text.lower())


def _acl_denied(r: _Refused, c: Call) -> ACLDenied:
    return ACLDenied(c.address, c.action, c.permission, c.resource, token_unknown=r.acl_unknown)


def _refused(r: _Refused, c: Call) -> ConsulLockError:
    return ConsulLockError(f"Consul at {c.address} answered {r.status} while {c.action}: {c.excerpt(r.text)}")


def _unreachable(detail: str) -> Callable[[Exception, Call], ConsulLockError]:
    return lambda e, c: ConsulUnavailable(c.address, c.action, detail)


#: How each failure of a request becomes our error, most specific first: (what was raised,
#: a condition on it or None, the error). :meth:`ConsulClient._request` raises the first
#: match's error; a failure no row matches (a bug) propagates as it is.
FAILURES: tuple[tuple[type[Exception], Callable[[Any, Call], bool] | None, Callable[[Any, Call], ConsulLockError]], ...] = (
    # -- an answer no Consul agent gives: waiting does not fix an address
    (_Foreign, None, lambda e, c: NotConsul(c.address, c.action, str(e))),
    (NotHTTP, None, lambda e, c: NotConsul(c.address, c.action, f"something that is not HTTP ({c.excerpt(e.args[0])})")),
    # -- the connection (ssl.SSLError and TimeoutError are OSErrors: before OSError)
    (ssl.SSLError, None, lambda e, c: ConsulUnavailable(c.address, c.action, tls_failure(e, c.client.settings), transient=False)),
    (TimeoutError, None, _unreachable("no answer within the timeout")),
    (Interrupted, None, _unreachable("the request was interrupted (by this process)")),
    (ConnectionRefusedError, None, _unreachable("connection refused")),
    (OSError, None, lambda e, c: ConsulUnavailable(c.address, c.action, f"{type(e).__name__}: {e}")),
    # -- Consul's refusals
    (_Refused, lambda r, c: r.status == 403, _acl_denied),
    (_Refused, _unknown_session, lambda r, c: SessionGone(c.session or "", c.address)),
    (_Refused, _election, lambda r, c: _no_leader(c.address, c.action, r.text)),
    (_Refused, None, _refused),
)


def _failure(exc: Exception, call: Call) -> ConsulLockError | None:
    """The error :data:`FAILURES` makes of ``exc``, or None if no row matches."""
    for kind, when, error in FAILURES:
        if isinstance(exc, kind) and (when is None or when(exc, call)):
            return error(exc, call)
    return None


def _no_leader(address: str, action: str, answer: str) -> ConsulUnavailable:
    return ConsulUnavailable(address, action, f"Consul has no usable leader right now ({answer.strip()[:120]})")


# -- reading answers ------------------------------------------------------------------------

#: Statuses some calls read as an answer: 404 (no such key or session), 409 (a rolled-back
#: transaction).
_OK_404 = (200, 404)
_OK_409 = (200, 409)


def _expect(value: Any, kinds: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it has the JSON shape Consul gives ``what``; else the answer was not Consul's."""
    if not isinstance(value, kinds):
        raise _Foreign(f"{what} of an unexpected shape ({type(value).__name__})")
    return value


def _entry(data: Any) -> KVEntry:
    """A KV entry from an answer, which must be one."""
    if not isinstance(data, dict) or not isinstance(data.get("Key"), str):
        raise _Foreign(f"a key entry of an unexpected shape ({type(data).__name__})")
    return KVEntry.from_api(data)


def _read_id(status: int, headers: Headers, content: bytes) -> str:
    return _expect(_expect(json.loads(content), dict, "a session")["ID"], str, "a session ID")  # type: ignore[no-any-return]


def _read_first(status: int, headers: Headers, content: bytes) -> dict[str, Any] | None:
    """The one session of a session answer (a list of one), or None (404, null, [])."""
    data = json.loads(content) if status == 200 else None
    return _expect(_expect(data, list, "a session list")[0], dict, "a session") if data else None


def _read_sessions(status: int, headers: Headers, content: bytes) -> list[dict[str, Any]]:
    return [_expect(s, dict, "a session") for s in _expect(json.loads(content) or [], list, "a session list")]


def _read_config(status: int, headers: Headers, content: bytes) -> dict[str, Any]:
    return _expect(_expect(json.loads(content), dict, "an agent description").get("Config"), dict, "an agent configuration")  # type: ignore[no-any-return]


def _read_leader(status: int, headers: Headers, content: bytes) -> str:
    return _expect(json.loads(content) or "", str, "a raft leader address")  # type: ignore[no-any-return]


def _read_nothing(status: int, headers: Headers, content: bytes) -> None:
    return None


def _read_found(status: int, headers: Headers, content: bytes) -> bool:
    """True for 200, False for 404 (nothing there)."""
    return status == 200


def _read_bool(status: int, headers: Headers, content: bytes) -> bool:
    return _expect(json.loads(content), bool, "a true or false")  # type: ignore[no-any-return]


def _read_entry(status: int, headers: Headers, content: bytes) -> tuple[int, KVEntry | None]:
    """(X-Consul-Index, the key's entry or None)."""
    index = int(headers.get("x-consul-index") or 0)  # type: ignore[call-overload]
    if status == 404:
        return index, None
    data = _expect(json.loads(content), list, "a key list")
    return index, (_entry(data[0]) if data else None)


def _read_indexed_entries(status: int, headers: Headers, content: bytes) -> tuple[int, list[KVEntry]]:
    """(X-Consul-Index, the entries under a prefix)."""
    return int(headers.get("x-consul-index") or 0), _read_entries(status, headers, content)  # type: ignore[call-overload]


def _read_entries(status: int, headers: Headers, content: bytes) -> list[KVEntry]:
    return [] if status == 404 else [_entry(d) for d in _expect(json.loads(content) or [], list, "a key list")]


class _Unreadable(ValueError):
    """An answer a reader cannot take; ``args[0]`` says why ("not a transaction's answer")."""


def _read_renewed(status: int, headers: Headers, content: bytes) -> dict[str, Any]:
    """The renewed session; an empty answer means Consul no longer knows it."""
    session = _read_first(status, headers, content)
    if session is None:
        raise _Refused(404, "no such session")
    return session


def _read_release(status: int, headers: Headers, content: bytes) -> bool:
    answer = content.strip()
    if answer not in (b"true", b"false"):
        raise _Unreadable("instead of true or false")
    return answer == b"true"


def _read_txn(status: int, headers: Headers, content: bytes) -> tuple[bool, list[dict[str, Any]], list[dict[str, Any]]]:
    """(ok, results, errors) of a transaction: 200 ran, 409 rolled back. Consul reports an
    ACL refusal inside a transaction as a 409 with errors: it becomes a 403's error."""
    try:
        data = json.loads(content)
        errors, results = data.get("Errors") or [], data.get("Results") or []
        # Consul lists the results of a transaction that ran and the errors of one that did not.
        if not isinstance(data.get("Results" if status == 200 else "Errors"), list):
            raise ValueError("no results")
        if not all(isinstance(e, dict) for e in errors) or not all(isinstance(r.get("KV"), dict) for r in results):
            raise ValueError("not a KV transaction's answer")
    except (ValueError, TypeError, AttributeError):
        raise _Unreadable("which is not a transaction's answer") from None
    denied = [str(e.get("What", "")) for e in errors if "Permission denied" in str(e.get("What", ""))]
    if denied:
        raise _Refused(403, denied[0])
    return status == 200, results, errors


#: Why Consul refused a lock transaction (words of its error), and the reason we give.
_LOCK_REFUSALS = (
    ("doesn't exist", "missing"),
    ("exists", "exists"),
    ("lock delay", "lock-delay"),
    ("invalid session", "session"),
    ("already held", "held"),
)


def _read_lock(status: int, headers: Headers, content: bytes, exists: bool) -> LockAttempt:
    """kv_lock's answer: taken (the usual answer, read quickly), or why not."""
    if status == 200:
        taken = _quick_lock_answer(content, exists)
        if taken is not None:
            return taken
    ok, results, errors = _read_txn(status, headers, content)
    if ok and len(results) != (2 if exists else 1):
        raise _Unreadable(f"{len(results)} results to a transaction of 2 operations")
    if ok:
        before = results[0]["KV"] if exists else {}
        conflict = KVEntry.from_api(before) if int(before.get("Flags") or 0) not in (0, LOCK_FLAG) else None
        return LockAttempt(True, int(results[-1]["KV"]["ModifyIndex"]), conflict=conflict, previous=before.get("Value"))
    what = " ".join(str(e.get("What", "")) for e in errors)
    for marker, reason in _LOCK_REFUSALS:
        if marker in what:
            return LockAttempt(False, reason=reason)
    raise _Refused(status, what)


def _read_lock_existing(status: int, headers: Headers, content: bytes) -> LockAttempt:
    return _read_lock(status, headers, content, True)


def _read_lock_new(status: int, headers: Headers, content: bytes) -> LockAttempt:
    return _read_lock(status, headers, content, False)


def _kv_path(key: str) -> str:
    return "/v1/kv/" + quote(key, safe="/")


#: How a Consul answer's JSON body can begin (an object, a list, a string, true, false,
#: null, a number).
_JSON_START = frozenset(bytes([b]) for b in b'{["tfn-0123456789')
#: How Consul's usual answers begin, unindented: an object, a list, true or false.
_JSON_FIRST = frozenset((b"{", b"[", b"t", b"f"))


def _foreign_answer(status: int, headers: Headers, content: bytes) -> str | None:
    """How an answer shows that no Consul agent sent it, or None if one may have. Consul
    (checked on 1.8.7) answers every call this adapter makes with: a JSON body typed
    ``application/json``; a short ``text/plain`` error; no body at all (agent endpoints);
    or, for a key that does not exist, an empty 404 carrying ``X-Consul-Index``."""
    media = headers.get("content-type")
    if media == "application/json" and status == 200 and content[:1] in _JSON_FIRST:
        return None  # nearly every answer: decided without the checks below
    media = str(media or "").partition(";")[0].strip().lower()
    if content:
        if media not in ("application/json", "text/plain"):
            return f"HTTP {status} typed {media or 'nothing'}"
        if status == 200 and (media != "application/json" or content[:16].lstrip()[:1] not in _JSON_START):
            return "HTTP 200 with a body that is not JSON"
        if status == 404 and content.startswith(b"404 page not found"):  # a Go server's default page
            return "HTTP 404 for an endpoint Consul has"
    elif status == 404 and "x-consul-index" not in headers:
        return "HTTP 404 with no body and no X-Consul-Index header (Consul's answer for a missing key has one)"
    return None


def _excerpt(body: str | bytes, token: str | None) -> str:
    """The start of an answer's body, on one line, quoted; never the token (an echoing
    server could send our request headers back)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    if token:
        text = text.replace(token, "<token>")
    return repr(text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else ""))


#: The two fields a taken lock needs from the transaction's answer. Keys and sessions are
#: JSON strings there (a quote inside is escaped) and values base64, so only the entries'
#: own fields match. (Dev agents indent their answers, servers do not.)
_FLAGS = re.compile(rb'"Flags":\s*(\d+)')
_MODIFY_INDEX = re.compile(rb'"ModifyIndex":\s*(\d+)')
_VALUE = re.compile(rb'"Value":\s*"([A-Za-z0-9+/=]*)"')


def _quick_lock_answer(answer: bytes, exists: bool) -> LockAttempt | None:
    """The usual answer to kv_lock's transaction, read without decoding it all (decoding
    costs more than the rest of an acquire's bookkeeping): taken, with the fencing token,
    the key a lock before. None, to decode it fully, when the key was something else (flags
    of another kind: the caller needs the whole entry to put it back) or the answer does
    not have the expected shape (one entry from ``get`` if it ran, one from ``lock``)."""
    expected = 2 if exists else 1
    if answer.count(b'"Flags":') != expected or answer.count(b'"ModifyIndex":') != expected:
        return None
    flags = _FLAGS.search(answer)
    if flags is None or (exists and int(flags.group(1)) not in (0, LOCK_FLAG)):
        return None
    index = _MODIFY_INDEX.search(answer, answer.rindex(b'"ModifyIndex":'))
    if index is None:
        return None
    # The lock's own result has "Value": null, so the one string value is the previous one.
    previous = _VALUE.search(answer) if exists else None
    return LockAttempt(True, int(index.group(1)), previous=previous.group(1).decode() if previous else None)


class _Clients:
    """The process's shared clients, one per (settings, kind); forgotten in a forked child
    (it must not reuse its parent's keep-alive sockets)."""

    def __init__(self) -> None:
        self._reset()
        native.at_fork(self._reset)

    def _reset(self) -> None:
        self._mutex = native.lock()  # also taken by real threads under gevent; held briefly
        self._clients: dict[tuple[ConsulSettings, str], ConsulClient] = {}

    def get(self, settings: ConsulSettings, kind: str) -> ConsulClient:
        client = self._clients.get((settings, kind))
        if client is None:
            with self._mutex:
                client = self._clients.get((settings, kind))
                if client is None:
                    real = kind != "shared"
                    size = RENEWAL_CONNECTIONS if kind == "renewal" else settings.max_connections
                    client = self._clients[(settings, kind)] = ConsulClient(settings, native=real, connections=size)
        return client


_CLIENTS = _Clients()


def shared_client(settings: ConsulSettings) -> ConsulClient:
    """The process's client for ``settings``: at most ``settings.max_connections``
    connections to the agent, lent to one request at a time, shared by every thread (or
    greenlet) of the process. Under gevent, real OS threads share another one, of real
    sockets (see :mod:`.native`)."""
    return _CLIENTS.get(settings, "shared-real" if native.real_thread() else "shared")


def renewal_client(settings: ConsulSettings) -> ConsulClient:
    """The client the session renewers of the process share (real threads, real sockets,
    RENEWAL_CONNECTIONS connections): a renewal never waits behind a task's request."""
    return _CLIENTS.get(settings, "renewal")


@functools.lru_cache(maxsize=1024)
def _release_target(key: str, session: str, flags: int, datacenter: str | None) -> str:
    """The ``?release=`` URL of a key for a session (the same for every release of one lock
    in one process, so it is quoted once)."""
    target = f"/v1/kv/{quote(key, safe='/')}?release={quote(session)}&flags={flags}"
    return target + (f"&dc={quote(datacenter)}" if datacenter else "")


def _seconds(value: float) -> int | float:
    """Seconds as the client libraries format them ("%ss"): whole numbers without ".0"."""
    return int(value) if float(value).is_integer() else value


def _go_duration(seconds: float) -> str:
    # Never "0ms": Consul takes a zero wait as its default, five minutes.
    return f"{max(1, int(seconds * 1000))}ms"


def _parse_go_duration(text: str) -> float | None:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", text or "")
    return sum(float(n) * units[u] for n, u in parts) if parts else None
