"""Requests built to break the API, not to use it: each once answered 500 or left something behind.

A refused submission's input image, numbers beyond a float's range, a resolution with a trailing newline, URLs
urllib and idna cannot parse, a lifecycle header nested deeper than json.loads recurses, and the SSRF refusal that
told the caller how our internal names resolve. Each must be a 4xx that stores nothing and tells nothing.
"""

from __future__ import annotations

import base64
import io
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.storage import FileSystemStorage, storages
from PIL import Image

from inference.catalog import ensure_builtin_endpoints
from inference.models import Endpoint, Job, Upload, WebhookAttempt, WebhookDelivery
from inference.netguard import HOST_REFUSED
from inference.webhooks import deliver

pytestmark = pytest.mark.django_db

I2I = "/queue/platform/tiny-sd/image-to-image"
HUGE = 10**400  # a JSON integer: float() of it raises OverflowError
CLUSTER_ADDRESS = "10.96.14.7"


@pytest.fixture(autouse=True)
def media(settings: Any, tmp_path: Path) -> Path:
    """The filesystem storage, rooted in this test's own folder."""
    root = tmp_path / "media"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}}
    settings.MEDIA_ROOT = root
    assert isinstance(storages["default"], FileSystemStorage)
    return root


@pytest.fixture(autouse=True)
def _endpoints(db: None) -> None:
    # A transactional test before this one may have emptied the tables the migrations filled.
    ensure_builtin_endpoints(Endpoint)


def png_data_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(client: Any, path: str, body: dict[str, Any], **headers: str) -> Any:
    # json.dumps writes a Python int of any size as a JSON integer, as a hostile client would.
    return client.post(path, data=json.dumps(body), content_type="application/json", **headers)


def problems(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.content
    return {"/".join(str(part) for part in item["loc"][1:]): item["type"] for item in response.json()["detail"]}


def stored_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


@pytest.mark.usefixtures("priced_without_broker")
def test_a_refused_submission_leaves_no_input_image(tenant: dict[str, Any], media: Path) -> None:
    from billing.ledger import grant_credits
    from billing.models import EntryKind

    organization = tenant["organization"]
    grant_credits(
        organization=organization,
        amount_micros=-settings.BILLING_SIGNUP_CREDITS_MICROS,
        reason="Emptied: every submission is refused",
        kind=EntryKind.ADJUSTMENT,
    )
    image = png_data_uri()
    for _ in range(5):
        refused = post(tenant["client"], I2I, {"prompt": "a fox", "image_url": image})
        assert refused.status_code == 402, refused.content
    assert not Job.objects.exists()
    # Saved before admission refused it; no job points at it, so no purge would ever reach it.
    assert stored_under(media / "inputs" / str(organization.pk)) == []


@pytest.mark.usefixtures("priced_without_broker")
def test_a_lost_idempotency_race_leaves_no_input_image(
    tenant: dict[str, Any], media: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference import submission

    looked_up = submission._same_key
    looks: list[str] = []

    def same_key(*args: Any) -> Job | None:
        looks.append(args[1])
        # Each request's first look misses, as when two requests with one key pass it together: the second is told
        # by the unique index, and answered with the first's job.
        return None if len(looks) <= 2 else looked_up(*args)

    monkeypatch.setattr(submission, "_same_key", same_key)
    body = {"prompt": "a fox", "image_url": png_data_uri()}
    first = post(tenant["client"], I2I, body, HTTP_IDEMPOTENCY_KEY="once")
    second = post(tenant["client"], I2I, body, HTTP_IDEMPOTENCY_KEY="once")
    assert first.status_code == second.status_code == 200, second.content
    assert first.json()["request_id"] == second.json()["request_id"]
    assert len(looks) == 3  # the race was lost and the winner looked up
    [job] = Job.objects.all()
    inputs = media / "inputs" / str(tenant["organization"].pk)
    assert [path.relative_to(inputs) for path in stored_under(inputs)] == [
        Path(str(job.pk)),
        Path(str(job.pk), Path(job.input["image_path"]).name),
    ]


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/queue/platform/tiny-sd", "guidance_scale"),
        (I2I, "guidance_scale"),
        (I2I, "strength"),
        ("/queue/platform/tiny-ltx-video", "guidance_scale"),
        ("/queue/platform/tiny-ltx-video", "duration"),
        ("/queue/platform/tiny-ltx-video/image-to-video", "duration"),
        ("/queue/platform/tiny-stable-audio", "guidance_scale"),
        ("/queue/platform/tiny-stable-audio", "seconds_total"),
    ],
)
@pytest.mark.parametrize("number", [HUGE, -HUGE, 1e308])
def test_numbers_beyond_a_float_are_out_of_range(tenant: dict[str, Any], path: str, field: str, number: Any) -> None:
    body = {"prompt": "a fox", field: number}
    if path.endswith(("-to-image", "-to-video")):
        body["image_url"] = png_data_uri()
    found = problems(post(tenant["client"], path, body))
    assert found == {field: "out_of_range"}, found
    assert not Job.objects.exists()


@pytest.mark.usefixtures("priced_without_broker")
def test_the_price_estimate_refuses_numbers_beyond_a_float(tenant: dict[str, Any]) -> None:
    body = {
        "estimate_type": "historical_api_price",
        "endpoints": {
            "platform/tiny-ltx-video": {"call_quantity": 1, "input": {"prompt": "x", "duration": HUGE}},
        },
    }
    answer = post(tenant["client"], "/v1/models/pricing/estimate", body)
    assert answer.status_code == 422, answer.content


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize("resolution", ["64p\n", "64p\r\n", " 64p", "64P", "064p"])
def test_a_resolution_is_matched_whole(tenant: dict[str, Any], resolution: str) -> None:
    found = problems(
        post(tenant["client"], "/queue/platform/tiny-ltx-video", {"prompt": "x", "resolution": resolution})
    )
    assert found == {"resolution": "pattern"}


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize("url", ["http://[/a.png", "http://[::1/a.png", "https://a]/a.png", "http://[zz]/a.png"])
def test_an_unparsable_image_url_is_refused(tenant: dict[str, Any], url: str) -> None:
    found = problems(post(tenant["client"], I2I, {"prompt": "a fox", "image_url": url}))
    assert set(found) == {"image_url"}
    assert not Job.objects.exists()


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/a.png",
        "http://2130706433/a.png",
        "http://[::ffff:10.0.0.1]/a.png",
        "http://localhost/a.png",
        "https://user:secret@example.com/a.png",
    ],
)
def test_an_image_url_that_can_never_be_fetched_is_refused_before_anything_is_held(
    tenant: dict[str, Any], settings: Any, url: str
) -> None:
    """A literal private address, a host naming this machine, credentials: the worker's fetch would refuse them, the
    request failing after it was queued and held; the submission refuses them (a name is still resolved and checked
    by the fetch when it connects)."""
    settings.OUTBOUND_ALLOW_PRIVATE = False
    refused = post(tenant["client"], I2I, {"prompt": "a fox", "image_url": url})
    assert refused.status_code == 422, refused.content
    assert problems(refused) == {"image_url": "url_not_allowed"}
    assert "image_url is not allowed" in json.dumps(refused.json())
    assert not Job.objects.exists()


@pytest.mark.usefixtures("priced_without_broker")
def test_an_image_url_on_a_public_name_is_left_to_the_fetch(tenant: dict[str, Any], settings: Any) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = False
    accepted = post(tenant["client"], I2I, {"prompt": "a fox", "image_url": "https://images.example.com/a.png"})
    assert accepted.status_code == 200, accepted.content


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize("webhook", ["http://xn--a.com/hook", "https://xn--/hook"])
def test_an_unparsable_webhook_url_is_refused(tenant: dict[str, Any], webhook: str) -> None:
    refused = post(tenant["client"], f"/queue/platform/tiny-sd?fal_webhook={webhook}", {"prompt": "a fox"})
    assert refused.status_code == 422, refused.content
    assert refused.json()["error_type"] == "invalid_webhook_url"
    assert not Job.objects.exists()


@pytest.mark.usefixtures("priced_without_broker")
def test_a_refused_webhook_host_does_not_say_how_it_resolves(
    tenant: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook's name is resolved by its delivery, not on the submission's thread (inference/netguard.py): the
    delivery refuses it, and resolving to a private address and not resolving at all read alike there."""
    settings.OUTBOUND_ALLOW_PRIVATE = False
    cluster_name = "postgres.default.svc.cluster.internal-test"

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host == cluster_name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (CLUSTER_ADDRESS, port))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    caplog.set_level("INFO", logger="inference.netguard")
    errors = []
    for host in (cluster_name, "nowhere.invalid"):
        accepted = post(tenant["client"], f"/queue/platform/tiny-sd?fal_webhook=http://{host}/hook", {"prompt": "x"})
        assert accepted.status_code == 200, accepted.content
        request_id = accepted.json()["request_id"]
        assert tenant["client"].put(f"/queue/platform/tiny-sd/requests/{request_id}/cancel").status_code == 202
        delivery = WebhookDelivery.objects.get(job_id=request_id)
        assert deliver(delivery.pk) is False
        errors.append(WebhookAttempt.objects.get(delivery=delivery).error)
    # Resolving to a private address and not resolving at all read alike: no oracle for our internal DNS.
    assert errors == [HOST_REFUSED, HOST_REFUSED]
    assert CLUSTER_ADDRESS in caplog.text  # ours to read, in the server's log


DEEP = "[" * 2000


@pytest.mark.usefixtures("priced_without_broker")
@pytest.mark.parametrize("header", [DEEP, '{"expiration_duration_seconds": 3600, "x": "' + "a" * 600 + '"}'])
def test_a_deep_or_long_lifecycle_header_on_submit_is_refused(tenant: dict[str, Any], header: str) -> None:
    refused = post(
        tenant["client"], "/queue/platform/tiny-sd", {"prompt": "x"}, HTTP_X_FAL_OBJECT_LIFECYCLE_PREFERENCE=header
    )
    assert refused.status_code == 422, refused.content
    assert refused.json()["detail"][0]["loc"] == ["header", "X-Fal-Object-Lifecycle-Preference"]
    assert not Job.objects.exists()


@pytest.mark.parametrize("header_name", ["HTTP_X_FAL_OBJECT_LIFECYCLE", "HTTP_X_FAL_OBJECT_LIFECYCLE_PREFERENCE"])
@pytest.mark.parametrize("route", ["initiate", "initiate-multipart"])
def test_a_deep_lifecycle_header_on_upload_is_refused(tenant: dict[str, Any], header_name: str, route: str) -> None:
    refused = post(
        tenant["client"],
        f"/storage/upload/{route}?storage_type=fal-cdn-v3",
        {"content_type": "image/png", "file_name": "a.png"},
        **{header_name: DEEP},
    )
    assert refused.status_code == 422, refused.content
    assert refused.json()["detail"][0]["type"] == "json"
    assert not Upload.objects.exists()
