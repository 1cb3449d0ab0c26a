"""The fake Stripe of one run: localstripe, extended by ``config.fake_stripe``, on a free loopback port.

The embedded run (``manage.py runplatform``) starts one when it is given no ``STRIPE_SECRET_KEY``, so that buying
credits, saved cards, Checkout and auto top-up can be tried on a machine with no network: its processes get the
fake's address and keys (``environment()``, with ``STRIPE_FAKE=1``, which labels every page, receipt and statement
as test mode), and the fake delivers its webhooks, signed with Stripe's scheme, to the run's web server. With a
real key (``sk_test_...`` or ``sk_live_...``) nothing fake runs. The tests start theirs the same way
(tests/stripe_support.py).

localstripe is a development dependency (``make install`` installs it): without it there is no fake, and card
payments stay off.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from config.embedded_process import EmbeddedProcess, die_with_parent, free_port

START_TIMEOUT_SECONDS = 30.0


class StripeUnavailable(RuntimeError):
    """There is no localstripe to start, or the fake started does not answer."""


class EmbeddedStripe(EmbeddedProcess):
    """One fake Stripe process on loopback, with a secret key and a webhook signing secret of its own."""

    host = "127.0.0.1"

    def __init__(self, data_dir: Path, *, port: int | None = None, secret_key: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port(self.host)
        # Test-mode keys: the SDK and the fake accept them, and nothing could mistake them for live ones.
        self.secret_key = secret_key or f"sk_test_fake_{secrets.token_hex(12)}"
        self.publishable_key = "pk_test_fake"
        self.webhook_secret = f"whsec_fake_{secrets.token_hex(16)}"
        self.log_file = self.data_dir / "fake-stripe.log"
        # Its customers, cards and payments outlive it, as Stripe's outlive a run: the database names them.
        self.store_file = self.data_dir / "fake-stripe.pickle"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("localstripe") is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def environment(self) -> dict[str, str]:
        """The settings of the processes that pay through this fake (deploy/environment.md)."""
        return {
            "STRIPE_SECRET_KEY": self.secret_key,
            "STRIPE_PUBLISHABLE_KEY": self.publishable_key,
            "STRIPE_WEBHOOK_SECRET": self.webhook_secret,
            "STRIPE_API_BASE": self.url,
            "STRIPE_FAKE": "1",
        }

    def describe(self) -> str:
        return f"a fake Stripe (localstripe) on {self.url}, log {self.log_file}"

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Starts the fake and returns once it answers an authenticated request."""
        if self.alive():
            return
        if not self.available():
            raise StripeUnavailable("localstripe is not installed (`make install` installs the development tools).")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603  (our own interpreter and module)
                [sys.executable, "-m", "config.fake_stripe", "--port", str(self.port), "--store", str(self.store_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),  # prctl only, between fork and exec
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise StripeUnavailable(f"the fake Stripe exited with {self.process.returncode}: {self._log_tail()}")
            try:
                self.request("GET", "/v1/balance")
                return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise StripeUnavailable(f"the fake Stripe did not answer within {timeout:.0f} s: {self._log_tail()}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: dict[str, object] | None = None) -> object:
        """One request to the fake (JSON body for its ``/_config`` routes), authenticated with the run's key."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.secret_key}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310  (loopback, http)
            content = answer.read()
        return json.loads(content) if content else None

    def deliver_webhooks_to(self, url: str) -> None:
        """Every event the fake makes is sent to ``url``, signed with ``webhook_secret`` (Stripe's scheme)."""
        self.request("POST", "/_config/webhooks/platform", {"url": url, "secret": self.webhook_secret})

    def _log_tail(self) -> str:
        return self.log_since()[-2000:]
