"""Celery tasks: thin, taking ids and calling a service (HackSoft styleguide)."""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

from inference import file_tasks, webhook_tasks  # noqa: F401  (their tasks register with Celery)


# run_job takes both limits from CELERY_TASK_TIME_LIMIT / CELERY_TASK_SOFT_TIME_LIMIT: they are a GPU job's deadline.
# The scheduled tasks below set their own pair, so tuning that deadline never leaves beat a soft limit above a hard one.
@shared_task(name="inference.run_job", ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str, attempt: int, ahead: float | bool = False) -> None:
    from inference.worker import execute

    execute(job_id, attempt, ahead=ahead)


@shared_task(name="inference.sweep", ignore_result=True, soft_time_limit=240, time_limit=300)
def sweep() -> dict[str, int]:
    from inference.sweep import sweep as run_sweep

    return run_sweep()


@shared_task(name="inference.sync_models", ignore_result=True, soft_time_limit=240, time_limit=300)
def sync_models() -> Any:
    from inference.registry import sync_local_models

    return sync_local_models()


@worker_ready.connect
def register_local_models(**_: Any) -> None:
    """A worker that starts makes the model folders it can see servable at once."""
    from inference.registry import sync_local_models

    sync_local_models()


@shared_task(name="inference.probe")
def probe() -> float:
    """Does nothing but tell when it ran: a bare Celery round trip, the queue benchmark's baseline."""
    return time.time()
