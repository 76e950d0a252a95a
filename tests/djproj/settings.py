"""Minimal Django settings for the django-celery-beat test (SQLite file from the environment)."""

import os

SECRET_KEY = "test-only"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ.get("TEST_SQLITE", "/tmp/djproj.sqlite3")}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CELERY_BROKER_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = CELERY_BROKER_URL
CELERY_CONSUL_LOCK_LOCK_DELAY = 2
CELERY_CONSUL_LOCK_BEAT_NAME = os.environ.get("TEST_BEAT_NAME", "djproj")
CELERY_BEAT_SCHEDULE = {"heartbeat": {"task": "proj.heartbeat", "schedule": 1.0}}
for _name in ("KEY_PREFIX", "REAP_AFTER", "BEAT_REAP_INTERVAL"):  # a test's own part of the KV store, its delays
    if os.environ.get(f"TEST_CONSUL_LOCK_{_name}"):
        globals()[f"CELERY_CONSUL_LOCK_{_name}"] = os.environ[f"TEST_CONSUL_LOCK_{_name}"]
