"""celery-consul-lock: run periodic Celery work once across a cluster, with Consul locks."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import startup as _startup  # noqa: F401  # connects the checks at a worker's start
from .contrib.flask import LockedFlaskTask
from .entries import EntryDefinition, RuntimeSchedule, once
from .errors import (
    ACLDenied,
    ConsulLockError,
    ConsulUnavailable,
    EntryConflict,
    EntryNotFound,
    InternalsChanged,
    InvalidEntry,
    InvalidSetting,
    LockConflict,
    LockHeld,
    LockLost,
    LockTimeout,
    NotConsul,
    SemaphoreConflict,
    SemaphoreLimitConflict,
    SessionGone,
)
from .lock import ConsulLock, LockHolder
from .protocol import TICK_HEADER, Tick
from .semaphore import ConsulSemaphore, SemaphoreState
from .session import close_sessions
from .settings import ConsulSettings
from .task import ConsulLockedTask, LockLostAbort, LockOptions, is_skipped

try:
    #: The installed distribution's version (``pyproject.toml`` is its one source).
    __version__: str = _version("celery-consul-lock")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "TICK_HEADER",
    "ACLDenied",
    "ConsulLock",
    "ConsulLockError",
    "ConsulLockedTask",
    "ConsulSemaphore",
    "ConsulSettings",
    "ConsulUnavailable",
    "EntryConflict",
    "EntryDefinition",
    "EntryNotFound",
    "InternalsChanged",
    "InvalidEntry",
    "InvalidSetting",
    "LockConflict",
    "LockHeld",
    "LockHolder",
    "LockLost",
    "LockLostAbort",
    "LockOptions",
    "LockTimeout",
    "LockedFlaskTask",
    "NotConsul",
    "RuntimeSchedule",
    "SemaphoreConflict",
    "SemaphoreLimitConflict",
    "SemaphoreState",
    "SessionGone",
    "Tick",
    "__version__",
    "close_sessions",
    "is_skipped",
    "once",
]
