"""The Celery app, configured the Django way: every ``CELERY_*`` setting of settings.py.

celery -A proj worker -l INFO
celery -A proj beat -S celery_consul_lock.contrib.django_celery_beat:LeaderDatabaseScheduler -l INFO
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
