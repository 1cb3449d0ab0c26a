"""fal's webhooks end to end: fal's Python client submits with a ``webhook_url``, a real worker signs the delivery,
and a receiver built from fal's documented verifier checks it against the server's JWKS, fetched over HTTPS."""

from __future__ import annotations

import json
from typing import Any

import fal_client
import pytest

from tests.e2e.conftest import Stack
from tests.inference.local_http import local_server
from tests.inference.test_fal_webhook_signatures import FalDocsReceiver
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3}


def test_fals_documented_verifier_accepts_the_workers_webhooks(
    stack: Stack, e2e_tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nacl.signing", reason="PyNaCl, which fal's verifier uses, is not installed")
    # The receiver's own configuration: requests trusts the test certificate authority.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", stack.ca_file)
    fal = fal_client.SyncClient(key=e2e_tenant["key"])
    with local_server() as receiver:
        handle = fal.submit(APP, SMALL, webhook_url=receiver.url("/hook"))
        [request] = wait_until(
            lambda: list(receiver.received),
            timeout=120,
            message=lambda: f"the webhook\n{stack.log_tail('gpu')}\n{stack.log_tail('housekeeping')}",
        )
    body = json.loads(request.body)
    assert body["request_id"] == body["gateway_request_id"] == handle.request_id
    assert body["status"] == "OK"
    # The server that answered the API is the one its outputs are linked on.
    assert body["payload"]["images"][0]["url"].startswith(f"{stack.base_url}/files/")
    # The worker signed it; the web process publishes the key: both derive it from the same configuration.
    assert FalDocsReceiver(f"{stack.base_url}/.well-known/jwks.json").accepts(request.headers, request.body)
    assert not FalDocsReceiver(f"{stack.base_url}/.well-known/jwks.json").accepts(request.headers, request.body[:-1])
