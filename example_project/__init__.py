"""Example project: the lock demo (``make demo``); the Django and Flask examples come later."""
