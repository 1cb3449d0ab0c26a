"""Outputs and input images in storage: signed URLs, the file view, retention and the purge."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from django.core.files.storage import FileSystemStorage, default_storage, storages
from django.test import Client
from django.utils import timezone
from PIL import Image

from inference import files
from inference.engine.outputs import EncodedImage, encode_image
from inference.file_tasks import purge_expired_outputs_task
from inference.inputs import InlineImage
from inference.models import Endpoint, Job, JobStatus, TenantSettings

BASE = "http://testserver"


@pytest.fixture
def media(settings: Any, tmp_path: Path) -> Path:
    """The filesystem storage, rooted in this test's own folder."""
    root = tmp_path / "media"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}}
    settings.MEDIA_ROOT = root
    # default_storage and the storages handler cache their instance and its location: both follow.
    assert isinstance(storages["default"], FileSystemStorage)
    assert Path(default_storage.path("probe")) == root / "probe"
    return root


@pytest.fixture
def job(db: None, tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Job:
    endpoint = builtin_endpoint
    return Job.objects.create(
        organization=tenant["organization"],
        endpoint=endpoint,
        gpu_class=endpoint.gpu_class,
        input={"prompt": "a lighthouse", "output_format": "png"},
    )


def image(color: str = "red", output_format: str = "png", size: tuple[int, int] = (16, 8)) -> EncodedImage:
    return encode_image(Image.new("RGB", size, color), output_format)


def fetch(client: Client, url: str, method: str = "get") -> Any:
    parts = urlsplit(url)
    return getattr(client, method)(parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()})


def complete(job: Job, images: list[EncodedImage], *, expires_in: timedelta = timedelta(days=1)) -> Job:
    job.status = JobStatus.COMPLETED
    job.result = {"images": files.save_outputs(job, images), "seed": 42, "has_nsfw_concepts": [False] * len(images)}
    job.outputs_expire_at = timezone.now() + expires_in
    job.save()
    return job


# Storing


def test_input_image_round_trip(media: Path, job: Job) -> None:
    data = image(output_format="jpeg").data
    name = files.save_input_image(job.organization_id, job.pk, InlineImage(data=data, content_type="image/jpeg"))
    assert name == f"inputs/{job.organization_id}/{job.pk}/input.jpg"
    assert (media / name).read_bytes() == data
    assert files.read_input(name) == data


def test_outputs_are_stored_and_described(media: Path, job: Job) -> None:
    images = [image("red"), image("blue", "webp")]
    stored = files.save_outputs(job, images)
    assert [entry["path"] for entry in stored] == [
        f"outputs/{job.organization_id}/{job.pk}/0.png",
        f"outputs/{job.organization_id}/{job.pk}/1.webp",
    ]
    assert stored[1] == {
        "path": stored[1]["path"],
        "width": 16,
        "height": 8,
        "content_type": "image/webp",
        "file_name": "1.webp",
        "file_size": len(images[1].data),
    }
    for entry, encoded in zip(stored, images, strict=True):
        assert (media / entry["path"]).read_bytes() == encoded.data


def test_inline_outputs_are_data_uris_and_store_nothing(media: Path) -> None:
    encoded = image()
    [inline] = files.inline_outputs([encoded])
    assert inline["url"].startswith("data:image/png;base64,")
    assert inline["file_size"] == len(encoded.data)
    assert not media.exists() or not any(media.iterdir())


# Signed URLs and the file view


def test_signed_url_serves_the_file(media: Path, job: Job, client: Client) -> None:
    encoded = image(output_format="jpeg")
    [stored] = files.save_outputs(job, [encoded])
    url = files.signed_url(stored["path"], base_url=BASE + "/", ttl=120)
    assert url.startswith(f"{BASE}/files/outputs/")

    response = fetch(client, url)
    assert response.status_code == 200
    assert b"".join(response.streaming_content) == encoded.data
    assert response["Content-Type"] == "image/jpeg"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Cache-Control"].startswith("private, max-age=")
    assert 0 < int(response["Cache-Control"].rsplit("=", 1)[1]) <= 120

    head = fetch(client, url, "head")
    assert head.status_code == 200
    assert head["Content-Length"] == str(len(encoded.data))


def test_tampered_signature_or_name_is_refused(media: Path, job: Job, client: Client) -> None:
    first, second = files.save_outputs(job, [image("red"), image("blue")])
    url = files.signed_url(first["path"], base_url=BASE)
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    tampered = url.replace(signature, signature[:-1] + ("0" if signature[-1] != "0" else "1"))
    other_file = url.replace(first["path"], second["path"])
    unsigned = url.split("?")[0]
    for bad in (tampered, other_file, unsigned):
        response = fetch(client, bad)
        assert response.status_code == 403
        assert response.json()["error_type"] == "invalid_signature"
    assert not files.verify_signature(first["path"], "not-a-number", signature)


def test_expired_url_is_refused(media: Path, job: Job, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    [stored] = files.save_outputs(job, [image()])
    url = files.signed_url(stored["path"], base_url=BASE, ttl=60)
    issued = files._unix_now()
    monkeypatch.setattr(files, "_unix_now", lambda: issued + 59)
    assert fetch(client, url).status_code == 200
    monkeypatch.setattr(files, "_unix_now", lambda: issued + 61)
    response = fetch(client, url)
    assert response.status_code == 403
    assert response.json() == {"detail": response.json()["detail"], "error_type": "url_expired"}


@pytest.mark.parametrize(
    "requested",
    [
        "outputs/../secret_key",
        "outputs/%2e%2e/%2e%2e/secret_key",
        "inputs/a/./b.png",
        "static/admin.css",
        "outputs//etc/passwd",
        "outputs/a%5c..%5c..%5csecret_key",
        "secret_key",
    ],
)
def test_traversal_and_foreign_names_are_refused(media: Path, client: Client, requested: str) -> None:
    (media.parent / "secret_key").write_text("do not serve")
    name = unquote(requested)  # what the view receives
    # Even a correct signature for the odd name does not make it servable.
    expires = files._unix_now() + 60
    response = client.get(f"/files/{requested}", {"expires": expires, "signature": files._signature(name, expires)})
    assert response.status_code in (403, 404)
    assert b"do not serve" not in response.content
    with pytest.raises(ValueError, match="not a servable"):
        files.signed_url(name, base_url=BASE)


def test_only_get_and_head(media: Path, job: Job, client: Client) -> None:
    [stored] = files.save_outputs(job, [image()])
    url = files.signed_url(stored["path"], base_url=BASE)
    response = client.post(urlsplit(url).path + "?" + urlsplit(url).query)
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


def test_deleted_file_is_404(media: Path, job: Job, client: Client) -> None:
    [stored] = files.save_outputs(job, [image()])
    url = files.signed_url(stored["path"], base_url=BASE)
    (media / stored["path"]).unlink()
    response = fetch(client, url)
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


# What the API shows


def test_render_result_swaps_paths_for_signed_urls(media: Path, job: Job, client: Client) -> None:
    encoded = [image("red"), image("green")]
    complete(job, encoded)
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    assert "path" not in str(rendered)
    assert rendered["seed"] == 42
    for shown, original in zip(rendered["images"], encoded, strict=True):
        assert set(shown) == {"url", "width", "height", "content_type", "file_name", "file_size"}
        response = fetch(client, shown["url"])
        assert b"".join(response.streaming_content) == original.data
    # The stored form is untouched: the path stays on the server.
    assert job.result is not None
    assert "path" in job.result["images"][0]


def test_render_result_passes_inline_images_and_none(job: Job) -> None:
    assert files.render_result(job, base_url=BASE) is None
    job.result = {"images": files.inline_outputs([image()]), "seed": 1}
    assert files.render_result(job, base_url=BASE) == job.result
    job.outputs_expire_at = timezone.now() - timedelta(seconds=1)
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    assert rendered["images"][0]["url"] is None


def test_urls_never_outlive_the_retention(media: Path, job: Job) -> None:
    complete(job, [image()], expires_in=timedelta(seconds=90))
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    expires = int(parse_qs(urlsplit(rendered["images"][0]["url"]).query)["expires"][0])
    assert expires <= files._unix_now() + 90

    job.outputs_expire_at = timezone.now() - timedelta(seconds=1)  # expired, not yet purged
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    assert rendered["images"][0]["url"] is None


# Retention and the purge


def test_retention_precedence(settings: Any, job: Job) -> None:
    settings.OUTPUT_RETENTION_SECONDS = 7 * 24 * 3600
    assert files.retention_seconds(job) == 7 * 24 * 3600
    TenantSettings.objects.create(
        organization=job.organization, output_retention_seconds=3600, webhook_secret="whsec_dGVzdA=="
    )
    assert files.retention_seconds(job) == 3600
    job.input["retention_seconds"] = 120
    assert files.retention_seconds(job) == 120


def test_purge_deletes_files_and_is_idempotent(media: Path, job: Job, client: Client) -> None:
    input_data = image("white").data
    job.input["image_path"] = files.save_input_image(
        job.organization_id, job.pk, InlineImage(data=input_data, content_type="image/png")
    )
    complete(job, [image("red"), image("blue")], expires_in=timedelta(seconds=60))
    stored_paths = [entry["path"] for entry in job.result["images"]] + [job.input["image_path"]]  # type: ignore[index]
    url = files.signed_url(stored_paths[0], base_url=BASE)
    (media / stored_paths[1]).unlink()  # already gone: not an error
    assert files.purge_expired_outputs().looked_at == 0  # not yet expired

    assert files.purge_expired_outputs(now=timezone.now() + timedelta(seconds=61)).purged == 1
    assert not any((media / path).exists() for path in stored_paths)
    assert not (media / "outputs" / str(job.organization_id) / str(job.pk)).exists()
    job.refresh_from_db()
    assert job.outputs_expire_at is None
    assert job.result is not None
    assert job.result["outputs_purged"] is True
    assert [entry["path"] for entry in job.result["images"]] == [None, None]
    assert job.result["images"][0]["width"] == 16

    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    assert rendered["outputs_purged"] is True
    assert [shown["url"] for shown in rendered["images"]] == [None, None]
    assert "path" not in str(rendered)
    assert fetch(client, url).status_code == 404

    assert files.purge_expired_outputs(now=timezone.now() + timedelta(days=365)).looked_at == 0
    job.refresh_from_db()
    assert job.result is not None
    assert job.result["outputs_purged"] is True


def test_purge_runs_in_bounded_batches(media: Path, job: Job) -> None:
    past = timezone.now() - timedelta(seconds=1)
    for _ in range(3):
        other = Job.objects.create(
            organization=job.organization, endpoint=job.endpoint, gpu_class=job.gpu_class, input={"prompt": "x"}
        )
        complete(other, [image()], expires_in=timedelta(seconds=-1))
    assert Job.objects.filter(outputs_expire_at__lte=past + timedelta(seconds=2)).count() == 3
    assert files.purge_expired_outputs(limit=2).purged == 2
    assert purge_expired_outputs_task() == {"jobs": 1, "jobs_failed": 0, "uploads": 0, "uploads_failed": 0}
    assert purge_expired_outputs_task()["jobs"] == 0


def test_purge_drops_inline_outputs_and_inputs_of_failed_jobs(media: Path, job: Job) -> None:
    job.result = {"images": files.inline_outputs([image()])}
    job.input["image_path"] = files.save_input_image(
        job.organization_id, job.pk, InlineImage(data=image().data, content_type="image/png")
    )
    job.outputs_expire_at = timezone.now() - timedelta(seconds=1)
    job.save()
    assert files.purge_expired_outputs().purged == 1
    job.refresh_from_db()
    assert job.result == {"images": [{**job.result["images"][0], "url": None}], "outputs_purged": True}
    assert not (media / job.input["image_path"]).exists()


# An S3-compatible bucket (django-storages): presigned by the storage itself, offline


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
                "querystring_expire": 3600,
            },
        },
    }

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("signing a URL must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_s3_urls_are_presigned_by_the_storage(s3: None) -> None:
    url = files.signed_url("outputs/org/job/0.png", base_url=BASE, ttl=600)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "http://127.0.0.1:9"
    assert parts.path == "/test/outputs/org/job/0.png"
    query = parse_qs(parts.query)
    assert "X-Amz-Signature" in query
    assert query["X-Amz-Expires"] == ["600"]
    default = parse_qs(urlsplit(files.signed_url("outputs/org/job/0.png", base_url=BASE)).query)
    assert default["X-Amz-Expires"] == ["3600"]


def test_s3_render_result(s3: None, job: Job) -> None:
    job.result = {"images": [{"path": "outputs/o/j/0.png", "content_type": "image/png", "width": 8, "height": 8}]}
    job.outputs_expire_at = timezone.now() + timedelta(days=1)
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    url = rendered["images"][0]["url"]
    assert url.startswith("http://127.0.0.1:9/test/outputs/o/j/0.png?")
    assert "X-Amz-Signature=" in url
