"""End-user tags from fal's JavaScript client (``@fal-ai/client``, pinned in tests/e2e/js/package-lock.json), run by
Node against the platform over HTTPS with real workers, as the README shows it: the client's documented
``requestMiddleware`` adds ``X-Fal-End-User`` to every request, and its ``proxyUrl`` (the platform's ``/fal/proxy``) is
its only other configuration. The Node side is tests/e2e/js/end_user.mjs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inference.models import Job
from tests.e2e.conftest import Stack
from tests.e2e.test_fal_js_client import APP, JS, SMALL, scenario_output
from tests.npm import npm_ci

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

END_USER = "customer-42"


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/e2e/js, copied under var/npm/ with its node_modules installed from the lock file (``npm ci``)."""
    return npm_ci(JS, needed_for="fal's JavaScript client (tests/e2e/js)")


def run_tagged(stack: Stack, node_client: Path, name: str, key: str, **given: Any) -> dict[str, Any]:
    """Runs ``end_user.mjs <name>`` with the client's ``proxyUrl`` on this stack; what it printed, as JSON."""
    env = {
        # No FAL_* of the Python client's (tests/e2e/conftest.py): the proxy URL is the only configuration.
        **{name: value for name, value in os.environ.items() if not name.startswith("FAL_")},
        "NODE_EXTRA_CA_CERTS": stack.ca_file,
        "PLATFORM_PROXY_URL": f"{stack.base_url}/fal/proxy",
        "FAL_KEY": key,
        "SCENARIO_INPUT": json.dumps({"app": APP, "endUser": END_USER, **given}),
    }
    scenario = subprocess.Popen(
        ["node", "end_user.mjs", name],
        cwd=node_client,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return scenario_output(stack, scenario)


def test_the_js_clients_request_middleware_tags_its_requests_through_the_proxy(
    stack: Stack, node_client: Path, e2e_tenant: dict[str, Any]
) -> None:
    from billing.end_users import set_end_user_limit
    from billing.models import Price, UsageRecord
    from billing.rates import ensure_opening_prices

    ensure_opening_prices(Price)  # a transactional test before this one may have emptied the rate card: work is priced
    key, organization = str(e2e_tenant["key"]), e2e_tenant["organization"]
    seen = run_tagged(stack, node_client, "subscribe", key, input=SMALL)
    result = seen["value"]
    assert result["data"]["images"]
    # Every request (submit, status polls, result) went to the proxy URL, naming fal's URL, with the tag.
    assert len(seen["sent"]) >= 3
    for request in seen["sent"]:
        assert request["url"] == f"{stack.base_url}/fal/proxy"
        assert request["headers"]["x-fal-target-url"].startswith("https://queue.fal.run/")
        assert request["headers"]["x-fal-end-user"] == END_USER
    job = Job.objects.get(pk=result["requestId"])
    assert (job.organization_id, job.end_user) == (organization.pk, END_USER)
    assert UsageRecord.objects.get(job=job).end_user == END_USER

    # Over its monthly limit, the tag is refused at admission, and the client reports our body.
    set_end_user_limit(organization=organization, end_user=END_USER, monthly_limit_micros=0)
    refused = run_tagged(stack, node_client, "submit", key, input=SMALL)["error"]
    assert refused["status"] == 402
    assert refused["body"]["error_type"] == "end_user_limit_exceeded"
    assert Job.objects.filter(organization=organization).count() == 1
