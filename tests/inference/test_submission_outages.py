"""A submission whose database fails under it answers what is true: its job with its request_id when the job was
stored (the COMMIT reached the server, its answer did not), a 503 ``service_unavailable`` with ``Retry-After`` that
says nothing was queued or charged when it was not. A client retrying a 503 never pays twice.

On PostgreSQL the request's own backend is ended at the moment under test (``pg_terminate_backend``, from inside its
own query or right after its COMMIT); on SQLite, where no connection can be killed, the commit raises the
OperationalError SQLite raises for a full disk, at the same seam.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import OperationalError, connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from accounts.models import Organization
from billing import controls
from billing.ledger import grant_credits
from billing.models import Account, Hold
from inference import dispatch, submission
from inference.models import Endpoint, Job, JobStatus
from tests.lifecycle import SMALL
from tests.outages import KILL_MYSELF, commit_lost

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]

on_postgresql = pytest.mark.skipif(
    "connections['default'].vendor != 'postgresql'", reason="SQLite submits in a transaction of Django's"
)


@pytest.fixture
def funded(tenant: dict[str, Any], settings: Any) -> dict[str, Any]:
    settings.JOB_MESSAGE_AHEAD = False  # its message goes after the dispatch, where the test sees it
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="outage test")
    return tenant


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs whose run message went to the broker."""
    sent: list[str] = []
    monkeypatch.setattr(dispatch, "send_run_message", lambda job_id, attempt, queue: sent.append(job_id) or True)
    return sent


def _books(organization: Organization) -> tuple[int, int]:
    return Account.objects.values_list("balance_micros", "held_micros").get(pk=organization.pk)


def _submit(tenant: dict[str, Any], endpoint: Endpoint, **headers: str) -> Any:
    return tenant["client"].post(f"/queue/{endpoint.endpoint_id}", SMALL, format="json", **headers)


@contextmanager
def _one_query_killed(monkeypatch: pytest.MonkeyPatch, *, after_commit: bool) -> Iterator[None]:
    """The submission's one query ends its own backend just before or just after its first COMMIT (the submission's
    transaction): the server has committed it or rolled it back, and the client hears only that the connection
    died."""
    real = statements.in_turn

    def killing(cursor: Any, *sent: Any, **kwargs: Any) -> Any:
        if statements.COMMIT in sent:
            at = sent.index(statements.COMMIT) + (1 if after_commit else 0)
            sent = (*sent[:at], (KILL_MYSELF, ()), *sent[at:])
            monkeypatch.setattr(statements, "in_turn", real)  # once
        return real(cursor, *sent, **kwargs)

    monkeypatch.setattr(statements, "in_turn", killing)
    yield
    monkeypatch.setattr(statements, "in_turn", real)


def _commit_lost(monkeypatch: pytest.MonkeyPatch, organization: Organization, *, after_commit: bool) -> Any:
    """The COMMIT of the transaction that inserted the organization's job, lost before or after it."""
    return commit_lost(
        monkeypatch, lambda: Job.objects.filter(organization=organization).exists(), after_commit=after_commit
    )


def _in_a_transaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every submission through the transaction's path (on SQLite it always is)."""
    monkeypatch.setattr(submission, "_admission_in_query", lambda job: None)


def _assert_accepted(response: Any, organization: Organization, books_before: tuple[int, int]) -> Job:
    assert response.status_code == 200, response.content
    [job] = Job.objects.filter(organization=organization)
    assert response.json()["request_id"] == str(job.pk)
    assert response["x-fal-request-id"] == str(job.pk)
    [hold] = Hold.objects.filter(job=job, released_at=None)
    balance, held = books_before
    assert _books(organization) == (balance, held + hold.amount_micros)
    return job


def _assert_refused_whole(response: Any, organization: Organization, books_before: tuple[int, int]) -> None:
    assert response.status_code == 503, response.content
    assert response["Retry-After"].isdigit()
    body = response.json()
    assert set(body) == {"detail", "error_type"}
    assert body["error_type"] == "service_unavailable"
    assert "nothing was queued or charged" in body["detail"]
    assert not Job.objects.filter(organization=organization).exists()
    assert not Hold.objects.filter(organization_id=organization.pk).exists()
    assert _books(organization) == books_before


@on_postgresql
def test_a_connection_lost_after_the_one_query_s_commit_answers_the_job_and_dispatches_it(
    funded: dict[str, Any], builtin_endpoint: Endpoint, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    organization = funded["organization"]
    before = _books(organization)
    with _one_query_killed(monkeypatch, after_commit=True):
        response = _submit(funded, builtin_endpoint)
    job = _assert_accepted(response, organization, before)
    # Its dispatch (the same query's, after the COMMIT) never ran: the request dispatched it again.
    assert (job.status, messages) == (JobStatus.DISPATCHED, [str(job.pk)])
    # The client got its answer: nothing it could do next makes a second job.
    assert Job.objects.filter(organization=organization).count() == 1


@on_postgresql
def test_a_connection_lost_before_the_one_query_s_commit_answers_503_and_stores_nothing(
    funded: dict[str, Any], builtin_endpoint: Endpoint, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    organization = funded["organization"]
    before = _books(organization)
    with _one_query_killed(monkeypatch, after_commit=False):
        response = _submit(funded, builtin_endpoint)
    _assert_refused_whole(response, organization, before)
    assert messages == []
    # The retry the 503 invites is one job, paid once.
    _assert_accepted(_submit(funded, builtin_endpoint), organization, before)


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
def test_a_connection_lost_at_the_transaction_s_commit_answers_what_was_stored(
    funded: dict[str, Any], builtin_endpoint: Endpoint, messages: list[str], monkeypatch: pytest.MonkeyPatch,
    after_commit: bool,
) -> None:  # fmt: skip
    organization = funded["organization"]
    _in_a_transaction(monkeypatch)
    before = _books(organization)
    with _commit_lost(monkeypatch, organization, after_commit=after_commit):
        response = _submit(funded, builtin_endpoint)
    if not after_commit:
        _assert_refused_whole(response, organization, before)
        assert messages == []
        return
    job = _assert_accepted(response, organization, before)
    # Django dropped its on-commit dispatch with the failed COMMIT: the request dispatched it on the new connection.
    assert (job.status, messages) == (JobStatus.DISPATCHED, [str(job.pk)])


def test_a_database_that_does_not_answer_again_names_the_request_to_look_up(
    funded: dict[str, Any], builtin_endpoint: Endpoint, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    organization = funded["organization"]
    _in_a_transaction(monkeypatch)

    def no_answer(read: Callable[[], Any]) -> Any:
        raise OperationalError("connection refused")

    monkeypatch.setattr(submission, "on_a_new_connection", no_answer)
    with _commit_lost(monkeypatch, organization, after_commit=True):
        response = _submit(funded, builtin_endpoint)
    assert response.status_code == 503, response.content
    assert response["Retry-After"].isdigit()
    body = response.json()
    assert body["error_type"] == "service_unavailable"
    [job] = Job.objects.filter(organization=organization)  # it was stored: the answer could not say, and did not
    assert body["request_id"] == str(job.pk)
    assert "before sending it again" in body["detail"]
    status = funded["client"].get(f"/queue/{builtin_endpoint.endpoint_id}/requests/{job.pk}/status")
    assert status.status_code == 200


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    moments=st.lists(st.sampled_from(["none", "before", "after"]), min_size=1, max_size=4),
    one_query=st.booleans(),
    with_idempotency_key=st.booleans(),
)
def test_every_answer_agrees_with_the_books(
    make_user: Any, make_key: Any, builtin_endpoint: Endpoint, moments: list[str], one_query: bool,
    with_idempotency_key: bool,
) -> None:  # fmt: skip
    """Submissions whose connection dies before their COMMIT, after it or not at all, each retried by the client
    until it is answered 200 (with the same Idempotency-Key or without one): each 200 names a job that exists with
    its hold, no 503 leaves anything behind, and the client pays exactly once per request it sent."""
    from rest_framework.test import APIClient

    one_query = one_query and connections["default"].vendor == "postgresql"
    user = make_user(email=f"outage-{uuid.uuid4().hex[:10]}@example.com")
    organization = Organization.objects.get(memberships__user=user, is_personal=True)
    _, token = make_key(organization, created_by=user)
    grant_credits(organization=organization, amount_micros=100_000_000, reason="outage property")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    if not one_query:
        controls.set_monthly_budget(organization=organization, budget_micros=10**12)  # decided in a transaction
    answered: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(dispatch, "send_run_message", lambda *message: True)
        for number, moment in enumerate(moments):
            headers = {"HTTP_IDEMPOTENCY_KEY": f"request-{number}"} if with_idempotency_key else {}
            for attempt in range(2):
                jobs_before = set(Job.objects.filter(organization=organization).values_list("pk", flat=True))
                if moment == "none" or attempt == 1:
                    response = client.post(f"/queue/{builtin_endpoint.endpoint_id}", SMALL, format="json", **headers)
                elif one_query:
                    with _one_query_killed(monkeypatch, after_commit=moment == "after"):
                        response = client.post(f"/queue/{builtin_endpoint.endpoint_id}", SMALL, format="json",
                                               **headers)  # fmt: skip
                else:
                    with _commit_lost(monkeypatch, organization, after_commit=moment == "after"):
                        response = client.post(f"/queue/{builtin_endpoint.endpoint_id}", SMALL, format="json",
                                               **headers)  # fmt: skip
                jobs_now = set(Job.objects.filter(organization=organization).values_list("pk", flat=True))
                if response.status_code == 503:
                    assert jobs_now == jobs_before, "a 503 left a job behind"
                    continue
                assert response.status_code == 200, response.content
                assert response.json()["request_id"] in {str(pk) for pk in jobs_now - jobs_before}
                answered.append(response.json()["request_id"])
                break
    jobs = Job.objects.filter(organization=organization)
    assert sorted(answered) == sorted(str(pk) for pk in jobs.values_list("pk", flat=True))  # one job per request
    holds = Hold.objects.filter(organization_id=organization.pk, released_at=None)
    assert sorted(str(job_id) for job_id in holds.values_list("job_id", flat=True)) == sorted(answered)
    account = Account.objects.get(pk=organization.pk)
    assert account.held_micros == sum(holds.values_list("amount_micros", flat=True))
