"""The package's exceptions: one base class, each error carrying what it is about.

Every exception keeps its constructor arguments in ``args`` so that it pickles (Celery
pickles a task's exception to store it as the result) and compares by value. Messages
say what happened and what to do; none ever contains an ACL token.
"""

from __future__ import annotations

__all__ = [
    "ACLDenied",
    "ConsulLockError",
    "ConsulUnavailable",
    "EntryConflict",
    "EntryNotFound",
    "InternalsChanged",
    "InvalidEntry",
    "InvalidSetting",
    "LockConflict",
    "LockHeld",
    "LockLost",
    "LockTimeout",
    "NotConsul",
    "SemaphoreConflict",
    "SemaphoreLimitConflict",
    "SessionGone",
]


# -- the base ---------------------------------------------------------------------------------


class ConsulLockError(Exception):
    """Base class of every error raised by celery-consul-lock."""

    def __reduce__(self) -> tuple[type[ConsulLockError], tuple[object, ...]]:
        return (type(self), self.args)


# -- configuration ------------------------------------------------------------------------------


class InvalidSetting(ConsulLockError, ValueError):
    """A setting has a value we refuse at start-up; names the setting and the value."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        super().__init__(setting, value, reason)
        self.setting = setting
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.setting}={self.value!r} is invalid: {self.reason}"


# -- the runtime schedule -----------------------------------------------------------------------


class InvalidEntry(ConsulLockError, ValueError):
    """A runtime schedule entry has a field we refuse; names the field and the value. Nothing
    was written."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(field, value, reason)
        self.field = field
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"schedule entry field {self.field}={self.value!r} is invalid: {self.reason}"


class EntryConflict(ConsulLockError):
    """A runtime schedule write was refused: the entry changed since it was read (check-and-set
    failed), already exists, or is a config entry that a runtime write may not change."""

    def __init__(self, beat: str, name: str, reason: str) -> None:
        super().__init__(beat, name, reason)
        self.beat = beat
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"schedule entry {self.name!r} of beat {self.beat!r} {self.reason}"


class EntryNotFound(ConsulLockError):
    """No runtime schedule entry (nor config entry, where one would do) has this name."""

    def __init__(self, beat: str, name: str) -> None:
        super().__init__(beat, name)
        self.beat = beat
        self.name = name

    def __str__(self) -> str:
        return f"beat {self.beat!r} has no runtime schedule entry named {self.name!r}"


# -- reaching Consul (consul.FAILURES maps every failure of a request to one of these) ----------


#: Where a process's Consul address and token are set, as its errors name them by default.
ADDRESS_NAMES = "consul_lock_address / CONSUL_HTTP_ADDR"
TOKEN_NAMES = "consul_lock_token / CONSUL_HTTP_TOKEN"
#: ... and as this process's errors name them now (:func:`name_settings`).
_SETTING_NAMES: dict[str, str] = {"address": ADDRESS_NAMES, "token": TOKEN_NAMES}


def name_settings(*, address: str = ADDRESS_NAMES, token: str = TOKEN_NAMES) -> None:
    """Name where this process's Consul address and token are set, in every error message
    from now on (``"CELERY_CONSUL_LOCK_ADDRESS / CONSUL_HTTP_ADDR"``): a worker and a beat
    name the settings as the app's configuration spells them (Django's namespace), the cron
    wrapper names Consul's variables (it has no Celery settings). Process-wide: one app's
    settings per process. Without arguments: back to the default, the Celery setting names
    without a namespace and Consul's variables."""
    _SETTING_NAMES.update(address=address, token=token)


class ConsulUnavailable(ConsulLockError):
    """The Consul agent could not be reached (refused, timed out, no leader, TLS failure).

    ``transient`` is False when waiting will not help: a TLS failure is a configuration
    problem (wrong CA, missing client certificate), so a blocking acquire raises it at once
    instead of retrying through it as it does through a Consul leader election.
    """

    def __init__(self, address: str, action: str, detail: str, transient: bool = True) -> None:
        super().__init__(address, action, detail, transient)
        self.address = address
        self.action = action
        self.detail = detail
        self.transient = transient

    def __str__(self) -> str:
        return self.message()

    def message(self, address_from: str | None = None) -> str:
        """The message, naming ``address_from`` as where the address is set (default: as
        :func:`name_settings` last named it)."""
        address_from = address_from or _SETTING_NAMES["address"]
        text = f"Consul agent at {self.address} is unreachable while {self.action}: {self.detail}."
        if self.transient:
            text += f" Check that the agent runs there, or point {address_from} at it."
        return text


class NotConsul(ConsulUnavailable):
    """Something answers at the address, but not as a Consul agent does (a web server, a
    proxy's error page, another service): ``answer`` says how, with a short excerpt.

    A :class:`ConsulUnavailable`, because Consul is not reachable there (so ``fail_policy``
    applies as for any unreachable agent), with ``transient`` False, because waiting does
    not fix an address: a blocking acquire raises it at once instead of retrying through it.
    """

    def __init__(self, address: str, action: str, answer: str) -> None:
        super().__init__(address, action, answer, transient=False)
        self.args = (address, action, answer)
        self.answer = answer

    def message(self, address_from: str | None = None) -> str:
        address_from = address_from or _SETTING_NAMES["address"]
        return (
            f"the server at {self.address} is not a Consul agent: while {self.action}, it answered {self.answer}. "
            f"Point {address_from} at a Consul agent's HTTP API."
        )


class ACLDenied(ConsulLockError):
    """Consul refused a request with 403: the token lacks ``permission`` on ``resource``,
    or (``token_unknown``) Consul does not know the token at all ("ACL not found": a token
    mistyped, deleted or expired), which no policy change fixes."""

    def __init__(self, address: str, action: str, permission: str, resource: str, token_unknown: bool = False) -> None:
        super().__init__(address, action, permission, resource, token_unknown)
        self.address = address
        self.action = action
        self.permission = permission
        self.resource = resource
        self.token_unknown = token_unknown

    def __str__(self) -> str:
        if self.token_unknown:
            return (
                f"Consul at {self.address} refused {self.action}: it does not know the ACL token "
                f"(ACL not found: mistyped, deleted or expired). Set {_SETTING_NAMES['token']} to a token "
                "that exists."
            )
        return (
            f"Consul at {self.address} denied {self.action}: the ACL token needs "
            f"{self.permission} on {self.resource!r} (set {_SETTING_NAMES['token']} to a token whose "
            "policy grants it)."
        )


class SessionGone(ConsulLockError):
    """The Consul session no longer exists (destroyed, TTL expired, or a check failed)."""

    def __init__(self, session: str, address: str) -> None:
        super().__init__(session, address)
        self.session = session
        self.address = address

    def __str__(self) -> str:
        return (
            f"Consul session {self.session} is gone at {self.address} (destroyed, expired or "
            "invalidated by a failing check); every lock it held is lost. A new acquire "
            "creates a new session."
        )


# -- the lock -----------------------------------------------------------------------------------


class LockConflict(ConsulLockError):
    """The key exists with flags that mark it as something other than a lock."""

    def __init__(self, key: str, flags: int) -> None:
        super().__init__(key, flags)
        self.key = key
        self.flags = flags

    def __str__(self) -> str:
        return (
            f"key {self.key!r} has flags {self.flags:#x}, so it is not a lock (a semaphore or "
            "other data?); refusing to overwrite it. Use another key."
        )


class SemaphoreConflict(LockConflict):
    """A semaphore's ``PREFIX/.lock`` key exists with flags that are not a semaphore's
    (a lock, or other data)."""

    def __str__(self) -> str:
        return (
            f"key {self.key!r} has flags {self.flags:#x}, so it is not a semaphore's (a lock taken by "
            "`consul lock` without -n, or other data?); refusing to use it. Use another prefix."
        )


class SemaphoreLimitConflict(ConsulLockError, ValueError):
    """The limit stored in a semaphore's ``.lock`` key differs from the one asked for (every
    holder must agree on it, as the Go client and ``consul lock -n`` require)."""

    def __init__(self, key: str, stored: int, requested: int) -> None:
        super().__init__(key, stored, requested)
        self.key = key
        self.stored = stored
        self.requested = requested

    def __str__(self) -> str:
        return (
            f"semaphore {self.key!r} has limit {self.stored} in Consul but limit={self.requested} was asked "
            "for; every holder must use the same limit (wait until its holders are gone, or use another prefix)"
        )


class LockTimeout(ConsulLockError):
    """A blocking acquire gave up at its timeout; carries who held the key, if known."""

    def __init__(self, key: str, timeout: float, holder: str | None = None) -> None:
        super().__init__(key, timeout, holder)
        self.key = key
        self.timeout = timeout
        self.holder = holder

    def __str__(self) -> str:
        held = f"; held by {self.holder}" if self.holder else ""
        return f"could not acquire {self.key!r} within {self.timeout:g} s{held}"


class LockLost(ConsulLockError):
    """The lock was lost while held: the work it guards may now run elsewhere."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        return f"lock {self.key!r} was lost: {self.reason}"


class LockHeld(ConsulLockError):
    """A task's lock was held elsewhere: ``on_held="fail"``, or ``"retry"`` once its retries ran out."""

    def __init__(self, key: str, holder: str | None = None) -> None:
        super().__init__(key, holder)
        self.key = key
        self.holder = holder

    def __str__(self) -> str:
        return f"lock {self.key!r} is held" + (f" by {self.holder}" if self.holder else " (lock-delay)")


class InternalsChanged(ConsulLockError):
    """An installed release of Celery or django-celery-beat changed a private part of it that
    this package relies on (``where`` no longer uses ``names``); raised when a scheduler that
    relies on it starts, instead of scheduling wrongly without a word."""

    def __init__(self, package: str, version: str, where: str, names: tuple[str, ...], why: str, tested: str) -> None:
        super().__init__(package, version, where, names, why, tested)
        self.package = package
        self.version = version
        self.where = where
        self.names = names
        self.why = why
        self.tested = tested

    def __str__(self) -> str:
        return (
            f"{self.package} {self.version} changed an internal celery-consul-lock relies on: {self.where} no longer "
            f"uses {', '.join(self.names)} ({self.why}). celery-consul-lock is tested with {self.package} {self.tested}; "
            f"install one of those, or a celery-consul-lock release that supports {self.package} {self.version}."
        )
