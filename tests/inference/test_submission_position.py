"""The queue API's answer to a submission carries the request's queue position, read in the submission's own query on
PostgreSQL (after its dispatch committed), not in a round trip of its own."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts import statements
from accounts.models import ApiKey
from accounts.services import set_concurrency_limit
from billing import pricing
from billing.ledger import grant_credits
from inference.models import Endpoint, Job, JobStatus
from inference.presenters import queue_position
from tests.lifecycle import SMALL

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]


def test_a_submission_answers_its_queue_position_from_its_own_query(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    organization = tenant["organization"]
    # That the endpoint has no measurement yet is kept for a second (billing.pricing.UNMEASURED_RECHECK_SECONDS):
    # kept for the whole test, since a loaded machine may take longer over the four requests (a later one then reads
    # the rollups again, a query of its own).
    monkeypatch.setattr(pricing, "UNMEASURED_RECHECK_SECONDS", 3_600.0)
    grant_credits(organization=organization, amount_micros=100_000_000, reason="position test")
    set_concurrency_limit(organization=organization, limit=2)
    client = Client(headers={"Authorization": f"Key {tenant['token']}"})
    app = f"/queue/{builtin_endpoint.endpoint_id}"
    answers, sent = [], []
    for seed in range(4):
        with CaptureQueriesContext(connection) as queries:
            answer = client.post(app, {**SMALL, "seed": seed}, content_type="application/json")
        assert answer.status_code == 200, answer.content
        answers.append(answer.json())
        sent.append([query["sql"] for query in queries.captured_queries if not statements.is_preparation(query["sql"])])
    jobs = [Job.objects.get(pk=answer["request_id"]) for answer in answers]
    # Two dispatched in turn, then two queued behind the concurrency limit: each answer counted as the job stood.
    assert [job.status for job in jobs] == [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED] * 2
    assert [answer["queue_position"] for answer in answers] == [0, 1, 2, 3]
    assert [answer["queue_position"] for answer in answers] == [queue_position(job) for job in jobs]
    if connection.vendor == "postgresql":
        # The endpoint, its price and that it has no measured GPU time yet were read by the first (kept in this
        # process's memory); the later ones send the submission's one query (the key's lookup aside, where Redis
        # does not keep it).
        key_lookup = f'SELECT "{ApiKey._meta.db_table}".'
        beyond_the_key = [[sql for sql in queries if not sql.startswith(key_lookup)] for queries in sent[1:]]
        assert [len(queries) for queries in beyond_the_key] == [1, 1, 1], beyond_the_key
