"""django-celery-beat's DatabaseScheduler behind the Consul leader election.

    celery -A proj beat -S celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler

Only the leader reads the schedule from the database, writes it back (``last_run_at``,
``total_run_count``, and the entries it installs from ``beat_schedule``) and sends; standbys
touch neither the database nor the broker. The database is the shared state, so a new leader
continues from what the old one saved; django-celery-beat saves every few seconds (its
``sync_every``), not after each send, so a tick sent in the last seconds before a crash can be
sent again by the new leader — with the same tick id, which ConsulLockedTask runs once.
Install with ``pip install celery-consul-lock[django]``.
"""

from __future__ import annotations

from django_celery_beat.schedulers import DatabaseScheduler

from ..beat import leader_elected

__all__ = ["LeaderDatabaseScheduler"]

LeaderDatabaseScheduler = leader_elected(DatabaseScheduler)
