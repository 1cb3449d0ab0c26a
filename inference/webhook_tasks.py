"""Celery tasks for customer webhooks: thin, ids in, the work is in ``inference.webhooks``."""

from __future__ import annotations

from celery import shared_task

from inference import webhooks


@shared_task(name="inference.deliver_webhook", ignore_result=True, soft_time_limit=120, time_limit=150)
def deliver_webhook(delivery_id: int) -> bool:
    """The first try of a delivery, queued on commit of the request's final state."""
    return webhooks.deliver(delivery_id)


@shared_task(name="inference.deliver_due_webhooks", ignore_result=True, soft_time_limit=240, time_limit=300)
def deliver_due_webhooks() -> int:
    """Retries that are due, and first tries the broker lost (beat, every few seconds)."""
    return webhooks.deliver_due_webhooks(budget_seconds=150)
