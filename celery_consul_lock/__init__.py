"""celery-consul-lock: run periodic Celery work once across a cluster, with Consul locks."""

from __future__ import annotations

from .errors import (
    ACLDenied,
    ConsulLockError,
    ConsulUnavailable,
    InvalidSetting,
    LockConflict,
    LockLost,
    LockTimeout,
    SessionGone,
)
from .lock import ConsulLock, LockHolder
from .session import close_sessions
from .settings import ConsulSettings

__all__ = [
    "ACLDenied",
    "ConsulLock",
    "ConsulLockError",
    "ConsulSettings",
    "ConsulUnavailable",
    "InvalidSetting",
    "LockConflict",
    "LockHolder",
    "LockLost",
    "LockTimeout",
    "SessionGone",
    "close_sessions",
]
