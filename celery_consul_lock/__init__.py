"""celery-consul-lock: run periodic Celery work once across a cluster, with Consul locks."""

from __future__ import annotations

from .entries import EntryDefinition, RuntimeSchedule, once
from .errors import (
    ACLDenied,
    ConsulLockError,
    ConsulUnavailable,
    EntryConflict,
    EntryNotFound,
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
    "InvalidEntry",
    "InvalidSetting",
    "LockConflict",
    "LockHeld",
    "LockHolder",
    "LockLost",
    "LockLostAbort",
    "LockOptions",
    "LockTimeout",
    "NotConsul",
    "RuntimeSchedule",
    "SemaphoreConflict",
    "SemaphoreLimitConflict",
    "SemaphoreState",
    "SessionGone",
    "Tick",
    "close_sessions",
    "is_skipped",
    "once",
]
