"""Settings of the example site: Django, Celery (``CELERY_*``) and celery-consul-lock
(``CELERY_CONSUL_LOCK_*``). Addresses come from the environment: REDIS_URL (broker and
results) and CONSUL_HTTP_ADDR (the local Consul agent, read by celery-consul-lock itself).
"""

import os
from pathlib import Path

from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = ["django_celery_beat", "backups"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", BASE_DIR / "db.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

# Celery
CELERY_BROKER_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The leader writes the schedule to the database after every send (django-celery-beat's
# default is every 3 minutes), so a new leader continues from the last send.
CELERY_BEAT_SYNC_EVERY = 1
# Installed into the database by the beat leader (django-celery-beat's DatabaseScheduler).
CELERY_BEAT_SCHEDULE = {
    "nightly-backup": {"task": "backups.tasks.nightly_backup", "schedule": crontab(hour=3, minute=0)},
    "report-customer-42": {"task": "backups.tasks.report", "schedule": crontab(hour=6, minute=0), "args": (42,)},
    "heartbeat": {"task": "backups.tasks.heartbeat", "schedule": 2.0},
}

# celery-consul-lock (the agent's address: CONSUL_HTTP_ADDR, default 127.0.0.1:8500)
CELERY_CONSUL_LOCK_KEY_PREFIX = os.environ.get("CONSUL_LOCK_KEY_PREFIX", "backups/")
CELERY_CONSUL_LOCK_TTL = 15
CELERY_CONSUL_LOCK_LOCK_DELAY = 5
