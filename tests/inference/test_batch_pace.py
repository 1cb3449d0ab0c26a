"""A job waits for company only while requests reach its worker faster than the worker runs them; a job whose claim
saw another dispatched takes it along without waiting; a job of a quiet endpoint does not even look."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference import attempts, worker
from inference.batch_pace import ArrivalPace
from inference.engine import GenerationRequest, OptimizationProfile

START = datetime(2026, 12, 6, tzinfo=UTC)


def _arrivals(pace: ArrivalPace, gaps_ms: list[float], *, endpoint: int = 1) -> None:
    at = START
    pace.arrived(endpoint, at)
    for gap in gaps_ms:
        at += timedelta(milliseconds=gap)
        pace.arrived(endpoint, at)


def test_nothing_known_waits_as_the_profile_says() -> None:
    pace = ArrivalPace()
    assert pace.company_expected(1)
    pace.arrived(1, START)
    assert pace.company_expected(1)  # one arrival: no gap yet
    pace.ran(1, 50)
    assert pace.company_expected(1)  # a call's time but still no gap
    pace.arrived(1, START + timedelta(milliseconds=10))
    assert pace.company_expected(1)  # 10 ms apart, calls of 50 ms


def test_one_request_after_another_stops_waiting_and_a_burst_starts_again() -> None:
    pace = ArrivalPace()
    pace.ran(1, 60)
    _arrivals(pace, [90, 85, 95])  # a client waiting for each result before the next: always further apart
    assert not pace.company_expected(1)
    _arrivals(pace, [1, 1, 1])  # a burst (its first gap is from START again: behind, counted as 0)
    assert pace.company_expected(1)
    later = START + timedelta(seconds=30)
    pace.arrived(1, later)  # half a minute of quiet: one gap says so
    assert not pace.company_expected(1)
    assert pace.company_expected(2)  # another endpoint: nothing known


def test_an_hour_of_quiet_weighs_no_more_than_a_few_calls() -> None:
    pace = ArrivalPace()
    pace.ran(1, 3000)
    _arrivals(pace, [10] * 5)
    assert pace.company_expected(1)
    at = START + timedelta(milliseconds=50)
    for _ in range(10):  # ten hours, a request an hour
        at += timedelta(hours=1)
        pace.arrived(1, at)
    assert not pace.company_expected(1)
    for count in range(1, 4):
        pace.arrived(1, at + timedelta(milliseconds=10 * count))
        assert not pace.company_expected(1)
    pace.arrived(1, at + timedelta(milliseconds=40))
    assert pace.company_expected(1)  # the fourth request of a burst: waits start again


def test_requests_taken_out_of_order_mean_the_worker_is_behind() -> None:
    pace = ArrivalPace()
    pace.ran(1, 50)
    _arrivals(pace, [100])
    assert not pace.company_expected(1)
    for _ in range(5):
        pace.arrived(1, START)  # older than the latest taken: they waited behind it
    assert pace.company_expected(1)


@given(
    gaps=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=30),
    calls=st.lists(st.floats(min_value=0.1, max_value=10_000), min_size=1, max_size=30),
)
def test_the_means_stay_between_what_was_seen(gaps: list[int], calls: list[float]) -> None:
    pace = ArrivalPace()
    _arrivals(pace, gaps)
    for call in calls:
        pace.ran(1, call)
    kept = pace._paces[1]
    assert kept.gap_ms is not None
    assert kept.call_ms is not None
    assert min(gaps) - 1e-6 <= kept.gap_ms <= max(gaps) + 1e-6
    assert min(calls) - 1e-6 <= kept.call_ms <= max(calls) + 1e-6
    if max(gaps) < min(calls):
        assert pace.company_expected(1)
    if min(gaps) > max(calls):
        assert not pace.company_expected(1)


class _Clock:
    """``time`` for the worker's wait: a millisecond passes at each sleep, none otherwise."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When (on the fake clock) the worker looked for company: none is ever found."""
    clock = _Clock()
    seen: list[float] = []

    def look(**_: Any) -> list[Any]:
        seen.append(clock.now)
        return []

    monkeypatch.setattr(worker, "time", clock)
    monkeypatch.setattr(attempts, "claim_batch_companions", look)
    monkeypatch.setattr(worker, "_pace", ArrivalPace())
    return seen


def _gather(*, company_waiting: bool, wait_ms: int = 20) -> list[Any]:
    """``gather_companions`` for a job of endpoint 7 whose claim saw (or did not see) another job dispatched."""
    job = SimpleNamespace(endpoint_id=7, company_waiting=company_waiting)
    request = GenerationRequest(prompts=["a lighthouse"], seeds=[1], width=64, height=64, num_inference_steps=2)
    return worker.gather_companions(job, request, OptimizationProfile(batch_wait_ms=wait_ms))  # type: ignore[arg-type]


def test_a_busy_endpoint_waits_for_company_up_to_the_profile(looks: list[float]) -> None:
    worker._pace.ran(7, 50)
    _arrivals(worker._pace, [2, 3, 1], endpoint=7)
    assert _gather(company_waiting=False) == []
    assert len(looks) > 1
    assert looks[-1] == pytest.approx(0.02)  # the last look at the end of the 20 ms


def test_a_quiet_endpoint_takes_what_waits_without_waiting_and_looks_for_nothing_else(looks: list[float]) -> None:
    worker._pace.ran(7, 50)
    _arrivals(worker._pace, [400, 300], endpoint=7)
    assert _gather(company_waiting=True) == []
    assert looks == [0.0]  # one look, at once
    looks.clear()
    assert _gather(company_waiting=False) == []
    assert looks == []  # nothing was dispatched at the claim, and nothing is expected


def test_a_request_arrives_when_it_is_dispatched_not_when_it_was_made() -> None:
    made = START
    backlog = [SimpleNamespace(created_at=made, dispatched_at=made + timedelta(seconds=n)) for n in range(4)]
    assert [worker.arrival(job) for job in backlog] == [job.dispatched_at for job in backlog]  # type: ignore[arg-type]
    never_dispatched = SimpleNamespace(created_at=made, dispatched_at=None)
    assert worker.arrival(never_dispatched) == made  # type: ignore[arg-type]
