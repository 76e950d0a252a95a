"""Settings: each declared once, read once, validated once, into one frozen :class:`ConsulSettings`.

Every setting is one :class:`Setting` row: its name (the Celery setting is
``consul_lock_<name>``), Consul's environment variable that fills it (if any), the parser
that checks and converts a value, its default (a named constant below, with the reason for
its value) and one line of documentation. Everything else derives from the rows: reading
``app.conf`` (:func:`read_celery`), the environment, the errors (:class:`InvalidSetting`
naming the setting as the user wrote it and the value), and the configuration table of the
docs (:func:`configuration_table`; ``tests/test_settings.py`` checks docs/configuration.md against
it and prints the table to paste when they differ). The rows of :class:`ConsulSettings` are
:data:`CONSUL_SETTINGS`; the worker's (``availability.AVAILABILITY_SETTINGS``) and the beat's
(``election.BEAT_SETTINGS``) are declared with the objects they configure.

Where each value comes from, first match wins:

1. an explicit keyword argument (``ConsulLock(..., ttl=20)``), or a Celery setting
   ``consul_lock_<name>`` (Django: ``CELERY_CONSUL_LOCK_<NAME>`` with
   ``config_from_object(..., namespace="CELERY")``);
2. Consul's own environment variables (``CONSUL_HTTP_ADDR``, ``CONSUL_HTTP_TOKEN``,
   ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_CACERT``,
   ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``);
3. the defaults below.

An explicit token therefore wins over ``CONSUL_HTTP_TOKEN`` (the Consul client libraries do
the opposite; this package never lets them read the environment). Bad values raise
:class:`~celery_consul_lock.errors.InvalidSetting` naming the setting as the user wrote it
(:func:`written_name`: ``CELERY_CONSUL_LOCK_TTL`` under Django's namespace, the environment
variable when the value came from there) and the value, never the token. Workers and beats
check every setting when they start (:mod:`celery_consul_lock.startup`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from .errors import InvalidSetting

__all__ = [
    "CONSUL_SETTINGS",
    "ConsulSettings",
    "Setting",
    "address_source",
    "as_written",
    "configuration_table",
    "namespaced_name",
    "parse_bool",
    "parse_seconds",
    "read_celery",
    "validate_key",
    "written_name",
]

#: What every Celery setting of this package starts with (``consul_lock_ttl``).
CELERY_PREFIX = "consul_lock_"
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
#: Connections a process keeps to its agent for its requests (threads and greenlets share
#: them, one request at a time each). A lock's request takes a millisecond or two on a local
#: agent, so 16 serve thousands of requests a second; and a host's worker processes share
#: the agent's limit of 200 connections per client address (http_max_conns_per_client):
#: nine processes of 16 + 6 (two renewals, three watcher queries, agent watch) each stay under
#: it (198). (A prefork child runs one task at a time and opens one of them.)
DEFAULT_MAX_CONNECTIONS = 16
#: How long a released lock key keeps its release record before it is removed (see
#: :mod:`.reap`). The next acquirer reads that record: a copy of a message redelivered after
#: its run finished is skipped only while it is there. Redis redelivers a message that was
#: not acknowledged one visibility timeout (default 3600 s) after it was taken, i.e. within
#: an hour of the run's start, and the redelivered copy may then wait behind a backlog: two
#: hours cover the hour and as much again. The same delay applies to a free key with no
#: record (its holder's session ended) and to the state of a removed periodic entry.
DEFAULT_REAP_AFTER = 7200.0

#: Consul's server-side bounds on a session TTL.
TTL_MIN, TTL_MAX = 10.0, 86400.0
#: Consul's bound on lock-delay.
LOCK_DELAY_MAX = 60.0
#: What a locked task does when Consul cannot be asked: fail closed (requeue, then fail) or
#: run without its lock.
FailPolicy = Literal["closed", "open"]
FAIL_POLICIES: tuple[FailPolicy, ...] = get_args(FailPolicy)

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


# -- parsers: each takes a value as given (a Celery setting, a keyword, an environment
# variable's text) and returns it converted, or raises Invalid with the reason ------------------


class Invalid(ValueError):
    """A parser's refusal; ``args[0]`` is the reason. The reader adds the setting and value."""


Parser = Callable[[Any], Any]


class seconds:
    """Seconds: a number, or text such as ``15``, ``"15s"``, ``"500ms"``, ``"1m"``; refused
    below ``at_least``, at or below ``above``, or above ``at_most`` (``why`` says why)."""

    unit = "s"

    def __init__(
        self, *, at_least: float | None = None, above: float | None = None, at_most: float | None = None, why: str = ""
    ) -> None:
        self.at_least, self.above, self.at_most, self.why = at_least, above, at_most, why

    def __call__(self, value: Any) -> float:
        number = _seconds(value)
        if (
            (self.at_least is not None and number < self.at_least)
            or (self.above is not None and number <= self.above)
            or (self.at_most is not None and number > self.at_most)
        ):
            raise Invalid(self.why)
        return number


def boolean(value: Any) -> bool:
    """True or False, or text: ``1``/``true``/``yes``/``on``, ``0``/``false``/``no``/``off``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise Invalid("expected true or false")


def text(value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        raise Invalid("must be a string")
    return value


def one_of(*choices: str) -> Parser:
    """One of ``choices``."""
    expected = " or ".join(repr(c) for c in choices) if len(choices) == 2 else f"one of {', '.join(choices)}"

    def parse(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"expected {expected}")
        return str(value)

    return parse


def whole(minimum: int, why: str) -> Parser:
    """A whole number (not a bool) of at least ``minimum``."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(why)
        return value

    return parse


def check_ids(value: Any) -> tuple[str, ...]:
    """Consul check IDs: a list, or text separated by commas; empty for a TTL-only session."""
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(c, str) and c for c in value):
        raise Invalid("must be a list of Consul check IDs, e.g. ['serfHealth']")
    return tuple(value)


def address(value: Any) -> str:
    """``host:port`` (a ``http(s)://`` in front is the scheme's, see :meth:`ConsulSettings.resolve`)."""
    m = _ADDRESS.match(value) if isinstance(value, str) else None
    if not m or not 0 < int(m["port"]) < 65536:
        raise Invalid("expected host:port or http(s)://host:port, e.g. 127.0.0.1:8500")
    return f"{m['host']}:{m['port']}"


def key_prefix(value: Any) -> str:
    """A folder of Consul's KV store put in front of every key: empty, or ending with ``/``
    (``myapp/``), and with a key after it, a key Consul accepts.

    ``myapp`` is refused, not corrected to ``myapp/``: the prefix is what the user's ACL
    policy (``key_prefix "myapp/"``), ``consul kv get -recurse`` and the other programs
    sharing the keys (``celery-consul-lock run --key-prefix``, a script's ``ConsulLock``)
    name, so the keys must sit exactly where the setting says; a one-character fix at start
    beats keys quietly moved, or left at ``myapplocks/...``."""
    prefix = text(value)
    if not prefix:
        return prefix
    if prefix.startswith("/"):
        raise Invalid("a key prefix must not start with '/' (Consul's keys have no leading slash)")
    if not prefix.endswith("/"):
        raise Invalid(f"a key prefix must end with '/', or the keys would be {prefix + 'locks/...'!r}; write {prefix + '/'!r}")
    try:
        validate_key(prefix + "x")
    except InvalidSetting as exc:
        raise Invalid(exc.reason.replace("a lock key", "a key prefix")) from None
    return prefix


def pem(marker: str, what: str) -> Parser:
    """The path of a PEM file containing a ``-----BEGIN ...{marker}`` block: checked at
    start-up (Python's ssl loads PEM only), so that a swapped certificate and key is
    refused there."""

    def parse(value: Any) -> str:
        path = text(value)
        if not os.path.isfile(path):
            raise Invalid("no such file")
        try:
            with open(path, "rb") as f:
                content = f.read()
        except OSError as exc:
            raise Invalid(f"cannot be read: {exc.strerror}") from None
        if marker.encode() not in content:
            raise Invalid(f"not {what} (no '-----BEGIN ...{marker}' line)")
        return path

    return parse


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise Invalid("expected a number of seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise Invalid("expected a finite number of seconds")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise Invalid("expected seconds, e.g. 15 or '15s', '500ms', '1m'")
    return float(m[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m[2]]


def parse_seconds(setting: str, value: object) -> float:
    """A duration setting in seconds: a number, or text such as ``15``, ``"15s"``, ``"500ms"``,
    ``"1m"``; anything else (and NaN or infinity) raises InvalidSetting naming ``setting``."""
    return _parsed(setting, value, _seconds)  # type: ignore[no-any-return]


def parse_bool(setting: str, value: object) -> bool:
    """A true/false setting (see :func:`boolean`); else InvalidSetting naming ``setting``."""
    return _parsed(setting, value, boolean)  # type: ignore[no-any-return]


def _parsed(setting: str, value: object, parse: Parser, secret: bool = False) -> Any:
    try:
        return parse(value)
    except Invalid as exc:
        raise InvalidSetting(setting, "<redacted>" if secret else value, exc.args[0]) from None


# -- declarations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting, declared once."""

    #: The name: the Celery setting is ``consul_lock_<name>``, the keyword argument ``<name>``.
    name: str
    #: Checks and converts a value as given; raises Invalid with the reason.
    parse: Parser
    #: The value when nothing gives one (None: unset, the field's meaning says what then).
    default: Any
    #: One line for the configuration table (docs/configuration.md).
    doc: str
    #: Consul's environment variable that fills it when no setting does.
    env: str | None = None
    #: How the configuration table shows the default, when not the value itself ("system CAs").
    shown_default: str | None = None
    #: How the configuration table shows the environment fallback, when not just ``env``.
    shown_env: str | None = None
    #: Never shown in errors (the token).
    secret: bool = False

    @property
    def celery_name(self) -> str:
        return CELERY_PREFIX + self.name

    def parsed(self, value: Any, setting: str | None = None) -> Any:
        """``value`` converted, or InvalidSetting naming ``setting`` (default: the field name)."""
        return _parsed(setting or self.name, value, self.parse, self.secret)


_TTL_RANGE = "Consul accepts a session TTL between 10 s and 86400 s (24 h)"

#: The settings of :class:`ConsulSettings`, in the order of its fields.
CONSUL_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "address",
        address,
        DEFAULT_ADDRESS,
        "agent's HTTP address, `host:port`",
        env="CONSUL_HTTP_ADDR",
        shown_env="`CONSUL_HTTP_ADDR` (with or without `http(s)://`)",
    ),
    Setting(
        "scheme",
        one_of("http", "https"),
        "http",
        "`http` or `https`",
        shown_env="scheme of `CONSUL_HTTP_ADDR`, `CONSUL_HTTP_SSL=true`",
    ),
    Setting(
        "token",
        text,
        None,
        "ACL token; sent as a header, never logged or shown in a repr",
        env="CONSUL_HTTP_TOKEN",
        shown_default="none",
        secret=True,
    ),
    Setting("verify", boolean, True, "verify the agent's certificate", env="CONSUL_HTTP_SSL_VERIFY"),
    Setting(
        "ca_file",
        pem("CERTIFICATE-----", "a PEM CA certificate"),
        None,
        "CA bundle for the agent's certificate",
        env="CONSUL_CACERT",
        shown_default="system CAs",
    ),
    Setting(
        "client_cert",
        pem("CERTIFICATE-----", "a PEM certificate"),
        None,
        "client certificate for `verify_incoming` agents (with `client_key`)",
        env="CONSUL_CLIENT_CERT",
        shown_default="none",
    ),
    Setting(
        "client_key",
        pem("PRIVATE KEY-----", "a PEM private key"),
        None,
        "the client certificate's private key",
        env="CONSUL_CLIENT_KEY",
        shown_default="none",
    ),
    Setting("datacenter", text, None, "datacenter", shown_default="the agent's"),
    Setting(
        "key_prefix",
        key_prefix,
        "",
        "a folder put before every key: `myapp/`. Without its trailing `/` it is refused, not corrected: your ACL "
        "policy and `consul kv` name the prefix as you wrote it, so keys never move behind your back",
    ),
    Setting(
        "ttl",
        seconds(at_least=TTL_MIN, at_most=TTL_MAX, why=_TTL_RANGE),
        DEFAULT_TTL,
        'session TTL, 10 s .. 24 h (`15`, `"15s"`, `"1m"`)',
    ),
    Setting(
        "lock_delay",
        seconds(at_least=0, at_most=LOCK_DELAY_MAX, why="Consul accepts a lock-delay between 0 and 60 s"),
        DEFAULT_LOCK_DELAY,
        "session lock-delay, 0 .. 60 s",
    ),
    Setting("fail_policy", one_of(*FAIL_POLICIES), DEFAULT_FAIL_POLICY, "`closed` or `open` (tasks)"),
    Setting(
        "session_checks",
        check_ids,
        DEFAULT_SESSION_CHECKS,
        "checks the session is tied to; `[]` for TTL-only",
        shown_default='`["serfHealth"]`',
    ),
    Setting(
        "timeout",
        seconds(above=0, at_most=TIMEOUT_MAX, why=f"expected seconds, more than 0 and at most {TIMEOUT_MAX:g}"),
        DEFAULT_TIMEOUT,
        "HTTP timeout of each request (renewals are cut shorter to the fencing deadline)",
    ),
    Setting(
        "max_connections",
        whole(1, "expected a whole number of connections, at least 1"),
        DEFAULT_MAX_CONNECTIONS,
        "connections a process opens to the agent for its requests, shared by its threads or greenlets "
        "(plus at most two for session renewals and one for the watcher: "
        "[Connections and the watcher](concepts.md#connections-and-the-watcher))",
    ),
    Setting(
        "reap_after",
        seconds(at_least=0, why="expected a number of seconds >= 0"),
        DEFAULT_REAP_AFTER,
        "a free lock key, a dead semaphore holder's key, and the tick mark and beat state of a removed entry, "
        "are removed from KV this long after their last use ([KV layout](concepts.md#kv-layout)); at least the "
        "broker's redelivery window",
    ),
)
_BY_NAME = {s.name: s for s in CONSUL_SETTINGS}


def read_celery(conf: Any, declared: Iterable[Setting]) -> dict[str, Any]:
    """The ``declared`` settings from a Celery app's ``conf`` (``consul_lock_<name>``),
    parsed, the default where unset; InvalidSetting names the setting as the user wrote it
    (:func:`written_name`)."""
    values = {}
    with as_written(conf):
        for setting in declared:
            value = conf.get(setting.celery_name)
            values[setting.name] = setting.default if value is None else setting.parsed(value, setting.celery_name)
    return values


def written_name(conf: Any, name: str) -> str:
    """The Celery setting ``name`` (``consul_lock_ttl``) as the app's configuration spells it.

    An app configured with ``app.config_from_object(obj, namespace="CELERY")`` (Django's
    way) reads ``consul_lock_ttl`` from ``obj.CELERY_CONSUL_LOCK_TTL``: that is the name
    returned, unless the value was set without the namespace (``app.conf.consul_lock_ttl =
    ...``, which Celery also reads). Any other name (an environment variable, a task's
    option) is returned as it is. ``conf`` is a loaded ``app.conf``."""
    prefix: str = getattr(conf, "prefix", None) or ""
    if not prefix or not name.startswith(CELERY_PREFIX):
        return name
    namespaced = namespaced_name(name, prefix)
    # Where the value Celery reads is written (the last map: Celery's own defaults). Both
    # spellings may be set, and Celery versions differ on which wins: the one holding it.
    written = [(key, m[key]) for m in getattr(conf, "maps", [])[:-1] for key in (namespaced, name) if key in m]
    current = conf.get(name)
    return next((key for key, value in written if value is current), written[0][0] if written else namespaced)


def namespaced_name(name: str, prefix: str) -> str:
    """``name`` as Celery looks it up in a configuration read with the namespace ``prefix``
    (``CELERY_``: ``CELERY_CONSUL_LOCK_TTL``; Celery matches the namespace's case); ``name``
    itself without one."""
    if not prefix:
        return name
    return (prefix + name).upper() if prefix.isupper() else (prefix + name).lower()


def address_source(conf: Any, env: Mapping[str, str] | None = None) -> str:
    """Where the agent's address of an app comes from, for a message: ``address from
    CELERY_CONSUL_LOCK_ADDRESS`` (as written), ``address from CONSUL_HTTP_ADDR``, or ``the
    default address; set ...`` naming both."""
    env = os.environ if env is None else env
    name = written_name(conf, CELERY_PREFIX + "address")
    if conf.get(CELERY_PREFIX + "address") is not None:
        return f"address from {name}"
    if env.get("CONSUL_HTTP_ADDR"):
        return "address from CONSUL_HTTP_ADDR"
    return f"the default address; set {name} or CONSUL_HTTP_ADDR"


@contextmanager
def as_written(conf: Any) -> Iterator[None]:
    """Re-raise an InvalidSetting from inside naming its setting as ``conf`` spells it
    (:func:`written_name`): ``CELERY_CONSUL_LOCK_TTL=5 is invalid`` under Django."""
    try:
        yield
    except InvalidSetting as exc:
        name = written_name(conf, exc.setting)
        if name == exc.setting:
            raise
        raise InvalidSetting(name, exc.value, exc.reason) from None


def configuration_table(declared: Iterable[Setting]) -> str:
    """The table of ``declared`` in docs/configuration.md (markdown, one row per setting)."""
    rows = ["| setting | environment fallback | default | |", "|---|---|---|---|"]
    for s in declared:
        env = s.shown_env or (f"`{s.env}`" if s.env else "")
        cells = (f"`{s.celery_name}`", env, s.shown_default or _shown(s.default, s.parse), s.doc)
        rows.append("| " + " | ".join(cells).replace("|  |", "| |") + " |")
    return "\n".join(rows) + "\n"


def _shown(default: Any, parse: Parser) -> str:
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and isinstance(parse, seconds):
        return f"`{default:g}` s"
    if isinstance(default, str) and not default:
        return '`""`'
    return f"`{default:g}`" if isinstance(default, float) else f"`{default}`"


@dataclass(frozen=True)
class ConsulSettings:
    """Everything needed to talk to Consul and to shape sessions, validated: one field per
    row of :data:`CONSUL_SETTINGS`, which says what each means, accepts and defaults to.

    Build one with :meth:`from_celery` (from ``app.conf``) or :meth:`resolve` (keyword
    arguments, then the environment). The token is kept out of ``repr``.
    """

    address: str = DEFAULT_ADDRESS
    scheme: str = "http"
    token: str | None = field(default=None, repr=False)
    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    datacenter: str | None = None
    key_prefix: str = ""
    ttl: float = DEFAULT_TTL
    lock_delay: float = DEFAULT_LOCK_DELAY
    fail_policy: FailPolicy = DEFAULT_FAIL_POLICY
    session_checks: tuple[str, ...] = DEFAULT_SESSION_CHECKS
    timeout: float = DEFAULT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    reap_after: float = DEFAULT_REAP_AFTER

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
        given = {s.name: conf.get(s.celery_name) for s in CONSUL_SETTINGS}
        given.update({k: v for k, v in overrides.items() if v is not None})
        with as_written(conf):
            return cls.resolve(given, names=CELERY_PREFIX + "{}")

    @classmethod
    def resolve(
        cls,
        given: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        names: str = "{}",
    ) -> ConsulSettings:
        """Combine explicit values, Consul's environment variables and the defaults.

        ``names`` formats a field name into the setting name used in error messages; a
        value from the environment is named by its variable.
        """
        given = {k: v for k, v in (given or {}).items() if v is not None}
        env = os.environ if env is None else env
        unknown = sorted(set(given) - set(_BY_NAME))
        if unknown:
            raise InvalidSetting(
                names.format(unknown[0]), given[unknown[0]], f"unknown setting; known: {', '.join(sorted(_BY_NAME))}"
            )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for s in CONSUL_SETTINGS:
            if s.name in given:
                values[s.name], sources[s.name] = given[s.name], names.format(s.name)
            elif s.env and env.get(s.env, "") != "":
                values[s.name], sources[s.name] = env[s.env], s.env
        # The scheme may also come from the address (https://...) or CONSUL_HTTP_SSL.
        if "address" in values:
            m = _ADDRESS.match(values["address"]) if isinstance(values["address"], str) else None
            if m and m["scheme"] and "scheme" not in values:
                values["scheme"], sources["scheme"] = m["scheme"], sources["address"]
        if "scheme" not in values and env.get("CONSUL_HTTP_SSL") and parse_bool("CONSUL_HTTP_SSL", env["CONSUL_HTTP_SSL"]):
            values["scheme"], sources["scheme"] = "https", "CONSUL_HTTP_SSL"
        try:
            return _interned(cls(**values))
        except InvalidSetting as exc:
            # Re-name the setting after where its value came from, with the value as given.
            value = "<redacted>" if _BY_NAME[exc.setting].secret else values.get(exc.setting, exc.value)
            raise InvalidSetting(sources.get(exc.setting, exc.setting), value, exc.reason) from None

    def replace(self, **changes: Any) -> ConsulSettings:
        """A copy with some fields changed, validated again."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return _interned(replace(self, **changes)) if changes else self

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
        # Each field by its row (None: unset), then what holds between fields.
        for s in CONSUL_SETTINGS:
            value = getattr(self, s.name)
            if value is not None:
                object.__setattr__(self, s.name, s.parsed(value))
        if self.session_checks and self.lock_delay == 0:
            raise InvalidSetting(
                "lock_delay",
                self.lock_delay,
                "a lock-delay of 0 with session checks lets a failed check hand the lock to the "
                "next holder at once, before this one can notice; use a lock-delay > 0 or "
                "session_checks=[] (TTL-only sessions)",
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidSetting(
                "client_cert" if self.client_key else "client_key", None, "client_cert and client_key must be given together"
            )


#: One instance per distinct settings resolved in this process (up to INTERNED_MAX): the
#: process's clients, sessions and watchers are looked up by settings on every acquire and
#: release, and the same object answers those lookups at once, without comparing every field.
_INTERNED: dict[ConsulSettings, ConsulSettings] = {}
INTERNED_MAX = 256


def _interned(settings: ConsulSettings) -> ConsulSettings:
    if len(_INTERNED) >= INTERNED_MAX:
        return _INTERNED.get(settings, settings)
    return _INTERNED.setdefault(settings, settings)
