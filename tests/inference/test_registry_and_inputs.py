"""The registry serves diffusers folders dropped under MODELS_DIR; /v1/models shows them; input limits."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rest_framework.test import APIClient

from inference import worker
from inference.engine import GenerationRequest, run_pipeline, save_builtin_model
from inference.models import Endpoint, Job
from inference.registry import sync_local_models

pytestmark = pytest.mark.django_db


def test_a_folder_under_models_dir_is_served_with_no_code_change(tmp_path: Path, settings: Any) -> None:
    settings.MODELS_DIR = tmp_path
    save_builtin_model("tiny-sd", tmp_path / "My Model")
    (tmp_path / "not-a-model").mkdir()
    assert sync_local_models() == {"models": 1, "created": 2, "retired": 0}
    text = Endpoint.objects.get(owner="local", name="my-model", path="")
    image = Endpoint.objects.get(owner="local", name="my-model", path="image-to-image")
    assert (text.kind, image.kind) == ("text-to-image", "image-to-image")
    # The worker loads it from the folder with from_pretrained and runs it.
    loaded = worker.pipeline_cache().get(worker.weights_source(text), text.kind)
    result = run_pipeline(
        loaded.pipeline, GenerationRequest(prompts=["x"], seeds=[1], width=64, height=64, num_inference_steps=2)
    )
    assert result.images[0].size == (64, 64)
    # Listed with its input schema.
    listed = {model["endpoint_id"]: model for model in APIClient().get("/v1/models").json()["models"]}
    assert "local/my-model" in listed
    assert "image_url" in listed["local/my-model/image-to-image"]["input_schema"]["required"]
    # A folder that goes away turns its endpoints off; it comes back when the folder does.
    (tmp_path / "My Model" / "model_index.json").unlink()
    assert sync_local_models()["retired"] == 2
    assert not Endpoint.objects.filter(owner="local", is_active=True).exists()


def test_models_lists_the_builtins_with_their_limits(builtin_endpoint: Endpoint) -> None:
    models = {model["endpoint_id"]: model for model in APIClient().get("/v1/models").json()["models"]}
    schema = models["platform/tiny-sd"]["input_schema"]
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["num_inference_steps"]["maximum"] == builtin_endpoint.max_steps
    assert models["platform/tiny-sd"]["price"] == {
        "unit": "gpu_second",
        "unit_price_micros": 100,
        "currency": "usd",
        "effective_from": "2020-01-01T00:00:00+00:00",
        "resolution_tiers": [],
    }  # the opening rate card for the cpu class


def test_an_input_image_over_the_endpoint_limit_is_413(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    Endpoint.objects.filter(owner="platform", name="tiny-sd").update(max_input_image_bytes=2000)
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 64).convert("RGB").save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 2000
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = tenant["client"].post(
        "/queue/platform/tiny-sd/image-to-image",
        data=json.dumps({"prompt": "x", "image_url": uri}),
        content_type="application/json",
    )
    assert response.status_code == 413, response.content
    assert response.json()["detail"][0]["loc"] == ["body", "image_url"]
    assert not Job.objects.exists()


def test_unknown_endpoint_is_404(tenant: dict[str, Any]) -> None:
    response = tenant["client"].post("/queue/acme/nothing", data={"prompt": "x"}, format="json")
    assert response.status_code == 404
    assert response.json()["error_type"] == "endpoint_not_found"


def test_another_tenants_request_is_404(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference import dispatch

    monkeypatch.setattr(dispatch, "send_run_message", lambda *args: True)
    submitted = tenant["client"].post("/queue/platform/tiny-sd", data={"prompt": "x"}, format="json").json()
    request_id = submitted["request_id"]
    for method, suffix in (("get", "/status"), ("get", ""), ("put", "/cancel")):
        response = getattr(other_tenant["client"], method)(f"/queue/platform/tiny-sd/requests/{request_id}{suffix}")
        assert response.status_code == 404, (method, suffix)
    assert other_tenant["client"].get(f"/v1/requests/{request_id}").status_code == 404
    assert tenant["client"].get(f"/v1/requests/{request_id}").status_code == 200
