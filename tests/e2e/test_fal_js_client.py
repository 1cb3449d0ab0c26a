"""fal's JavaScript client (``@fal-ai/client``, pinned in tests/e2e/js/package-lock.json), unmodified, run by Node
against the platform over HTTPS with real workers. Its only configuration is its own ``proxyUrl`` option, pointed at
the platform's ``/fal/proxy`` (inference/fal_proxy.py); the key is the client's own ``FAL_KEY``.

The Node side is tests/e2e/js/scenario.mjs: each test runs one scenario and reads what the client returned, saw or
threw. It runs from the folder's copy under var/npm/ (tests/npm.py), where ``npm ci`` installs the client when the
copy's node_modules is missing or older than the lock file. The browser side is the same client bundled by esbuild
(tests/e2e/js/browser.mjs), in a page of another origin in headless Chromium, configured with ``proxyUrl`` and its
``credentials``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from inference.models import Job, JobAttempt, Upload, UploadStatus
from tests.browser.conftest import chromium_path
from tests.e2e.conftest import Stack
from tests.e2e.test_fal_client import WAITED_SECONDS, set_concurrency_limit, waited_unstarted
from tests.e2e.test_fal_streaming import SHARED_CACHE
from tests.npm import npm_ci
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

JS = Path(__file__).resolve().parent / "js"
APP = "platform/tiny-sd"
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3}
# Long enough to be caught running, however fast the machine.
LONG = {**SMALL, "num_inference_steps": 50, "image_size": {"width": 256, "height": 256}}
# Steps long enough (attention over 32x32 latents) that the stream sees most of them, and previews between them.
STREAM_STEPS = 6
STREAMED = {**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": STREAM_STEPS}
# What a scenario may take at most, waits included (it waits on conditions, with deadlines of its own).
SCENARIO_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/e2e/js, copied under var/npm/ with its node_modules installed from the lock file (``npm ci``)."""
    return npm_ci(JS, needed_for="fal's JavaScript client (tests/e2e/js)")


def start_scenario(stack: Stack, node_client: Path, name: str, key: str, **given: Any) -> subprocess.Popen[str]:
    """Starts ``scenario.mjs <name>`` with the client's ``proxyUrl`` on this stack."""
    env = {
        # No FAL_* of the Python client's (tests/e2e/conftest.py): the proxy URL is the only configuration.
        **{name: value for name, value in os.environ.items() if not name.startswith("FAL_")},
        "NODE_EXTRA_CA_CERTS": stack.ca_file,
        "PLATFORM_PROXY_URL": f"{stack.base_url}/fal/proxy",
        "FAL_KEY": key,
        "SCENARIO_INPUT": json.dumps({"app": APP, **given}),
    }
    return subprocess.Popen(
        ["node", "scenario.mjs", name],
        cwd=node_client,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def scenario_output(stack: Stack, scenario: subprocess.Popen[str]) -> dict[str, Any]:
    """What a started scenario printed, as JSON, once it has exited."""
    try:
        stdout, stderr = scenario.communicate(timeout=SCENARIO_TIMEOUT_SECONDS)
    finally:
        if scenario.poll() is None:
            scenario.kill()
            scenario.communicate()
    assert scenario.returncode == 0, (
        f"scenario {scenario.args[2]} failed:\n{stderr}\n{stdout}\nserver:\n{stack.log_tail('web')}"
        f"\nworker:\n{stack.log_tail('gpu')}"
    )
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run_scenario(stack: Stack, node_client: Path, name: str, key: str, **given: Any) -> dict[str, Any]:
    """Runs ``scenario.mjs <name>`` with the client's ``proxyUrl`` on this stack; what it printed, as JSON."""
    return scenario_output(stack, start_scenario(stack, node_client, name, key, **given))


def still_running(scenario: subprocess.Popen[str]) -> bool:
    """True while the scenario runs; a condition that gives up at once if it has exited."""
    assert scenario.poll() is None, f"the scenario exited early:\n{''.join(scenario.communicate())}"
    return True


@pytest.fixture
def key(e2e_tenant: dict[str, Any]) -> str:
    return str(e2e_tenant["key"])


def fetch_image(stack: Stack, url: str) -> Image.Image:
    response = httpx.get(url, verify=stack.ssl_context(), timeout=30)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def messages(logs: list[dict[str, Any]] | None) -> list[str]:
    return [line["message"] for line in logs or []]


def test_submit_status_and_result(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "queue", key, input={**SMALL, "seed": 7, "num_images": 2})
    request_id = seen["handle"]["request_id"]
    assert seen["handle"]["status"] == "IN_QUEUE"
    assert seen["seen"][-1] == "COMPLETED"
    assert set(seen["seen"]) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    done = seen["done"]
    assert (done["request_id"], done["error"]) == (request_id, None)
    assert any("Completed" in message for message in messages(done["logs"]))
    result = seen["result"]
    assert result["requestId"] == request_id
    output = result["data"]
    assert (output["seed"], output["prompt"]) == (7, SMALL["prompt"])
    assert len(output["images"]) == 2
    for image in output["images"]:
        assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
        assert fetch_image(stack, image["url"]).size == (64, 64)
    assert output["usage"]["gpu_ms"] > 0


def test_subscribe_polls_with_logs(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "subscribe", key, input=SMALL)
    result = seen["result"]
    assert seen["enqueued"] == result["requestId"]
    assert len(result["data"]["images"]) == 1
    statuses = [update["status"] for update in seen["updates"]]
    assert statuses[-1] == "COMPLETED"
    assert {"IN_QUEUE", "IN_PROGRESS"} & set(statuses)
    # Polling asks for the whole list each time: the last update has every line, once.
    assert messages(seen["updates"][-1]["logs"]) == messages(seen["final"]["logs"])
    assert seen["final"]["logs"]


def test_run_waits_for_the_result(stack: Stack, node_client: Path, key: str) -> None:
    ran = run_scenario(stack, node_client, "run", key, input={**SMALL, "output_format": "jpeg"})
    assert "error" not in ran, ran
    image = ran["value"]["data"]["images"][0]
    assert image["content_type"] == "image/jpeg"
    assert fetch_image(stack, image["url"]).format == "JPEG"
    assert ran["value"]["requestId"]


def test_run_returns_the_output_however_long_the_request_waits(
    stack: Stack, node_client: Path, key: str, e2e_tenant: dict[str, Any]
) -> None:
    # No worker takes the request until it has waited: its job stays DISPATCHED (no lease runs out meanwhile).
    with stack.paused("gpu"):
        running = start_scenario(stack, node_client, "run", key, input={**SMALL, "seed": 23})
        waited = wait_until(
            lambda: (
                still_running(running) and waited_unstarted(e2e_tenant["organization"], seed=23, seconds=WAITED_SECONDS)
            ),
            timeout=60,
            message=f"the run's request to wait {WAITED_SECONDS} s unstarted",
        )
    ran = scenario_output(stack, running)
    assert "error" not in ran, ran
    assert ran["value"]["requestId"] == str(waited.pk)
    output = ran["value"]["data"]
    # The model's output, not a queue handle standing in for it.
    assert not {"request_id", "status_url", "response_url"} & set(output), output
    assert output["seed"] == 23
    [image] = output["images"]
    assert fetch_image(stack, image["url"]).size == (64, 64)
    job = Job.objects.get(pk=waited.pk)
    assert job.status == "COMPLETED"
    assert (job.finished_at - job.created_at).total_seconds() >= WAITED_SECONDS


def test_start_timeout_ends_a_request_that_could_not_start_unbilled(
    stack: Stack, node_client: Path, key: str, e2e_tenant: dict[str, Any]
) -> None:
    from billing.models import Account, UsageRecord

    organization = e2e_tenant["organization"]
    set_concurrency_limit(organization, 1)
    # With the GPU worker paused, a dispatched request holds the tenant's only slot until it is cancelled: the run
    # waits in the queue behind it past its start timeout, however fast the machine.
    with stack.client(key) as client, stack.paused("gpu"):
        blocker = client.post(f"/queue/{APP}", json={**SMALL, "seed": 1}).json()["request_id"]
        wait_until(
            lambda: Job.objects.get(pk=blocker).status == "DISPATCHED",
            timeout=30,
            message="the blocker to take the only slot",
        )
        held_before = Account.objects.get(organization=organization).held_micros
        ran = run_scenario(stack, node_client, "run", key, input={**SMALL, "seed": 2}, startTimeout=1.5)
        # Read before the blocker's cancel releases the blocker's own hold.
        held_after = Account.objects.get(organization=organization).held_micros
        assert client.put(f"/queue/{APP}/requests/{blocker}/cancel").status_code == 202
    error = ran["error"]
    assert (error["name"], error["isApiError"], error["status"]) == ("ApiError", True, 504)
    # The client's mark of a timeout the caller set, which it does not retry.
    assert (error["timeoutType"], error["isUserTimeout"]) == ("user", True)
    assert error["body"]["error_type"] == "timeout"
    assert "start timeout" in error["body"]["detail"]
    job = Job.objects.get(pk=error["requestId"])
    assert job.input["seed"] == 2
    assert (job.status, job.error_type, job.started_at, job.gpu_ms) == ("CANCELLED", "timeout", None, 0)
    assert not JobAttempt.objects.filter(job=job).exists()
    assert not UsageRecord.objects.filter(job=job).exists()
    assert held_after == held_before


def test_a_run_past_the_servers_wait_is_never_sent_again(
    stack: Stack, node_client: Path, key: str, e2e_tenant: dict[str, Any]
) -> None:
    # The client resends a 504 unless it is marked as the caller's own timeout; the request goes on past the run's
    # wait, so a resend would be a second request, run and billed again.
    set_concurrency_limit(e2e_tenant["organization"], 1)
    with (
        stack.restarted("web", SYNC_RUN_TIMEOUT_SECONDS="2") as restarted,
        restarted.client(key) as client,
        restarted.paused("gpu"),
    ):
        blocker = client.post(f"/queue/{APP}", json={**SMALL, "seed": 30}).json()["request_id"]
        wait_until(
            lambda: Job.objects.get(pk=blocker).status == "DISPATCHED",
            timeout=30,
            message="the blocker to take the only slot",
        )
        ran = run_scenario(restarted, node_client, "run", key, input={**SMALL, "seed": 31})
        assert client.put(f"/queue/{APP}/requests/{blocker}/cancel").status_code == 202
    error = ran["error"]
    assert (error["name"], error["status"], error["isUserTimeout"]) == ("ApiError", 504, True), error
    assert error["body"]["error_type"] == "timeout"
    [job] = Job.objects.filter(organization=e2e_tenant["organization"], input__seed=31)
    assert str(job.pk) == error["requestId"]


def test_cancel_a_running_request(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "cancel", key, input=LONG)
    assert (seen["done"]["status"], seen["done"]["error_type"]) == ("COMPLETED", "cancelled")
    error = seen["result"]["error"]
    assert (error["isApiError"], error["status"]) == (True, 400)
    assert error["body"]["error_type"] == "cancelled"
    assert error["requestId"] == seen["requestId"]


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [("bad key", 401, "invalid_api_key"), ("unknown app", 404, "endpoint_not_found")],
)
def test_refusals_are_the_clients_api_errors_with_our_body(
    stack: Stack, node_client: Path, key: str, case: str, status: int, error_type: str
) -> None:
    used_key, app = (f"{key.split(':')[0]}:wrong", APP) if case == "bad key" else (key, "platform/no-such-model")
    seen = run_scenario(stack, node_client, "submit", used_key, app=app, input=SMALL)
    error = seen["error"]
    assert (error["name"], error["isApiError"], error["isValidationError"]) == ("ApiError", True, False)
    assert error["status"] == status
    assert error["body"]["error_type"] == error_type
    assert error["body"]["detail"]


def test_invalid_input_is_the_clients_validation_error(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "run", key, input={"num_images": "two", "num_inference_steps": 10_000})
    error = seen["error"]
    assert (error["name"], error["isValidationError"], error["status"]) == ("ValidationError", True, 422)
    assert error["body"]["error_type"] == "validation_error"
    locations = [item["loc"] for item in error["fieldErrors"]]
    assert ["body", "prompt"] in locations
    assert ["body", "num_images"] in locations
    assert error["fieldErrors"] == error["body"]["detail"]


def test_a_host_that_is_not_fals_is_refused(stack: Stack, node_client: Path, key: str) -> None:
    """The client takes any URL whose host ends in fal.run as an endpoint; the proxy serves only fal's own hosts."""
    seen = run_scenario(stack, node_client, "run", key, app="https://notfal.run/platform/tiny-sd", input=SMALL)
    error = seen["error"]
    assert (error["isApiError"], error["status"]) == (True, 403)
    assert error["body"]["error_type"] == "proxy_target_refused"
    with stack.client(key) as client:
        response = client.post("/fal/proxy", json=SMALL, headers={"x-fal-target-url": "https://example.com/x"})
        assert (response.status_code, response.json()["error_type"]) == (403, "proxy_target_refused")
        missing = client.post("/fal/proxy", json=SMALL)
        assert missing.status_code == 422
        assert missing.json()["detail"][0]["loc"] == ["header", "x-fal-target-url"]


def test_the_status_stream_arrives_while_the_request_runs(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "statusStream", key, input=LONG)
    first = seen["first"]
    assert first["event"]["request_id"] == seen["requestId"]
    assert first["event"]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    # Asked over another request once the first event was in: nothing had waited for the end.
    assert first["statusMeanwhile"] in ("IN_QUEUE", "IN_PROGRESS")
    assert seen["events"][-1] == seen["done"]
    assert (seen["done"]["status"], seen["done"]["error_type"]) == ("COMPLETED", "cancelled")


def test_subscribe_streaming_shows_each_log_line_once(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(
        stack, node_client, "subscribe", key, input={**SMALL, "num_inference_steps": 6}, mode="streaming"
    )
    assert len(seen["result"]["data"]["images"]) == 1
    statuses = [update["status"] for update in seen["updates"]]
    assert statuses[-1] == "COMPLETED"
    assert len(statuses) > 1
    final = messages(seen["final"]["logs"])
    assert final
    # The client appends each event's logs to what it showed before: the application sees each line once.
    assert messages(seen["updates"][-1]["logs"]) == final


def test_stream_yields_progress_previews_and_the_output_last(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "stream", key, input={**STREAMED, "seed": 11})
    events, done = seen["events"], seen["done"]
    output = events[-1]
    # done() resolves with the last event: the output, as the result URL renders it.
    assert done == {"value": output}
    assert "type" not in output
    assert output["seed"] == 11
    [image] = output["images"]
    assert (image["width"], image["height"]) == (256, 256)
    assert fetch_image(stack, image["url"]).size == (256, 256)
    assert output["usage"]["gpu_ms"] > 0

    updates = events[:-1]
    assert {event["type"] for event in updates} <= {"status", "preview"}
    assert {event["request_id"] for event in updates} == {seen["requestId"]}
    phases = [event["status"] for event in updates if event["type"] == "status"]
    assert phases[-1] == "COMPLETED"
    assert "IN_PROGRESS" in phases
    assert all(event["progress"]["total"] == STREAM_STEPS for event in updates if event["status"] == "IN_PROGRESS")
    lines = [line["message"] for event in updates for line in event.get("logs") or []]
    assert len(lines) == len(set(lines)), lines  # each event carries only its new lines
    assert f"Step {STREAM_STEPS}/{STREAM_STEPS}" in lines

    previews = [event for event in updates if event["type"] == "preview"]
    if SHARED_CACHE:  # previews travel through the shared cache (inference/streaming.py)
        assert previews, [(event["type"], event.get("progress")) for event in updates]
    for preview in previews:
        assert 0 < preview["progress"]["step"] < STREAM_STEPS
        for shown in preview["images"]:
            header, data = shown["url"].split(",", 1)
            assert header == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (shown["width"], shown["height"])
    preview_steps = [preview["progress"]["step"] for preview in previews]
    assert preview_steps == sorted(set(preview_steps))


def test_a_cancelled_stream_ends_with_an_error_event(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(stack, node_client, "stream", key, input={**STREAMED, "num_inference_steps": 50}, cancel=True)
    last = seen["events"][-1]
    # The client raises on no event: done() resolves with the error event, which the application checks.
    assert seen["done"] == {"value": last}
    assert last["type"] == "error"
    assert last["request_id"] == seen["requestId"]
    assert (last["status"], last["error_type"], last["status_code"]) == ("COMPLETED", "cancelled", 400)
    assert last["detail"].startswith("Cancelled by request.")
    # The result URL answers the same error, as the client's ApiError.
    error = seen["result"]["error"]
    assert (error["isApiError"], error["status"]) == (True, last["status_code"])
    assert error["body"] == {"detail": last["detail"], "error_type": "cancelled"}


@pytest.mark.parametrize(
    ("case", "name", "status", "error_type"),
    [
        ("bad key", "ApiError", 401, "invalid_api_key"),
        ("invalid input", "ValidationError", 422, "validation_error"),
    ],
)
def test_stream_refusals_come_before_any_event_as_the_clients_errors(
    stack: Stack, node_client: Path, e2e_tenant: dict[str, Any], case: str, name: str, status: int, error_type: str
) -> None:
    key = str(e2e_tenant["key"])
    if case == "bad key":
        used_key, given = f"{key.split(':')[0]}:wrong", STREAMED
    else:
        used_key, given = key, {"num_images": "two", "num_inference_steps": 10_000}
    seen = run_scenario(stack, node_client, "stream", used_key, input=given)
    assert seen["events"] == []
    error = seen["done"]["error"]
    assert (error["name"], error["isApiError"], error["status"]) == (name, True, status)
    assert error["body"]["error_type"] == error_type
    if status == 422:
        assert ["body", "prompt"] in [item["loc"] for item in error["fieldErrors"]]
    assert not Job.objects.filter(organization=e2e_tenant["organization"]).exists()


def png_base64(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# An input image whose size is no default's: image-to-image without `image_size` keeps it, as fal's does.
INPUT_SIZE = (48, 40)
IMAGE_TO_IMAGE = {"prompt": "a lighthouse at dusk", "num_inference_steps": 3, "strength": 0.5}


def test_upload_then_image_to_image(stack: Stack, node_client: Path, key: str) -> None:
    seen = run_scenario(
        stack,
        node_client,
        "uploadThenImageToImage",
        key,
        app=f"{APP}/image-to-image",
        png_base64=png_base64(INPUT_SIZE),
        input=IMAGE_TO_IMAGE,
    )
    assert seen["url"].startswith(f"{stack.base_url}/files/uploads/")
    [image] = seen["result"]["data"]["images"]
    assert (image["width"], image["height"]) == INPUT_SIZE
    assert fetch_image(stack, image["url"]).size == INPUT_SIZE


def test_a_blob_inside_input_is_uploaded_by_the_client(
    stack: Stack, node_client: Path, key: str, e2e_tenant: dict[str, Any]
) -> None:
    size = (40, 56)
    encoded = png_base64(size)
    seen = run_scenario(
        stack, node_client, "blobInInput", key, app=f"{APP}/image-to-image", png_base64=encoded, input=IMAGE_TO_IMAGE
    )
    result = seen["result"]
    [image] = result["data"]["images"]
    assert (image["width"], image["height"]) == size
    assert fetch_image(stack, image["url"]).size == size
    # The request got the URL of the client's own upload in place of the Blob.
    job = Job.objects.get(pk=result["requestId"])
    sent = job.input["image_url"]
    assert sent.startswith(f"{stack.base_url}/files/uploads/")
    upload = Upload.objects.get(organization=e2e_tenant["organization"])
    assert str(upload.id) in sent
    assert (upload.status, upload.content_type, upload.size) == (
        UploadStatus.READY,
        "image/png",
        len(base64.b64decode(encoded)),
    )


def test_stream_in_client_mode_is_refused_saying_why(
    stack: Stack, node_client: Path, key: str, e2e_tenant: dict[str, Any]
) -> None:
    """``connectionMode: "client"`` asks fal's REST host for a token to reach fal.run past the proxy: refused with the
    reason (inference/fal_proxy.py), which the client throws as its ApiError."""
    seen = run_scenario(stack, node_client, "streamClientMode", key, input=SMALL)
    error = seen["done"]["error"]
    assert (error["isApiError"], error["status"]) == (True, 501)
    assert error["body"]["error_type"] == "proxy_target_unsupported"
    assert 'connectionMode ("server")' in error["body"]["detail"]
    assert not Job.objects.filter(organization=e2e_tenant["organization"]).exists()


# In a browser: a page of another origin, as a web app calls the platform.

BROWSER_SCENARIO = """
async ({ proxyUrl, key, app, input }) => {
  const { fal, ApiError } = window.falClient;
  fal.config({ proxyUrl, credentials: key });
  const statuses = [];
  const onQueueUpdate = (update) => statuses.push(update.status);
  const result = await fal.subscribe(app, { input, logs: true, onQueueUpdate });
  fal.config({ proxyUrl, credentials: key.split(":")[0] + ":wrong" });
  let refused = null;
  try {
    await fal.queue.submit(app, { input });
  } catch (error) {
    refused = { isApiError: error instanceof ApiError, status: error.status, body: error.body };
  }
  return { origin: location.origin, statuses, result, refused };
}
"""


@contextmanager
def serving(folder: Path) -> Iterator[str]:
    """``folder`` over plain HTTP on a loopback port of its own: an origin that is not the platform's."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def web_app(node_client: Path, tmp_path: Path) -> Path:
    """A page with fal's client in it, bundled from the installed package as a web app's build would."""
    bundled = subprocess.run(
        [str(node_client / "node_modules" / ".bin" / "esbuild"), "browser.mjs", "--bundle", "--format=iife",
         "--global-name=falClient", "--platform=browser", "--log-level=warning", f"--outfile={tmp_path / 'fal.js'}"],
        cwd=node_client, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bundled.returncode == 0, bundled.stderr
    (tmp_path / "index.html").write_text('<!doctype html><title>web app</title><script src="fal.js"></script>\n')
    return tmp_path


@pytest.mark.browser
def test_a_web_page_on_another_origin(stack: Stack, web_app: Path, key: str) -> None:
    from playwright.sync_api import sync_playwright

    with serving(web_app) as origin, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path())
        try:
            # The page trusts the test CA's certificate as a browser trusts a real one.
            page = browser.new_context(ignore_https_errors=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{origin}/index.html")
            seen = page.evaluate(
                BROWSER_SCENARIO, {"proxyUrl": f"{stack.base_url}/fal/proxy", "key": key, "app": APP, "input": SMALL}
            )
        finally:
            browser.close()
    assert not errors
    assert seen["origin"] == origin != stack.base_url
    assert seen["statuses"][-1] == "COMPLETED"
    # The request id comes from a response header: readable across origins only because the proxy exposes it.
    assert seen["result"]["requestId"]
    image = seen["result"]["data"]["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    assert fetch_image(stack, image["url"]).size == (64, 64)
    refused = seen["refused"]
    assert (refused["isApiError"], refused["status"], refused["body"]["error_type"]) == (True, 401, "invalid_api_key")
