"""The fake Stripe the tests run: localstripe (extended by platform/config/fake_stripe.py) on a loopback port,
started as the embedded run starts its own (config/embedded_stripe.py). Shared by the billing tests and the running
platform of the e2e tests."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from config.embedded_stripe import EmbeddedStripe

SECRET_KEY = "sk_test_platform"
PUBLISHABLE_KEY = "pk_test_platform"
WEBHOOK_SECRET = "whsec_test_platform"
WEBHOOK_PATH = "/billing/stripe/webhook"


@dataclass
class FakeStripe:
    """The fake's address, and what a test does to it that an API call cannot (open a dispute, pay Checkout)."""

    url: str
    log: Path

    def call(self, method: str, path: str, **data: Any) -> Any:
        response = httpx.request(
            method, self.url + path, data=data, headers={"Authorization": f"Bearer {SECRET_KEY}"}, timeout=10
        )
        response.raise_for_status()
        return response.json() if response.content else None

    def open_dispute(self, charge_id: str, amount: int | None = None) -> dict[str, Any]:
        data = {"charge": charge_id} | ({"amount": amount} if amount is not None else {})
        return self.call("POST", "/_test/disputes", **data)

    def close_dispute(self, dispute_id: str, status: str) -> dict[str, Any]:
        return self.call("POST", f"/_test/disputes/{dispute_id}/close", status=status)

    def pay_checkout(self, session_id: str) -> dict[str, Any]:
        return self.call("POST", f"/_test/checkout/sessions/{session_id}/pay")

    def expire_checkout(self, session_id: str) -> dict[str, Any]:
        return self.call("POST", f"/_test/checkout/sessions/{session_id}/expire")

    def events(self, *object_ids: str, types: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The events Stripe made about these objects, oldest first (what it would deliver, in its order)."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self.call("GET", "/v1/events?limit=100" + (f"&starting_after={after}" if after else ""))
            for event in page["data"]:
                if event["data"]["object"].get("id") in object_ids and (not types or event["type"] in types):
                    found.append(event)
            if not page["has_more"]:
                return found
            after = page["data"][-1]["id"]

    def send_webhooks_to(self, url: str | None, types: tuple[str, ...] = ()) -> None:
        """Deliveries of these event types (all if none) to ``url``; ``None`` stops deliveries."""
        events = list(types) if url else ["none.none"]
        data: dict[str, Any] = {"url": url or "http://127.0.0.1:9/", "secret": WEBHOOK_SECRET}
        if events:
            data["events"] = events
        response = httpx.post(self.url + "/_config/webhooks/platform", json=data, timeout=10)
        response.raise_for_status()


@contextmanager
def running_fake_stripe() -> Iterator[FakeStripe]:
    """localstripe, extended by config/fake_stripe.py, on a free loopback port until the block ends."""
    server = EmbeddedStripe(Path(tempfile.mkdtemp(prefix="fake-stripe-")), secret_key=SECRET_KEY)
    server.start()
    try:
        yield FakeStripe(url=server.url, log=server.log_file)
    finally:
        server.stop()
