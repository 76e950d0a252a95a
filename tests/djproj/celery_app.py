"""The Django-configured Celery app: settings come from django.conf with the CELERY namespace."""

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproj.settings")
django.setup()

app = Celery("djproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
