"""Celery tasks of the dashboard: thin, calling a service. Routed to ``default`` (the housekeeping worker)."""

from __future__ import annotations

from celery import shared_task

RESET_TASK = "dashboard.send_password_reset_email"


@shared_task(name=RESET_TASK, ignore_result=True, acks_late=True, soft_time_limit=50, time_limit=60)
def send_password_reset_email(email: str, domain: str, use_https: bool) -> None:
    from dashboard.forms import send_password_reset_email as send

    send(email=email, domain=domain, use_https=use_https)
