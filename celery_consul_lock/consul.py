"""The one door to Consul: every HTTP call this package makes goes through :class:`ConsulClient`.

This is the only module that imports the Consul client library (``consul``, installed by
python-consul2 or by its maintained fork py-consul; both are supported). It pins down
what the two libraries do differently: it never lets them read ``CONSUL_HTTP_*`` (the
settings module already did, with our precedence), sends the token as a header on the
connection (so it is in no URL, log line or exception text), sets a timeout on every
request, and turns every failure into a :class:`~celery_consul_lock.errors.ConsulLockError`
that names the agent's address or the ACL permission involved.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import ssl
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import consul as consul_lib

from . import native as _native
from .errors import ACLDenied, ConsulLockError, ConsulUnavailable, InvalidSetting, NotConsul, SessionGone
from .settings import ConsulSettings
from .transport import Connection, Headers, NotHTTP

__all__ = ["LOCK_FLAG", "ConsulClient", "KVEntry", "LockAttempt", "thread_client"]

log = logging.getLogger(__name__)

#: The flags value ``consul lock`` and the Go client write on a lock key
#: (``api.LockFlagValue``); a key with other non-zero flags is not a lock.
LOCK_FLAG = 0x2DDCCBC058A50C18

#: kv_lock's transaction: ``get`` (or ``check-not-exists``) then ``lock``, on one key.
_LOCK_TXN = '[{"KV":{"Verb":"%s","Key":%s}},{"KV":{"Verb":"lock","Key":%s,"Value":"%s","Flags":%d,"Session":%s}}]'

#: How a server says it is between leaders (an election): brief, worth retrying.
#: Consul's answer to a token it does not know (not one that lacks a permission).
_ACL_NOT_FOUND = "ACL not found"
_NO_LEADER = ("No cluster leader", "rpc error", "leadership lost", "connection refused", "EOF")

#: How much of a foreign answer's body an error quotes: enough to recognise it, never a page.
EXCERPT_CHARS = 80

#: How much longer than ``wait`` a blocking query may take: Consul adds up to wait/16
#: of jitter before answering.
BLOCKING_JITTER = 1 / 16


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


class ConsulClient:
    """A connection to one agent, with our error handling around every call.

    Not shared between threads: each thread that talks to Consul (callers, the renewer,
    each watcher) uses its own, so a blocking query never holds up a renewal. ``native``:
    for a real OS thread under gevent (see :mod:`.native`), over a real socket.
    """

    def __init__(self, settings: ConsulSettings, *, timeout: float | None = None, native: bool = False) -> None:
        self.settings = settings
        self.address = settings.base_url
        self.timeout = settings.timeout if timeout is None else timeout
        self._client = _make_client(settings, self.timeout, native)

    def __repr__(self) -> str:
        return f"<ConsulClient {self.address}>"

    def close(self) -> None:
        self._client.http.close()

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
        """Create a session; returns its ID."""
        with self._errors("creating a session", "session:write", "the agent's node"):
            return str(
                self._client.session.create(
                    name=name,
                    checks=list(checks),
                    lock_delay=_seconds(lock_delay),
                    behavior=behavior,
                    ttl=_seconds(ttl),
                    dc=self.settings.datacenter,
                )
            )

    def session_renew(self, session: str, *, timeout: float | None = None) -> float:
        """Renew a session; returns the TTL the server now uses. Raises SessionGone."""
        with self._errors("renewing a session", "session:write", "the agent's node", timeout=timeout, session=session):
            answer = _expect(self._client.session.renew(session, dc=self.settings.datacenter), (dict, type(None)), "a session")
        if answer is None:
            raise SessionGone(session, self.address)
        return _parse_go_duration(answer.get("TTL", "")) or self.settings.ttl

    def session_destroy(self, session: str) -> bool:
        with self._errors("destroying a session", "session:write", "the agent's node"):
            return bool(self._client.session.destroy(session, dc=self.settings.datacenter))

    def session_info(self, session: str) -> dict[str, Any] | None:
        with self._errors("reading a session", "session:read", "the agent's node"):
            _, info = self._client.session.info(session, dc=self.settings.datacenter)
            return _expect(info, (dict, type(None)), "a session")

    def session_list(self) -> list[dict[str, Any]]:
        """Every session in the datacenter (ID, Name, Node, TTL, LockDelay, Checks, ...)."""
        with self._errors("listing sessions", "session:read", "the datacenter's nodes"):
            _, sessions = self._client.session.list(dc=self.settings.datacenter)
            return [_expect(s, dict, "a session") for s in _expect(sessions or [], list, "a session list")]

    # -- agent and cluster ------------------------------------------------------------

    def agent_self(self) -> dict[str, Any]:
        """The agent's own description: node name, datacenter, Consul version."""
        with self._errors("reading the agent's configuration", "agent:read", "the agent's node"):
            info = _expect(self._client.agent.self(), dict, "an agent description")
            config = _expect(info.get("Config"), dict, "an agent configuration")
        return {"node": config.get("NodeName"), "datacenter": config.get("Datacenter"), "version": config.get("Version")}

    def status_leader(self) -> str:
        """The address of the servers' raft leader; empty while they have none."""
        with self._errors("asking for the cluster leader", "none", "the cluster"):
            return _expect(self._client.status.leader() or "", str, "a raft leader address")

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
        with self._errors("registering a health check", "service:write", name):
            status, text = self._client.http.raw("PUT", "/v1/agent/service/register", json.dumps(body).encode())
        self._check_status(status, text, "registering a health check", "service:write", name, None)
        return f"service:{service_id}"

    def agent_check_pass(self, check_id: str) -> None:
        with self._errors("passing a health check", "service:write", check_id):
            status, text = self._client.http.raw("PUT", f"/v1/agent/check/pass/{quote(check_id)}", b"")
        self._check_status(status, text, "passing a health check", "service:write", check_id, None)

    def agent_check_fail(self, check_id: str) -> None:
        with self._errors("failing a health check", "service:write", check_id):
            status, text = self._client.http.raw("PUT", f"/v1/agent/check/fail/{quote(check_id)}", b"")
        self._check_status(status, text, "failing a health check", "service:write", check_id, None)

    def agent_deregister_service(self, service_id: str) -> None:
        with self._errors("deregistering a health check", "service:write", service_id):
            status, text = self._client.http.raw("PUT", f"/v1/agent/service/deregister/{quote(service_id)}", b"")
        self._check_status(status, text, "deregistering a health check", "service:write", service_id, None)

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
        timeout = None
        if index:
            timeout = self.timeout + (wait or 300) * (1 + BLOCKING_JITTER)
        with self._errors("reading a key", "key:read", key, timeout=timeout):
            idx, data = self._client.kv.get(
                key,
                index=index or None,
                wait=_go_duration(wait) if index and wait is not None else None,
                consistency="consistent" if consistent else None,
                dc=self.settings.datacenter,
            )
            return int(idx or 0), (_entry(data) if data else None)

    def kv_keys(self, prefix: str) -> list[KVEntry]:
        """Every key under ``prefix``."""
        with self._errors("listing keys", "key:read", prefix):
            _, data = self._client.kv.get(prefix, recurse=True, dc=self.settings.datacenter)
            return [_entry(d) for d in _expect(data or [], list, "a key list")]

    def kv_list(
        self, prefix: str, *, index: int | None = None, wait: float | None = None, consistent: bool = False
    ) -> tuple[int, list[KVEntry]]:
        """Every key under ``prefix`` and the X-Consul-Index; with ``index``, a blocking query
        that returns when something under the prefix changes past it or ``wait`` ends."""
        timeout = self.timeout + (wait or 300) * (1 + BLOCKING_JITTER) if index else None
        with self._errors("listing keys", "key:read", prefix, timeout=timeout):
            idx, data = self._client.kv.get(
                prefix,
                recurse=True,
                index=index or None,
                wait=_go_duration(wait) if index and wait is not None else None,
                consistency="consistent" if consistent else None,
                dc=self.settings.datacenter,
            )
            return int(idx or 0), [_entry(d) for d in _expect(data or [], list, "a key list")]

    def kv_put(self, key: str, value: bytes, *, cas: int | None = None, flags: int | None = None) -> bool:
        """Write a key; with ``cas``, only if its ModifyIndex is ``cas`` (0: if absent)."""
        with self._errors("writing a key", "key:write", key):
            return bool(self._client.kv.put(key, value, cas=cas, flags=flags, dc=self.settings.datacenter))

    def kv_delete(self, key: str, *, cas: int | None = None) -> bool:
        """Delete a key; with ``cas``, only if its ModifyIndex is still ``cas``."""
        with self._errors("deleting a key", "key:write", key):
            return bool(self._client.kv.delete(key, cas=cas, dc=self.settings.datacenter))

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
        code, answer = self._txn_send(body.encode(), "acquiring a lock", key)
        if code == 200:
            taken = _quick_lock_answer(answer, exists)
            if taken is not None:
                return taken
        ok, results, errors = self._txn_parse(code, answer, "acquiring a lock", key)
        if ok and len(results) != (2 if exists else 1):
            raise NotConsul(self.address, "acquiring a lock", f"{len(results)} results to a transaction of 2 operations")
        if ok:
            before = results[0]["KV"] if exists else {}
            conflict = KVEntry.from_api(before) if int(before.get("Flags") or 0) not in (0, LOCK_FLAG) else None
            return LockAttempt(True, int(results[-1]["KV"]["ModifyIndex"]), conflict=conflict, previous=before.get("Value"))
        what = " ".join(str(e.get("What", "")) for e in errors)
        for marker, reason in (
            ("doesn't exist", "missing"),
            ("exists", "exists"),
            ("lock delay", "lock-delay"),
            ("invalid session", "session"),
            ("already held", "held"),
        ):
            if marker in what:
                return LockAttempt(False, reason=reason)
        raise ConsulLockError(f"Consul at {self.address} refused to lock {key!r}: {what}")

    def kv_restore(self, key: str, session: str, previous: KVEntry) -> bool:
        """Undo a lock taken on a key that turned out not to be a lock: free it and put its
        value and flags back, in one transaction, only while our session holds it."""
        value = base64.b64encode(previous.value or b"").decode()
        ops = [
            {"KV": {"Verb": "check-session", "Key": key, "Session": session}},
            {"KV": {"Verb": "unlock", "Key": key, "Session": session}},
            {"KV": {"Verb": "set", "Key": key, "Value": value, "Flags": previous.flags}},
        ]
        ok, _, _ = self.txn(ops, action="restoring a key that is not a lock", resource=key)
        return ok

    def kv_release(self, key: str, session: str, value: bytes, flags: int = LOCK_FLAG) -> bool:
        """``PUT ?release=``: frees the key only if ``session`` holds it (Consul checks);
        no lock-delay follows. True if we held it."""
        # The hot path of every lock: sent straight over the connection, without the
        # library's URL and answer machinery (a tenth of a millisecond per call here).
        target = _release_target(key, session, flags, self.settings.datacenter)
        action = "releasing a lock"
        with self._errors(action, "key:write", key, session=session):
            status, body = self._client.http.raw("PUT", target, value)
        self._check_status(status, body, action, "key:write", key, session)
        answer = body.strip()
        if answer not in ("true", "false"):
            raise NotConsul(self.address, action, f"HTTP 200 with {self._excerpt(body)} instead of true or false")
        return answer == "true"

    def _check_status(self, status: int, body: str, action: str, permission: str, resource: str, session: str | None) -> None:
        if status == 200:
            return
        if status == 403:
            raise ACLDenied(self.address, action, permission, resource, token_unknown=_ACL_NOT_FOUND in body)
        if session is not None and "invalid session" in body.lower():
            raise SessionGone(session, self.address)
        if status >= 500 and any(m in body for m in _NO_LEADER):
            raise _no_leader(self.address, action, body)
        raise ConsulLockError(f"Consul at {self.address} answered {status} while {action}: {self._excerpt(body)}")

    def _excerpt(self, body: str | bytes) -> str:
        return _excerpt(body, self.settings.token)

    def txn(
        self, ops: list[dict[str, Any]], *, action: str = "running a transaction", resource: str = "the keys involved"
    ) -> tuple[bool, list[dict[str, Any]], list[dict[str, Any]]]:
        """``PUT /v1/txn``: all operations or none. Returns (ok, results, errors); a
        ``check-session`` that fails gives ok=False, not an exception."""
        code, body = self._txn_send(json.dumps(ops).encode(), action, resource)
        return self._txn_parse(code, body, action, resource)

    def _txn_send(self, payload: bytes, action: str, resource: str) -> tuple[int, str]:
        """Send a transaction; its answer (200 or 409: rolled back) or an exception."""
        target = "/v1/txn" + (f"?dc={quote(self.settings.datacenter)}" if self.settings.datacenter else "")
        with self._errors(action, "key:write", resource):
            code, body = self._client.http.raw("PUT", target, payload)
        if code != 409:
            self._check_status(code, body, action, "key:write", resource, None)
        return code, body

    def _txn_parse(
        self, code: int, body: str, action: str, resource: str
    ) -> tuple[bool, list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            data = json.loads(body)
            errors, results = data.get("Errors") or [], data.get("Results") or []
            # Consul lists the results of a transaction that ran and the errors of one that did not.
            if not isinstance(data.get("Results" if code == 200 else "Errors"), list):
                raise ValueError("no results")
            if not all(isinstance(e, dict) for e in errors) or not all(isinstance(r.get("KV"), dict) for r in results):
                raise ValueError("not a KV transaction's answer")
        except (ValueError, TypeError, AttributeError):
            raise NotConsul(
                self.address, action, f"HTTP {code} with {self._excerpt(body)}, which is not a transaction's answer"
            ) from None
        if any("Permission denied" in str(e.get("What", "")) for e in errors):
            # A transaction reports ACL refusals as 409 with errors, not as 403.
            raise ACLDenied(self.address, action, "key:write", resource)
        return code == 200, results, errors

    # -- errors -----------------------------------------------------------------------

    def _errors(
        self, action: str, permission: str, resource: str, *, timeout: float | None = None, session: str | None = None
    ) -> _Errors:
        """A context that turns transport and library failures into our exceptions (and
        sets the request timeout for its duration)."""
        return _Errors(self, action, permission, resource, timeout, session)


class _Errors:
    """See :meth:`ConsulClient._errors`. A class rather than a generator context manager:
    it wraps every request, and this costs a few microseconds less each time."""

    __slots__ = ("action", "client", "permission", "resource", "saved", "session", "timeout")

    def __init__(
        self, client: ConsulClient, action: str, permission: str, resource: str, timeout: float | None, session: str | None
    ) -> None:
        self.client, self.action, self.permission, self.resource = client, action, permission, resource
        self.timeout, self.session = timeout, session

    def __enter__(self) -> None:
        transport = self.client._client.http
        self.saved = transport.timeout
        if self.timeout is not None:
            transport.timeout = self.timeout

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.client._client.http.timeout = self.saved
        if exc is None:
            return
        address, action, session = self.client.address, self.action, self.session
        if isinstance(exc, _Foreign):
            raise NotConsul(address, action, str(exc)) from None
        if isinstance(exc, NotHTTP):
            raise NotConsul(address, action, f"something that is not HTTP ({self.client._excerpt(exc.args[0])})") from None
        if isinstance(exc, ssl.SSLError):
            raise ConsulUnavailable(address, action, _tls_failure(exc, self.client.settings), transient=False) from None
        if isinstance(exc, TimeoutError):
            raise ConsulUnavailable(address, action, "no answer within the timeout") from None
        if isinstance(exc, ConnectionRefusedError):
            raise ConsulUnavailable(address, action, "connection refused") from None
        if isinstance(exc, OSError):
            raise ConsulUnavailable(address, action, f"{type(exc).__name__}: {exc}") from None
        if isinstance(exc, consul_lib.ACLPermissionDenied):
            unknown = _ACL_NOT_FOUND in str(exc)
            raise ACLDenied(address, action, self.permission, self.resource, token_unknown=unknown) from None
        if isinstance(exc, consul_lib.ConsulException):
            text = str(exc)
            if text.startswith("5") and any(m in text for m in _NO_LEADER):
                raise _no_leader(address, action, text) from None
            if session is not None and (isinstance(exc, consul_lib.NotFound) or "invalid session" in text.lower()):
                raise SessionGone(session, address) from None
            raise ConsulLockError(f"Consul at {address} failed while {action}: {self.client._excerpt(text)}") from None


class _KeepAliveHTTP(consul_lib.base.HTTPClient):  # type: ignore[misc]
    """The client library's transport interface over our lean keep-alive connection
    (:mod:`.transport`): the library still builds every URL and parses every answer.

    Replaces the libraries' ``requests`` transport, which costs about 1 ms a request
    here (more than Consul's own work for a KV write) and reads ``HTTP(S)_PROXY`` and
    ``REQUESTS_CA_BUNDLE`` from the environment behind our settings' back.
    """

    def __init__(self, settings: ConsulSettings, timeout: float, native: bool = False) -> None:
        super().__init__(host=settings.host, port=settings.port, scheme=settings.scheme, verify=settings.verify, cert=None)
        self.timeout: float = timeout
        self._headers = {"X-Consul-Token": settings.token} if settings.token else {}
        self._token = settings.token
        context = _tls_context(settings, native) if settings.scheme == "https" else None
        self._conn = Connection(settings.host, settings.port, ssl_context=context, native=native)

    def raw(self, method: str, target: str, body: bytes) -> tuple[int, str]:
        """One request with a ready target (path and query); returns (status, body text)."""
        status, headers, content = self._conn.request(method, target, body, self._headers, self.timeout)
        self._check_consul(status, headers, content)
        return status, content.decode("utf-8", "replace")

    def _request(self, method: str, callback: Any, path: str, params: Any, data: Any, headers: Any) -> Any:
        target = self.uri(path, params)[len(self.base_uri) :]
        body = data.encode() if isinstance(data, str) else data
        all_headers = {**self._headers, **headers} if headers else self._headers
        status, resp_headers, content = self._conn.request(method, target, body, all_headers, self.timeout)
        self._check_consul(status, resp_headers, content)
        values = (status, resp_headers, content.decode("utf-8", "replace"), content)
        try:
            return callback(_RESPONSE._make(values[: len(_RESPONSE._fields)]))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            # The library's parsing of the answer failed: JSON of a shape Consul never sends.
            what = f"{type(exc).__name__} reading it"
            raise _Foreign(f"HTTP {status} with {_excerpt(content, self._token)} ({what})") from None

    def _check_consul(self, status: int, headers: Headers, content: bytes) -> None:
        why = _foreign_answer(status, headers, content)
        if why is not None:
            raise _Foreign(f"{why}: {_excerpt(content, self._token)}" if content else why)

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None, **_: Any) -> Any:
        return self._request("GET", callback, path, params, None, headers)

    def put(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None, **_: Any) -> Any:
        return self._request("PUT", callback, path, params, data, headers)

    def delete(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None, **_: Any) -> Any:
        return self._request("DELETE", callback, path, params, data, headers)

    def post(self, callback: Any, path: str, params: Any = None, data: Any = "", headers: Any = None, **_: Any) -> Any:
        return self._request("POST", callback, path, params, data, headers)

    def close(self) -> None:
        self._conn.close()


_RESPONSE = consul_lib.base.Response


class _Foreign(Exception):
    """An answer that cannot be a Consul agent's (``args[0]`` says how); _Errors turns it
    into NotConsul with the address and the action."""


#: How a Consul answer's JSON body can begin (an object, a list, a string, true, false,
#: null, a number).
_JSON_START = frozenset(bytes([b]) for b in b'{["tfn-0123456789')


def _foreign_answer(status: int, headers: Headers, content: bytes) -> str | None:
    """How an answer shows that no Consul agent sent it, or None if one may have. Consul
    (checked on 1.8.7) answers every call this adapter makes with: a JSON body typed
    ``application/json``; a short ``text/plain`` error; no body at all (agent endpoints);
    or, for a key that does not exist, an empty 404 carrying ``X-Consul-Index``."""
    media = str(headers.get("content-type") or "").partition(";")[0].strip().lower()
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


#: The two fields a taken lock needs from the transaction's answer. Keys and sessions are
#: JSON strings there (a quote inside is escaped) and values base64, so only the entries'
#: own fields match. (Dev agents indent their answers, servers do not.)
_FLAGS = re.compile(r'"Flags":\s*(\d+)')
_MODIFY_INDEX = re.compile(r'"ModifyIndex":\s*(\d+)')
_VALUE = re.compile(r'"Value":\s*"([A-Za-z0-9+/=]*)"')


def _quick_lock_answer(answer: str, exists: bool) -> LockAttempt | None:
    """The usual answer to kv_lock's transaction, read without decoding it all (decoding
    costs more than the rest of an acquire's bookkeeping): taken, with the fencing token,
    the key a lock before. None, to decode it fully, when the key was something else (flags
    of another kind: the caller needs the whole entry to put it back) or the answer does
    not have the expected shape (one entry from ``get`` if it ran, one from ``lock``)."""
    flags, indexes = _FLAGS.findall(answer), _MODIFY_INDEX.findall(answer)
    expected = 2 if exists else 1
    if len(flags) != expected or len(indexes) != expected:
        return None
    if exists and int(flags[0]) not in (0, LOCK_FLAG):
        return None
    # The lock's own result has "Value": null, so the one string value is the previous one.
    previous = _VALUE.search(answer) if exists else None
    return LockAttempt(True, int(indexes[-1]), previous=previous.group(1) if previous else None)


def _no_leader(address: str, action: str, answer: str) -> ConsulUnavailable:
    """A server's answer during a raft election: brief, worth retrying."""
    return ConsulUnavailable(address, action, f"Consul has no usable leader right now ({answer.strip()[:120]})")


def _tls_context(settings: ConsulSettings, native: bool = False) -> ssl.SSLContext:
    """The TLS context for an ``https`` agent. The settings checked that each file is PEM;
    one that still does not load (corrupt, or a key that is not the certificate's) raises
    InvalidSetting here, at the first connection, instead of an ``ssl`` traceback.
    ``native``: of the unpatched SSLContext class, whose sockets are real under gevent."""
    try:
        if native and _native.green():
            context = _native.ssl_context_class()(ssl.PROTOCOL_TLS_CLIENT)
            if settings.ca_file:
                context.load_verify_locations(cafile=settings.ca_file)
            else:
                context.load_default_certs()
        else:
            context = ssl.create_default_context(cafile=settings.ca_file)
    except ssl.SSLError as exc:
        raise InvalidSetting("ca_file", settings.ca_file, f"cannot be loaded as a CA certificate ({exc.reason})") from None
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        try:
            context.load_cert_chain(settings.client_cert, settings.client_key)
        except ssl.SSLError as exc:
            raise InvalidSetting(
                "client_key",
                settings.client_key,
                f"cannot be loaded with client_cert={settings.client_cert!r} ({exc.reason}); "
                "expected the PEM private key of that certificate",
            ) from None
    return context


def _tls_failure(exc: ssl.SSLError, settings: ConsulSettings) -> str:
    """What a TLS error means for the user, and which setting fixes it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS verification of the agent's certificate failed ({exc.verify_message}); set consul_lock_ca_file / "
            "CONSUL_CACERT to the CA that signed it"
        )
    reason = str(exc.reason or exc)
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        # The agent refused us during the handshake: it requires a client certificate
        # (verify_incoming) signed by a CA it trusts.
        if settings.client_cert is None:
            return (
                f"the agent requires a client certificate ({reason}); set consul_lock_client_cert and "
                "consul_lock_client_key / CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY"
            )
        return (
            f"the agent refused the client certificate {settings.client_cert!r} ({reason}); it must be signed "
            "by a CA in the agent's ca_file"
        )
    return (
        f"TLS failed ({reason}); check that the agent serves HTTPS there, and consul_lock_ca_file / CONSUL_CACERT, "
        "consul_lock_client_cert / CONSUL_CLIENT_CERT"
    )


class _ThreadClients(threading.local):
    clients: dict[ConsulSettings, ConsulClient]

    def __init__(self) -> None:
        self.clients = {}


_THREAD_CLIENTS = _ThreadClients()


def _forget_thread_clients() -> None:
    # A forked child must not reuse the parent's keep-alive sockets.
    global _THREAD_CLIENTS
    _THREAD_CLIENTS = _ThreadClients()


os.register_at_fork(after_in_child=_forget_thread_clients)


def thread_client(settings: ConsulSettings) -> ConsulClient:
    """This thread's keep-alive connection for ``settings`` (one per thread and process)."""
    clients = _THREAD_CLIENTS.clients
    client = clients.get(settings)
    if client is None:
        client = clients[settings] = ConsulClient(settings)
    return client


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
    return f"{int(seconds * 1000)}ms"


def _parse_go_duration(text: str) -> float | None:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", text or "")
    return sum(float(n) * units[u] for n, u in parts) if parts else None


def _make_client(settings: ConsulSettings, timeout: float, native: bool = False) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul_lib.Consul(host=settings.host, port=settings.port, scheme=settings.scheme, dc=settings.datacenter)
    # Replace the transport the library built (from CONSUL_HTTP_*, over requests) with
    # ours, built from our settings only.
    client.http = _KeepAliveHTTP(settings, timeout, native)
    client.token = None  # sent as a header by the transport, never as a URL parameter
    client.scheme = settings.scheme
    return client
