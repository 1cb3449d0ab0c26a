"""Video and audio with fal's official client, unmodified, over HTTPS against real workers: generated, downloaded,
decoded, and billed per second of output delivered; the books reconcile after.
"""

from __future__ import annotations

import base64
import io
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import av
import fal_client
import fal_client.client
import httpx
import numpy as np
import pytest
import soundfile
from PIL import Image
from standardwebhooks import Webhook

from billing.models import Price, UsageRecord
from billing.money import divide_half_up
from billing.rates import ensure_media_prices, ensure_opening_prices
from billing.reconciliation import run_reconciliation
from inference.engine import GenerationRequest, PipelineCache, PipelineKind
from inference.models import Endpoint, Job
from tests.e2e.conftest import Stack
from tests.inference.local_http import local_server
from tests.inference.test_fal_webhook_signatures import FalDocsReceiver
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

VIDEO = "platform/tiny-ltx-video"
AUDIO = "platform/tiny-stable-audio"


@pytest.fixture
def fal(stack: Stack, e2e_tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """A client of the tenant's key, its two storage hosts pointed at the platform (README), the opening prices."""
    monkeypatch.setattr(fal_client.client, "REST_URL", stack.base_url)
    monkeypatch.setattr(fal_client.client, "CDN_URL", stack.base_url)
    ensure_opening_prices(Price)
    ensure_media_prices(Price, Endpoint)
    return fal_client.SyncClient(key=str(e2e_tenant["key"]))


def download(stack: Stack, url: str) -> httpx.Response:
    response = httpx.get(url, verify=stack.ssl_context(), timeout=30)
    assert response.status_code == 200, response.text
    return response


def decoded_frames(data: bytes) -> tuple[list[np.ndarray], float, str]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, float(container.duration or 0) / av.time_base, stream.codec_context.name


def psnr(one: np.ndarray, other: np.ndarray) -> float:
    """PSNR (dB) of two frames' 8x8 block means: the codec's loss on the tiny model's noise-like pixels averages
    out there, what the frame is made of stays."""

    def blocks(frame: np.ndarray) -> np.ndarray:
        height, width, channels = frame.shape
        return frame.astype(np.float64).reshape(height // 8, 8, width // 8, 8, channels).mean(axis=(1, 3))

    error = float(np.mean((blocks(one) - blocks(other)) ** 2))
    return 10 * float(np.log10(255**2 / error)) if error else float("inf")


def billed_exactly(result: dict[str, Any], request_id: str, *, seconds: Decimal, unit: str, price: int) -> None:
    """The usage object says the seconds delivered and costs them at exactly the unit price; the record agrees."""
    usage = result["usage"]
    assert (usage["unit"], usage["unit_price_micros"]) == (unit, price)
    assert Decimal(str(usage["billable_units"])) == seconds
    assert usage["cost_micros"] == divide_half_up(int(seconds * 1000) * price, 1000)
    record = UsageRecord.objects.get(job_id=request_id)
    assert (record.billable_units, record.cost_micros) == (seconds, usage["cost_micros"])
    assert record.gpu_ms + record.unbilled_gpu_ms > 0  # its GPU time recorded too


def test_text_to_video(stack: Stack, fal: fal_client.SyncClient) -> None:
    arguments = {"prompt": "a lighthouse at dusk", "num_frames": 12, "fps": 8, "resolution": "64p",
                 "aspect_ratio": "16:9", "num_inference_steps": 3, "seed": 11}  # fmt: skip
    handle = fal.submit(VIDEO, arguments)
    result = handle.get()
    video = result["video"]
    assert (video["content_type"], video["file_name"]) == ("video/mp4", "0.mp4")
    assert result["seed"] == 11
    served = download(stack, video["url"])
    assert served.headers["content-type"] == "video/mp4"
    assert len(served.content) == video["file_size"]
    frames, duration, codec = decoded_frames(served.content)
    assert (len(frames), frames[0].shape, codec) == (12, (64, 128, 3), "h264")  # 16:9 at 64p: 128x64
    assert duration == pytest.approx(1.5)
    # The poster: its first frame, as a JPEG.
    poster = Image.open(io.BytesIO(download(stack, video["poster"]["url"]).content))
    assert poster.size == (128, 64)
    # 1.5 s at the 64p tier's price (10,000 µ$ a second): 15,000 µ$.
    billed_exactly(result, handle.request_id, seconds=Decimal("1.5"), unit="video_second", price=10_000)
    with stack.client() as client:
        answer = client.get(f"/queue/{VIDEO}/requests/{handle.request_id}", headers={"Authorization": f"Key {fal.key}"})
    assert answer.headers["x-fal-billable-units"] == "1.5"
    assert answer.headers["x-cost-micros"] == "15000"


def start_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 96, 3), dtype=np.uint8))


def model_first_frame(image: Image.Image, *, seed: int, prompt: str) -> np.ndarray:
    """The tiny model's first frame for this start image, made in this process (the same weights): what a video that
    honours its start frame begins with, whatever its prompt and seed."""
    engine = PipelineCache(budget_bytes=1 << 30).get("builtin:tiny-ltx-video", PipelineKind.IMAGE_TO_VIDEO).engine
    request = GenerationRequest(prompts=[prompt], seeds=[seed], width=96, height=64, num_inference_steps=3,
                                guidance_scale=3.0, num_frames=9, frame_rate=8, init_image=image)  # fmt: skip
    return engine.run(request).videos[0][0]


def test_image_to_video_starts_from_the_image_given(stack: Stack, fal: fal_client.SyncClient) -> None:
    image = start_image(1)
    uploaded = fal.upload_image(image, format="png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    common = {"num_frames": 9, "fps": 8, "num_inference_steps": 3, "seed": 5}  # auto: the image's 3:2 at 64p
    first_frames = []
    for image_url, prompt in ((uploaded, "a harbour"), (data_uri, "a forest")):
        result = fal.subscribe(
            f"{VIDEO}/image-to-video", arguments={**common, "prompt": prompt, "image_url": image_url}
        )
        frames, _, _ = decoded_frames(download(stack, result["video"]["url"]).content)
        assert (len(frames), frames[0].shape) == (9, (64, 96, 3))
        first_frames.append(frames[0])
    expected = model_first_frame(image, seed=99, prompt="any prompt")  # the first frame depends on neither
    another_image = model_first_frame(start_image(2), seed=5, prompt="a harbour")
    for frame in first_frames:
        matched, unmatched = psnr(frame, expected), psnr(frame, another_image)
        assert matched > 40, (matched, unmatched)
        assert matched > unmatched + 4, (matched, unmatched)
    assert psnr(first_frames[0], first_frames[1]) > 40  # an upload and a data URI of one image: one start frame


@pytest.mark.parametrize(("output_format", "content_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg")])
def test_text_to_audio(stack: Stack, fal: fal_client.SyncClient, output_format: str, content_type: str) -> None:
    handle = fal.submit(AUDIO, {"prompt": "rain on a tin roof", "seconds_total": 1.25, "steps": 4,
                                "output_format": output_format})  # fmt: skip
    result = handle.get()
    clip = result["audio_file"]
    assert clip["content_type"] == content_type
    served = download(stack, clip["url"])
    assert served.headers["content-type"] == content_type
    samples, rate = soundfile.read(io.BytesIO(served.content))
    assert rate == 16_000
    assert samples.shape[1] == 2
    if output_format == "wav":
        assert samples.shape[0] == 20_000  # 1.25 s
    else:
        assert 20_000 <= samples.shape[0] <= 20_000 + 2 * 1_152  # MP3 pads to whole frames of 1,152 samples
    billed_exactly(result, handle.request_id, seconds=Decimal("1.25"), unit="audio_second", price=1_000)


def forged(url: str) -> str:
    """The same link with one character of its signature changed."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["signature"] = ("0" if query["signature"][0] != "0" else "1") + query["signature"][1:]
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.mark.parametrize(
    ("app", "arguments"),
    [
        (VIDEO, {"prompt": "a lighthouse", "num_frames": 10, "fps": 8, "resolution": "64p", "aspect_ratio": "1:1",
                 "num_inference_steps": 2, "seed": 3}),
        (AUDIO, {"prompt": "rain", "seconds_total": 0.75, "steps": 2, "seed": 3}),
    ],
    ids=["video", "audio"],
)  # fmt: skip
def test_a_webhook_carries_signed_links_to_the_video_its_poster_and_the_clip(
    stack: Stack,
    fal: fal_client.SyncClient,
    e2e_tenant: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    app: str,
    arguments: dict[str, Any],
) -> None:
    """The worker's webhook, checked as a receiver does (fal's documented verifier against the server's JWKS, and
    Standard Webhooks with the organization's secret); its links are signed, served over HTTPS with the file's
    type and size, and refused once their signature is changed."""
    pytest.importorskip("nacl.signing", reason="PyNaCl, which fal's verifier uses, is not installed")
    from inference.webhooks import webhook_secret_for

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", stack.ca_file)  # the verifier fetches the JWKS with requests
    with local_server() as receiver:
        handle = fal.submit(app, arguments, webhook_url=receiver.url("/hook"))
        [request] = wait_until(
            lambda: list(receiver.received),
            timeout=120,
            message=lambda: f"the webhook\n{stack.log_tail('gpu')}\n{stack.log_tail('housekeeping')}",
        )
    assert FalDocsReceiver(f"{stack.base_url}/.well-known/jwks.json").accepts(request.headers, request.body)
    body = Webhook(webhook_secret_for(e2e_tenant["organization"].pk)).verify(request.body, request.headers)
    assert (body["request_id"], body["status"], body["error"]) == (handle.request_id, "OK", None)
    payload = body["payload"]
    if app == VIDEO:
        video = payload["video"]
        links = [(video, "video/mp4"), (video["poster"], "image/jpeg")]
    else:
        links = [(payload["audio_file"], "audio/wav")]
    for file, content_type in links:
        assert file["url"].startswith(f"{stack.base_url}/files/outputs/")
        assert file["content_type"] == content_type
        served = download(stack, file["url"])
        assert served.headers["content-type"] == content_type
        assert len(served.content) == file["file_size"]
        refused = httpx.get(forged(file["url"]), verify=stack.ssl_context(), timeout=30)
        assert (refused.status_code, refused.json()["error_type"]) == (403, "invalid_signature")
        if content_type == "video/mp4":
            frames, duration, codec = decoded_frames(served.content)
            assert (len(frames), frames[0].shape, codec, duration) == (10, (64, 64, 3), "h264", pytest.approx(1.25))
        elif content_type == "image/jpeg":
            assert Image.open(io.BytesIO(served.content)).size == (64, 64)
        else:
            samples, rate = soundfile.read(io.BytesIO(served.content))
            assert (rate, samples.shape) == (16_000, (12_000, 2))  # 0.75 s of stereo


def test_the_books_reconcile_after_video_and_audio(stack: Stack, fal: fal_client.SyncClient) -> None:
    fal.subscribe(VIDEO, arguments={"prompt": "x", "duration": 1, "fps": 8, "num_inference_steps": 2})
    fal.subscribe(AUDIO, arguments={"prompt": "x", "seconds_total": 0.5, "steps": 2})
    cancelled = fal.submit(VIDEO, {"prompt": "x", "num_frames": 33, "fps": 8, "resolution": "128p",
                                   "num_inference_steps": 50})  # fmt: skip
    cancelled.cancel()
    final = ("COMPLETED", "CANCELLED", "FAILED")
    wait_until(lambda: Job.objects.get(pk=cancelled.request_id).status in final, timeout=120,
               message=lambda: stack.log_tail("gpu"))  # fmt: skip
    # A video cancelled before it delivered anything costs nothing, whatever its GPU time.
    assert all(record.cost_micros == 0 for record in UsageRecord.objects.filter(job_id=cancelled.request_id))
    run = run_reconciliation(full=True)
    assert run.drift == [], run.drift
