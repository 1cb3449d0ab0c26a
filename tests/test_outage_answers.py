"""A database or broker that fails under a request is answered 503 ``{detail, error_type: "service_unavailable"}``
with ``Retry-After`` on the API and a page saying so on the dashboard, logged with its cause, never a traceback; and
the writes whose answer a client acts on (a cancel, a new key) answer what their database holds when their
connection dies after the COMMIT. The submission's own cases: tests/inference/test_submission_outages.py."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
from django.db import OperationalError, connection
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiKey
from billing.ledger import grant_credits
from billing.models import Account, Hold
from inference import api as inference_api
from inference.models import Endpoint, Job, JobStatus
from tests.lifecycle import SMALL, submit_as
from tests.outages import commit_lost, queries_fail

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]

APP = "platform/tiny-sd"
TRACES = ("Traceback", "OperationalError", 'File "', "disk is full", "5432")


def assert_unavailable(response: Any) -> dict[str, Any]:
    assert response.status_code == 503, response.content
    assert response["Content-Type"].startswith("application/json")
    assert int(response["Retry-After"]) > 0
    body: dict[str, Any] = response.json()
    assert body["error_type"] == "service_unavailable"
    assert body["detail"]
    assert not any(trace in response.content.decode() for trace in TRACES)
    return body


def logged_with_cause(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        record.levelno >= logging.ERROR and record.exc_info and isinstance(record.exc_info[1], OperationalError)
        for record in caplog.records
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/me"),
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/billing/balance"),
        ("GET", "/v1/requests"),
        ("POST", f"/queue/{APP}"),
        ("GET", f"/queue/{APP}/requests/{uuid.UUID(int=7)}/status"),
        ("PUT", f"/queue/{APP}/requests/{uuid.UUID(int=7)}/cancel"),
        ("POST", f"/run/{APP}"),
    ],
)
def test_an_api_request_whose_database_is_gone_answers_503_json(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    body = {"name": "k", "scopes": ["inference"]} if path == "/v1/keys" else SMALL
    with caplog.at_level(logging.ERROR), queries_fail():
        response = client.generic(method, path, _json(body), content_type="application/json")
    assert_unavailable(response)
    assert logged_with_cause(caplog)


def _json(body: Any) -> str:
    import json

    return json.dumps(body)


def test_a_dashboard_page_whose_database_is_gone_answers_a_503_page(
    tenant: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(raise_request_exception=False)
    client.force_login(tenant["user"])
    with caplog.at_level(logging.ERROR), queries_fail():
        response = client.get("/dashboard/")
    assert response.status_code == 503
    assert response["Content-Type"].startswith("text/html")
    assert int(response["Retry-After"]) > 0
    page = response.content.decode()
    assert "temporarily unavailable" in page
    assert not any(trace in page for trace in TRACES)
    assert logged_with_cause(caplog)
    assert client.get("/dashboard/").status_code == 200  # back once the database is


def test_an_unknown_error_is_still_500(tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(inference_api, "find_job", broken)
    response = tenant["client"].get(f"/queue/{APP}/requests/{uuid.uuid4()}/status")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error.", "error_type": "internal_error"}


def test_a_sync_run_whose_database_fails_while_it_waits_names_its_request(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="sync outage")

    def gone(job_id: Any) -> Any:
        raise OperationalError("the connection is lost")

    monkeypatch.setattr(inference_api, "_load_job", gone)
    response = tenant["client"].post(f"/run/{APP}", SMALL, format="json")
    body = assert_unavailable(response)
    [job] = Job.objects.filter(organization=tenant["organization"])
    assert body["request_id"] == response["x-fal-request-id"] == str(job.pk)  # accepted: never to be sent again
    assert body["response_url"].endswith(f"/requests/{job.pk}")
    assert "Do not send it again" in body["detail"]
    assert not job.is_final  # it goes on


def _cancelled(job: Job) -> bool:
    return Job.objects.filter(pk=job.pk, cancel_requested_at__isnull=False).exists()


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
def test_a_cancel_whose_connection_dies_at_its_commit_answers_as_a_retry_will(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, after_commit: bool
) -> None:
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="cancel outage")
    job = submit_as(tenant, builtin_endpoint)
    before = Account.objects.values_list("balance_micros", flat=True).get(pk=organization.pk)
    url = f"/queue/{APP}/requests/{job.pk}/cancel"
    with commit_lost(monkeypatch, lambda: _cancelled(job), after_commit=after_commit):
        first = tenant["client"].put(url)
    assert (first.status_code, first.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    again = tenant["client"].put(url)  # the client's retry, as if the first answer had been lost
    assert (again.status_code, again.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert not Hold.objects.filter(job=job, released_at=None).exists()
    account = Account.objects.get(pk=organization.pk)
    assert (account.balance_micros, account.held_micros) == (before, 0)  # never billed


def test_a_cancel_of_a_request_that_ended_uncancelled_is_already_completed(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    from tests.lifecycle import run_as

    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="done")
    job = run_as(tenant, builtin_endpoint)
    response = tenant["client"].put(f"/queue/{APP}/requests/{job.pk}/cancel")
    assert (response.status_code, response.json()) == (400, {"status": "ALREADY_COMPLETED"})


def _key_named(name: str) -> Any:
    return lambda: ApiKey.objects.filter(name=name).exists()


def test_a_key_made_before_its_connection_died_is_answered_with_its_token(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with commit_lost(monkeypatch, _key_named("lost answer"), after_commit=True):
        response = tenant["client"].post("/v1/keys", {"name": "lost answer", "scopes": ["inference"]}, format="json")
    assert response.status_code == 201, response.content
    [key] = ApiKey.objects.filter(name="lost answer")
    token = response.json()["key"]
    assert token.startswith(f"{key.id}:")
    maker = APIClient()
    maker.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    assert maker.get(f"/queue/{APP}/requests/{uuid.uuid4()}/status").status_code == 404  # the key works


def test_a_key_whose_commit_never_happened_is_503_and_not_made(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with commit_lost(monkeypatch, _key_named("never made"), after_commit=False):
        response = tenant["client"].post("/v1/keys", {"name": "never made", "scopes": ["inference"]}, format="json")
    body = assert_unavailable(response)
    assert "no key was made" in body["detail"]
    assert not ApiKey.objects.filter(name="never made").exists()
    assert connection.vendor  # the connection answers again for the next request
    assert tenant["client"].get("/v1/keys").status_code == 200
