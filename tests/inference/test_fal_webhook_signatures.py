"""fal's webhook signatures (X-Fal-Webhook-*, ED25519, keys as a JWKS): a receiver built from fal's documentation.

``FalDocsReceiver`` follows, step for step, the Python verifier fal publishes under "Verifying Your Webhook"
(https://fal.ai/docs/documentation/model-apis/inference/webhooks), with PyNaCl as fal's code uses it. The only
thing a fal user changes to receive ours is the JWKS address, which here is our server's ``/.well-known/jwks.json``,
fetched over HTTP by ``requests`` as in fal's code. The calls that decide whether our headers and keys interoperate are
fal's own: ``int(timestamp)`` within 300 s of the receiver's clock, ``hashlib.sha256(body).hexdigest()`` as the
fourth of four ``\\n``-joined lines, ``bytes.fromhex`` of the signature, ``base64.urlsafe_b64decode(x)`` of each
key (no padding added: fal's code relies on the key carrying it), ``VerifyKey(hex, encoder=HexEncoder).verify``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.utils import timezone
from standardwebhooks import Webhook

from inference import webhook_signing
from inference.models import Endpoint, Job, JobStatus
from inference.webhooks import deliver, schedule_webhook, webhook_body, webhook_secret_for
from tests.inference.local_http import LocalServer, Received, local_server
from tests.test_entrypoints import clean_env, run_python

# RFC 8037, appendix A: an Ed25519 key pair and its RFC 7638 thumbprint, as published.
RFC8037_SEED = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def seed(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FalDocsReceiver:
    """fal's documented verifier: JWKS fetched with ``requests`` and cached a day, every key tried."""

    JWKS_CACHE_DURATION = 24 * 60 * 60

    def __init__(self, jwks_url: str) -> None:
        self.jwks_url = jwks_url
        self._jwks_cache: list[dict[str, Any]] | None = None
        self._jwks_cache_time = 0.0

    def fetch_jwks(self) -> list[dict[str, Any]]:
        current_time = time.time()
        if self._jwks_cache is None or (current_time - self._jwks_cache_time) > self.JWKS_CACHE_DURATION:
            response = requests.get(self.jwks_url, timeout=10)
            response.raise_for_status()
            self._jwks_cache = response.json().get("keys", [])
            self._jwks_cache_time = current_time
        return self._jwks_cache

    def verify_webhook_signature(
        self, request_id: str, user_id: str, timestamp: str, signature_hex: str, body: bytes
    ) -> bool:
        from nacl.encoding import HexEncoder
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        try:
            if abs(int(time.time()) - int(timestamp)) > 300:
                return False  # too old, or from the future
        except ValueError:
            return False
        parts = [request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]
        if any(part is None for part in parts):
            return False
        message_to_verify = "\n".join(parts).encode("utf-8")
        try:
            signature_bytes = bytes.fromhex(signature_hex)
        except ValueError:
            return False
        public_keys_info = self.fetch_jwks()
        if not public_keys_info:
            return False
        for key_info in public_keys_info:
            try:
                public_key_b64url = key_info.get("x")
                if not isinstance(public_key_b64url, str):
                    continue
                public_key_bytes = base64.urlsafe_b64decode(public_key_b64url)
                verify_key = VerifyKey(public_key_bytes.hex(), encoder=HexEncoder)
                verify_key.verify(message_to_verify, signature_bytes)
                return True
            except (BadSignatureError, Exception):  # noqa: S112 - as in fal's code: on to the next key
                continue
        return False

    def accepts(self, headers: dict[str, str], body: bytes) -> bool:
        """The handler's part: the four headers (any case) and the raw body, as fal's docs say to pass them."""
        lowered = {name.lower(): value for name, value in headers.items()}
        return self.verify_webhook_signature(
            lowered.get("x-fal-webhook-request-id"),
            lowered.get("x-fal-webhook-user-id"),
            lowered.get("x-fal-webhook-timestamp"),
            lowered.get("x-fal-webhook-signature", ""),
            body,
        )


pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver(settings: Any) -> Iterator[LocalServer]:
    settings.OUTBOUND_ALLOW_PRIVATE = True
    with local_server() as server:
        yield server


@pytest.fixture
def fal_receiver(live_server: Any) -> FalDocsReceiver:
    """fal's verifier pointed at our JWKS, served by the app over real HTTP."""
    pytest.importorskip("nacl.signing", reason="PyNaCl, which fal's verifier uses, is not installed")
    return FalDocsReceiver(f"{live_server.url}/.well-known/jwks.json")


@pytest.fixture
def make_job(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Callable[..., Job]:
    def make(webhook_url: str, status: str = JobStatus.COMPLETED, **fields: Any) -> Job:
        fields.setdefault("result", {"images": [], "seed": 1, "prompt": "a cat"})
        return Job.objects.create(
            organization=tenant["organization"],
            api_key=tenant["api_key"],
            endpoint=builtin_endpoint,
            gpu_class=builtin_endpoint.gpu_class,
            input={"prompt": "a cat"},
            webhook_url=webhook_url,
            status=status,
            finished_at=timezone.now(),
            **fields,
        )

    return make


@pytest.fixture
def delivered(make_job: Callable[..., Job], receiver: LocalServer, sent_tasks: Any) -> Callable[..., Received]:
    """Sends a finished request's webhook to the local receiver and returns what it received."""

    def send(**fields: Any) -> Received:
        job = make_job(receiver.url("/hook"), **fields)
        delivery = schedule_webhook(job.id)
        assert delivery is not None
        assert deliver(delivery.pk) is True
        return receiver.received[-1]

    return send


# A receiver written from fal's documentation


def test_a_receiver_from_fals_docs_accepts_our_deliveries(
    delivered: Callable[..., Received], fal_receiver: FalDocsReceiver
) -> None:
    request = delivered()
    assert fal_receiver.accepts(request.headers, request.body)
    body = json.loads(request.body)
    assert request.headers["x-fal-webhook-request-id"] == body["request_id"] == body["gateway_request_id"]
    job = Job.objects.get(pk=body["request_id"])
    assert request.headers["x-fal-webhook-user-id"] == str(job.organization_id)
    # The same instant as the Standard Webhooks signature, which still verifies on the same delivery.
    assert request.headers["x-fal-webhook-timestamp"] == request.headers["webhook-timestamp"]
    assert Webhook(webhook_secret_for(job.organization_id)).verify(request.body, request.headers) == body

    failed = delivered(status=JobStatus.FAILED, error="Out of memory.", error_type="internal_error", result=None)
    assert fal_receiver.accepts(failed.headers, failed.body)
    assert json.loads(failed.body)["status"] == "ERROR"


def test_fals_receiver_refuses_a_tampered_delivery(
    delivered: Callable[..., Received], fal_receiver: FalDocsReceiver, tenant: dict[str, Any]
) -> None:
    request = delivered()
    assert fal_receiver.accepts(request.headers, request.body)
    assert not fal_receiver.accepts(request.headers, request.body.replace(b'"OK"', b'"ERROR"'))
    assert not fal_receiver.accepts(request.headers, request.body + b" ")
    for header, value in (
        ("x-fal-webhook-request-id", "00000000-0000-0000-0000-000000000000"),
        ("x-fal-webhook-user-id", "someone-else"),
        ("x-fal-webhook-timestamp", str(int(request.headers["x-fal-webhook-timestamp"]) + 1)),
        ("x-fal-webhook-signature", "00" * 64),
        ("x-fal-webhook-signature", "not hex"),
    ):
        assert not fal_receiver.accepts({**request.headers, header: value}, request.body), header
    missing = {name: value for name, value in request.headers.items() if name != "x-fal-webhook-user-id"}
    assert not fal_receiver.accepts(missing, request.body)


def test_fals_receiver_refuses_old_and_future_timestamps(fal_receiver: FalDocsReceiver) -> None:
    body = b'{"request_id":"r","status":"OK"}'
    now = int(time.time())
    # Signed by our signer with a moved clock: the signature is good, only the time decides.
    for offset, accepted in ((-3600, False), (-310, False), (-200, True), (0, True), (200, True), (310, False)):
        headers = webhook_signing.signature_headers(request_id="r", user_id="u", timestamp=now + offset, body=body)
        assert fal_receiver.accepts(headers, body) is accepted, offset


# Keys: the JWKS, rotation, the default key


def test_the_jwks_is_fals_shape_with_padded_keys(client: Any, settings: Any) -> None:
    settings.WEBHOOK_SIGNING_KEY = seed(RFC8037_SEED)
    settings.WEBHOOK_EXTRA_PUBLIC_KEYS = []
    response = client.get("/.well-known/jwks.json")  # no credentials: it is public
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "public, max-age=3600"
    # The published example key of RFC 8037: its x, and its RFC 7638 thumbprint as the key id.
    assert response.json() == {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": RFC8037_X + "=",
                "kid": RFC8037_THUMBPRINT,
                "alg": "EdDSA",
                "use": "sig",
            }
        ]
    }


def test_rotation_publishes_several_keys_and_old_signatures_verify_while_published(
    delivered: Callable[..., Received], fal_receiver: FalDocsReceiver, settings: Any
) -> None:
    old_seed, new_seed = bytes(range(32)), bytes(range(32, 64))
    settings.WEBHOOK_SIGNING_KEY = old_seed
    settings.WEBHOOK_EXTRA_PUBLIC_KEYS = []
    signed_by_old = delivered()
    [old_key] = webhook_signing.jwks()["keys"]

    settings.WEBHOOK_SIGNING_KEY = new_seed
    settings.WEBHOOK_EXTRA_PUBLIC_KEYS = [seed(old_key["x"]), seed(old_key["x"])]  # a repeated key is shown once
    new_key, still_published = webhook_signing.jwks()["keys"]
    assert still_published == old_key
    assert new_key["kid"] != old_key["kid"]
    signed_by_new = delivered()
    assert signed_by_new.headers["x-fal-webhook-signature"] != signed_by_old.headers["x-fal-webhook-signature"]
    assert fal_receiver.accepts(signed_by_old.headers, signed_by_old.body)
    assert fal_receiver.accepts(signed_by_new.headers, signed_by_new.body)

    # The old key withdrawn (and the receiver's day-long cache expired): what it signed no longer verifies.
    settings.WEBHOOK_EXTRA_PUBLIC_KEYS = []
    fal_receiver._jwks_cache = None
    assert not fal_receiver.accepts(signed_by_old.headers, signed_by_old.body)
    assert fal_receiver.accepts(signed_by_new.headers, signed_by_new.body)


def test_without_a_configured_key_the_key_follows_the_secret_key(settings: Any) -> None:
    settings.WEBHOOK_SIGNING_KEY = None
    settings.WEBHOOK_EXTRA_PUBLIC_KEYS = []
    settings.SECRET_KEY = "one secret key " * 4
    first = webhook_signing.jwks()
    webhook_signing._keys_for.cache_clear()  # as a new process would
    assert webhook_signing.jwks() == first
    settings.SECRET_KEY = "another secret key " * 4
    assert webhook_signing.jwks() != first


def embedded_jwks(data_dir: Path) -> dict[str, Any]:
    """The JWKS of a fresh embedded process with no configuration (the README's `make run`)."""
    program = (
        "import django, json; django.setup(); from inference.webhook_signing import jwks; print(json.dumps(jwks()))"
    )
    result = run_python("-c", program, env=clean_env(data_dir, PLATFORM_EMBEDDED="1"))
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_the_embedded_runs_key_survives_a_restart(tmp_path: Path) -> None:
    first = embedded_jwks(tmp_path / "data")
    assert embedded_jwks(tmp_path / "data") == first
    assert embedded_jwks(tmp_path / "other") != first


@pytest.mark.slow
def test_a_malformed_key_stops_start_up_without_showing_it(tmp_path: Path) -> None:
    for variable, written in (
        ("WEBHOOK_SIGNING_KEY", "a-private-key-written-wrong"),
        ("WEBHOOK_EXTRA_PUBLIC_KEYS", base64.urlsafe_b64encode(b"thirty-one bytes, one too short").decode()),
    ):
        env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key", **{variable: written})
        result = run_python("-c", "import django; django.setup()", env=env)
        assert result.returncode != 0
        assert f"ImproperlyConfigured: {variable} must be 32 bytes" in result.stderr
        assert written not in result.stderr


def test_a_delivery_logs_nothing_of_the_private_key(
    delivered: Callable[..., Received], settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    private = bytes(range(100, 132))
    settings.WEBHOOK_SIGNING_KEY = private
    with caplog.at_level(logging.DEBUG):
        request = delivered()
    assert request.headers["x-fal-webhook-signature"]
    written = "\n".join(record.getMessage() for record in caplog.records)
    for form in (private.hex(), base64.urlsafe_b64encode(private).decode().rstrip("="), repr(private)):
        assert form not in written
        assert form not in json.dumps(webhook_signing.jwks())


# gateway_request_id and the base URL of webhook outputs


@pytest.mark.usefixtures("priced_without_broker")
def test_submit_answers_gateway_request_id_and_webhooks_use_the_apis_base_url(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.PUBLIC_BASE_URL = "http://127.0.0.1:8000"
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the webhook URL names no host to resolve
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "api.example.test"]
    response = tenant["client"].post(
        "/queue/platform/tiny-sd?fal_webhook=http://127.0.0.1:9/done",
        {"prompt": "a cat"},
        format="json",
        secure=True,
        HTTP_HOST="api.example.test:8443",
    )
    assert response.status_code == 200, response.content
    handle = response.json()
    assert handle["gateway_request_id"] == handle["request_id"]
    assert handle["status_url"].startswith("https://api.example.test:8443/queue/")

    job = Job.objects.get(pk=handle["request_id"])
    image = {"path": f"outputs/{job.organization_id}/{job.id}/0.png", "content_type": "image/png"}
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.COMPLETED, finished_at=timezone.now(), result={"images": [image], "seed": 1}
    )
    job.refresh_from_db()
    [shown] = webhook_body(job)["payload"]["images"]
    assert shown["url"].startswith(f"https://api.example.test:8443/files/outputs/{job.organization_id}/{job.id}/")
    # The API's own answer for the same request starts the same way.
    result = tenant["client"].get(
        f"/queue/platform/tiny-sd/requests/{job.id}", secure=True, HTTP_HOST="api.example.test:8443"
    )
    assert result.json()["images"][0]["url"].split("?")[0] == shown["url"].split("?")[0]


def test_a_request_made_outside_the_api_links_its_outputs_under_public_base_url(
    make_job: Callable[..., Job], settings: Any
) -> None:
    settings.PUBLIC_BASE_URL = "https://platform.example.test"
    job = make_job(
        "https://hooks.example.com/",
        result={"images": [{"path": "outputs/x/y/0.png", "content_type": "image/png"}], "seed": 1},
    )
    assert job.base_url == ""
    assert webhook_body(job)["payload"]["images"][0]["url"].startswith("https://platform.example.test/files/")
