"""fal-client's uploads, unmodified, against the platform over HTTPS with real workers.

The client hard-codes its storage hosts as two module constants; pointing both at the platform is the one change
an application makes for uploads (README). Everything else comes from the environment, as in test_fal_client.py.
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest
from PIL import Image

from inference.models import Job, Upload, UploadStatus
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
I2I = {"prompt": "a harbour at night", "num_inference_steps": 4, "strength": 0.5}


@pytest.fixture
def storage_hosts(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's two assignments (``fal_client.client.REST_URL`` and ``CDN_URL``), undone after the test."""
    monkeypatch.setattr(fal_client.client, "REST_URL", stack.base_url)
    monkeypatch.setattr(fal_client.client, "CDN_URL", stack.base_url)


@pytest.fixture
def fal(e2e_tenant: dict[str, Any], storage_hosts: None) -> fal_client.SyncClient:
    return fal_client.SyncClient(key=str(e2e_tenant["key"]))


def picture(size: tuple[int, int], color: str) -> Image.Image:
    return Image.new("RGB", size, color)


def fetched(stack: Stack, url: str) -> bytes:
    response = httpx.get(url, verify=stack.ssl_context(), timeout=30)
    assert response.status_code == 200, response.text
    return response.content


def test_upload_image_then_image_to_image_with_its_url(
    stack: Stack, fal: fal_client.SyncClient, e2e_tenant: dict[str, Any]
) -> None:
    url = fal.upload_image(picture((48, 40), "teal"), format="png")
    assert url.startswith(f"{stack.base_url}/files/uploads/")
    assert url.endswith("/upload.png")  # the CDN route's name for a nameless file (the fallback's is upload.bin)
    upload = Upload.objects.get(organization=e2e_tenant["organization"])
    assert (upload.status, upload.content_type) == (UploadStatus.READY, "image/png")
    with Image.open(io.BytesIO(fetched(stack, url))) as stored:
        assert stored.size == (48, 40)

    handle = fal.submit(APP, path="image-to-image", arguments={**I2I, "image_url": url})
    result = handle.get()
    [image] = result["images"]
    assert (image["width"], image["height"]) == (48, 40)  # no image_size: the input image's
    with Image.open(io.BytesIO(fetched(stack, image["url"]))) as output:
        assert output.size == (48, 40)
    job = Job.objects.get(pk=handle.request_id)
    assert job.input["image_url"] == url
    assert job.input["image_path"].startswith(f"inputs/{e2e_tenant['organization'].id}/{job.pk}/")

    # The output's own signed HTTPS URL as the next input: read from storage, never downloaded.
    again = fal.submit(APP, path="image-to-image", arguments={**I2I, "image_url": image["url"], "seed": 3})
    [next_image] = again.get()["images"]
    assert (next_image["width"], next_image["height"]) == (48, 40)
    assert Job.objects.get(pk=again.request_id).input["image_path"]


def test_upload_file_and_upload_keep_names_and_types(stack: Stack, fal: fal_client.SyncClient, tmp_path: Path) -> None:
    path = tmp_path / "lighthouse.jpg"
    picture((32, 32), "orange").save(path, format="JPEG")
    url = fal.upload_file(path)
    assert url.endswith("/lighthouse.jpg")
    assert fetched(stack, url) == path.read_bytes()

    buffer = io.BytesIO()
    picture((16, 24), "navy").save(buffer, format="WEBP")
    raw = fal.upload(buffer.getvalue(), "image/webp", file_name="navy.webp")
    assert raw.endswith("/navy.webp")
    response = httpx.get(raw, verify=stack.ssl_context(), timeout=30)
    assert response.headers["content-type"] == "image/webp"

    # The client's other repository: initiate on the REST host, then PUT to the upload URL.
    initiated = fal.upload(
        buffer.getvalue(), "image/webp", file_name="again.webp", repository="fal", fallback_repository=[]
    )
    assert initiated.endswith("/again.webp")
    assert fetched(stack, initiated) == buffer.getvalue()


def test_the_async_client_uploads(stack: Stack, e2e_tenant: dict[str, Any], storage_hosts: None) -> None:
    client = fal_client.AsyncClient(key=str(e2e_tenant["key"]))

    async def go() -> str:
        return await client.upload_image(picture((24, 16), "red"), format="png")

    url = asyncio.run(go())
    with Image.open(io.BytesIO(fetched(stack, url))) as stored:
        assert stored.size == (24, 16)


def test_what_is_not_an_image_is_refused(fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        fal.upload(b"plain words", "text/plain", file_name="notes.txt")
    assert refused.value.status_code == 422
    assert "Only images" in str(refused.value)
    assert not Upload.objects.exists()


def test_another_organization_cannot_use_the_url(stack: Stack, fal: fal_client.SyncClient) -> None:
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up

    url = fal.upload_image(picture((40, 40), "green"), format="png")
    stranger = sign_up(email=f"e2e-other-{os.urandom(4).hex()}@example.com", password=None)
    _, key = create_api_key(
        organization=Organization.objects.get(memberships__user=stranger),
        name="other",
        scopes=[Scope.INFERENCE],
        created_by=stranger,
    )
    with pytest.raises(fal_client.FalClientHTTPError) as refused:
        fal_client.SyncClient(key=key).submit(APP, path="image-to-image", arguments={**I2I, "image_url": url})
    assert refused.value.status_code == 422
    assert "another organization" in str(refused.value)
