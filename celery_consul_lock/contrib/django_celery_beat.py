"""django-celery-beat's DatabaseScheduler behind the Consul leader election.

    celery -A proj beat -S celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler

Only the leader reads the schedule from the database, writes it back (``last_run_at``,
``total_run_count``, and the entries it installs from ``beat_schedule``) and sends; standbys
touch neither the database nor the broker. The database is the shared state, so a new leader
continues from what the old one saved.

Two differences from a plain DatabaseScheduler, both so that a tick is not sent twice:

- it saves an entry right after each send, not every few seconds (django-celery-beat's
  ``sync_every``), so a new leader does not resend a tick the old one sent in its last
  seconds; the window left is the leader dying between a send and its save (milliseconds),
  and such a copy carries the same tick id, which ConsulLockedTask runs once;
- on election it takes in the change its own set-up made to the schedule before the first
  send (see :meth:`LeaderDatabaseScheduler.on_elected`).

Its leader's sweep removes the tick marks of entries deleted from the database (see
:mod:`celery_consul_lock.reap`); a disabled entry (a one-off entry after its run) keeps its mark.

Install with ``pip install celery-consul-lock[django]``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import DatabaseError, connections
from django_celery_beat.schedulers import DatabaseScheduler

from ..beat import leader_elected
from ..internals import check_django_celery_beat

__all__ = ["LeaderDatabaseScheduler"]

log = logging.getLogger("celery_consul_lock.beat")


class LeaderDatabaseScheduler(leader_elected(DatabaseScheduler)):  # type: ignore[misc]
    """DatabaseScheduler, leader-elected, saving each entry as soon as it is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_django_celery_beat()  # loud at start if django-celery-beat changed what on_elected clears
        super().__init__(*args, **kwargs)

    def on_elected(self) -> None:
        """Setting up the schedule saves its entries, which DatabaseScheduler sees as a
        change at its next read, made while the first heap is built. It then reloads the
        entries and marks the heap stale, and the following tick rebuilds the heap from the
        reloaded entries. Their ``last_run_at`` is older than the send just made, so that
        tick is sent a second time. Reading the change now, before the heap exists, avoids
        this. Here the rebuild is not needed: ``tick`` builds the heap afresh after
        election."""
        self.schedule  # noqa: B018 -- the property reads (and syncs) a changed schedule
        self._heap_invalidated = False

    def after_send(self, entry: Any) -> None:
        self.sync()

    def entry_names(self) -> list[str] | None:
        """Every periodic task's name in the database, disabled ones too; None when the
        database cannot be read. Called in the sweeper's thread, which uses a database
        connection of its own (Django's are per thread), closed after the read."""
        try:
            return list(self.Model.objects.values_list("name", flat=True))
        except DatabaseError as exc:
            log.warning("beat: could not read the periodic tasks' names (their removed entries' marks stay): %s", exc)
            return None
        finally:
            connections.close_all()
