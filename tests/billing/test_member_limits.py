"""A member's monthly spend limit, shared by every API key the member made (``billing.models.MemberSpendLimit``).

Found in a red-team pass: a billing manager limited a developer's key, and the developer made another key, which had
no limit. A member's limit binds every key they made, keys made after it included (in the dashboard, or through
``POST /v1/keys`` by a key, whose keys are its maker's): admission and every reservation count the member's spend
this month and the holds under all their keys. Only members who may manage billing set one, never the limited
developer; each change is audited.

Per-image prices make admission's estimate exact (images x price), so limits are set to the micro-dollar.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import ApiKey, AuditAction, AuditEvent, Membership, Role, Scope, User
from accounts.services import add_member, create_api_key
from billing import admission, controls
from billing.ledger import BillingError
from billing.models import Hold, MemberSpendLimit, PriceUnit
from billing.money import format_micros
from inference import attempts
from inference.hooks import Refusal, Reservation
from inference.models import Endpoint
from tests.billing.test_money_cases import (
    IMAGE_PRICE,
    admitted,
    priced_endpoint,
    refused,
    run_images,
)
from tests.lifecycle import start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

MEMBER_REFUSAL = (
    "The monthly member spend limit of {limit} on the person who made this API key, shared by every key they made, "
    "is spent ({spent} used, {held} held by their running requests)."
)


@pytest.fixture
def per_image(db: None) -> Endpoint:
    return priced_endpoint("per-image", PriceUnit.IMAGE, IMAGE_PRICE)


@pytest.fixture
def team(tenant: dict[str, Any], make_user: Any) -> dict[str, Any]:
    """The tenant's organization (its owner and admin key), a developer with a key of their own, another developer
    with theirs, and a billing member; no concurrency limit in the way."""
    organization = tenant["organization"]
    organization.concurrency_limit = 1_000
    organization.save(update_fields=["concurrency_limit"])
    developer, colleague, books = make_user(), make_user(), make_user()
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    add_member(organization=organization, user=colleague, role=Role.DEVELOPER)
    add_member(organization=organization, user=books, role=Role.BILLING)
    scopes = [Scope.INFERENCE, Scope.USAGE_READ]
    first, first_token = create_api_key(organization=organization, name="dev 1", scopes=scopes, created_by=developer)
    theirs, _ = create_api_key(organization=organization, name="colleague", scopes=scopes, created_by=colleague)
    return {
        **tenant,
        "developer": developer,
        "first": first,
        "first_token": first_token,
        "colleague_key": theirs,
        "books": books,
    }


def api_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return client


def new_key_of(user: User, organization: Any, name: str = "another") -> ApiKey:
    key, _ = create_api_key(organization=organization, name=name, scopes=[Scope.INFERENCE], created_by=user)
    return key


def signed_in(user: User, organization: Any) -> Client:
    """A browser of ``user``'s acting in ``organization`` (not their personal one)."""
    client = Client()
    client.force_login(user)
    assert client.post("/dashboard/organization", {"organization": str(organization.pk)}).status_code == 302
    return client


# --- Admission and reservations ------------------------------------------------------------------------------------


def test_a_member_s_limit_binds_every_key_they_made_a_key_made_after_it_included(
    team: dict[str, Any], per_image: Endpoint
) -> None:
    organization, developer, first = team["organization"], team["developer"], team["first"]
    run_images(organization, per_image, first, 2)  # the first key spends 2 x 2,500 = 5,000
    submit(organization, per_image, api_key=first, num_images=1)  # and holds 2,500
    # 5,000 spent + 2,500 held + one more image = 10,000.
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=10_000)
    second = new_key_of(developer, organization)  # made after the limit, without one of its own
    assert admitted(organization, per_image, second, num_images=1) == 2_500
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=9_999)
    refusal = refused(organization, per_image, second, num_images=1)
    assert (refusal.error_type, refusal.detail) == (
        "spend_limit_exceeded",
        MEMBER_REFUSAL.format(limit="$0.009999", spent="$0.005", held="$0.0025"),
    )
    assert refused(organization, per_image, first, num_images=1).error_type == "spend_limit_exceeded"
    # Counted through the second key too: its spend and holds are the member's.
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=None)
    run_images(organization, per_image, second, 1)
    assert admission.member_spent_this_month(organization_id=organization.pk, user_id=developer.pk) == 7_500
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=12_500)
    assert admitted(organization, per_image, first, num_images=1) == 2_500
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=12_499)
    assert refused(organization, per_image, first, num_images=1).error_type == "spend_limit_exceeded"
    # Another member's keys, the owner's, and a request with no key are not this member's.
    assert admitted(organization, per_image, team["colleague_key"], num_images=1) == 2_500
    assert admitted(organization, per_image, team["api_key"], num_images=1) == 2_500
    assert admitted(organization, per_image, None, num_images=1) == 2_500


def test_a_key_limit_and_its_maker_s_limit_both_bind_the_tighter_refusing(
    team: dict[str, Any], per_image: Endpoint
) -> None:
    organization, developer, first = team["organization"], team["developer"], team["first"]
    controls.set_key_limit(api_key=first, monthly_limit_micros=2_500)
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=2_499)
    refusal = refused(organization, per_image, first, num_images=1)
    assert refusal.detail == MEMBER_REFUSAL.format(limit="$0.002499", spent="$0.00", held="$0.00")
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=5_000)
    controls.set_key_limit(api_key=first, monthly_limit_micros=2_499)
    assert refused(organization, per_image, first, num_images=1).detail.startswith("This API key's monthly limit")


def test_a_running_job_stops_where_the_member_s_other_keys_hold_the_rest_of_the_limit(
    team: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """Holds grow before each unit of work within the member's limit, counting what every key of theirs holds."""
    organization, developer = team["organization"], team["developer"]
    second = new_key_of(developer, organization)
    running = start(submit(organization, builtin_endpoint, api_key=team["first"]))
    submit(organization, builtin_endpoint, api_key=second)  # waits, holding its estimate
    covered = attempts.reserve_work(job=running, gpu_ms=0, ahead_ms=0)
    assert isinstance(covered, Reservation)
    assert covered.covered_gpu_ms is not None
    held = admission.member_held(organization_id=organization.pk, user_id=developer.pk)
    assert held == sum(Hold.objects.filter(organization=organization, released_at=None, api_key__created_by=developer)
                       .values_list("amount_micros", flat=True))  # fmt: skip
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=held)
    stopped = attempts.reserve_work(job=running, gpu_ms=covered.covered_gpu_ms + 1_000, ahead_ms=0)
    assert isinstance(stopped, Refusal)
    assert stopped.error_type == "spend_limit_exceeded"
    assert stopped.detail == MEMBER_REFUSAL.format(limit=format_micros(held), spent="$0.00", held=format_micros(held))
    # Room for one more second (100 µ$ at the CPU rate): the hold grows into it.
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=held + 100)
    grown = attempts.reserve_work(job=running, gpu_ms=covered.covered_gpu_ms + 1_000, ahead_ms=0)
    assert isinstance(grown, Reservation)
    assert admission.member_held(organization_id=organization.pk, user_id=developer.pk) <= held + 100


def test_a_deleted_key_s_spend_leaves_the_member_s_and_stays_the_organization_s(
    team: dict[str, Any], per_image: Endpoint
) -> None:
    organization, developer, first = team["organization"], team["developer"], team["first"]
    run_images(organization, per_image, first, 2)
    assert admission.member_spent_this_month(organization_id=organization.pk, user_id=developer.pk) == 5_000
    first.delete()
    assert admission.member_spent_this_month(organization_id=organization.pk, user_id=developer.pk) == 0
    assert admission.spent_this_month(organization_id=organization.pk) == 5_000


def test_a_limit_is_set_only_on_a_member_and_never_below_zero(team: dict[str, Any], make_user: Any) -> None:
    organization = team["organization"]
    with pytest.raises(controls.NotAMember):
        controls.set_member_limit(organization=organization, user=make_user(), monthly_limit_micros=1)
    with pytest.raises(BillingError, match="negative"):
        controls.set_member_limit(organization=organization, user=team["developer"], monthly_limit_micros=-1)
    assert not MemberSpendLimit.objects.exists()


# --- The API ---------------------------------------------------------------------------------------------------


def test_an_admin_key_sets_a_member_s_limit_and_the_member_sees_it(team: dict[str, Any], per_image: Endpoint) -> None:
    organization, developer, owner_client = team["organization"], team["developer"], team["client"]
    run_images(organization, per_image, team["first"], 1)
    submit(organization, per_image, api_key=team["first"], num_images=2)
    answer = owner_client.put(
        "/v1/billing/limits",
        {"members": [{"user_id": developer.pk, "monthly_limit_micros": 20_000}]},
        format="json",
    )
    assert answer.status_code == 200, answer.content
    expected = {
        "user_id": developer.pk,
        "email": developer.email,
        "monthly_limit_micros": 20_000,
        "spent_this_month_micros": 2_500,
        "held_micros": 5_000,
    }
    assert answer.json()["members"] == [expected]
    assert answer.json()["member"]["monthly_limit_micros"] is None  # the owner, who made the asking key: no limit
    event = AuditEvent.objects.filter(organization=organization, action=AuditAction.SPEND_LIMITS_CHANGED).latest("id")
    assert (event.actor_api_key_id, event.target_type) == (team["api_key"].pk, "accounts.membership")
    assert event.target_id == str(Membership.objects.get(organization=organization, user=developer).pk)
    assert event.metadata == {"member": developer.email, "user_id": developer.pk, "monthly_limit_micros": 20_000}
    # The developer reads their own limit, spend and holds: a refusal is explainable.
    mine = api_client(team["first_token"]).get("/v1/billing/limits")
    assert mine.status_code == 200
    assert mine.json()["member"] == expected
    # By address, any capitals; null lifts it.
    lifted = owner_client.put(
        "/v1/billing/limits",
        {"members": [{"email": developer.email.upper(), "monthly_limit_micros": None}]},
        format="json",
    )
    assert lifted.status_code == 200
    assert lifted.json()["members"] == []
    assert not MemberSpendLimit.objects.exists()


def test_a_developer_key_cannot_set_or_lift_its_maker_s_limit(team: dict[str, Any]) -> None:
    organization, developer = team["organization"], team["developer"]
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=1_000)
    audits = AuditEvent.objects.count()
    client = api_client(team["first_token"])
    for limit in (None, 10**12):
        answer = client.put(
            "/v1/billing/limits", {"members": [{"user_id": developer.pk, "monthly_limit_micros": limit}]}, format="json"
        )
        assert answer.status_code == 403
        assert answer.json()["error_type"] == "insufficient_scope"
    assert MemberSpendLimit.objects.get(user=developer).monthly_limit_micros == 1_000
    assert AuditEvent.objects.count() == audits


def test_a_member_limit_naming_someone_else_changes_nothing(team: dict[str, Any], make_user: Any) -> None:
    """Named by both or neither of id and address: 422; not a member: 404; in each case not even the budget of the
    same request is changed."""
    client, stranger = team["client"], make_user()
    for members, status in (
        ([{"user_id": stranger.pk, "monthly_limit_micros": 1}], 404),
        ([{"email": stranger.email, "monthly_limit_micros": 1}], 404),
        ([{"user_id": team["developer"].pk, "email": team["developer"].email, "monthly_limit_micros": 1}], 422),
        ([{"monthly_limit_micros": 1}], 422),
        ([{"user_id": team["developer"].pk, "monthly_limit_micros": -1}], 422),
    ):
        answer = client.put("/v1/billing/limits", {"monthly_budget_micros": 5, "members": members}, format="json")
        assert answer.status_code == status, answer.content
        if status == 422:
            [problem] = answer.json()["detail"]
            assert problem["loc"][:3] == ["body", "members", 0]
        else:
            assert answer.json()["error_type"] == "not_found"
    assert client.get("/v1/billing/limits").json()["monthly_budget_micros"] is None
    assert not MemberSpendLimit.objects.exists()


def test_a_limited_admin_s_key_made_through_the_api_is_limited_too(
    team: dict[str, Any], make_user: Any, per_image: Endpoint
) -> None:
    """``POST /v1/keys`` by a key makes a key of that key's maker: the maker's limit binds it."""
    organization = team["organization"]
    admin = make_user()
    add_member(organization=organization, user=admin, role=Role.ADMIN)
    _, admin_token = create_api_key(organization=organization, name="adm", scopes=[Scope.ADMIN], created_by=admin)
    controls.set_member_limit(organization=organization, user=admin, monthly_limit_micros=2_499)
    made = api_client(admin_token).post("/v1/keys", {"name": "escape", "scopes": ["inference"]}, format="json")
    assert made.status_code == 201, made.content
    escape = ApiKey.objects.get(pk=made.json()["id"])
    assert escape.created_by == admin
    assert refused(organization, per_image, escape, num_images=1).error_type == "spend_limit_exceeded"
    answer = api_client(made.json()["key"]).post("/queue/test/per-image", {"prompt": "x"}, format="json")
    assert answer.status_code == 402, answer.content
    assert answer.json()["error_type"] == "spend_limit_exceeded"
    assert "member spend limit of $0.002499" in answer.json()["detail"]


# --- The dashboard ----------------------------------------------------------------------------------------------


def test_billing_members_set_member_limits_on_the_billing_page_and_the_developer_sees_theirs(
    team: dict[str, Any],
) -> None:
    organization, developer, books = team["organization"], team["developer"], team["books"]
    url, field = f"/dashboard/billing/members/{developer.pk}/limit", f"member-{developer.pk}-limit_dollars"
    refused_client, books_client = signed_in(developer, organization), signed_in(books, organization)
    assert refused_client.post(url, {field: "1000"}).status_code == 403  # never their own limit
    page = books_client.get("/dashboard/billing").content.decode()
    assert 'data-testid="member-limits"' in page
    assert developer.email in page
    assert books_client.post(url, {field: "3"}).status_code == 302
    assert MemberSpendLimit.objects.get(organization=organization, user=developer).monthly_limit_micros == 3_000_000
    assert refused_client.post(url, {field: ""}).status_code == 403  # nor lift it
    assert MemberSpendLimit.objects.get(organization=organization, user=developer).monthly_limit_micros == 3_000_000
    event = AuditEvent.objects.filter(organization=organization, actor_user=books).latest("id")
    assert (event.action, event.metadata["monthly_limit_micros"]) == (AuditAction.SPEND_LIMITS_CHANGED, 3_000_000)
    # The developer's billing page shows their own limit and what counts against it; not everyone's.
    own = refused_client.get("/dashboard/billing").content.decode()
    assert 'data-testid="own-member-limit"' in own
    assert "$3.00" in own
    assert 'data-testid="member-limits"' not in own
    # Someone who is not a member: 404; empty lifts the limit.
    assert books_client.post("/dashboard/billing/members/999999/limit", {}).status_code == 404
    assert books_client.post(url, {field: ""}).status_code == 302
    assert not MemberSpendLimit.objects.exists()
