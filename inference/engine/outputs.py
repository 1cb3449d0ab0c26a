"""Encoding generated images, videos and audio clips for storage and for the API's responses."""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_ALIASES = {"jpg": "jpeg"}


class EncodedImage(NamedTuple):
    data: bytes
    content_type: str
    width: int
    height: int


def encode_image(image: Image.Image, output_format: str = "png", *, quality: int = 90) -> EncodedImage:
    """Encode to png, jpeg (alias jpg) or webp. `quality` applies to jpeg and webp."""
    fmt = output_format.lower()
    fmt = _ALIASES.get(fmt, fmt)
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"output_format must be one of {sorted(CONTENT_TYPES)}, not {output_format!r}")
    # jpeg has no alpha; generated images are RGB anyway, this keeps uploads of RGBA inputs working.
    if fmt == "jpeg" and image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=fmt.upper(), quality=quality)
    return EncodedImage(buffer.getvalue(), CONTENT_TYPES[fmt], image.width, image.height)


# Videos: H.264 in an MP4 container, what browsers and fal's clients play; audio: WAV (PCM) or MP3.
VIDEO_CONTENT_TYPE = "video/mp4"
AUDIO_CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}
# x264's constant quality: 18 is visually lossless for most content (the scale runs from 0, lossless, to 51).
VIDEO_CRF = 18
POSTER_QUALITY = 85


class EncodedVideo(NamedTuple):
    data: bytes
    content_type: str
    width: int
    height: int
    fps: int
    # Frames written to the file: what a player decodes, and what the video's length (and bill) is made of.
    num_frames: int


class EncodedAudio(NamedTuple):
    data: bytes
    content_type: str
    sample_rate: int
    channels: int
    # Samples per channel written to the file.
    num_samples: int


def encode_video(frames: np.ndarray, fps: int, *, crf: int = VIDEO_CRF) -> EncodedVideo:
    """Frames (uint8, frames x height x width x 3) as an H.264 MP4 (PyAV's bundled FFmpeg; no ffmpeg binary).

    4:2:0 chroma and the moov atom at the front (``faststart``), so a browser starts playing before the last byte.
    FFmpeg moves the moov atom by reading its own output back from a file, which an in-memory buffer cannot give
    it: the file is written in a private temporary folder and read back. The width and height must be even (4:2:0):
    the engine's videos are multiples of 32.
    """
    import tempfile

    import av

    count, height, width, channels = frames.shape
    if channels != 3 or frames.dtype != np.uint8:
        raise ValueError("frames must be uint8 RGB, shaped (frames, height, width, 3)")
    if count < 1 or fps < 1:
        raise ValueError("a video needs at least one frame and a frame rate of at least 1")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 in 4:2:0 needs an even width and height, not {width}x{height}")
    written = 0
    with (
        tempfile.TemporaryDirectory(prefix="video-") as folder,
        av.open(f"{folder}/video.mp4", mode="w", format="mp4", options={"movflags": "+faststart"}) as container,
    ):
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
                written += 1
        for packet in stream.encode():  # what the encoder still holds
            container.mux(packet)
            written += 1
        container.close()
        data = Path(folder, "video.mp4").read_bytes()
    if written != count:
        raise RuntimeError(f"the encoder wrote {written} frames of {count}")
    return EncodedVideo(data, VIDEO_CONTENT_TYPE, width, height, fps, written)


def video_poster(frames: np.ndarray, *, quality: int = POSTER_QUALITY) -> EncodedImage:
    """The first frame as a JPEG: the video's poster (request history, the ``<video>`` element before it plays)."""
    return encode_image(Image.fromarray(np.ascontiguousarray(frames[0])), "jpeg", quality=quality)


def encode_audio(clip: np.ndarray, sample_rate: int, output_format: str = "wav") -> EncodedAudio:
    """A clip (float, channels x samples, nominally in [-1, 1]) as 16-bit WAV or as MP3 (soundfile's bundled
    libsndfile). Samples beyond [-1, 1] are clipped, never wrapped around."""
    import soundfile

    fmt = output_format.lower()
    if fmt not in AUDIO_CONTENT_TYPES:
        raise ValueError(f"output_format must be one of {sorted(AUDIO_CONTENT_TYPES)}, not {output_format!r}")
    if clip.ndim != 2 or clip.shape[1] < 1:
        raise ValueError("a clip is shaped (channels, samples), with at least one sample")
    channels, samples = clip.shape
    buffer = io.BytesIO()
    data = np.clip(np.asarray(clip, dtype=np.float32).T, -1.0, 1.0)
    if fmt == "wav":
        soundfile.write(buffer, data, sample_rate, format="WAV", subtype="PCM_16")
    else:
        soundfile.write(buffer, data, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    return EncodedAudio(buffer.getvalue(), AUDIO_CONTENT_TYPES[fmt], sample_rate, channels, samples)
