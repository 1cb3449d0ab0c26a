"""The video and audio endpoints: their input contract, the worker running them (and stopping one before work its hold
cannot pay for), their stored outputs.

Transactional where the worker runs: its heartbeat renews leases from its own thread and database connection.
"""

from __future__ import annotations

import base64
import io
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av
import numpy as np
import pytest
import soundfile
from django.core.files.storage import FileSystemStorage, default_storage, storages
from django.test import Client
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from inference import dispatch as dispatching
from inference import files, worker
from inference.catalog import ensure_builtin_endpoints
from inference.dispatch import dispatch_organization
from inference.engine import save_builtin_model
from inference.media_inputs import video_size
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from inference.registry import sync_local_models
from inference.submission import submit_job

BASE = "http://testserver"


@pytest.fixture
def endpoints(db: None) -> dict[str, Endpoint]:
    ensure_builtin_endpoints(Endpoint)
    return {
        "video": Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path=""),
        "image-to-video": Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path="image-to-video"),
        "audio": Endpoint.objects.get(owner="platform", name="tiny-stable-audio", path=""),
    }


@pytest.fixture
def media(settings: Any, tmp_path: Path) -> Path:
    root = tmp_path / "media"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}}
    settings.MEDIA_ROOT = root
    assert isinstance(storages["default"], FileSystemStorage)
    return root


def post(client: APIClient, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


def problems(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.content
    return {"/".join(str(part) for part in item["loc"][1:]): item["type"] for item in response.json()["detail"]}


def png_data_uri(size: tuple[int, int] = (96, 64), seed: int = 1) -> str:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# The input contract


def test_video_input_refuses_each_bad_field_at_once(tenant: dict[str, Any], endpoints: dict[str, Endpoint]) -> None:
    response = post(
        tenant["client"],
        "/queue/platform/tiny-ltx-video",
        {
            "prompt": "",
            "num_frames": 34,  # the endpoint's most is 33
            "fps": 0,
            "resolution": "100p",  # not a multiple of 32
            "aspect_ratio": "2:1",
            "num_inference_steps": 51,
            "guidance_scale": "high",
            "seed": -1,
        },
    )
    assert problems(response) == {
        "prompt": "string_too_short",
        "num_frames": "out_of_range",
        "fps": "out_of_range",
        "resolution": "out_of_range",
        "aspect_ratio": "enum",
        "num_inference_steps": "out_of_range",
        "guidance_scale": "float_type",
        "seed": "out_of_range",
    }
    assert not Job.objects.exists()


def test_video_size_and_length_from_resolution_aspect_ratio_and_duration(
    tenant: dict[str, Any], endpoints: dict[str, Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatching, "send_run_message", lambda *args: True)
    assert video_size(64, (16, 9)) == (128, 64)
    assert video_size(64, (9, 16)) == (64, 128)
    assert video_size(96, (4, 3)) == (128, 96)
    client = tenant["client"]
    answer = post(client, "/queue/platform/tiny-ltx-video", {"prompt": "x", "resolution": "64p", "aspect_ratio": "16:9",
                                                              "duration": 1.5, "fps": 12, "seed": 3})  # fmt: skip
    assert answer.status_code == 200, answer.content
    stored = Job.objects.get(pk=answer.json()["request_id"]).input
    assert (stored["width"], stored["height"], stored["num_frames"], stored["fps"]) == (128, 64, 18, 12)
    assert stored["seeds"] == [3]
    assert stored["num_images"] == 1
    # Beyond the endpoint's largest frame (128x128): named on the field that made it so.
    too_wide = post(client, "/queue/platform/tiny-ltx-video", {"prompt": "x", "resolution": "96p",
                                                                "aspect_ratio": "16:9"})  # fmt: skip
    assert problems(too_wide) == {"aspect_ratio": "out_of_range"}
    both = post(client, "/queue/platform/tiny-ltx-video", {"prompt": "x", "duration": 1, "num_frames": 8})
    assert problems(both) == {"duration": "value_error"}
    too_long = post(client, "/queue/platform/tiny-ltx-video", {"prompt": "x", "duration": 5, "fps": 8})
    assert problems(too_long) == {"duration": "out_of_range"}


def test_image_to_video_needs_a_start_image_and_takes_its_aspect_ratio(
    tenant: dict[str, Any], endpoints: dict[str, Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatching, "send_run_message", lambda *args: True)
    client = tenant["client"]
    assert problems(post(client, "/queue/platform/tiny-ltx-video/image-to-video", {"prompt": "x"})) == {
        "image_url": "missing"
    }
    answer = post(
        client, "/queue/platform/tiny-ltx-video/image-to-video", {"prompt": "x", "image_url": png_data_uri((96, 64))}
    )
    assert answer.status_code == 200, answer.content
    stored = Job.objects.get(pk=answer.json()["request_id"]).input
    # 3:2 at the default 64p: 96x64; the image itself kept with the job.
    assert (stored["width"], stored["height"]) == (96, 64)
    assert stored["image_path"].startswith("inputs/")


def test_audio_input(tenant: dict[str, Any], endpoints: dict[str, Endpoint], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatching, "send_run_message", lambda *args: True)
    client = tenant["client"]
    bad = post(client, "/queue/platform/tiny-stable-audio", {"prompt": "rain", "seconds_total": 9, "steps": 0,
                                                              "output_format": "flac"})  # fmt: skip
    assert problems(bad) == {"seconds_total": "out_of_range", "steps": "out_of_range", "output_format": "enum"}
    assert problems(post(client, "/queue/platform/tiny-stable-audio", {"prompt": "x", "seconds_total": 1.0005})) == {
        "seconds_total": "decimal_places"
    }
    assert problems(post(client, "/queue/platform/tiny-stable-audio", {"prompt": "x", "steps": 2,
                                                                        "num_inference_steps": 3})) == {
        "steps": "value_error"
    }  # fmt: skip
    answer = post(client, "/queue/platform/tiny-stable-audio", {"prompt": "rain", "seconds_total": 2.5, "steps": 6})
    assert answer.status_code == 200, answer.content
    stored = Job.objects.get(pk=answer.json()["request_id"]).input
    assert (stored["seconds_total"], stored["num_inference_steps"], stored["output_format"]) == (2.5, 6, "wav")


def test_models_lists_the_media_endpoints_with_their_schemas(endpoints: dict[str, Endpoint]) -> None:
    models = {model["endpoint_id"]: model for model in APIClient().get("/v1/models").json()["models"]}
    video = models["platform/tiny-ltx-video"]
    assert video["kind"] == "text-to-video"
    assert video["input_schema"]["properties"]["num_frames"]["maximum"] == 33
    assert video["input_schema"]["properties"]["fps"]["default"] == 8
    assert models["platform/tiny-ltx-video/image-to-video"]["input_schema"]["required"] == ["prompt", "image_url"]
    audio = models["platform/tiny-stable-audio"]["input_schema"]
    assert audio["properties"]["seconds_total"]["maximum"] == 8
    assert audio["properties"]["output_format"]["enum"] == ["wav", "mp3"]


def test_local_video_and_audio_folders_are_served_with_no_code_change(tmp_path: Path, settings: Any, db: None) -> None:
    settings.MODELS_DIR = tmp_path
    save_builtin_model("tiny-ltx-video", tmp_path / "My Video")
    save_builtin_model("tiny-stable-audio", tmp_path / "sounds")
    assert sync_local_models() == {"models": 2, "created": 3, "retired": 0}
    kinds = dict(Endpoint.objects.filter(owner="local").values_list("name", "kind").order_by("name", "path"))
    assert set(Endpoint.objects.filter(owner="local").values_list("name", "path", "kind")) == {
        ("my-video", "", "text-to-video"),
        ("my-video", "image-to-video", "image-to-video"),
        ("sounds", "", "text-to-audio"),
    }
    assert kinds["sounds"] == "text-to-audio"


# The worker


@pytest.fixture
def dispatched(
    tenant: dict[str, Any], endpoints: dict[str, Endpoint], media: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    monkeypatch.setattr(dispatching, "send_run_message", lambda *message: True)

    def submit(endpoint: str, **payload: Any) -> Job:
        job, _ = submit_job(
            organization=tenant["organization"], api_key=tenant["api_key"], endpoint=endpoints[endpoint],
            payload=payload,
        )  # fmt: skip
        dispatch_organization(tenant["organization"].pk)
        return Job.objects.get(pk=job.pk)

    return submit


def fetch(client: Client, url: str, **headers: str) -> Any:
    parts = urlsplit(url)
    return client.get(parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}, headers=headers)


@pytest.mark.django_db(transaction=True)
def test_a_video_request_runs_and_is_served_as_an_mp4(dispatched: Any) -> None:
    job = dispatched("video", prompt="a lighthouse", num_frames=10, fps=8, num_inference_steps=2, seed=4)
    worker.execute(str(job.id), job.attempt)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.attempts.get().outcome == AttemptOutcome.SUCCEEDED
    assert set(job.result) == {"video", "seed", "timings"}
    assert job.result["seed"] == 4
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    video = rendered["video"]
    assert {key: video[key] for key in ("content_type", "file_name", "width", "height", "fps", "num_frames")} == {
        "content_type": "video/mp4",
        "file_name": "0.mp4",
        "width": 64,
        "height": 64,
        "fps": 8,
        "num_frames": 10,
    }
    assert video["duration"] == 1.25
    client = Client()
    served = fetch(client, video["url"])
    body = b"".join(served.streaming_content)
    assert served.status_code == 200
    assert served["Content-Type"] == "video/mp4"
    assert served["Accept-Ranges"] == "bytes"
    assert len(body) == video["file_size"]
    with av.open(io.BytesIO(body)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10
    # Players ask for byte ranges.
    part = fetch(client, video["url"], Range="bytes=0-99")
    assert part.status_code == 206
    assert part.content == body[:100]
    assert part["Content-Range"] == f"bytes 0-99/{len(body)}"
    assert fetch(client, video["url"], Range="bytes=-10").content == body[-10:]
    assert fetch(client, video["url"], Range=f"bytes={len(body)}-").status_code == 416
    # The poster: the first frame, a JPEG, signed like the video.
    poster = fetch(client, video["poster"]["url"])
    assert poster.status_code == 200
    assert poster["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(b"".join(poster.streaming_content))).size == (64, 64)
    assert {path.split("/")[-1] for path in files._referenced_paths(job)} == {"0.mp4", "0.poster.jpg"}


@pytest.mark.django_db(transaction=True)
def test_an_audio_request_runs_and_is_served_as_wav(dispatched: Any) -> None:
    job = dispatched("audio", prompt="rain", seconds_total=1.25, steps=3, seed=2)
    worker.execute(str(job.id), job.attempt)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    clip = files.render_result(job, base_url=BASE)["audio_file"]  # type: ignore[index]
    assert (clip["content_type"], clip["file_name"], clip["sample_rate"], clip["num_samples"]) == (
        "audio/wav", "0.wav", 16_000, 20_000
    )  # fmt: skip
    assert clip["duration"] == 1.25
    served = fetch(Client(), clip["url"])
    assert served["Content-Type"] == "audio/wav"
    data, rate = soundfile.read(io.BytesIO(b"".join(served.streaming_content)))
    assert rate == 16_000
    assert data.shape == (20_000, 2)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("endpoint", "payload", "key", "names"),
    [
        ("video", {"prompt": "a", "num_frames": 5, "num_inference_steps": 2}, "video", {"0.mp4", "0.poster.jpg"}),
        ("audio", {"prompt": "a", "seconds_total": 0.5, "steps": 2}, "audio_file", {"0.wav"}),
    ],
    ids=["video", "audio"],
)
def test_the_purge_deletes_a_video_its_poster_and_a_clip_after_their_retention(
    dispatched: Any, tenant: dict[str, Any], media: Path, endpoint: str, payload: dict[str, Any], key: str,
    names: set[str],
) -> None:  # fmt: skip
    job = dispatched(endpoint, **payload)
    worker.execute(str(job.id), job.attempt)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.outputs_expire_at is not None
    folder = media / "outputs" / str(job.organization_id) / str(job.pk)
    assert {path.name for path in folder.iterdir()} == names
    before = files.render_result(job, base_url=BASE)
    assert before is not None
    links = [before[key]["url"]] + ([before[key]["poster"]["url"]] if key == "video" else [])
    client = Client()
    assert [fetch(client, url).status_code for url in links] == [200] * len(links)
    assert files.purge_expired_outputs().looked_at == 0  # not yet expired

    assert files.purge_expired_outputs(now=job.outputs_expire_at + timedelta(seconds=1)).purged == 1

    assert not folder.exists()
    assert [path for path in media.rglob("*") if path.is_file()] == []
    job.refresh_from_db()
    assert job.outputs_expire_at is None
    assert job.result is not None
    assert job.result["outputs_purged"] is True
    stored = job.result[key]
    assert stored["path"] is None
    assert stored["file_size"] > 0  # what it was stays described
    if key == "video":
        assert (stored["num_frames"], stored["width"], stored["poster"]["path"]) == (5, 64, None)
    rendered = files.render_result(job, base_url=BASE)
    assert rendered is not None
    assert rendered["outputs_purged"] is True
    assert rendered[key]["url"] is None
    if key == "video":
        assert rendered["video"]["poster"]["url"] is None
    assert "path" not in str(rendered)
    # The API's answer says so too, and the links handed out before the purge now find nothing.
    path = "/queue/platform/tiny-ltx-video" if key == "video" else "/queue/platform/tiny-stable-audio"
    answer = tenant["client"].get(f"{path}/requests/{job.pk}")
    assert answer.status_code == 200, answer.content
    assert answer.json()[key]["url"] is None
    assert [fetch(client, url).status_code for url in links] == [404] * len(links)
    assert files.purge_expired_outputs(now=timezone.now() + timedelta(days=365)).looked_at == 0


@pytest.mark.django_db(transaction=True)
def test_text_to_video_requests_share_a_pipeline_call(dispatched: Any) -> None:
    first = dispatched("video", prompt="a", num_frames=5, num_inference_steps=2, seed=1)
    second = dispatched("video", prompt="b", num_frames=5, num_inference_steps=2, seed=2)
    longer = dispatched("video", prompt="c", num_frames=9, num_inference_steps=2, seed=3)
    worker.execute(str(first.id), first.attempt)
    statuses = {job.pk: Job.objects.get(pk=job.pk).status for job in (first, second, longer)}
    assert statuses == {first.pk: JobStatus.COMPLETED, second.pk: JobStatus.COMPLETED, longer.pk: JobStatus.DISPATCHED}
    assert Job.objects.get(pk=second.pk).logs.filter(message__contains="Shared a pipeline call").exists()
    assert default_storage.exists(Job.objects.get(pk=second.pk).result["video"]["path"])


@pytest.mark.django_db(transaction=True)
def test_a_local_video_model_billed_per_gpu_second_stops_before_the_step_its_hold_cannot_pay_for(
    tenant: dict[str, Any], media: Path, tmp_path: Path, settings: Any, priced_without_broker: None
) -> None:
    """A ``local/`` video folder has no price per output: it is billed per GPU-second, and its hold grows before
    each step as an image model's does (a price per output is held whole at admission instead). When the hold
    cannot grow, the job stops before the step, stores nothing and is billed only the GPU time its hold covers;
    the rest of its GPU time is recorded unbilled."""
    from billing.ledger import grant_credits
    from billing.models import Account, EntryKind, Hold, UsageRecord
    from billing.money import gpu_cost_micros, gpu_ms_within
    from billing.rates import OPENING_PRICES

    settings.MODELS_DIR = tmp_path / "models"
    save_builtin_model("tiny-ltx-video", settings.MODELS_DIR / "clips")
    sync_local_models()
    endpoint = Endpoint.objects.get(owner="local", name="clips", path="")
    assert endpoint.kind == "text-to-video"
    job, _ = submit_job(
        organization=tenant["organization"], api_key=tenant["api_key"], endpoint=endpoint,
        payload={"prompt": "a lighthouse", "num_frames": 9, "fps": 8, "resolution": "64p", "aspect_ratio": "1:1",
                 "num_inference_steps": 8, "seed": 1},
    )  # fmt: skip
    dispatch_organization(tenant["organization"].pk)
    job = Job.objects.get(pk=job.pk)
    # A hold far below what the video takes (1 µ$: 14 ms at a CPU-second's price), and no credit beside it.
    organization = tenant["organization"]
    Hold.objects.filter(job=job).update(amount_micros=1)
    Account.objects.filter(pk=organization.pk).update(held_micros=1)
    books = Account.objects.get(pk=organization.pk)
    grant_credits(organization=organization, amount_micros=-(books.balance_micros - 1), reason="spent elsewhere",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip

    worker.execute(str(job.id), job.attempt)

    stopped = Job.objects.get(pk=job.pk)
    assert (stopped.status, stopped.error_type) == (JobStatus.CANCELLED, "insufficient_credits")
    assert "Credits ran out while this request ran." in stopped.error
    steps = re.search(r"Stopped after step (\d+) of (\d+)\.", stopped.error)
    assert steps is not None, stopped.error
    assert int(steps[1]) < int(steps[2]) == 8  # before its last step: no video was made
    assert not stopped.result
    assert [path for path in media.rglob("*") if path.is_file()] == []
    attempt = stopped.attempts.get()
    assert attempt.outcome == AttemptOutcome.CANCELLED
    assert attempt.gpu_ms > 0
    record = UsageRecord.objects.get(job=job)
    price = OPENING_PRICES[endpoint.gpu_class]
    assert (record.unit, record.unit_price_micros, record.billable) == ("gpu_second", price, True)
    # The GPU time the hold covers, at most, is billed; the rest of the attempt's is recorded unbilled.
    assert record.gpu_ms == min(attempt.gpu_ms, gpu_ms_within(1, price))
    assert record.cost_micros == gpu_cost_micros(record.gpu_ms, price) <= 1
    assert record.gpu_ms + record.unbilled_gpu_ms == attempt.cold_start_ms + attempt.gpu_ms
    assert (record.video_ms, record.work_units > 0) == (0, True)
    assert Hold.objects.get(job=job).amount_micros == 1  # never extended, and released
    books = Account.objects.get(pk=organization.pk)
    assert (books.balance_micros, books.held_micros) == (1 - record.cost_micros, 0)
