"""The nightly reconciliation (``billing.reconcile``, scheduled in settings' CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

# A full pass scans raw usage once; give it longer than the default task limit on a large ledger.
RECONCILE_TIME_LIMIT_SECONDS = 3600  # settings.LONGEST_OWN_TASK_LIMIT_SECONDS: the broker outlasts it


@shared_task(
    name="billing.reconcile",
    ignore_result=True,
    time_limit=RECONCILE_TIME_LIMIT_SECONDS,
    soft_time_limit=RECONCILE_TIME_LIMIT_SECONDS - 60,
)
def reconcile(full: bool = False) -> dict[str, Any]:
    """What was written since the last proven run; every row with ``full`` (the weekly run)."""
    from billing.reconciliation import run_reconciliation

    run = run_reconciliation(full=full)
    return {"run": run.pk, "scope": run.scope, "ok": run.ok, "drift": sum(item["count"] for item in run.drift)}
