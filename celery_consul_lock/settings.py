"""Settings: read once, validated once, into one frozen :class:`ConsulSettings`.

Where each value comes from, first match wins:

1. an explicit keyword argument (``ConsulLock(..., ttl=20)``), or a Celery setting
   ``consul_lock_<name>`` (Django: ``CELERY_CONSUL_LOCK_<NAME>`` with
   ``config_from_object(..., namespace="CELERY")``);
2. Consul's own environment variables (``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``,
   ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``,
   ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``);
3. the defaults below.

An explicit token therefore wins over ``CONSUL_HTTP_TOKEN`` (the Consul client libraries do
the opposite; the adapter never lets them read the environment). Bad values raise
:class:`~celery_consul_lock.errors.InvalidSetting` naming the setting and the value,
never the token.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from .errors import InvalidSetting

__all__ = ["ConsulSettings", "parse_seconds", "validate_key"]

#: Consul's own default agent address.
DEFAULT_ADDRESS = "127.0.0.1:8500"
#: The Go client's default session TTL; renewals at TTL/3 leave two spare renewals.
DEFAULT_TTL = 15.0
#: Consul's default lock-delay: after a holder's session is invalidated (crash, failed
#: check) nobody can take its locks for this long, which is what lets a cut-off holder
#: stop (self-fence) before the next one starts.
DEFAULT_LOCK_DELAY = 15.0
#: Fail closed by default: without Consul, guarded work does not run.
DEFAULT_FAIL_POLICY: Literal["closed", "open"] = "closed"
#: Tie sessions to the agent's node health, as Consul does by default: a dead node frees
#: its locks within seconds instead of waiting for the TTL.
DEFAULT_SESSION_CHECKS: tuple[str, ...] = ("serfHealth",)
#: Per-request HTTP timeout. Renewals cut it further to the time left before the
#: self-fencing deadline, so a hung agent can never stall one past it.
DEFAULT_TIMEOUT = 5.0
TIMEOUT_MAX = 60.0

#: Consul's server-side bounds on a session TTL.
TTL_MIN, TTL_MAX = 10.0, 86400.0
#: Consul's bound on lock-delay.
LOCK_DELAY_MAX = 60.0
#: What a locked task does when Consul cannot be asked: fail closed (requeue, then fail) or
#: run without its lock.
FailPolicy = Literal["closed", "open"]
FAIL_POLICIES: tuple[FailPolicy, ...] = get_args(FailPolicy)

#: The TLS files, the PEM block each must contain (Python's ssl loads PEM only), and what
#: it is: checked at start-up, so that a swapped certificate and key is refused there.
_TLS_FILES = (
    ("ca_file", "CERTIFICATE-----", "a PEM CA certificate"),
    ("client_cert", "CERTIFICATE-----", "a PEM certificate"),
    ("client_key", "PRIVATE KEY-----", "a PEM private key"),
)

_ADDRESS = re.compile(r"^(?:(?P<scheme>https?)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?$")
_BAD_KEY_CHARS = re.compile(r"[\x00-\x20\x7f?#%]")


def validate_key(key: object, setting: str = "key") -> str:
    """Return ``key`` if Consul accepts it as a KV key for a lock, else raise InvalidSetting."""
    if not isinstance(key, str) or not key:
        raise InvalidSetting(setting, key, "a lock key must be a non-empty string")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidSetting(setting, key, "a lock key must not start or end with '/'")
    if _BAD_KEY_CHARS.search(key):
        raise InvalidSetting(setting, key, "a lock key must not contain spaces, control characters, '?', '#' or '%'")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidSetting(setting, key, "a lock key must not contain empty, '.' or '..' path segments")
    if len(key.encode()) > 512:
        raise InvalidSetting(setting, key, "a lock key must be at most 512 bytes")
    return key


@dataclass(frozen=True)
class ConsulSettings:
    """Everything needed to talk to Consul and to shape sessions, validated.

    Build one with :meth:`from_celery` (from ``app.conf``) or :meth:`resolve` (keyword
    arguments, then the environment). The token is kept out of ``repr``.
    """

    #: ``host:port`` of the Consul agent's HTTP API.
    address: str = DEFAULT_ADDRESS
    #: ``http`` or ``https``.
    scheme: str = "http"
    #: ACL token, or None for the agent's default token.
    token: str | None = field(default=None, repr=False)
    #: Verify the agent's TLS certificate.
    verify: bool = True
    #: CA bundle used to verify the agent's certificate.
    ca_file: str | None = None
    #: Client certificate and key, for agents with ``verify_incoming``.
    client_cert: str | None = None
    client_key: str | None = None
    #: Datacenter to use; None for the agent's own.
    datacenter: str | None = None
    #: Prefix put in front of every lock key, e.g. ``"myapp/"``.
    key_prefix: str = ""
    #: Session TTL in seconds (Consul: 10 s .. 24 h).
    ttl: float = DEFAULT_TTL
    #: Session lock-delay in seconds (Consul: 0 .. 60 s).
    lock_delay: float = DEFAULT_LOCK_DELAY
    #: What guarded work does when Consul cannot be reached: ``closed`` or ``open``.
    fail_policy: FailPolicy = DEFAULT_FAIL_POLICY
    #: Health checks the session is tied to; empty for a TTL-only session.
    session_checks: tuple[str, ...] = DEFAULT_SESSION_CHECKS
    #: HTTP timeout in seconds for every non-blocking request.
    timeout: float = DEFAULT_TIMEOUT

    def __hash__(self) -> int:
        # Settings key the per-thread clients and the session pool, looked up on every
        # acquire and release: hash the fields once, not on each lookup.
        try:
            return self.__dict__["_hash"]  # type: ignore[no-any-return]
        except KeyError:
            value = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", value)
            return value

    def __getstate__(self) -> dict[str, Any]:
        # A string's hash differs between processes: never carry the cached one along.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __post_init__(self) -> None:
        self._validate()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_celery(cls, conf: Any, **overrides: Any) -> ConsulSettings:
        """Read ``consul_lock_*`` from a Celery app's ``conf``, then the environment."""
        given = {}
        for f in fields(cls):
            value = conf.get(f"consul_lock_{f.name}")
            if value is not None:
                given[f.name] = value
        given.update({k: v for k, v in overrides.items() if v is not None})
        return cls.resolve(given, names="consul_lock_{}")

    @classmethod
    def resolve(
        cls,
        given: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        names: str = "{}",
    ) -> ConsulSettings:
        """Combine explicit values, Consul's environment variables and the defaults.

        ``names`` formats a field name into the setting name used in error messages.
        """
        given = {k: v for k, v in (given or {}).items() if v is not None}
        env = os.environ if env is None else env
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidSetting(
                names.format(unknown[0]), given[unknown[0]], f"unknown setting; known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}

        def take(name: str, env_var: str | None = None) -> Any:
            if name in given:
                sources[name] = names.format(name)
                return given[name]
            if env_var and env.get(env_var, "") != "":
                sources[name] = env_var
                return env[env_var]
            return None

        address = take("address", "CONSUL_HTTP_ADDR")
        scheme = take("scheme")
        if address is not None:
            host, port, addr_scheme = _parse_address(sources["address"], address)
            values["address"] = f"{host}:{port}"
            if scheme is None and addr_scheme:
                scheme = addr_scheme
        if scheme is None and env.get("CONSUL_HTTP_SSL"):
            scheme = "https" if _parse_bool("CONSUL_HTTP_SSL", env["CONSUL_HTTP_SSL"]) else None
        if scheme is not None:
            values["scheme"] = scheme
        for name, env_var in (
            ("token", "CONSUL_HTTP_TOKEN"),
            ("ca_file", "CONSUL_CACERT"),
            ("client_cert", "CONSUL_CLIENT_CERT"),
            ("client_key", "CONSUL_CLIENT_KEY"),
            ("verify", "CONSUL_HTTP_SSL_VERIFY"),
        ):
            value = take(name, env_var)
            if value is not None:
                values[name] = value
        for name in ("datacenter", "key_prefix", "ttl", "lock_delay", "fail_policy", "session_checks", "timeout"):
            value = take(name)
            if value is not None:
                values[name] = value
        return cls._coerced(values, sources)

    @classmethod
    def _coerced(cls, values: dict[str, Any], sources: dict[str, str]) -> ConsulSettings:
        def src(name: str) -> str:
            return sources.get(name, name)

        out: dict[str, Any] = {}
        for name, value in values.items():
            if name in ("ttl", "lock_delay", "timeout"):
                out[name] = parse_seconds(src(name), value)
            elif name == "verify":
                out[name] = value if isinstance(value, bool) else _parse_bool(src(name), value)
            elif name == "session_checks":
                if isinstance(value, str):
                    value = [c.strip() for c in value.split(",") if c.strip()]
                if not isinstance(value, list | tuple) or not all(isinstance(c, str) and c for c in value):
                    raise InvalidSetting(src(name), value, "must be a list of Consul check IDs, e.g. ['serfHealth']")
                out[name] = tuple(value)
            elif name == "token":
                if not isinstance(value, str):
                    raise InvalidSetting(src(name), "<redacted>", "the token must be a string")
                out[name] = value
            else:
                if not isinstance(value, str):
                    raise InvalidSetting(src(name), value, "must be a string")
                out[name] = value
        try:
            return cls(**out)
        except InvalidSetting as exc:
            # Re-name the setting after where its value came from.
            raise InvalidSetting(src(exc.setting), values.get(exc.setting, exc.value), exc.reason) from None

    def replace(self, **changes: Any) -> ConsulSettings:
        """A copy with some fields changed, validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **changes) if changes else self

    # -- derived ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``scheme://host:port``: the address named in every error message."""
        return f"{self.scheme}://{self.address}"

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def full_key(self, key: str) -> str:
        """The key as stored in Consul: the prefix, then ``key``, validated."""
        return validate_key(self.key_prefix + key)

    @property
    def fence_window(self) -> float:
        """How long after the last successful contact with Consul we may still believe
        we hold a lock: min(TTL, lock-delay) when the session has checks (a failing check
        frees it at once, then only lock-delay protects us), the TTL when it has none."""
        return min(self.ttl, self.lock_delay) if self.session_checks else self.ttl

    # -- validation -------------------------------------------------------------------

    def _validate(self) -> None:
        if not _ADDRESS.match(self.address) or not 0 < int(self.address.rsplit(":", 1)[1]) < 65536:
            raise InvalidSetting("address", self.address, "expected host:port, e.g. 127.0.0.1:8500")
        if self.scheme not in ("http", "https"):
            raise InvalidSetting("scheme", self.scheme, "expected 'http' or 'https'")
        if not TTL_MIN <= self.ttl <= TTL_MAX:
            raise InvalidSetting("ttl", self.ttl, "Consul accepts a session TTL between 10 s and 86400 s (24 h)")
        if not 0 <= self.lock_delay <= LOCK_DELAY_MAX:
            raise InvalidSetting("lock_delay", self.lock_delay, "Consul accepts a lock-delay between 0 and 60 s")
        if self.session_checks and self.lock_delay == 0:
            raise InvalidSetting(
                "lock_delay",
                self.lock_delay,
                "a lock-delay of 0 with session checks lets a failed check hand the lock to the "
                "next holder at once, before this one can notice; use a lock-delay > 0 or "
                "session_checks=[] (TTL-only sessions)",
            )
        if self.fail_policy not in FAIL_POLICIES:
            raise InvalidSetting("fail_policy", self.fail_policy, "expected 'closed' or 'open'")
        if not 0 < self.timeout <= TIMEOUT_MAX:
            raise InvalidSetting("timeout", self.timeout, f"expected seconds, more than 0 and at most {TIMEOUT_MAX:g}")
        if self.key_prefix:
            validate_key(self.key_prefix + "x", "key_prefix")
        for name, marker, what in _TLS_FILES:
            path = getattr(self, name)
            if path is not None:
                _check_pem(name, path, marker, what)
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidSetting(
                "client_cert" if self.client_key else "client_key", None, "client_cert and client_key must be given together"
            )


def _check_pem(setting: str, path: str, marker: str, what: str) -> None:
    if not os.path.isfile(path):
        raise InvalidSetting(setting, path, "no such file")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise InvalidSetting(setting, path, f"cannot be read: {exc.strerror}") from None
    if marker.encode() not in text:
        raise InvalidSetting(setting, path, f"not {what} (no '-----BEGIN ...{marker}' line)")


def _parse_address(setting: str, value: object) -> tuple[str, str, str | None]:
    m = _ADDRESS.match(value) if isinstance(value, str) else None
    if not m or not 0 < int(m["port"]) < 65536:
        raise InvalidSetting(setting, value, "expected host:port or http(s)://host:port, e.g. 127.0.0.1:8500")
    return m["host"], m["port"], m["scheme"]


def _parse_bool(setting: str, value: object) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidSetting(setting, value, "expected true or false")


def parse_seconds(setting: str, value: object) -> float:
    """A duration setting in seconds: a number, or text such as ``15``, ``"15s"``, ``"500ms"``,
    ``"1m"``; anything else (and NaN or infinity) raises InvalidSetting naming ``setting``."""
    if isinstance(value, bool):
        raise InvalidSetting(setting, value, "expected a number of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidSetting(setting, value, "expected a finite number of seconds")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise InvalidSetting(setting, value, "expected seconds, e.g. 15 or '15s', '500ms', '1m'")
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m[2]]
    return float(m[1]) * scale


#: The parsers, public for the modules that read settings of their own from ``app.conf``
#: (the worker's agent watch and requeue bounds, in :mod:`.availability`).
parse_bool = _parse_bool
