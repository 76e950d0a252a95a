"""The Django app whose periodic tasks run once across the cluster."""
