"""Every column of a job is declared in inference/transitions.py, so no move of the lifecycle can forget one."""

from __future__ import annotations

import pytest

from inference import transitions
from inference.models import Job, JobStatus


def test_every_column_of_a_job_belongs_to_exactly_one_group() -> None:
    groups = {
        "REQUEST": set(transitions.REQUEST),
        "COUNTERS": set(transitions.COUNTERS),
        "LEASE": set(transitions.LEASE),
        "DISPATCH": set(transitions.DISPATCH),
        "PROGRESS": set(transitions.PROGRESS),
        "RUN": set(transitions.RUN),
        "OUTCOME": set(transitions.OUTCOME),
        "ARCHIVE": set(transitions.ARCHIVE),
        "status": {"status"},
    }
    columns = {field.name for field in Job._meta.concrete_fields}
    declared = [name for group in groups.values() for name in group]
    assert sorted(declared) == sorted(set(declared)), "a column is in two groups"
    assert set(declared) == columns, {"undeclared": columns - set(declared), "not columns": set(declared) - columns}


def test_a_requeue_clears_everything_a_run_wrote_and_keeps_the_request_and_counters() -> None:
    requeued = transitions.requeued()
    written_by_a_run = columns_of("LEASE", "DISPATCH", "PROGRESS", "RUN", "OUTCOME")
    assert set(requeued) == written_by_a_run | {"status"}
    assert requeued["status"] == JobStatus.QUEUED
    assert not set(requeued) & (transitions.REQUEST | transitions.COUNTERS)


def test_a_retry_keeps_the_run_and_clears_only_the_attempt_in_flight() -> None:
    retried = transitions.retried()
    assert set(retried) == columns_of("LEASE", "DISPATCH") | {"status"}
    assert retried["status"] == JobStatus.QUEUED


def test_every_end_writes_the_whole_outcome_and_releases_the_worker() -> None:
    ending = transitions.ended(JobStatus.FAILED, error="Boom.", error_type="internal_error")
    assert set(ending) == columns_of("LEASE", "OUTCOME") | {"status"}
    assert (ending["error"], ending["result"], ending["gpu_ms"]) == ("Boom.", None, 0)
    with pytest.raises(TypeError, match="started_at"):
        transitions.ended(JobStatus.FAILED, started_at=None)


def columns_of(*groups: str) -> set[str]:
    return {name for group in groups for name in getattr(transitions, group)}
