"""Skew this Python process's wall clock by TEST_CLOCK_SKEW seconds (a host with a wrong clock).

Put this directory on PYTHONPATH: Python imports ``sitecustomize`` at start-up, before the
program's own imports. Only the wall clock moves (``time.time``, ``datetime.now``); the
monotonic clock, which NTP never steps either and which the locks' fencing runs on, does not.
A stand-in for Debian's ``faketime``, whose libfaketime breaks Python 3.11's sleeps.
"""

import datetime as _dt
import os
import time as _time

_SKEW = float(os.environ.get("TEST_CLOCK_SKEW", "0") or 0)

if _SKEW:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _SKEW
    _time.time_ns = lambda: _real_time_ns() + int(_SKEW * 1e9)

    class _SkewedDateTime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + _dt.timedelta(seconds=_SKEW)

        @classmethod
        def utcnow(cls):
            return super().now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(seconds=_SKEW)

    _dt.datetime = _SkewedDateTime
