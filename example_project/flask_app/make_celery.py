"""The Celery app of the Flask application (``celery -A make_celery ...``), as in Flask's docs."""

from backup_app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
