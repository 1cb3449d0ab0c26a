"""fal's storage upload protocols (both clients' requests, as they send them) and uploaded files used as inputs.

The JavaScript client's way: initiate with the API key, then PUT to the signed URL it gets. The Python client's way:
a token from the REST host, then the CDN routes with ``Authorization: Bearer``. Then the URLs, of uploads and of
our own outputs, given back as ``image_url``: read from storage, by their own organization only.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import signing
from django.core.files.storage import FileSystemStorage, default_storage, storages
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from accounts.models import Membership, Role, Scope
from accounts.services import add_member, remove_member, revoke_api_key, set_organization_suspended
from inference import files, uploads, worker
from inference.engine.outputs import EncodedImage
from inference.files import UnusableFile
from inference.inputs import output_size_for_image
from inference.models import Endpoint, Job, TenantSettings, Upload, UploadPart, UploadStatus
from tests.inference.local_http import Reply, local_server
from tests.waiting import wait_until

I2I = "/queue/platform/tiny-sd/image-to-image"


@pytest.fixture(autouse=True)
def media(settings: Any, tmp_path: Path) -> Path:
    """The filesystem storage, rooted in this test's own folder."""
    root = tmp_path / "media"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}}
    settings.MEDIA_ROOT = root
    assert isinstance(storages["default"], FileSystemStorage)
    return root


def png(size: tuple[int, int] = (48, 40), color: str = "teal", image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


def path_and_query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    assert parts.scheme == "http"
    assert parts.netloc == "testserver"
    return parts.path, {key: values[0] for key, values in parse_qs(parts.query).items()}


def with_query(path: str, query: dict[str, str]) -> str:
    return path + "?" + "&".join(f"{key}={value}" for key, value in query.items())


def anonymous() -> APIClient:
    return APIClient()


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def cdn_token(tenant: dict[str, Any]) -> str:
    response = tenant["client"].post("/storage/auth/token?storage_type=fal-cdn-v3", data={}, format="json")
    assert response.status_code == 200, response.content
    return str(response.json()["token"])


def initiate(tenant: dict[str, Any], body: Any, *, multipart: bool = False, **headers: str) -> Any:
    route = "initiate-multipart" if multipart else "initiate"
    return tenant["client"].post(
        f"/storage/upload/{route}?storage_type=fal-cdn-v3",
        data=json.dumps(body),
        content_type="application/json",
        **headers,
    )


def js_upload(tenant: dict[str, Any], data: bytes, content_type: str = "image/png", name: str = "photo.png") -> str:
    """What ``fal.storage.upload(blob)`` does: initiate, then PUT the blob to the upload URL, with no key."""
    answer = initiate(tenant, {"content_type": content_type, "file_name": name})
    assert answer.status_code == 200, answer.content
    path, query = path_and_query(answer.json()["upload_url"])
    put = anonymous().generic("PUT", with_query(path, query), data=data, content_type=content_type)
    assert put.status_code == 200, put.content
    return str(answer.json()["file_url"])


def fetch_file(url: str) -> Any:
    path, query = path_and_query(url)
    assert not query
    return anonymous().get(path)


def submit(tenant: dict[str, Any], body: dict[str, Any]) -> Any:
    return tenant["client"].post(I2I, data=json.dumps({"prompt": "a harbour", **body}), content_type="application/json")


def refusal_of(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.content
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "image_url"]
    return dict(problem)


# The JavaScript client's protocol: initiate, then PUT


def test_initiate_then_put_stores_the_file_for_the_organization(tenant: dict[str, Any], media: Path) -> None:
    data = png()
    answer = initiate(tenant, {"content_type": "image/png", "file_name": "../my photo (1).png"})
    assert answer.status_code == 200, answer.content
    assert set(answer.json()) == {"upload_url", "file_url"}
    file_url = answer.json()["file_url"]
    upload = Upload.objects.get()
    assert file_url == f"http://testserver/files/uploads/{upload.id}/my_photo_1_.png"
    assert (upload.organization_id, upload.api_key_id, upload.status) == (
        tenant["organization"].id,
        tenant["api_key"].id,
        UploadStatus.PENDING,
    )
    assert fetch_file(file_url).status_code == 404  # nothing to serve before the bytes

    path, query = path_and_query(answer.json()["upload_url"])
    assert path == f"/storage/upload/{upload.id}"
    put = anonymous().generic("PUT", with_query(path, query), data=data, content_type="image/png")
    assert put.status_code == 200, put.content
    assert put["Access-Control-Allow-Origin"] == "*"
    assert put.json()["file_url"] == file_url
    assert put.json()["file_size"] == len(data)

    upload.refresh_from_db()
    assert upload.status == UploadStatus.READY
    assert upload.storage_name == f"uploads/{tenant['organization'].id}/{upload.id}/my_photo_1_.png"
    assert (media / upload.storage_name).read_bytes() == data
    served = fetch_file(file_url)
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == data
    assert served["Content-Type"] == "image/png"
    assert served["X-Content-Type-Options"] == "nosniff"
    assert served["Content-Security-Policy"] == "default-src 'none'; sandbox"
    head = anonymous().head(urlsplit(file_url).path)
    assert (head.status_code, head["Content-Length"]) == (200, str(len(data)))


def test_an_untyped_blob_is_typed_by_its_bytes(tenant: dict[str, Any]) -> None:
    file_url = js_upload(tenant, png(image_format="JPEG"), content_type="application/octet-stream", name="")
    upload = Upload.objects.get()
    assert upload.content_type == "image/jpeg"
    assert file_url.endswith(f"/{upload.id}/upload.bin")
    assert fetch_file(file_url)["Content-Type"] == "image/jpeg"


def test_a_phone_cameras_jpeg_is_a_jpeg(tenant: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(
        buffer, format="MPO", save_all=True, append_images=[Image.new("RGB", (16, 16), "blue")]
    )
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        assert opened.format == "MPO"
    js_upload(tenant, buffer.getvalue(), content_type="image/jpeg", name="phone.jpg")
    assert Upload.objects.get().content_type == "image/jpeg"


def test_what_is_not_an_image_is_refused_with_a_located_422(tenant: dict[str, Any]) -> None:
    declared = initiate(tenant, {"content_type": "application/pdf", "file_name": "a.pdf"})
    assert declared.status_code == 422, declared.content
    assert declared.json()["error_type"] == "unsupported_content_type"
    assert declared.json()["detail"][0]["loc"] == ["body", "content_type"]
    assert "Only images" in declared.json()["detail"][0]["msg"]

    missing = initiate(tenant, {"file_name": "a.png"})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "content_type"]

    answer = initiate(tenant, {"content_type": "image/png", "file_name": "a.png"})
    path, query = path_and_query(answer.json()["upload_url"])
    lying = anonymous().generic(
        "PUT", with_query(path, query), data=b"%PDF-1.7 not a picture", content_type="image/png"
    )
    assert lying.status_code == 422, lying.content
    assert lying.json()["error_type"] == "unsupported_content_type"
    assert lying.json()["detail"][0]["loc"] == ["body"]
    empty = anonymous().generic("PUT", with_query(path, query), data=b"", content_type="image/png")
    assert empty.status_code == 422
    assert Upload.objects.get().status == UploadStatus.PENDING


def test_the_size_cap(tenant: dict[str, Any], settings: Any) -> None:
    data = png((256, 256), "white") + b"\0" * 4096  # trailing bytes: still a PNG, just larger
    settings.UPLOAD_MAX_BYTES = len(data) - 1
    answer = initiate(tenant, {"content_type": "image/png", "file_name": "big.png"})
    path, query = path_and_query(answer.json()["upload_url"])
    put = anonymous().generic("PUT", with_query(path, query), data=data, content_type="image/png")
    assert put.status_code == 413, put.content
    assert put.json()["error_type"] == "payload_too_large"
    assert str(settings.UPLOAD_MAX_BYTES) in put.json()["detail"]
    settings.UPLOAD_MAX_BYTES = len(data)
    assert anonymous().generic("PUT", with_query(path, query), data=data, content_type="image/png").status_code == 200


def test_upload_urls_are_signed_and_expire(tenant: dict[str, Any]) -> None:
    answer = initiate(tenant, {"content_type": "image/png", "file_name": "a.png"})
    path, query = path_and_query(answer.json()["upload_url"])
    forged = anonymous().generic(
        "PUT",
        with_query(path, {**query, "expires": str(int(query["expires"]) + 60)}),
        data=png(),
        content_type="image/png",
    )
    assert (forged.status_code, forged.json()["error_type"]) == (403, "invalid_signature")
    other_upload = initiate(tenant, {"content_type": "image/png", "file_name": "b.png"}).json()["upload_url"]
    other_path, _ = path_and_query(other_upload)
    swapped = anonymous().generic("PUT", with_query(other_path, query), data=png(), content_type="image/png")
    assert swapped.status_code == 403

    # An upload whose retention ends in a second: its URL lives no longer.
    Upload.objects.filter(file_name="a.png").update(expires_at=timezone.now() + timedelta(seconds=1))
    short_url = uploads.upload_url(Upload.objects.get(file_name="a.png"), base_url="http://testserver")
    short_path, short_query = path_and_query(short_url)

    def refused() -> Any:
        response = anonymous().generic("PUT", with_query(short_path, short_query), data=png(), content_type="image/png")
        return response if response.status_code == 403 else None

    assert wait_until(refused, timeout=10, message="the upload URL to expire").json()["error_type"] == "url_expired"


@pytest.mark.parametrize("taken_away", ["revoked", "suspended", "deleted", "maker removed"])
def test_an_upload_url_stops_with_the_key_that_started_it(
    tenant: dict[str, Any], make_key: Any, make_user: Any, taken_away: str
) -> None:
    """Found in review: an upload URL took bytes for its hour whatever became of the key that started it (a leaked
    key revoked, its organization suspended); each use now asks of the key what a CDN token's use asks."""
    maker = make_user()
    add_member(organization=tenant["organization"], user=maker, role=Role.DEVELOPER)
    api_key, token = make_key(tenant["organization"], scopes=[Scope.INFERENCE], created_by=maker)
    starter = {"client": APIClient()}
    starter["client"].credentials(HTTP_AUTHORIZATION=f"Key {token}")
    url = initiate(starter, {"content_type": "image/png", "file_name": "a.png"}).json()["upload_url"]
    path, query = path_and_query(url)

    def put() -> Any:
        return anonymous().generic("PUT", with_query(path, query), data=png(), content_type="image/png")

    assert put().status_code == 200  # the URL works while its key does
    if taken_away == "revoked":
        revoke_api_key(api_key=api_key)
    elif taken_away == "suspended":
        set_organization_suspended(organization=tenant["organization"], suspended=True)
    elif taken_away == "deleted":
        api_key.delete()
    else:
        remove_member(membership=Membership.objects.get(user=maker, organization=tenant["organization"]))
    refused = put()
    expected = "organization_suspended" if taken_away == "suspended" else "api_key_unusable"
    assert (refused.status_code, refused.json()["error_type"]) == (403, expected)
    stored = Upload.objects.get(file_name="a.png")
    assert stored.size == len(png())  # the bytes of the first PUT, untouched


def test_a_second_put_replaces_the_file(tenant: dict[str, Any], media: Path) -> None:
    answer = initiate(tenant, {"content_type": "image/png", "file_name": "a.png"})
    path, query = path_and_query(answer.json()["upload_url"])
    for color in ("red", "blue"):
        put = anonymous().generic("PUT", with_query(path, query), data=png(color=color), content_type="image/png")
        assert put.status_code == 200
    upload = Upload.objects.get()
    assert (media / upload.storage_name).read_bytes() == png(color="blue")
    assert sorted(p.name for p in (media / upload.folder).iterdir()) == ["a.png"]


def test_initiate_needs_an_inference_key(tenant: dict[str, Any], make_key: Any) -> None:
    body = json.dumps({"content_type": "image/png"})
    nobody = anonymous().post("/storage/upload/initiate", data=body, content_type="application/json")
    assert nobody.status_code == 401
    _, reader = make_key(tenant["organization"], scopes=[Scope.USAGE_READ])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {reader}")
    assert client.post("/storage/upload/initiate", data=body, content_type="application/json").status_code == 403
    odd = tenant["client"].post("/storage/upload/initiate?storage_type=s3", data=body, content_type="application/json")
    assert odd.status_code == 422
    assert odd.json()["detail"][0]["loc"] == ["query", "storage_type"]


def test_the_lifecycle_header_sets_the_retention(tenant: dict[str, Any]) -> None:
    lifecycle = json.dumps({"expiration_duration_seconds": 3600})
    before = timezone.now()
    assert initiate(tenant, {"content_type": "image/png"}, HTTP_X_FAL_OBJECT_LIFECYCLE=lifecycle).status_code == 200
    expires_at = Upload.objects.get().expires_at
    assert before + timedelta(seconds=3600) <= expires_at <= timezone.now() + timedelta(seconds=3600)
    bad = initiate(
        tenant, {"content_type": "image/png"}, HTTP_X_FAL_OBJECT_LIFECYCLE='{"expiration_duration_seconds": 5}'
    )
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["header", "X-Fal-Object-Lifecycle", "expiration_duration_seconds"]


def test_the_organizations_retention_applies_to_uploads(tenant: dict[str, Any]) -> None:
    TenantSettings.objects.create(
        organization=tenant["organization"], output_retention_seconds=7200, webhook_secret="whsec_dGVzdA=="
    )
    initiate(tenant, {"content_type": "image/png"})
    remaining = Upload.objects.get().expires_at - timezone.now()
    assert timedelta(seconds=7100) < remaining <= timedelta(seconds=7200)


def test_js_multipart_upload(tenant: dict[str, Any], media: Path) -> None:
    """``@fal-ai/client`` over 90 MB: parts PUT to ``{upload_url path}/{n}{query}``, then ``/complete`` with the
    ``{partNumber, etag}`` each part answered."""
    data = png((64, 64), "purple")
    chunks = [data[:100], data[100:250], data[250:]]
    answer = initiate(tenant, {"content_type": "image/png", "file_name": "big.png"}, multipart=True)
    assert answer.status_code == 200, answer.content
    path, query = path_and_query(answer.json()["upload_url"])
    assert path.endswith("/multipart")
    answered = []
    for number, chunk in enumerate(chunks, start=1):
        part = anonymous().generic("PUT", with_query(f"{path}/{number}", query), data=chunk)
        assert part.status_code == 200, part.content
        assert part.json()["partNumber"] == number
        assert part["ETag"] == part.json()["etag"]
        answered.append(part.json())
    assert UploadPart.objects.count() == 3
    single = anonymous().generic("PUT", with_query(path.removesuffix("/multipart"), query), data=data)
    assert single.status_code == 404  # a multipart upload takes parts

    wrong = anonymous().post(
        with_query(f"{path}/complete", query),
        data=json.dumps({"parts": [{**answered[0], "etag": '"0000"'}, *answered[1:]]}),
        content_type="application/json",
    )
    assert wrong.status_code == 422
    assert wrong.json()["detail"][0]["loc"] == ["body", "parts", 0, "etag"]

    done = anonymous().post(
        with_query(f"{path}/complete", query), data=json.dumps({"parts": answered}), content_type="application/json"
    )
    assert done.status_code == 200, done.content
    upload = Upload.objects.get()
    assert upload.status == UploadStatus.READY
    assert b"".join(fetch_file(answer.json()["file_url"]).streaming_content) == data
    assert not UploadPart.objects.exists()
    assert not (media / upload.folder / "parts").exists() or not any((media / upload.folder / "parts").iterdir())


# The Python client's protocol: a CDN token, then the CDN routes


def test_token_then_cdn_upload(tenant: dict[str, Any], media: Path) -> None:
    answer = tenant["client"].post("/storage/auth/token?storage_type=fal-cdn-v3", data={}, format="json")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert (body["token_type"], body["base_url"]) == ("Bearer", "http://testserver")
    expires_at = timezone.datetime.fromisoformat(body["expires_at"])
    assert expires_at.utcoffset() == timedelta(0)  # the client compares it with an aware UTC now
    assert timedelta(minutes=5) < expires_at - timezone.now() <= timedelta(seconds=uploads.CDN_TOKEN_SECONDS)

    data = png(image_format="WEBP")
    uploaded = bearer(body["token"]).generic(
        "POST", "/files/upload", data=data, content_type="image/webp", HTTP_X_FAL_FILE_NAME="cat.webp"
    )
    assert uploaded.status_code == 200, uploaded.content
    upload = Upload.objects.get()
    assert uploaded.json() == {
        "access_url": f"http://testserver/files/uploads/{upload.id}/cat.webp",
        "file_url": f"http://testserver/files/uploads/{upload.id}/cat.webp",
        "content_type": "image/webp",
        "file_name": "cat.webp",
        "file_size": len(data),
    }
    assert (upload.organization_id, upload.api_key_id) == (tenant["organization"].id, tenant["api_key"].id)
    assert b"".join(fetch_file(uploaded.json()["access_url"]).streaming_content) == data


def test_cdn_upload_without_a_name_or_with_a_wrong_type(tenant: dict[str, Any]) -> None:
    client = bearer(cdn_token(tenant))
    unnamed = client.generic("POST", "/files/upload", data=png(image_format="JPEG"), content_type="image/jpeg")
    assert unnamed.status_code == 200
    assert unnamed.json()["file_name"] == "upload.jpg"
    text = client.generic("POST", "/files/upload", data=b"hello", content_type="text/plain")
    assert text.status_code == 422
    assert text.json()["detail"][0]["loc"] == ["header", "Content-Type"]


def test_cdn_routes_take_only_a_live_token_of_a_usable_key(tenant: dict[str, Any]) -> None:
    data = png()
    with_key = tenant["client"].generic("POST", "/files/upload", data=data, content_type="image/png")
    assert with_key.status_code == 401  # an API key is not an upload token
    forged = bearer("eyJrZXkiOiJ4In0:1abc:forged").generic("POST", "/files/upload", data=data, content_type="image/png")
    assert (forged.status_code, forged.json()["error_type"]) == (401, "invalid_upload_token")

    class Then(signing.TimestampSigner):
        def timestamp(self) -> str:
            return signing.b62_encode(int(timezone.now().timestamp()) - uploads.CDN_TOKEN_SECONDS - 5)

    claims = {"key": str(tenant["api_key"].pk), "org": str(tenant["organization"].pk)}
    stale = Then(salt="inference.uploads.cdn-token").sign_object(claims)
    expired = bearer(stale).generic("POST", "/files/upload", data=data, content_type="image/png")
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]

    token = cdn_token(tenant)
    revoke_api_key(api_key=tenant["api_key"])
    revoked = bearer(token).generic("POST", "/files/upload", data=data, content_type="image/png")
    assert revoked.status_code == 401
    assert not Upload.objects.exists()


def test_python_multipart_upload(tenant: dict[str, Any], other_tenant: dict[str, Any]) -> None:
    """``fal_client`` over 100 MB: create at ``{base_url}/files/upload/multipart``, parts to
    ``{access_url}/multipart/{uploadId}/{n}`` (the ETag header), then ``.../complete``."""
    data = png((64, 64), "orange")
    client = bearer(cdn_token(tenant))
    created = client.generic(
        "POST", "/files/upload/multipart", data=b"", content_type="image/png", HTTP_X_FAL_FILE_NAME="big.png"
    )
    assert created.status_code == 200, created.content
    access_url, upload_id = created.json()["access_url"], created.json()["uploadId"]
    access_path, _ = path_and_query(access_url)
    parts = []
    for number, chunk in enumerate((data[:200], data[200:]), start=1):
        part = client.generic(
            "PUT", f"{access_path}/multipart/{upload_id}/{number}", data=chunk, content_type="image/png"
        )
        assert part.status_code == 200, part.content
        parts.append({"partNumber": number, "etag": part["etag"]})
    other = bearer(cdn_token(other_tenant))
    foreign = other.post(f"{access_path}/multipart/{upload_id}/complete", data={"parts": parts}, format="json")
    assert foreign.status_code == 404  # another organization's upload is nobody's
    done = client.post(f"{access_path}/multipart/{upload_id}/complete", data={"parts": parts}, format="json")
    assert done.status_code == 200, done.content
    assert b"".join(fetch_file(access_url).streaming_content) == data
    again = client.post(f"{access_path}/multipart/{upload_id}/complete", data={"parts": parts}, format="json")
    assert again.status_code == 200  # a retried completion


def test_preflight_is_answered_without_credentials(tenant: dict[str, Any]) -> None:
    response = anonymous().options("/files/upload")
    assert response.status_code == 204
    assert response["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in response["Access-Control-Allow-Headers"]


# Uploaded and output URLs as inputs


def test_an_upload_is_an_input_of_its_organization_and_keeps_its_size(
    tenant: dict[str, Any], other_tenant: dict[str, Any], priced_without_broker: None, media: Path
) -> None:
    data = png((48, 40))
    file_url = js_upload(tenant, data)

    response = submit(tenant, {"image_url": file_url, "num_inference_steps": 4})
    assert response.status_code == 200, response.content
    job = Job.objects.get(pk=response.json()["request_id"])
    assert job.input["image_url"] == file_url
    assert (job.input["width"], job.input["height"]) == (48, 40)  # no image_size: the input's
    assert job.input["image_path"] == f"inputs/{tenant['organization'].id}/{job.pk}/input.png"
    assert (media / job.input["image_path"]).read_bytes() == data  # the job's own copy, read from storage

    sized = submit(tenant, {"image_url": file_url, "image_size": {"width": 64, "height": 64}})
    assert sized.status_code == 200
    assert Job.objects.get(pk=sized.json()["request_id"]).input["width"] == 64

    refusal = refusal_of(submit(other_tenant, {"image_url": file_url}))
    assert refusal["type"] == "file_of_another_organization"
    assert "another organization" in refusal["msg"]


def test_unusable_uploads_are_422(tenant: dict[str, Any], priced_without_broker: None) -> None:
    pending = initiate(tenant, {"content_type": "image/png", "file_name": "p.png"}).json()["file_url"]
    assert refusal_of(submit(tenant, {"image_url": pending}))["type"] == "upload_incomplete"
    unknown = f"http://testserver/files/uploads/{uuid.uuid4()}/x.png"
    assert refusal_of(submit(tenant, {"image_url": unknown}))["type"] == "upload_not_found"

    ready = js_upload(tenant, png(), name="r.png")
    Upload.objects.filter(file_name="r.png").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert refusal_of(submit(tenant, {"image_url": ready}))["type"] == "file_expired"
    assert not Job.objects.exists()


def test_purge_deletes_expired_uploads(tenant: dict[str, Any], media: Path, priced_without_broker: None) -> None:
    kept = js_upload(tenant, png(), name="kept.png")
    gone = js_upload(tenant, png(color="red"), name="gone.png")
    initiate(tenant, {"content_type": "image/png", "file_name": "never.png"})
    expired = Upload.objects.filter(file_name__in=["gone.png", "never.png"])
    assert expired.update(expires_at=timezone.now() - timedelta(seconds=1)) == 2
    gone_upload = Upload.objects.get(file_name="gone.png")
    assert (media / gone_upload.storage_name).exists()

    assert files.purge_expired_uploads().purged == 2
    assert set(Upload.objects.values_list("file_name", "status")) == {
        ("kept.png", UploadStatus.READY),
        ("gone.png", UploadStatus.EXPIRED),
        ("never.png", UploadStatus.EXPIRED),
    }
    assert not (media / gone_upload.folder).exists()
    assert fetch_file(gone).status_code == 404
    assert fetch_file(kept).status_code == 200
    assert refusal_of(submit(tenant, {"image_url": gone}))["type"] == "file_expired"
    assert files.purge_expired_uploads().looked_at == 0


def test_an_output_url_is_an_input_of_its_organization(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None
) -> None:
    earlier = Job.objects.create(
        organization=tenant["organization"], endpoint=builtin_endpoint, gpu_class="cpu", input={"prompt": "x"}
    )
    data = png((32, 24), "navy")
    stored = files.save_outputs(earlier, [_encoded(data)])
    url = files.signed_url(stored[0]["path"], base_url="http://testserver", ttl=60)

    response = submit(tenant, {"image_url": url})
    assert response.status_code == 200, response.content
    job = Job.objects.get(pk=response.json()["request_id"])
    assert (job.input["width"], job.input["height"]) == (32, 24)
    assert files.read_input(job.input["image_path"]) == data

    assert refusal_of(submit(other_tenant, {"image_url": url}))["type"] == "file_of_another_organization"
    path, query = path_and_query(url)
    forged = with_query(f"http://testserver{path}", {**query, "signature": "0" * 64})
    assert refusal_of(submit(tenant, {"image_url": forged}))["type"] == "invalid_signature"
    default_storage.delete(stored[0]["path"])
    assert refusal_of(submit(tenant, {"image_url": url}))["type"] == "file_expired"


def test_other_hosts_are_other_peoples_urls(tenant: dict[str, Any], priced_without_broker: None) -> None:
    url = f"https://images.example.com/files/uploads/{uuid.uuid4()}/x.png"
    assert files.stored_name_of_url(url, organization_id=tenant["organization"].pk) is None
    response = submit(tenant, {"image_url": url})
    assert response.status_code == 200, response.content
    job = Job.objects.get(pk=response.json()["request_id"])
    endpoint = job.endpoint
    # Its size is known only to the worker: credit is held for the endpoint's largest until then.
    assert (job.input["width"], job.input["height"], job.input["size_from_image"]) == (
        endpoint.max_width,
        endpoint.max_height,
        True,
    )


def test_a_data_uri_keeps_its_size_too(tenant: dict[str, Any], priced_without_broker: None) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png((1000, 500))).decode()
    response = submit(tenant, {"image_url": uri})
    assert response.status_code == 200, response.content
    job = Job.objects.get(pk=response.json()["request_id"])
    assert (job.input["width"], job.input["height"]) == (256, 128)  # scaled to fit 256x256, ratio kept
    assert "size_from_image" not in job.input


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((48, 40), (48, 40)),
        ((50, 41), (48, 40)),
        ((4, 300), (8, 256)),
        ((1024, 768), (256, 192)),
        ((256, 256), (256, 256)),
    ],
)
def test_output_size_for_image(builtin_endpoint: Endpoint, size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert output_size_for_image(builtin_endpoint, *size) == expected


def test_the_worker_takes_the_size_of_a_downloaded_image(
    tenant: dict[str, Any], priced_without_broker: None, settings: Any
) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True
    with local_server() as server:
        server.routes["/photo.png"] = Reply(body=png((120, 72)), headers={"Content-Type": "image/png"})
        response = submit(tenant, {"image_url": server.url("/photo.png"), "strength": 0.5})
        assert response.status_code == 200, response.content
        job = Job.objects.select_related("endpoint").get(pk=response.json()["request_id"])
        request = worker.generation_request(job)
    assert (request.width, request.height) == (120, 72)
    job.refresh_from_db()
    assert (job.input["width"], job.input["height"]) == (120, 72)  # what billing reads at the end


# Behind a bucket (django-storages S3): its own URLs resolve to storage names, offline


@pytest.fixture
def s3(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": "test",
                "access_key": "AKIAEXAMPLEEXAMPLE00",
                "secret_key": "not-a-real-secret-not-a-real-secret-0000",
                "endpoint_url": "http://127.0.0.1:9",
                "region_name": "us-east-1",
                "signature_version": "s3v4",
                "querystring_auth": True,
            },
        },
    }

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("resolving a URL of another organization must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_bucket_urls_of_another_organization_are_refused_before_any_read(s3: None) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    for root in ("outputs", "uploads", "inputs"):
        url = files.signed_url(f"{root}/{theirs}/{uuid.uuid4()}/0.png", base_url="", ttl=600)
        assert url.startswith("http://127.0.0.1:9/test/")
        with pytest.raises(UnusableFile) as refused:
            files.stored_name_of_url(url, organization_id=mine)
        assert refused.value.kind == "file_of_another_organization"
    assert files.stored_name_of_url("http://127.0.0.1:9/test/elsewhere/x.png", organization_id=mine) is None
    assert files.stored_name_of_url("https://example.com/outputs/a/b/0.png", organization_id=mine) is None


def _encoded(data: bytes) -> EncodedImage:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return EncodedImage(data=data, content_type="image/png", width=width, height=height)


def test_an_upload_url_is_held_to_its_keys_rate_limit(make_user: Any, make_key: Any) -> None:
    """An upload URL may be PUT again until it expires, each PUT decoding up to the size cap: the requests on it
    count against the limit of the key that initiated it, so one initiated upload is no way past that limit."""
    from tests.conftest import personal_organization

    organization = personal_organization(make_user())
    _, token = make_key(organization, requests_per_minute=3)
    keyed = APIClient()
    keyed.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    answer = keyed.post("/storage/upload/initiate", {"content_type": "image/png"}, format="json")
    assert answer.status_code == 200, answer.content
    path, query = path_and_query(answer.json()["upload_url"])
    data = png()
    codes = [
        anonymous().generic("PUT", with_query(path, query), data=data, content_type="image/png").status_code
        for _ in range(4)
    ]
    assert codes == [200, 200, 429, 429]  # the initiate and two PUTs: the key's three a minute
    refused = anonymous().generic("PUT", with_query(path, query), data=data, content_type="image/png")
    assert int(refused["Retry-After"]) >= 1
    assert keyed.post("/storage/upload/initiate", {"content_type": "image/png"}, format="json").status_code == 429
