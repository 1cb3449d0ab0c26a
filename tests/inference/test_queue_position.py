"""``queue_position`` (inference/presenters.py) is SQL written once per database vendor; it counts exactly what the ORM
definition kept here counts of the job as stored, for any mix of jobs: statuses, GPU classes, organizations, and ties
on ``dispatched_at`` and ``created_at``."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.models import Endpoint, GpuClass, Job, JobStatus
from inference.presenters import queue_position

pytestmark = pytest.mark.django_db

STATUSES = (JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING, JobStatus.COMPLETED)
CLASSES = (GpuClass.H100, GpuClass.A10G)

# A job: its organization (0 or 1), GPU class, status, and created_at / dispatched_at in milliseconds after a common
# instant. Few distinct instants, so that equal times (the ties) are common.
JOBS = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.sampled_from(CLASSES),
        st.sampled_from(STATUSES),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=12,
)


def orm_queue_position(job: Job) -> int:
    """The definition: the same counts through the ORM, built on each call."""
    waiting_on_class = Job.objects.filter(status=JobStatus.DISPATCHED, gpu_class=job.gpu_class).exclude(pk=job.pk)
    if job.status == JobStatus.DISPATCHED:
        ahead = Q(dispatched_at__lt=job.dispatched_at) | Q(
            dispatched_at=job.dispatched_at, created_at__lt=job.created_at
        )
        return waiting_on_class.filter(ahead).count()
    if job.status == JobStatus.QUEUED:
        ahead_in_tenant = Q(organization_id=job.organization_id, status=JobStatus.QUEUED, created_at__lt=job.created_at)
        waiting = Q(status=JobStatus.DISPATCHED, gpu_class=job.gpu_class)
        return Job.objects.filter(ahead_in_tenant | waiting).exclude(pk=job.pk).count()
    return 0


def test_queue_position_counts_what_the_orm_definition_counts(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organizations = [tenant["organization"], other_tenant["organization"]]
    # Whole milliseconds after an instant on a whole second too: how each database stores a time without a fraction.
    start = timezone.now().replace(microsecond=0)

    @settings(max_examples=30, deadline=None, database=None)
    @given(jobs=JOBS)
    def check(jobs: list[tuple[int, str, str, int, int]]) -> None:
        with transaction.atomic():  # a savepoint of the test's transaction, rolled back after the example
            Job.objects.bulk_create(
                Job(
                    organization=organizations[organization],
                    endpoint=builtin_endpoint,
                    gpu_class=gpu_class,
                    status=status,
                    input={},
                    created_at=start + timedelta(milliseconds=created),
                    dispatched_at=None if status == JobStatus.QUEUED else start + timedelta(milliseconds=dispatched),
                )
                for organization, gpu_class, status, created, dispatched in jobs
            )
            for job in Job.objects.all():
                assert queue_position(job) == orm_queue_position(job), job
                # A job read as waiting that the dispatcher has sent on, or a worker started, since: counted as the
                # database has it now.
                as_read = copy.copy(job)
                as_read.status, as_read.dispatched_at = JobStatus.QUEUED, None
                assert queue_position(as_read) == orm_queue_position(job), job
            transaction.set_rollback(True)

    check()
