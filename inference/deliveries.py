"""What a job delivered, and what a job's input asks for: the quantities a price per output meets.

Inference knows the shape of its results and inputs; billing prices quantities (``billing.metering``,
``billing.pricing``) and reads them here, never from the JSON itself. Lengths are exact fractions of seconds
(whole frames over the frame rate, whole samples over the sample rate): billing rounds them to its grain, the
millisecond, with its one rounding rule.

A delivery counts only what the stored result holds: a request that failed or stopped before its output was stored
delivered nothing, and a video is as long as the frames written to its file (``num_frames``), never as long as
asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from inference.models import Job


@dataclass(frozen=True)
class Outputs:
    """Quantities of outputs: images, videos and their seconds, seconds of audio, and pixels of the images."""

    images: int = 0
    videos: int = 0
    video_seconds: Fraction = Fraction(0)
    audio_seconds: Fraction = Fraction(0)
    # width x height x images: what a price per megapixel counts.
    image_pixels: int = 0
    # The shorter side of the outputs' frames, in pixels (0: not an image or video): a resolution tier's measure.
    short_side: int = 0


NOTHING = Outputs()


def _file_objects(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def delivered(job: Job) -> Outputs:
    """What the job's stored result holds: its images, its video (with its frames at its rate), its audio clip."""
    result = job.result if isinstance(job.result, dict) else None
    if not result:
        return NOTHING
    images = _file_objects(result.get("images"))
    videos = _file_objects(result.get("video"))
    clips = _file_objects(result.get("audio_file"))
    video_seconds = sum(
        (Fraction(int(video["num_frames"]), int(video["fps"])) for video in videos if video.get("fps")), Fraction(0)
    )
    audio_seconds = sum(
        (Fraction(int(clip["num_samples"]), int(clip["sample_rate"])) for clip in clips if clip.get("sample_rate")),
        Fraction(0),
    )
    width, height = int(job.input.get("width") or 0), int(job.input.get("height") or 0)
    return Outputs(
        images=len(images),
        videos=len(videos),
        video_seconds=video_seconds,
        audio_seconds=audio_seconds,
        image_pixels=width * height * len(images),
        short_side=min(width, height) if images or videos else 0,
    )


def asked(job_input: dict[str, Any]) -> Outputs:
    """What a run of this input delivers when it succeeds: what admission holds credit for and estimates price."""
    width, height = int(job_input.get("width") or 0), int(job_input.get("height") or 0)
    if job_input.get("seconds_total") is not None:
        # To the millisecond, as the input is (`media_inputs`): a float's decimal form is the number asked.
        return Outputs(audio_seconds=Fraction(str(job_input["seconds_total"])))
    if job_input.get("num_frames") is not None:
        return Outputs(
            videos=1,
            video_seconds=Fraction(int(job_input["num_frames"]), int(job_input["fps"])),
            short_side=min(width, height),
        )
    images = int(job_input.get("num_images", 1))
    return Outputs(images=images, image_pixels=width * height * images, short_side=min(width, height))
