"""Ready-made leader-elected versions of third-party schedulers."""
