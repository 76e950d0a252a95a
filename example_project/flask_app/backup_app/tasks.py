"""The app's periodic tasks; each run holds a Consul lock, inside the Flask app context."""

import logging
import time

from celery import shared_task
from flask import current_app

from celery_consul_lock import LockedFlaskTask
from example_project.records import record_run

log = logging.getLogger(__name__)


@shared_task(bind=True, base=LockedFlaskTask)
def nightly_backup(self):
    """One backup at a time cluster-wide (lock ``<prefix>locks/backup_app.tasks.nightly_backup/.lock``)."""
    log.info("backing up %s, fencing token %s", current_app.name, self.fencing_token)
    time.sleep(1)  # the backup


@shared_task(bind=True, base=LockedFlaskTask, lock_key="locks/report-{customer_id}/.lock", lock_on_held="wait")
def report(self, customer_id):
    """One report per customer at a time; reports of different customers run side by side."""
    self.check_lock()  # raises LockLost if the lock is gone
    log.info("report for customer %s, fencing token %s", customer_id, self.fencing_token)


@shared_task(bind=True, base=LockedFlaskTask)
def heartbeat(self):
    """Every 2 s: records which beat sent the tick and which worker ran it (for `make demo`),
    and the name of the Flask app whose context the run had."""
    record_run(self, app=current_app.name)
