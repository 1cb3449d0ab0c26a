"""The operators' console in headless Chromium: a form view's widgets (the search box over people, the admin's own
JavaScript) work under the pages' Content-Security-Policy, and what is posted goes through."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LAPTOP, Tab
from tests.browser.test_dashboard import log_in, with_password
from tests.e2e.conftest import BASE_URL, Stack

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def operator(seeded: None) -> str:
    from accounts.models import User

    user = User.objects.create_superuser(email=f"ops-{uuid.uuid4().hex[:8]}@example.com")
    return str(with_password(user).email)


@pytest.fixture
def team(seeded: None) -> dict[str, Any]:
    """A team organization with its owner, and someone who is not in it yet."""
    from accounts.services import create_organization, sign_up

    tag = uuid.uuid4().hex[:8]
    owner = sign_up(email=f"owner-{tag}@example.com", password=None)
    newcomer = sign_up(email=f"newcomer-{tag}@example.com", password=None)
    organization = create_organization(name=f"Team {tag}", owner=owner)
    return {"page": f"/admin/accounts/organization/{organization.pk}/change/", "newcomer": newcomer.email}


def test_an_operator_adds_a_member_found_by_the_search_box(
    team: dict[str, Any], operator: str, stack: Stack, open_tab: Callable[..., Tab]
) -> None:
    tab = open_tab(LAPTOP)
    page = tab.page
    log_in(tab, operator, f"/admin/login/?next={team['page']}")
    page.wait_for_url(BASE_URL + team["page"])
    page.get_by_role("link", name="Edit name, limit and members").click()
    page.wait_for_url(BASE_URL + team["page"].replace("/change/", "/edit/"))
    page.locator(".select2-selection").click()
    page.keyboard.type(team["newcomer"].split("@")[0])
    page.locator(".select2-results__option", has_text=team["newcomer"]).click()
    page.select_option("select[name=memberships-1-role]", "billing")
    tab.shot("edit")
    page.locator("input[type=submit][value=Save]").click()
    page.wait_for_url(BASE_URL + team["page"])
    expect(page.locator("ul.messagelist")).to_contain_text("was changed")
    expect(page.locator("#memberships-group")).to_contain_text(team["newcomer"])
    expect(page.locator("#memberships-group")).to_contain_text("Billing")
    tab.shot("saved")
