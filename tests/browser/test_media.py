"""Video and audio in the dashboard, in headless Chromium against the running platform: the playground builds the
video endpoint's form from its input schema, shows the run's progress and plays the video; the history shows its
poster frame; a program's audio clip plays on its request page; usage shows the seconds delivered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LAPTOP, PHONE, TIMEOUT_MS, Tab, dollars, off_the_loop, wait_in_page
from tests.browser.test_dashboard import (
    WATCH_PROGRESS,
    between_steps_or_final,
    developer,  # noqa: F401  (the fixture)
    intermediate_progress,
    loaded,
    log_in,
    side_link,
)
from tests.e2e.conftest import BASE_URL, Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

VIDEO = "platform/tiny-ltx-video"
AUDIO = "platform/tiny-stable-audio"
# The element plays: it has frames, it is not paused, and its clock moves.
PLAYING = "v => v.readyState >= 2 && !v.paused && v.currentTime > 0"


def run_audio_with_key(stack: Stack, key: str) -> str:
    with stack.client(key) as api:
        response = api.post(f"/run/{AUDIO}", json={"prompt": "rain on a tin roof", "seconds_total": 1.5, "steps": 4})
    assert response.status_code == 200, response.text
    assert response.json()["audio_file"]["content_type"] == "audio/wav"
    return str(response.headers["x-fal-request-id"])


def test_a_video_plays_in_the_playground_and_its_poster_is_in_the_history(
    developer: dict[str, Any],  # noqa: F811
    stack: Stack,
    open_tab: Callable[..., Tab],
) -> None:
    audio_request = run_audio_with_key(stack, developer["key"])
    tab = open_tab(LAPTOP)
    page = tab.page
    log_in(tab, developer["email"])
    page.wait_for_url(f"{BASE_URL}/dashboard/")

    # The form is the video endpoint's own: frames, fps, resolution and aspect ratio from its input schema.
    side_link(page, "Playground").click()
    page.select_option("#endpoint", VIDEO)
    expect(page.locator("#field-num_frames")).to_have_value("16")
    expect(page.locator("#field-fps")).to_have_value("8")
    expect(page.locator("#field-resolution")).to_have_value("64p")
    expect(page.locator("#field-aspect_ratio option")).to_have_count(6)  # the endpoint's default, then five ratios
    expect(page.locator("#field-image_size")).to_have_count(0)
    page.fill("#field-num_inference_steps", "30")
    page.fill("#field-prompt", "waves on a beach at sunset")
    page.evaluate(WATCH_PROGRESS)
    tab.shot("playground-video")
    with page.expect_response(lambda response: response.request.method == "POST") as submitted:
        page.get_by_role("button", name="Run").click()
    request_id = submitted.value.json()["request_id"]

    # The progress bar moves through the steps (the worker held still between two until the page shows one).
    job = off_the_loop(
        lambda: wait_until(
            lambda: between_steps_or_final(request_id), timeout=90, interval=0.01, message="a step of the video"
        )
    )
    if not job.is_final:
        with stack.paused("gpu"):
            wait_until(
                lambda: intermediate_progress(page.evaluate("window.progressSeen")),
                timeout=TIMEOUT_MS / 1000,
                message=f"the bar to show step {job.progress_step} of {job.progress_total}",
            )
            tab.shot("playground-video-running")
    outcome = page.get_by_test_id("outcome")
    expect(outcome).to_have_attribute("data-status", "COMPLETED", timeout=90_000)
    assert intermediate_progress(page.evaluate("window.progressSeen"))

    # The video plays: 64x64, 2 s (16 frames at 8 fps), H.264 decoded by Chromium itself.
    video = outcome.get_by_test_id("output-video").element_handle()
    wait_in_page(page, "v => v.readyState >= 2 && v.videoWidth === 64 && v.videoHeight === 64", video)
    assert page.evaluate("v => v.duration", video) == pytest.approx(2.0, abs=0.01)
    page.evaluate("v => v.play()", video)
    wait_in_page(page, PLAYING, video)
    cost = dollars(outcome.get_by_test_id("cost").inner_text())
    assert cost == dollars("$0.02")  # 2 s at the 64p tier's $0.01 a second
    expect(outcome.get_by_test_id("cost")).to_contain_text("2.0 video_second")
    tab.shot("playground-video-playing")

    # The history: the video's poster frame as its thumbnail, the audio clip marked as audio.
    side_link(page, "Requests").click()
    row = page.locator("table.requests tbody tr").filter(
        has=page.locator(f"a[href='/dashboard/requests/{request_id}']")
    )
    loaded(page, row.get_by_test_id("poster"))
    audio_row = page.locator("table.requests tbody tr").filter(
        has=page.locator(f"a[href='/dashboard/requests/{audio_request}']")
    )
    expect(audio_row.locator(".audio-mark")).to_have_count(1)
    tab.shot("requests-with-poster")

    # The audio clip plays on its request page, 1.5 s long.
    tab.open(f"/dashboard/requests/{audio_request}")
    audio = page.locator("audio").element_handle()
    wait_in_page(page, "a => a.readyState >= 1 && a.duration > 0", audio)
    assert page.evaluate("a => a.duration", audio) == pytest.approx(1.5, abs=0.01)
    page.evaluate("a => { a.muted = true; return a.play(); }", audio)
    wait_in_page(page, PLAYING, audio)
    tab.shot("request-audio")

    # Usage by endpoint: the seconds of video and of audio delivered.
    side_link(page, "Usage").click()
    by_endpoint = page.get_by_test_id("by-endpoint")
    expect(by_endpoint.locator("tr").filter(has_text=VIDEO).locator("td[data-label=Output]")).to_have_text(
        "2 s of video"
    )
    expect(by_endpoint.locator("tr").filter(has_text=AUDIO).locator("td[data-label=Output]")).to_have_text(
        "1.5 s of audio"
    )
    tab.shot("usage-media")

    # At a phone's width the request page and its video fit.
    phone = open_tab(PHONE)
    log_in(phone, developer["email"])
    phone.page.wait_for_url(f"{BASE_URL}/dashboard/")
    phone.open(f"/dashboard/requests/{request_id}")
    wait_in_page(phone.page, "v => v.readyState >= 1", phone.page.locator("video").element_handle())
    phone.shot("request-video")
    assert not phone.scrolls_sideways()
