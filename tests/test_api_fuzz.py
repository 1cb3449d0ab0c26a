"""No input reaches a 5xx, and every answer is one the OpenAPI document describes.

schemathesis reads /v1/openapi.json from the app itself and sends each operation a bounded, deterministic set of
generated requests (valid and invalid), in process through the WSGI app, with an admin key of a test organization
and the fake Stripe behind the payment operations; the same suite's hand-made bodies cover fal's queue and sync
APIs (weird JSON types, huge numbers, deep nesting), whose inputs the document leaves open.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, settings
from rest_framework.test import APIClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.serializers import MAX_REQUESTS_PER_MINUTE
from tests.conftest import personal_organization
from tests.stripe_support import PUBLISHABLE_KEY, SECRET_KEY, WEBHOOK_SECRET, FakeStripe, running_fake_stripe

# Generated requests per operation: the whole run takes about a minute on two cores.
EXAMPLES_PER_OPERATION = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", get_wsgi_application())
schema.config.generation.update(max_examples=EXAMPLES_PER_OPERATION, deterministic=True)


@pytest.fixture(scope="module")
def fake_stripe_server() -> Iterator[FakeStripe]:
    with running_fake_stripe() as fake:
        yield fake


@pytest.fixture
def fuzzed_tenant(
    transactional_db: None,
    make_user: Any,
    make_key: Any,
    priced_without_broker: None,
    fake_stripe_server: FakeStripe,
    settings: Any,
) -> dict[str, Any]:
    """An organization with credit, payments on against the fake Stripe, and an admin key whose rate limit
    the run cannot reach (a 429 would only hide what the request would have answered)."""
    settings.STRIPE_SECRET_KEY = f"{SECRET_KEY}_{uuid.uuid4().hex}"
    settings.STRIPE_PUBLISHABLE_KEY = PUBLISHABLE_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = fake_stripe_server.url
    user = make_user()
    organization = personal_organization(user)
    api_key, token = make_key(organization, created_by=user, requests_per_minute=MAX_REQUESTS_PER_MINUTE)
    return {"organization": organization, "api_key": api_key, "token": token}


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented_and_never_5xx(case: Any, fuzzed_tenant: dict[str, Any]) -> None:
    case.call_and_validate(headers={"Authorization": f"Key {fuzzed_tenant['token']}"}, checks=CHECKS)


# fal's queue and sync APIs take any JSON object the endpoint's input schema allows: hand-made bodies.
DEEP = 3000
BODIES = {
    "nan": b'{"prompt": "x", "guidance_scale": NaN}',
    "infinity": b'{"prompt": "x", "guidance_scale": Infinity}',
    "float-overflow": b'{"prompt": "x", "guidance_scale": 1e400}',
    "seed-float-overflow": b'{"prompt": "x", "seed": 1e400}',
    "seed-2^64": b'{"prompt": "x", "seed": 18446744073709551616}',
    "steps-huge": b'{"prompt": "x", "num_inference_steps": 99999999999999999999999999999999}',
    "steps-fraction": b'{"prompt": "x", "num_inference_steps": 4.5}',
    "images-bool": b'{"prompt": "x", "num_images": true}',
    "size-huge": b'{"prompt": "x", "image_size": {"width": 1e308, "height": -1e308}}',
    "size-list": b'{"prompt": "x", "image_size": [512, 512]}',
    "size-unknown": b'{"prompt": "x", "image_size": "enormous"}',
    "prompt-list": b'{"prompt": ["x"]}',
    "prompt-object": b'{"prompt": {"text": "x"}}',
    "prompt-nul": b'{"prompt": "\\u0000"}',
    "prompt-surrogate": b'{"prompt": "\\ud800"}',
    "prompt-long": json.dumps({"prompt": "x" * 1_000_000}).encode(),
    "webhook-number": b'{"prompt": "x", "webhook_url": 5}',
    "webhook-nul": b'{"prompt": "x", "webhook_url": "http://a\\u0000b/"}',
    "extra-nul-key": b'{"prompt": "x", "\\u0000": "\\u0000"}',
    "extra-overflow": b'{"prompt": "x", "extra": 1e400}',
    "extra-deep-list": b'{"prompt": "x", "extra": ' + b"[" * 900 + b"]" * 900 + b"}",
    "extra-deep-object": b'{"prompt": "x", "extra": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}",
    "deep-list": b"[" * DEEP + b"]" * DEEP,
    "deep-object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "string": b'"a lighthouse"',
    "number": b"123",
    "null": b"null",
    "true": b"true",
    "empty-list": b"[]",
    "empty-object": b"{}",
    "huge-integer": b"9" * 5000,
    "truncated": b'{"prompt": ',
    "not-utf8": b'{"prompt": "\xff\xfe"}',
}


@pytest.mark.django_db
@pytest.mark.parametrize("body", list(BODIES.values()), ids=list(BODIES))
def test_the_queue_api_answers_any_body_without_a_5xx(
    tenant: dict[str, Any], builtin_endpoint: Any, priced_without_broker: None, settings: Any, body: bytes
) -> None:
    answers_any_body_without_a_5xx(tenant, settings, "/queue", body)


# Committed: a waiting run reads its request from the shared threads' own connections, as a server's does.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("body", list(BODIES.values()), ids=list(BODIES))
def test_the_sync_api_answers_any_body_without_a_5xx(
    tenant: dict[str, Any], builtin_endpoint: Any, priced_without_broker: None, settings: Any, body: bytes
) -> None:
    answers_any_body_without_a_5xx(tenant, settings, "/run", body)


def answers_any_body_without_a_5xx(tenant: dict[str, Any], settings: Any, api: str, body: bytes) -> None:
    settings.SYNC_RUN_TIMEOUT_SECONDS = 0  # what is accepted is queued: the sync API answers its timeout at once
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    for query in ("", "?fal_webhook=https://93.184.215.14/hook", "?fal_webhook=a&fal_webhook=b"):  # a public IP: no DNS
        response = client.generic("POST", f"{api}/platform/tiny-sd{query}", body, content_type="application/json")
        answer = response.json()
        if api == "/run" and response.status_code == 504:  # accepted, and still queued when the wait ended
            assert answer["error_type"] == "timeout", answer
            assert answer["request_id"], answer
            continue
        assert response.status_code < 500, (query, response.content[:500])
        if response.status_code >= 400:
            assert set(answer) >= {"detail", "error_type"}, answer
        if response.status_code == 422:
            assert isinstance(answer["detail"], list), answer
            assert all(item["loc"][0] in ("body", "query", "header") for item in answer["detail"]), answer
