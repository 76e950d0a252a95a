"""The site's periodic tasks; each run holds a Consul lock, so a copy elsewhere skips."""

import logging
import time

from celery import shared_task

from celery_consul_lock import ConsulLockedTask
from example_project.records import record_run

log = logging.getLogger(__name__)


@shared_task(bind=True, base=ConsulLockedTask)
def nightly_backup(self):
    """One backup at a time cluster-wide (lock ``<prefix>locks/backups.tasks.nightly_backup/.lock``)."""
    log.info("backing up, fencing token %s", self.fencing_token)
    time.sleep(1)  # the backup


@shared_task(bind=True, base=ConsulLockedTask, lock_key="locks/report-{customer_id}/.lock", lock_on_held="wait")
def report(self, customer_id):
    """One report per customer at a time; reports of different customers run side by side."""
    self.check_lock()  # raises LockLost if the lock is gone
    log.info("report for customer %s, fencing token %s", customer_id, self.fencing_token)


@shared_task(bind=True, base=ConsulLockedTask)
def heartbeat(self):
    """Every 2 s: records which beat sent the tick and which worker ran it (for `make demo`)."""
    record_run(self)
