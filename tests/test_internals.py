"""The guards around the private parts of Celery and django-celery-beat we rely on
(celery_consul_lock.internals): the installed releases pass them, and a change fails loudly.

`make test-matrix` runs this file against the oldest and newest releases we claim.
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import subprocess
import sys

import pytest
from celery import Celery
from celery.beat import Scheduler

from celery_consul_lock import InternalsChanged
from celery_consul_lock.internals import TESTED, check_celery_scheduler, check_heap_rebuilt, require_names

from .servers import ROOT


def test_the_installed_celery_passes_the_check_and_rebuilds_a_heap_set_to_none():
    check_celery_scheduler()
    # What the leader-elected beat relies on, done by the real Scheduler: _heap = None makes
    # the next tick rebuild the heap.
    app = Celery("internals", broker="memory://", set_as_current=False)
    scheduler = Scheduler(app, lazy=True)
    scheduler._heap = None
    scheduler.tick()
    assert scheduler._heap is not None
    check_heap_rebuilt(scheduler)


def test_the_installed_django_celery_beat_passes_the_check():
    # django-celery-beat's models need a configured Django: check in a process of its own.
    code = "import django; django.setup(); from celery_consul_lock.internals import check_django_celery_beat as c; c()"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.djproj.settings"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_function_that_no_longer_uses_a_name_is_refused_naming_the_package_version_and_tested_releases():
    def tick(self):  # a Celery whose tick keeps its heap elsewhere
        return self._events

    with pytest.raises(InternalsChanged) as caught:
        require_names("celery", tick, ("_heap", "populate_heap"), "the beat rebuilds the heap")
    error = caught.value
    assert error.names == ("_heap", "populate_heap")
    text = str(error)
    assert f"celery {importlib.metadata.version('celery')} changed an internal" in text
    assert "test_internals." in text and "tick no longer uses _heap, populate_heap" in text
    assert f"tested with celery {TESTED['celery']}" in text
    assert str(pickle.loads(pickle.dumps(error))) == text  # Celery pickles errors


def test_a_tick_that_left_the_heap_unbuilt_is_refused():
    class Unbuilt:
        _heap = None

    with pytest.raises(InternalsChanged, match=r"celery\.beat\.Scheduler\.tick no longer uses _heap"):
        check_heap_rebuilt(Unbuilt())
