"""Integrations with third-party packages: leader-elected django-celery-beat schedulers
(:mod:`.django_celery_beat`) and Flask's app context for locked tasks (:mod:`.flask`)."""
