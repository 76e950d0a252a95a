"""One endpoint: ask for a customer's report (it runs in a worker, once at a time per customer)."""

from flask import Blueprint

from .tasks import report

bp = Blueprint("reports", __name__)


@bp.post("/reports/<int:customer_id>")
def request_report(customer_id: int) -> dict[str, str]:
    return {"task_id": report.delay(customer_id).id}
