"""fal's pricing API (``/v1/models/pricing`` and its estimate) through HTTP, against what admission holds and what
settlement charges for the same requests: real prices, a real negotiated price, real runs."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import resolve
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditAction, AuditEvent, Scope
from billing import pricing_api
from billing.models import Hold, Price, PriceUnit, UsageRecord
from inference import api as inference_api
from inference import submission
from inference.models import AttemptOutcome, Endpoint
from tests.lifecycle import SMALL, finish, run_as, start, submit_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

TINY, TINY_I2I = "platform/tiny-sd", "platform/tiny-sd/image-to-image"
PRICING, ESTIMATE = "/v1/models/pricing", "/v1/models/pricing/estimate"


@pytest.fixture
def negotiated(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Price:
    """The tenant's own price for tiny-sd: per image, where everyone else pays the CPU class's GPU-seconds."""
    return Price.objects.create(
        endpoint=builtin_endpoint,
        gpu_class="",
        organization=tenant["organization"],
        unit=PriceUnit.IMAGE,
        unit_price_micros=2_500,
        note="Negotiated",
    )


@pytest.fixture
def poster(db: None) -> Endpoint:
    """A second text-to-image endpoint, priced per megapixel for everyone."""
    endpoint = Endpoint.objects.create(
        owner="acme", name="poster", kind="text-to-image", weights="builtin:tiny-sd", gpu_class="cpu", default_steps=2
    )
    Price.objects.create(endpoint=endpoint, unit=PriceUnit.MEGAPIXEL, unit_price_micros=25_000)
    return endpoint


def prices(client: APIClient, query: str) -> dict[str, dict[str, Any]]:
    response = client.get(f"{PRICING}?{query}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["next_cursor"], body["has_more"]) == (None, False)
    return {line["endpoint_id"]: line for line in body["prices"]}


def estimate(client: APIClient, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post(ESTIMATE, body, format="json")
    assert response.status_code == status, response.content
    answer: dict[str, Any] = response.json()
    return answer


def located(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error_type"]
    return [item["loc"] for item in body["detail"]]


# Prices


def test_prices_are_the_organizations_own_and_a_negotiated_one_is_shown_to_no_other(
    tenant: dict[str, Any], other_tenant: dict[str, Any], negotiated: Price
) -> None:
    mine = prices(tenant["client"], f"endpoint_id={TINY},{TINY_I2I}")
    assert list(mine) == [TINY, TINY_I2I]  # in the order asked
    assert mine[TINY] == {
        "endpoint_id": TINY,
        "unit_price": 0.0025,
        "unit": "image",
        "currency": "USD",
        "unit_price_micros": 2_500,
        "negotiated": True,
        "resolution_tiers": [],
        "effective_from": negotiated.effective_from.isoformat().replace("+00:00", "Z"),
    }
    class_line = Price.objects.get(gpu_class="cpu", endpoint=None)
    assert mine[TINY_I2I]["unit_price_micros"] == class_line.unit_price_micros
    assert (mine[TINY_I2I]["unit"], mine[TINY_I2I]["negotiated"]) == ("gpu_second", False)

    theirs = prices(other_tenant["client"], f"endpoint_id={TINY}&endpoint_id={TINY_I2I}")
    assert theirs[TINY]["unit_price_micros"] == class_line.unit_price_micros
    assert (theirs[TINY]["unit"], theirs[TINY]["negotiated"]) == ("gpu_second", False)
    assert theirs[TINY_I2I] == mine[TINY_I2I]
    # The public catalogue shows the public price.
    [listed] = [model for model in APIClient().get("/v1/models").json()["models"] if model["endpoint_id"] == TINY]
    assert (listed["price"]["unit"], listed["price"]["unit_price_micros"]) == (
        "gpu_second",
        class_line.unit_price_micros,
    )


def test_the_negotiated_price_is_what_admission_holds_and_settlement_charges(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, negotiated: Price
) -> None:
    job = submit_as(tenant, builtin_endpoint, num_images=3)
    assert Hold.objects.get(job=job).amount_micros == 3 * negotiated.unit_price_micros
    finish(start(job), gpu_ms=4_000)
    record = UsageRecord.objects.get(job=job)
    assert (record.unit, record.price_id, record.cost_micros) == ("image", negotiated.pk, 7_500)
    theirs = run_as(other_tenant, builtin_endpoint, gpu_ms=4_000)
    assert UsageRecord.objects.get(job=theirs).unit == "gpu_second"


def test_amounts_are_written_as_exact_decimals(tenant: dict[str, Any], poster: Endpoint) -> None:
    # 19 significant digits: a float would keep about 16.
    Price.objects.create(endpoint=poster, unit=PriceUnit.IMAGE, unit_price_micros=1_234_567_890_123_456_789)
    response = tenant["client"].get(f"{PRICING}?endpoint_id=acme/poster")
    assert b'"unit_price":1234567890123.456789,' in response.content
    assert json.loads(response.content, parse_float=Decimal)["prices"][0]["unit_price"] == Decimal(
        "1234567890123.456789"
    )
    response = tenant["client"].post(
        ESTIMATE,
        {"estimate_type": "unit_price", "endpoints": {"acme/poster": {"unit_quantity": 1000}}},
        format="json",
    )
    assert b'"total_cost":1234567890123456.789,' in response.content
    assert response.json()["total_cost_micros"] == 1_234_567_890_123_456_789_000


def test_every_price_a_page_at_a_time(tenant: dict[str, Any], builtin_endpoint: Endpoint, poster: Endpoint) -> None:
    Endpoint.objects.create(
        owner="acme", name="retired", kind="text-to-image", weights="builtin:tiny-sd", is_active=False
    )
    seen, cursor = [], None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = tenant["client"].get(f"{PRICING}?{query}").json()
        assert len(body["prices"]) <= 2
        seen += [line["endpoint_id"] for line in body["prices"]]
        assert body["has_more"] == (body["next_cursor"] is not None)
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(endpoint.endpoint_id for endpoint in Endpoint.objects.active())
    assert "acme/retired" not in seen


def test_pricing_reads_a_fixed_number_of_queries_however_many_endpoints(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, poster: Endpoint, negotiated: Price
) -> None:
    tenant["client"].get(f"{PRICING}?endpoint_id={TINY}")  # the key's lookup cached
    with CaptureQueriesContext(connection) as one:
        assert tenant["client"].get(f"{PRICING}?endpoint_id={TINY}").status_code == 200
    with CaptureQueriesContext(connection) as three:
        assert tenant["client"].get(f"{PRICING}?endpoint_id={TINY},{TINY_I2I},acme/poster").status_code == 200
    assert len(three) == len(one), [query["sql"] for query in three.captured_queries]


def test_pricing_needs_an_api_key_of_any_scope(
    tenant: dict[str, Any], make_key: Any, builtin_endpoint: Endpoint
) -> None:
    anonymous = APIClient()
    assert anonymous.get(f"{PRICING}?endpoint_id={TINY}").status_code == 401
    body = {"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 1}}}
    assert anonymous.post(ESTIMATE, body, format="json").status_code == 401
    _, token = make_key(tenant["organization"], scopes=[Scope.INFERENCE])
    runner = APIClient()
    runner.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    assert runner.get(f"{PRICING}?endpoint_id={TINY}").status_code == 200
    assert runner.post(ESTIMATE, body, format="json").status_code == 200


def test_unknown_endpoints_answer_fals_not_found(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    response = tenant["client"].get(f"{PRICING}?endpoint_id={TINY},fal-ai/flux/dev")
    assert response.status_code == 404
    body = response.json()
    assert body["error"]["type"] == body["error_type"] == "not_found"
    assert "fal-ai/flux/dev" in body["error"]["message"] == body["detail"]
    assert TINY + "," not in body["detail"]  # only the unknown one is named
    for endpoint_id in ("tiny-sd", "a/b/c/d", "platform/tiny-sd/", "x\x00y/z", "platform/" + "n" * 5000):
        response = tenant["client"].post(
            ESTIMATE,
            {"estimate_type": "historical_api_price", "endpoints": {endpoint_id: {"call_quantity": 1}}},
            format="json",
        )
        assert response.status_code == 404, (endpoint_id, response.content)
        assert response.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("endpoint_id=", ["query", "endpoint_id"]),
        ("endpoint_id=,,", ["query", "endpoint_id"]),
        ("endpoint_id=" + ",".join(f"a/m{index}" for index in range(51)), ["query", "endpoint_id"]),
        ("endpoint_ids=platform/tiny-sd", ["query", "endpoint_ids"]),
        (f"endpoint_id={TINY}&limit=5", ["query", "limit"]),
        ("limit=0", ["query", "limit"]),
        ("limit=51", ["query", "limit"]),
        ("cursor=%25%25", ["query", "cursor"]),
    ],
)
def test_a_bad_query_is_a_located_422(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, query: str, location: list[str]
) -> None:
    assert location in located(tenant["client"].get(f"{PRICING}?{query}"))


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ([], ["body"]),
        ({"endpoints": {TINY: {"call_quantity": 1}}}, ["body", "estimate_type"]),
        ({"estimate_type": "cheapest", "endpoints": {TINY: {"call_quantity": 1}}}, ["body", "estimate_type"]),
        ({"estimate_type": {}, "endpoints": {TINY: {"call_quantity": 1}}}, ["body", "estimate_type"]),
        ({"estimate_type": ["unit_price"], "endpoints": {TINY: {"call_quantity": 1}}}, ["body", "estimate_type"]),
        ({"estimate_type": "unit_price"}, ["body", "endpoints"]),
        ({"estimate_type": "unit_price", "endpoints": {}}, ["body", "endpoints"]),
        ({"estimate_type": "unit_price", "endpoints": {TINY: 3}}, ["body", "endpoints", TINY]),
        ({"estimate_type": "historical_api_price", "endpoints": {TINY: {"call_quantity": 0}}}, [TINY, "call_quantity"]),
        (
            {"estimate_type": "historical_api_price", "endpoints": {TINY: {"call_quantity": "2"}}},
            [TINY, "call_quantity"],
        ),
        (
            {"estimate_type": "historical_api_price", "endpoints": {TINY: {"call_quantity": 1.5}}},
            [TINY, "call_quantity"],
        ),
        ({"estimate_type": "historical_api_price", "endpoints": {TINY: {"unit_quantity": 2}}}, [TINY, "unit_quantity"]),
        ({"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 0.0000001}}}, [TINY, "unit_quantity"]),
        ({"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": "2"}}}, [TINY, "unit_quantity"]),
        ({"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 1.0005}}}, [TINY, "unit_quantity"]),
        (
            {
                "estimate_type": "historical_api_price",
                "endpoints": {TINY: {"call_quantity": 1, "input": {"prompt": 5}}},
            },
            [TINY, "input", "prompt"],
        ),
        (
            {
                "estimate_type": "historical_api_price",
                "endpoints": {
                    TINY: {"call_quantity": 1, "input": {"prompt": "x", "image_size": {"width": 4096, "height": 64}}}
                },
            },
            [TINY, "input", "image_size", "width"],
        ),
        ({"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 1}}, "currency": "EUR"}, ["currency"]),
    ],
)
def test_a_bad_estimate_is_a_located_422(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, body: Any, location: list[Any]
) -> None:
    where = location if location[0] == "body" else ["body", *(["endpoints"] if location[0] == TINY else []), *location]
    assert where in located(tenant["client"].post(ESTIMATE, body, format="json"))


def test_a_part_of_an_image_is_refused_where_images_are_billed(
    tenant: dict[str, Any], negotiated: Price, other_tenant: dict[str, Any]
) -> None:
    body = {"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 1.5}}}
    assert ["body", "endpoints", TINY, "unit_quantity"] in located(tenant["client"].post(ESTIMATE, body, format="json"))
    # The same quantity of GPU-seconds (the other organization's price) is fine.
    assert estimate(other_tenant["client"], body)["endpoints"][TINY]["unit"] == "gpu_second"


def test_the_routes_sit_beside_inferences_catalogue_and_in_the_schema(client: Any) -> None:
    assert resolve("/v1/models").func.view_class is inference_api.ModelsView  # type: ignore[attr-defined]
    assert resolve(PRICING).func.view_class is pricing_api.ModelPricingView  # type: ignore[attr-defined]
    assert resolve(ESTIMATE).func.view_class is pricing_api.PricingEstimateView  # type: ignore[attr-defined]
    paths = client.get("/v1/openapi.json").json()["paths"]
    assert {"404", "422"} <= set(paths[PRICING]["get"]["responses"])
    assert "discriminator" in json.dumps(
        client.get("/v1/openapi.json").json()["components"]["schemas"]["PricingEstimateRequest"]
    )
    assert {"404", "422"} <= set(paths[ESTIMATE]["post"]["responses"])


# Estimates, against what admission holds and settlement charges


def test_a_unit_price_estimate_is_what_the_same_output_is_charged(
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    negotiated: Price,
    poster: Endpoint,
) -> None:
    # Per image (the tenant's negotiated price), per GPU-second (everyone else's), per megapixel.
    images = estimate(tenant["client"], {"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 3}}})
    job = finish(start(submit_as(tenant, builtin_endpoint, num_images=3)))
    assert images["total_cost_micros"] == UsageRecord.objects.get(job=job).cost_micros
    assert images["endpoints"][TINY]["basis"] == "unit_price"
    assert Decimal(str(images["total_cost"])) * 1_000_000 == images["total_cost_micros"]
    assert images["currency"] == "USD"

    seconds = estimate(
        other_tenant["client"], {"estimate_type": "unit_price", "endpoints": {TINY: {"unit_quantity": 2.345}}}
    )
    job = run_as(other_tenant, builtin_endpoint, gpu_ms=2_345)
    assert seconds["total_cost_micros"] == UsageRecord.objects.get(job=job).cost_micros

    pixels = 128 * 64 * 2
    both = estimate(
        tenant["client"],
        {
            "estimate_type": "unit_price",
            "endpoints": {"acme/poster": {"unit_quantity": pixels / 1_000_000}, TINY: {"unit_quantity": 2}},
        },
    )
    job = finish(start(submit_as(tenant, poster, image_size={"width": 128, "height": 64}, num_images=2)))
    charged = UsageRecord.objects.get(job=job)
    assert (charged.unit, charged.billable_units) == ("megapixel", Decimal(pixels) / 1_000_000)
    assert both["endpoints"]["acme/poster"]["cost_micros"] == charged.cost_micros
    assert both["total_cost_micros"] == charged.cost_micros + 2 * negotiated.unit_price_micros


def test_an_estimate_for_an_input_is_what_admission_holds_for_it(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, negotiated: Price
) -> None:
    run_as(other_tenant, builtin_endpoint, gpu_ms=3_000)  # a measured GPU time per work unit, for every estimate
    request = {**SMALL, "image_size": {"width": 128, "height": 128}, "num_inference_steps": 6, "num_images": 2}
    body = {"estimate_type": "historical_api_price", "endpoints": {TINY: {"call_quantity": 5, "input": request}}}
    for party in (tenant, other_tenant):  # per image (negotiated), per GPU-second
        answer = estimate(party["client"], body)
        line = answer["endpoints"][TINY]
        assert (line["basis"], line["history_requests"]) == ("input", None)
        held = Hold.objects.get(job=submit_as(party, builtin_endpoint, **request)).amount_micros
        assert answer["total_cost_micros"] == line["cost_micros"] == 5 * held
    assert held > 0  # the GPU-second one


def test_a_historical_estimate_averages_this_organizations_billed_requests_at_todays_price(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    jobs = [run_as(tenant, builtin_endpoint, gpu_ms=gpu_ms) for gpu_ms in (1_000, 2_001)]
    run_as(tenant, builtin_endpoint, outcome=AttemptOutcome.ERRORED, gpu_ms=9_000, error="out of memory")  # unbilled
    run_as(other_tenant, builtin_endpoint, gpu_ms=50_000)  # another organization's: not counted
    records = UsageRecord.objects.filter(job__in=jobs)
    body = {"estimate_type": "historical_api_price", "endpoints": {TINY: {"call_quantity": 4}}}
    answer = estimate(tenant["client"], body)
    line = answer["endpoints"][TINY]
    assert (line["basis"], line["history_requests"]) == ("history", 2)
    assert answer["total_cost_micros"] == 2 * sum(record.cost_micros for record in records)  # 4 calls like these 2

    # Today's price applies to yesterday's pattern: 4 calls of 1,500.5 ms on average are 6,002 ms.
    raised = Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)
    assert estimate(tenant["client"], body)["total_cost_micros"] == 6_002 * raised.unit_price_micros // 1000

    # Older than the window, the history is not this organization's pattern any more.
    UsageRecord.objects.filter(organization=tenant["organization"]).update(
        recorded_at=timezone.now() - timedelta(days=31)
    )
    assert estimate(tenant["client"], body)["endpoints"][TINY]["basis"] == "defaults"


def test_with_no_history_a_call_costs_what_admission_holds_for_a_request_of_defaults(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    run_as(other_tenant, builtin_endpoint, gpu_ms=3_000)  # measured GPU time (any organization's), no history of ours
    body = {
        "estimate_type": "historical_api_price",
        "endpoints": {TINY: {"call_quantity": 3}, TINY_I2I: {"call_quantity": 1}},
    }
    answer = estimate(tenant["client"], body)
    assert {line["basis"] for line in answer["endpoints"].values()} == {"defaults"}
    job, _ = submission.submit_job(
        organization=tenant["organization"],
        api_key=tenant["api_key"],
        endpoint=builtin_endpoint,
        payload={"prompt": "x"},
    )
    held = Hold.objects.get(job=job).amount_micros
    assert answer["endpoints"][TINY]["cost_micros"] == 3 * held
    assert answer["total_cost_micros"] == sum(line["cost_micros"] for line in answer["endpoints"].values())


def test_an_operator_negotiates_a_price_in_the_console(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, django_user_model: Any
) -> None:
    operator = Client()
    operator.force_login(django_user_model.objects.create_superuser(email="ops@example.com", password="ops pass 1"))
    now = timezone.now()
    form = {
        "gpu_class": "",
        "endpoint": builtin_endpoint.pk,
        "organization": tenant["organization"].pk,
        "unit": PriceUnit.IMAGE,
        "unit_price_micros": 1_800,
        "effective_from_0": now.strftime("%Y-%m-%d"),
        "effective_from_1": now.strftime("%H:%M:%S"),
        "note": "Volume deal",
    }
    class_wide = {**form, "endpoint": "", "gpu_class": "cpu", "unit": PriceUnit.GPU_SECOND}
    without_endpoint = operator.post("/admin/billing/price/create/", class_wide)
    assert without_endpoint.status_code == 200
    assert "organization" in without_endpoint.context["adminform"].form.errors
    assert not Price.objects.filter(note="Volume deal").exists()
    assert operator.post("/admin/billing/price/create/", form).status_code == 302
    event = AuditEvent.objects.get(action=AuditAction.PRICE_CHANGED)
    assert event.metadata["organization"] == str(tenant["organization"].pk)
    assert prices(tenant["client"], f"endpoint_id={TINY}")[TINY]["unit_price_micros"] == 1_800
    assert prices(other_tenant["client"], f"endpoint_id={TINY}")[TINY]["negotiated"] is False
