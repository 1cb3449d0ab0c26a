"""One error contract: ``{detail, error_type}``; every 422's ``detail`` a list of ``{loc, msg, type}`` whose ``loc``
starts where the value came from; inputs bounded at the edge, so none reaches a 5xx; every status documented.

Each case is one that fuzzing found answering a 500, a string 422, a wrong location or a 200.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiKey, Scope
from inference.models import AttemptOutcome, Endpoint
from tests.lifecycle import finish, start, submit_as

pytestmark = pytest.mark.django_db


def problems(response: Any, status: int = 422) -> list[dict[str, Any]]:
    """The located problems of a 422 (or another status's, when it has a list)."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) >= {"detail", "error_type"}, body
    assert isinstance(body["detail"], list), body
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type"}, item
        assert item["loc"][0] in ("body", "query", "path", "header"), item
        assert item["msg"], item
        assert item["type"], item
    detail: list[dict[str, Any]] = body["detail"]
    return detail


def locations(response: Any) -> list[list[Any]]:
    return [item["loc"] for item in problems(response)]


# Integers and dates are bounded at the edge.


@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("end=0001-01-01", ["query", "end"]),
        ("end=9999-12-31", ["query", "end"]),
        ("start=0001-01-01", ["query", "start"]),
        ("start=9999-12-31&end=9999-12-31", ["query", "start"]),
        ("end=1999-12-31", ["query", "end"]),
        ("end=2101-01-01", ["query", "end"]),
    ],
)
def test_usage_dates_outside_the_supported_range_are_422_in_the_query(
    tenant: dict[str, Any], query: str, location: list[str]
) -> None:
    assert location in locations(tenant["client"].get(f"/v1/usage?{query}"))


@pytest.mark.parametrize(
    ("payload", "location"),
    [
        ({"name": "k", "requests_per_minute": 2**63}, ["body", "requests_per_minute"]),
        ({"name": "k", "requests_per_minute": 2**31}, ["body", "requests_per_minute"]),
        ({"name": "k", "requests_per_minute": 10**1000}, ["body", "requests_per_minute"]),
        ({"name": "k", "requests_per_minute": "60"}, ["body", "requests_per_minute"]),
        ({"name": "k", "requests_per_minute": True}, ["body", "requests_per_minute"]),
        ({"name": "k", "expires_at": "9999-12-31T23:59:59Z"}, ["body", "expires_at"]),
        ({"name": "k", "expires_at": "9999-12-31T23:59:59-12:00"}, ["body", "expires_at"]),
        ({"name": 5}, ["body", "name"]),
        ({"name": 5.5}, ["body", "name"]),
        ({"name": True}, ["body", "name"]),
        ({"name": {"first": "k"}}, ["body", "name"]),
    ],
)
def test_key_creation_bounds_numbers_and_dates_and_takes_only_strings_as_names(
    tenant: dict[str, Any], payload: dict[str, Any], location: list[str]
) -> None:
    before = ApiKey.objects.count()
    assert locations(tenant["client"].post("/v1/keys", payload, format="json")) == [location]
    assert ApiKey.objects.count() == before


def test_the_largest_rate_a_key_may_have_is_accepted(tenant: dict[str, Any]) -> None:
    from accounts.serializers import MAX_REQUESTS_PER_MINUTE

    response = tenant["client"].post(
        "/v1/keys", {"name": "fast", "requests_per_minute": MAX_REQUESTS_PER_MINUTE}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["rate_limit_per_minute"] == MAX_REQUESTS_PER_MINUTE


@pytest.mark.parametrize(
    ("path", "payload", "location"),
    [
        ("/v1/billing/limits", {"monthly_budget_micros": 2**63}, ["body", "monthly_budget_micros"]),
        ("/v1/billing/limits", {"monthly_budget_micros": "5"}, ["body", "monthly_budget_micros"]),
        ("/v1/billing/top-up", {"enabled": False, "threshold_micros": 2**63}, ["body", "threshold_micros"]),
        ("/v1/billing/top-up", {"enabled": "yes"}, ["body", "enabled"]),
    ],
)
def test_money_settings_are_bounded(
    tenant: dict[str, Any], path: str, payload: dict[str, Any], location: list[str]
) -> None:
    assert locations(tenant["client"].put(path, payload, format="json")) == [location]


def test_a_key_limit_over_a_64_bit_column_is_422(tenant: dict[str, Any]) -> None:
    payload = {"keys": [{"key_id": str(tenant["api_key"].id), "monthly_limit_micros": 2**63}]}
    response = tenant["client"].put("/v1/billing/limits", payload, format="json")
    assert locations(response) == [["body", "keys", 0, "monthly_limit_micros"]]


# Query parameters: located in the query, given once, well-formed.


@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("group_by=bogus", ["query", "group_by"]),
        ("start=2025-02-01&end=2025-01-01", ["query", "start"]),
        ("key_id=not-a-uuid", ["query", "key_id"]),
        ("format=xml", ["query", "format"]),
        ("start=", ["query", "start"]),
        ("end=yesterday", ["query", "end"]),
        ("group_by=day&group_by=key", ["query", "group_by"]),
        ("end=2025-01-01&end=2025-02-01", ["query", "end"]),
    ],
)
def test_usage_query_errors_name_the_query(tenant: dict[str, Any], query: str, location: list[str]) -> None:
    assert locations(tenant["client"].get(f"/v1/usage?{query}")) == [location]


@pytest.mark.parametrize("path", ["/v1/keys", "/v1/billing/ledger", "/v1/billing/purchases", "/v1/requests"])
@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("limit=null&limit=null", ["query", "limit"]),
        ("limit=null", ["query", "limit"]),
        ("limit=", ["query", "limit"]),
        ("limit=0", ["query", "limit"]),
        ("limit=-1", ["query", "limit"]),
        ("limit=201", ["query", "limit"]),
        ("limit=" + "9" * 5000, ["query", "limit"]),
        ("limit=1&limit=1", ["query", "limit"]),
        ("cursor=a&cursor=b", ["query", "cursor"]),
        ("cursor=!!!", ["query", "cursor"]),
        ("cursor=" + base64.b64encode(b"p=not-a-position").decode(), ["query", "cursor"]),
    ],
)
def test_malformed_or_repeated_page_parameters_are_422(
    tenant: dict[str, Any], path: str, query: str, location: list[str]
) -> None:
    assert locations(tenant["client"].get(f"{path}?{query}")) == [location]


def test_a_valid_limit_still_pages(tenant: dict[str, Any]) -> None:
    response = tenant["client"].get("/v1/keys?limit=200")
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1


@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("status=bogus", ["query", "status"]),
        ("status=", ["query", "status"]),
        ("status=queued&status=failed", ["query", "status"]),
        ("endpoint_id=" + "x" * 301, ["query", "endpoint_id"]),
        ("endpoint_id=a%00b", ["query", "endpoint_id"]),
    ],
)
def test_request_history_query_errors_name_the_query(tenant: dict[str, Any], query: str, location: list[str]) -> None:
    assert locations(tenant["client"].get(f"/v1/requests?{query}")) == [location]


def test_statement_format_errors_name_the_query(tenant: dict[str, Any]) -> None:
    assert locations(tenant["client"].get("/v1/billing/statements/2025-01?format=xml")) == [["query", "format"]]


# Keys per organization are capped.


def test_an_organization_has_at_most_the_configured_number_of_active_keys(
    tenant: dict[str, Any], settings: Any, make_key: Any
) -> None:
    settings.API_KEYS_PER_ORGANIZATION = 3
    make_key(tenant["organization"], name="second")
    assert tenant["client"].post("/v1/keys", {"name": "third"}, format="json").status_code == 201
    refused = tenant["client"].post("/v1/keys", {"name": "fourth"}, format="json")
    assert problems(refused) == [{"loc": ["body"], "msg": refused.json()["detail"][0]["msg"], "type": "too_many_keys"}]
    assert refused.json()["error_type"] == "too_many_keys"
    assert "3" in refused.json()["detail"][0]["msg"]
    assert ApiKey.objects.filter(organization=tenant["organization"]).count() == 3
    # Revoked and expired keys free their place.
    second = ApiKey.objects.get(organization=tenant["organization"], name="second")
    assert tenant["client"].delete(f"/v1/keys/{second.id}").status_code == 200
    assert tenant["client"].post("/v1/keys", {"name": "fourth"}, format="json").status_code == 201


def test_the_default_cap_is_a_hundred_active_keys(tenant: dict[str, Any], make_key: Any, settings: Any) -> None:
    from accounts.services import DEFAULT_KEYS_PER_ORGANIZATION, TooManyKeys

    if hasattr(settings, "API_KEYS_PER_ORGANIZATION"):
        del settings.API_KEYS_PER_ORGANIZATION
    assert DEFAULT_KEYS_PER_ORGANIZATION == 100
    for number in range(99):  # the tenant's own key is the first
        make_key(tenant["organization"], name=f"k{number}", scopes=[Scope.INFERENCE])
    with pytest.raises(TooManyKeys):
        make_key(tenant["organization"], name="one too many")
    assert ApiKey.objects.filter(organization=tenant["organization"]).count() == 100


# Refusals of the queue and sync APIs are located too.


@pytest.fixture
def submitting(tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None) -> APIClient:
    client: APIClient = tenant["client"]
    return client


@pytest.mark.parametrize("api", ["/queue", "/run"])
@pytest.mark.parametrize(
    ("query", "body", "location"),
    [
        ("", {"webhook_url": "http://127.0.0.1/hook"}, ["body", "webhook_url"]),
        ("", {"webhook_url": "http://a\u0000b/"}, ["body", "webhook_url"]),
        ("", {"webhook_url": "ftp://example.com/"}, ["body", "webhook_url"]),
        ("?fal_webhook=http://127.0.0.1/hook", {}, ["query", "fal_webhook"]),
        ("?fal_webhook=http://127.0.0.1/hook", {"webhook_url": "https://example.com/"}, ["query", "fal_webhook"]),
        ("?fal_webhook=https://a.example/&fal_webhook=https://b.example/", {}, ["query", "fal_webhook"]),
    ],
)
def test_a_refused_webhook_url_is_a_located_422(
    submitting: APIClient, api: str, query: str, body: dict[str, Any], location: list[str]
) -> None:
    response = submitting.post(f"{api}/platform/tiny-sd{query}", {"prompt": "a lighthouse", **body}, format="json")
    assert locations(response) == [location]
    assert response.json()["error_type"] in ("invalid_webhook_url", "validation_error")


def test_a_reused_idempotency_key_is_located_in_its_header(submitting: APIClient) -> None:
    first = submitting.post(
        "/queue/platform/tiny-sd", {"prompt": "a lighthouse"}, format="json", HTTP_IDEMPOTENCY_KEY="once"
    )
    assert first.status_code == 200, first.content
    reused = submitting.post(
        "/queue/platform/tiny-sd", {"prompt": "a harbour"}, format="json", HTTP_IDEMPOTENCY_KEY="once"
    )
    assert locations(reused) == [["header", "Idempotency-Key"]]
    assert reused.json()["error_type"] == "idempotency_key_reused"


def test_the_result_of_a_request_whose_image_could_not_be_loaded_is_a_located_422(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None
) -> None:
    job = finish(
        start(submit_as(tenant, builtin_endpoint)),
        AttemptOutcome.FAILED,
        error="image_url could not be downloaded: timed out",
        error_type="image_load_error",
    )
    response = tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.id}")
    assert problems(response) == [
        {
            "loc": ["body", "image_url"],
            "msg": "image_url could not be downloaded: timed out",
            "type": "image_load_error",
        }
    ]
    assert response.json()["error_type"] == "image_load_error"


def test_a_422_raised_with_a_string_still_answers_a_list() -> None:
    from rest_framework.exceptions import APIException

    from accounts.errors import api_exception_handler

    refused = APIException("Not like that.", code="not_like_that")
    refused.status_code = 422
    response = api_exception_handler(refused, {})
    assert response is not None
    assert response.status_code == 422
    assert response.data == {
        "detail": [{"loc": ["body"], "msg": "Not like that.", "type": "not_like_that"}],
        "error_type": "not_like_that",
    }


# Every status an operation can answer is in the OpenAPI document.


@pytest.fixture(scope="module")
def openapi(django_db_blocker: Any) -> dict[str, Any]:
    with django_db_blocker.unblock():
        response = Client().get("/v1/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, item in document["paths"].items() for method, operation in item.items()]


def test_every_operation_documents_the_errors_of_the_api(openapi: dict[str, Any]) -> None:
    for method, path, operation in operations(openapi):
        label = f"{method.upper()} {path}"
        responses = operation["responses"]
        assert {"401", "403", "429"} <= set(responses), label
        assert "Retry-After" in responses["429"]["headers"], label
        if "{" in path:
            assert "404" in responses, label
        reads_input = "requestBody" in operation or any(p["in"] != "path" for p in operation.get("parameters", []))
        if reads_input:
            assert "422" in responses, label
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= set(responses), label
        for code, response in responses.items():
            if code >= "400" and (code, path.rpartition("/")[2]) != ("400", "cancel"):  # ALREADY_COMPLETED
                schema = response["content"]["application/json"]["schema"]
                expected = "ValidationError" if code == "422" else "Error"
                assert schema == {"$ref": f"#/components/schemas/{expected}"}, (label, code)


def test_the_422_schema_is_a_list_of_located_problems(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert schemas["ValidationError"]["properties"]["detail"]["items"] == {"$ref": "#/components/schemas/Problem"}
    assert set(schemas["Problem"]["required"]) == {"loc", "msg", "type"}
    assert set(schemas["Error"]["required"]) == {"detail", "error_type"}


def test_each_operation_documents_its_own_refusals(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    assert "402" in paths["/queue/{owner}/{model}"]["post"]["responses"]
    assert "200" in paths["/v1/keys/{id}"]["delete"]["responses"]  # a revoke answers the key, not 204
    assert "409" in paths["/v1/billing/top-up"]["put"]["responses"]
    assert "503" in paths["/v1/billing/purchases"]["post"]["responses"]
    assert "text/csv" in paths["/v1/usage"]["get"]["responses"]["200"]["content"]
    limit = next(p for p in paths["/v1/keys"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}


def test_a_reused_idempotency_key_with_other_headers_is_refused(submitting: APIClient) -> None:
    """The output retention and the start timeout are part of the request: the same key asking for others is refused,
    not answered with a job that keeps its outputs, or waits to start, other than it asked; the same headers again
    are a replay."""
    body = {"prompt": "a lighthouse"}
    first = submitting.post("/queue/platform/tiny-sd", body, format="json", HTTP_IDEMPOTENCY_KEY="headers",
                            HTTP_X_FAL_REQUEST_TIMEOUT="30")  # fmt: skip
    assert first.status_code == 200, first.content
    again = submitting.post("/queue/platform/tiny-sd", body, format="json", HTTP_IDEMPOTENCY_KEY="headers",
                            HTTP_X_FAL_REQUEST_TIMEOUT="30")  # fmt: skip
    assert again.json()["request_id"] == first.json()["request_id"]
    for other in ({"HTTP_X_FAL_REQUEST_TIMEOUT": "60"}, {}):
        reused = submitting.post("/queue/platform/tiny-sd", body, format="json", HTTP_IDEMPOTENCY_KEY="headers",
                                 **other)  # fmt: skip
        assert reused.json()["error_type"] == "idempotency_key_reused", other
