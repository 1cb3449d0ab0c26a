"""Celery tasks of billing: thin, taking ids and calling a service."""

from __future__ import annotations

import uuid

from celery import shared_task

from accounts.sweeps import all_parts

# A task that sets time_limit sets soft_time_limit below it too: a soft limit left unset is filled from
# CELERY_TASK_SOFT_TIME_LIMIT, which may exceed this hard limit, and Celery then refuses to send the task
# (beat logs "Couldn't apply scheduled task" and skips it). The soft limit leaves the task time to roll back.


@shared_task(
    name="billing.process_stripe_event", ignore_result=True, acks_late=True, soft_time_limit=100, time_limit=120
)
def process_stripe_event(event_id: str) -> None:
    from billing.stripe_events import process_event

    process_event(event_id)


@shared_task(name="billing.auto_top_up", ignore_result=True, acks_late=True, soft_time_limit=100, time_limit=120)
def auto_top_up(organization_id: str) -> None:
    from billing.topups import auto_top_up as top_up

    top_up(organization_id=uuid.UUID(organization_id))


@shared_task(name="billing.stripe_sweep", ignore_result=True, soft_time_limit=540, time_limit=600)
def stripe_sweep() -> dict[str, int]:
    from billing.stripe_sweep import sweep

    return sweep()


@shared_task(name="billing.issue_statements", ignore_result=True, soft_time_limit=840, time_limit=900)
def issue_statements() -> dict[str, int]:
    from billing.receipts import issue_missing_receipts
    from billing.statements import issue_due_statements

    return all_parts({"statements": issue_due_statements, "receipts": issue_missing_receipts})


@shared_task(name="billing.send_alert_email", ignore_result=True, acks_late=True, soft_time_limit=50, time_limit=60)
def send_alert_email(alert_id: int) -> None:
    from billing.alerts import send_alert_email as send

    send(alert_id)


@shared_task(name="billing.send_due_alert_emails", ignore_result=True, soft_time_limit=100, time_limit=120)
def send_due_alert_emails() -> int:
    from billing.alerts import send_due_alert_emails as sweep

    return sweep()


@shared_task(name="billing.create_partitions_ahead", ignore_result=True, soft_time_limit=100, time_limit=120)
def create_partitions_ahead() -> list[str]:
    from billing.partitions import create_partitions_ahead as create_ahead

    return create_ahead()
