"""Input images are bounded by their pixels before anything decodes them: a 17 KB PNG can declare
12000x12000 pixels, 430 MB of worker memory once decoded."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from inference.inputs import image_pixels_problem
from inference.models import Endpoint, Job

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("builtin_endpoint", "priced_without_broker")]

SUBMIT = "/queue/platform/tiny-sd/image-to-image"


@pytest.fixture(autouse=True)
def _pillow_limit_restored() -> Iterator[None]:
    # The check sets Pillow's process-wide limit from the setting, which these tests lower.
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def blank_png(width: int, height: int) -> bytes:
    """A black 1-bit PNG, written row by row: compressed it weighs a few KB however many pixels it declares."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # the filter byte, then one bit per pixel
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def submit(tenant: dict[str, Any], image: bytes) -> Any:
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    return tenant["client"].post(
        SUBMIT, data=json.dumps({"prompt": "x", "image_url": uri}), content_type="application/json"
    )


def test_a_small_file_declaring_a_huge_image_is_refused_at_submission(tenant: dict[str, Any]) -> None:
    bomb = blank_png(12_000, 12_000)
    assert len(bomb) < 20_000
    assert (
        len(bomb) < Endpoint.objects.get(owner="platform", name="tiny-sd", path="image-to-image").max_input_image_bytes
    )
    response = submit(tenant, bomb)
    assert response.status_code == 413, response.content
    body = response.json()
    assert body["error_type"] == "validation_error"
    [problem] = body["detail"]
    assert problem["loc"] == ["body", "image_url"]
    assert problem["type"] == "too_large"
    assert "16777216 pixels" in problem["msg"]
    assert not Job.objects.exists()


def test_the_limit_is_on_pixels_whatever_the_shape(tenant: dict[str, Any], settings: Any) -> None:
    settings.MAX_INPUT_IMAGE_PIXELS = 512 * 512
    assert submit(tenant, blank_png(512, 512)).status_code == 200
    assert submit(tenant, blank_png(512, 513)).status_code == 413
    assert submit(tenant, blank_png(64, 512 * 512 // 64 + 8)).status_code == 413  # narrow and tall
    assert submit(tenant, blank_png(1024, 256)).status_code == 200  # as many pixels, another shape
    assert Job.objects.count() == 2


def test_the_workers_check_reads_only_the_header(settings: Any) -> None:
    """What the worker calls on a downloaded image before it decodes it (inference.worker.load_input_image)."""
    settings.MAX_INPUT_IMAGE_PIXELS = 4096 * 4096
    bomb = blank_png(12_000, 12_000)
    assert image_pixels_problem(bomb) == "The image has more than 16777216 pixels, the most an input image may have."
    assert image_pixels_problem(blank_png(4096, 4096)) is None
    assert image_pixels_problem(blank_png(4096, 4097)) is not None
    assert image_pixels_problem(b"not an image") is None  # the decoder's to refuse, as before
    # Pillow's own guard is set to the same limit, for any decode in the process: past twice it, an error.
    assert Image.MAX_IMAGE_PIXELS == 4096 * 4096
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))


def test_an_image_only_known_at_fetch_fails_its_job_before_it_is_decoded(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from inference import worker

    name = default_storage.save("inputs/test/huge.png", ContentFile(blank_png(12_000, 12_000)))
    job = Job(input={"image_path": name}, endpoint=Endpoint(max_input_image_bytes=10**7))

    def never_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(Image.Image, "convert", never_decode)
    with pytest.raises(worker.InputProblem) as problem:
        worker.load_input_image(job)
    assert problem.value.error_type == "image_too_large"
