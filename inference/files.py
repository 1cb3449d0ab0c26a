"""Outputs, input images and uploads, kept in Django's default storage, handed out as URLs.

Names are ``outputs/<org>/<job>/<n>.<ext>``, ``inputs/<org>/<job>/input.<ext>`` and
``uploads/<org>/<upload>/<file_name>`` (files sent through fal's upload protocols, inference/uploads.py). A stored
name is internal: ``job.result`` keeps it as ``path``, and ``render_result`` swaps it for a URL on the way out.

URLs depend on where the files live:
- local storage (the filesystem; Django's in-memory storage in tests): this app serves them itself at
  ``/files/<name>?expires=<unix>&signature=<hmac>`` (``serve_file``), signed with SECRET_KEY;
- anything else (an S3-compatible bucket through django-storages): the storage's own URL, which
  django-storages presigns with ``querystring_auth`` and ``querystring_expire`` (settings.py).
An upload's URL is ``/files/uploads/<upload>/<file_name>`` wherever it lives (``serve_upload``): unguessable, like
fal's CDN URLs, and alive until the upload's retention ends (behind a bucket it redirects to a presigned URL).

Any of these URLs given back as a request's input (``image_url``) is read from storage, never over HTTP, and only
for the organization that owns the file (``stored_name_of_url``).

Retention: a completed job's ``outputs_expire_at`` comes from ``retention_seconds``. Past it the
API shows no URL, and ``purge_expired_outputs`` deletes the files and marks the result purged:
each stored image keeps its metadata with ``path: None`` (so it renders as ``url: null``), inline
data URIs are dropped the same way, and the result gains ``"outputs_purged": true``. Uploads expire the same way
(``Upload.expires_at``, from the same retention), and the same hourly task deletes them (``purge_expired_uploads``).
Files that cannot be deleted (a file we may not remove, a bucket that refuses) are logged, counted and left for the
next run, expired to the API meanwhile; the rest of the backlog is purged past them (``PurgeBatch``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import inspect
import logging
import mimetypes
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, InMemoryStorage, Storage, default_storage
from django.db.models import Q
from django.http import FileResponse, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.http.request import validate_host
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac

from inference.engine.outputs import EncodedAudio, EncodedImage, EncodedVideo
from inference.models import Job, TenantSettings, Upload, UploadPart, UploadStatus

if TYPE_CHECKING:
    from inference.inputs import InlineImage

logger = logging.getLogger(__name__)

OUTPUTS = "outputs"
INPUTS = "inputs"
UPLOADS = "uploads"
SERVED_ROOTS = (OUTPUTS, INPUTS)
ORGANIZATION_ROOTS = (OUTPUTS, INPUTS, UPLOADS)
# Its own salt, so no other HMAC made with SECRET_KEY (sessions, signing.dumps) can pass as a file URL.
SIGNATURE_SALT = "inference.files.signed-url"
PURGE_BATCH_SIZE = 200

_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "video/mp4": "mp4",
    "audio/wav": "wav",
    "audio/mpeg": "mp3",
}
# What a stored file is served as, by its extension: ours first (Python's table says audio/x-wav, and differs
# between machines), then Python's.
_SERVED_TYPES = {extension: content_type for content_type, extension in _EXTENSIONS.items()}
EncodedFile = EncodedImage | EncodedVideo | EncodedAudio


def _unix_now() -> int:
    return int(time.time())


def _extension(content_type: str) -> str:
    if content_type in _EXTENSIONS:
        return _EXTENSIONS[content_type]
    guessed = mimetypes.guess_extension(content_type)
    return guessed.lstrip(".") if guessed else "bin"


def _job_folder(root: str, organization_id: uuid.UUID | str, job_id: uuid.UUID | str) -> str:
    return f"{root}/{organization_id}/{job_id}"


# Storing and reading


def save_input_image(organization_id: uuid.UUID | str, job_id: uuid.UUID | str, image: InlineImage) -> str:
    """Stores an inline input image (a decoded data URI) and returns its storage name."""
    name = f"{_job_folder(INPUTS, organization_id, job_id)}/input.{_extension(image.content_type)}"
    return default_storage.save(name, ContentFile(image.data))


def read_input(name: str) -> bytes:
    with default_storage.open(name, "rb") as stored:
        data: bytes = stored.read()
    return data


def stored_size(name: str) -> int:
    return int(default_storage.size(name))


def save_outputs(job: Job, images: list[EncodedImage]) -> list[dict[str, Any]]:
    """Stores the job's images; returns their internal form for ``job.result`` (``path`` never leaves us).

    If a file of that name is already there (an earlier attempt died after storing), the storage
    picks a free name; the returned ``path`` is the one actually written, and the purge clears the
    whole job folder, strays included.
    """
    return [save_output(job, image, str(number)) for number, image in enumerate(images)]


def inline_outputs(images: list[EncodedImage]) -> list[dict[str, Any]]:
    """``sync_mode``: the images themselves, as data URIs; nothing is stored."""
    return [inline_file(image, str(number)) for number, image in enumerate(images)]


def save_output(job: Job, encoded: EncodedFile, stem: str) -> dict[str, Any]:
    """Stores one output file of the job as ``<stem>.<ext>``; its internal form for ``job.result``."""
    file_name = f"{stem}.{_extension(encoded.content_type)}"
    path = default_storage.save(
        f"{_job_folder(OUTPUTS, job.organization_id, job.pk)}/{file_name}", ContentFile(encoded.data)
    )
    return {"path": path, **_metadata(encoded, file_name)}


def inline_file(encoded: EncodedFile, stem: str) -> dict[str, Any]:
    """``sync_mode``: one output as a data URI; nothing is stored."""
    data = base64.b64encode(encoded.data).decode("ascii")
    file_name = f"{stem}.{_extension(encoded.content_type)}"
    return {"url": f"data:{encoded.content_type};base64,{data}", **_metadata(encoded, file_name)}


def _metadata(encoded: EncodedFile, file_name: str) -> dict[str, Any]:
    """fal's File (url, content_type, file_name, file_size) with what the kind of file adds.

    Images: fal's Image (width, height). Videos: fal's VideoFile (width, height, fps, num_frames, duration).
    Audio: sample_rate, channels, num_samples and duration. ``duration`` is in seconds for people and players; what
    a bill counts is the whole frames or samples (``inference.deliveries``).
    """
    common = {"content_type": encoded.content_type, "file_name": file_name, "file_size": len(encoded.data)}
    if isinstance(encoded, EncodedVideo):
        return {
            **common,
            "width": encoded.width,
            "height": encoded.height,
            "fps": encoded.fps,
            "num_frames": encoded.num_frames,
            "duration": round(encoded.num_frames / encoded.fps, 6),
        }
    if isinstance(encoded, EncodedAudio):
        return {
            **common,
            "sample_rate": encoded.sample_rate,
            "channels": encoded.channels,
            "num_samples": encoded.num_samples,
            "duration": round(encoded.num_samples / encoded.sample_rate, 6),
        }
    return {"width": encoded.width, "height": encoded.height, **common}


# Signed URLs


def _serves_locally(storage: Storage) -> bool:
    """Storages without URLs of their own that a client could fetch: this app serves their files."""
    return isinstance(storage, FileSystemStorage | InMemoryStorage)


def _is_servable(name: str) -> bool:
    """A plain relative name under outputs/ or inputs/: no traversal, no absolute path, no odd bytes."""
    if "\x00" in name or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) >= 2 and parts[0] in SERVED_ROOTS and all(part not in ("", ".", "..") for part in parts)


def _signature(name: str, expires: int, secret: str | bytes | None = None) -> str:
    return salted_hmac(SIGNATURE_SALT, f"{name}\n{expires}", secret=secret, algorithm="sha256").hexdigest()


def signed_url(name: str, *, base_url: str, ttl: int | None = None) -> str:
    """A URL that fetches the stored file for ``ttl`` seconds (default OUTPUT_URL_TTL_SECONDS)."""
    storage = default_storage
    if not _serves_locally(storage):
        # django-storages presigns (querystring auth); `expire` overrides its configured lifetime.
        if ttl is not None and "expire" in inspect.signature(storage.url).parameters:
            return storage.url(name, expire=ttl)  # type: ignore[call-arg]
        return storage.url(name)
    if not _is_servable(name):
        raise ValueError(f"not a servable storage name: {name!r}")
    expires = _unix_now() + (settings.OUTPUT_URL_TTL_SECONDS if ttl is None else ttl)
    query = urlencode({"expires": expires, "signature": _signature(name, expires)})
    return f"{base_url.rstrip('/')}/files/{quote(name, safe='/')}?{query}"


def verify_signature(name: str, expires: int | str, signature: str) -> bool:
    """Whether ``signature`` is ours for this name and expiry (authenticity only: the caller checks the time).

    Compared in constant time, against SECRET_KEY and its fallbacks, so a key rotation does not
    break the URLs already handed out.
    """
    if isinstance(expires, str):
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return False
        expires = int(expires)
    secrets = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    return any(constant_time_compare(_signature(name, expires, secret), signature) for secret in secrets)


def _error(status: int, detail: str, error_type: str) -> JsonResponse:
    return JsonResponse({"detail": detail, "error_type": error_type}, status=status)


def serve_file(request: HttpRequest, name: str) -> HttpResponseBase:
    """``GET /files/<name>?expires=&signature=``: a stored file, for as long as its signed URL lives."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed()
    if not _is_servable(name):
        return _error(404, "Not found.", "not_found")
    expires = request.GET.get("expires", "")
    if not verify_signature(name, expires, request.GET.get("signature", "")):
        return _error(403, "The URL's signature is not valid.", "invalid_signature")
    remaining = int(expires) - _unix_now()
    if remaining <= 0:
        return _error(403, "The URL has expired; fetch the result again for a fresh one.", "url_expired")
    return _stored_file_response(request, name, served_type(name), remaining)


def served_type(name: str) -> str:
    """The Content-Type a stored file is served with, from its extension."""
    extension = name.rpartition(".")[2].lower()
    return _SERVED_TYPES.get(extension) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def serve_upload(request: HttpRequest, upload_id: uuid.UUID, file_name: str) -> HttpResponseBase:
    """``GET /files/uploads/<upload>/<file_name>``: an uploaded file, until its retention ends.

    No signature: the upload's random id is the secret, as in fal's CDN URLs. Behind a bucket, a redirect to a
    presigned URL of the object.
    """
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed()
    now = timezone.now()
    upload = Upload.objects.filter(
        pk=upload_id, file_name=file_name, status=UploadStatus.READY, expires_at__gt=now
    ).first()
    if upload is None:
        return _error(404, "No such file (uploads are deleted after their retention).", "not_found")
    remaining = max(1, int((upload.expires_at - now).total_seconds()))
    if not _serves_locally(default_storage):
        ttl = min(settings.OUTPUT_URL_TTL_SECONDS, remaining)
        response: HttpResponseBase = HttpResponseRedirect(signed_url(upload.storage_name, base_url="", ttl=ttl))
        response["Cache-Control"] = f"private, max-age={ttl}"
    else:
        response = _stored_file_response(request, upload.storage_name, upload.content_type, remaining)
    # Public by design (the URL is the secret): a page on any origin may show it.
    response["Access-Control-Allow-Origin"] = "*"
    return response


def _method_not_allowed() -> JsonResponse:
    refusal = _error(405, "Method not allowed.", "method_not_allowed")
    refusal["Allow"] = "GET, HEAD"
    return refusal


_BYTE_RANGE = re.compile(r"^bytes=(?P<first>[0-9]{0,15})-(?P<last>[0-9]{0,15})$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one range ``Range: bytes=first-last`` asks of a file of ``size`` bytes, clamped to it; None for no
    range or one this server does not take (several ranges, another unit: the whole file is answered, as RFC 9110
    allows). Raises ValueError for a range past the end (416)."""
    match = _BYTE_RANGE.match(header.strip())
    if match is None or (not match["first"] and not match["last"]):
        return None
    if not match["first"]:  # the last N bytes
        length = int(match["last"])
        if length == 0:
            raise ValueError("an empty suffix range")
        return max(0, size - length), size - 1
    first = int(match["first"])
    last = min(int(match["last"]), size - 1) if match["last"] else size - 1
    if first >= size or last < first:
        raise ValueError("the range starts past the end of the file")
    return first, last


def _stored_file_response(request: HttpRequest, name: str, content_type: str, remaining: int) -> HttpResponseBase:
    """The stored file, or the one byte range asked of it (206): players seek in videos and audio that way, and
    Chromium's media player asks for ranges before it plays."""
    try:
        size = default_storage.size(name)
        requested = _byte_range(request.headers.get("Range", ""), size)
        if request.method == "HEAD":
            response: HttpResponseBase = HttpResponse(content_type=content_type)
            response["Content-Length"] = str(size)
        elif requested is not None:
            first, last = requested
            with default_storage.open(name, "rb") as stored:
                stored.seek(first)
                part = stored.read(last - first + 1)
            response = HttpResponse(part, content_type=content_type, status=206)
            response["Content-Range"] = f"bytes {first}-{last}/{size}"
        else:
            response = FileResponse(default_storage.open(name, "rb"), content_type=content_type)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return _error(404, "The file is no longer available (outputs are deleted after their retention).", "not_found")
    except ValueError:
        refusal = _error(416, "The range asked for is not in the file.", "range_not_satisfiable")
        refusal["Content-Range"] = f"bytes */{size}"
        return refusal
    response["Accept-Ranges"] = "bytes"
    response["Cache-Control"] = f"private, max-age={remaining}"
    response["X-Content-Type-Options"] = "nosniff"
    # A stored file is data, never a page: nothing in it may run if a browser opens it directly.
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


# Our own URLs given back as inputs


class UnusableFile(Exception):
    """One of our own file URLs that this request may not use as an input: ``kind`` names why."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


_UPLOAD_PATH = re.compile(
    r"^/files/uploads/(?P<upload_id>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})/(?P<file_name>[^/]+)$"
)
_ANOTHER_ORGANIZATION = "The file at this URL belongs to another organization: only its own requests may use it."


def stored_name_of_url(url: str, *, organization_id: uuid.UUID | str) -> str | None:
    """The storage name behind ``url`` when it is one of our own file URLs; None for any other URL.

    Ours are an upload's URL or a signed ``/files/...`` URL on one of this platform's hosts (``ALLOWED_HOSTS`` or
    ``PUBLIC_BASE_URL``'s), and behind a bucket, the bucket's URL of a stored object. Raises ``UnusableFile``
    when it is ours but this organization may not use it: another organization's file, a forged signature, an
    upload not yet complete, a file past its retention. A signed URL past its own expiry is still good for the
    organization that owns the file, while the file is kept.
    """
    parts = urlsplit(url)
    if _is_our_host(parts.netloc):
        upload_path = _UPLOAD_PATH.match(parts.path)
        if upload_path:
            return _upload_name(uuid.UUID(upload_path["upload_id"]), unquote(upload_path["file_name"]), organization_id)
        if parts.path.startswith("/files/"):
            name = unquote(parts.path.removeprefix("/files/"))
            if _is_servable(name):
                return _signed_name(name, parts.query, organization_id)
    if not _serves_locally(default_storage):
        bucket_name = _bucket_name(url)
        if bucket_name is not None:
            _check_owner(bucket_name, organization_id)
            _check_present(bucket_name)
            return bucket_name
    return None


def _is_our_host(netloc: str) -> bool:
    host = netloc.rpartition("@")[2].lower()
    if not host:
        return False
    if host == urlsplit(settings.PUBLIC_BASE_URL).netloc.lower():
        return True
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return validate_host(hostname, settings.ALLOWED_HOSTS)


def _upload_name(upload_id: uuid.UUID, file_name: str, organization_id: uuid.UUID | str) -> str:
    upload = Upload.objects.filter(pk=upload_id, file_name=file_name).first()
    if upload is None:
        raise UnusableFile("No uploaded file has this URL.", "upload_not_found")
    if str(upload.organization_id) != str(organization_id):
        raise UnusableFile(_ANOTHER_ORGANIZATION, "file_of_another_organization")
    if upload.status == UploadStatus.PENDING:
        raise UnusableFile("This upload has not been completed: PUT its bytes first.", "upload_incomplete")
    if upload.status == UploadStatus.EXPIRED or upload.expires_at <= timezone.now():
        raise UnusableFile(
            "This uploaded file has expired (uploads are deleted after their retention).", "file_expired"
        )
    return upload.storage_name


def _signed_name(name: str, query: str, organization_id: uuid.UUID | str) -> str:
    params = {key: values[0] for key, values in parse_qs(query).items()}
    expires = params.get("expires", "")
    if not verify_signature(name, expires, params.get("signature", "")):
        raise UnusableFile("The file URL's signature is not valid.", "invalid_signature")
    # Past its expiry too: the URL's lifetime bounds anonymous downloads, and this is the owner, authenticated.
    _check_owner(name, organization_id)
    _check_present(name)
    return name


def _bucket_name(url: str) -> str | None:
    """The storage name of a URL of the bucket's own (presigned or not), or None."""
    probe = "probe-of-the-bucket-url"
    prefix = urlsplit(default_storage.url(probe))._replace(query="", fragment="").geturl().removesuffix(probe)
    given = urlsplit(url)._replace(query="", fragment="").geturl()
    if not prefix or not given.startswith(prefix):
        return None
    name = unquote(given.removeprefix(prefix))
    if "\x00" in name or "\\" in name:
        return None
    segments = name.split("/")
    if len(segments) < 3 or segments[0] not in ORGANIZATION_ROOTS or any(s in ("", ".", "..") for s in segments):
        return None
    return name


def _check_owner(name: str, organization_id: uuid.UUID | str) -> None:
    if name.split("/")[1] != str(organization_id):
        raise UnusableFile(_ANOTHER_ORGANIZATION, "file_of_another_organization")


def _check_present(name: str) -> None:
    if not default_storage.exists(name):
        raise UnusableFile("The file is no longer available (files are deleted after their retention).", "file_expired")


# Results as the API shows them


def _map_files(value: Any, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """``value`` with every file object in it (a dict with ``content_type`` and ``url`` or ``path``) changed,
    files inside files too (a video's poster)."""
    if isinstance(value, dict):
        if "content_type" in value and ("path" in value or "url" in value):
            changed = change(value)
            return {key: _map_files(item, change) if isinstance(item, dict) else item for key, item in changed.items()}
        return {key: _map_files(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_files(item, change) for item in value]
    return value


def _outputs_gone(job: Job, now: datetime) -> bool:
    if isinstance(job.result, dict) and job.result.get("outputs_purged"):
        return True
    return job.outputs_expire_at is not None and job.outputs_expire_at <= now


def render_result(job: Job, *, base_url: str) -> dict[str, Any] | None:
    """``job.result`` as the API shows it: stored images get a signed ``url`` and lose their ``path``.

    Inline (sync_mode) images pass unchanged. Past the retention (purged, or expired and waiting for
    the purge), every image shows ``url: null`` with its metadata. URLs never outlive the retention.
    """
    if job.result is None:
        return None
    now = timezone.now()
    gone = _outputs_gone(job, now)
    ttl = settings.OUTPUT_URL_TTL_SECONDS
    if job.outputs_expire_at is not None:
        ttl = max(1, min(ttl, int((job.outputs_expire_at - now).total_seconds())))

    def show(file: dict[str, Any]) -> dict[str, Any]:
        if "path" not in file:
            is_inline = isinstance(file.get("url"), str) and file["url"].startswith("data:")
            return {**file, "url": None} if gone and is_inline else file
        shown = {key: item for key, item in file.items() if key != "path"}
        path = file["path"]
        shown["url"] = signed_url(path, base_url=base_url, ttl=ttl) if path and not gone else None
        return shown

    rendered: dict[str, Any] = _map_files(copy.deepcopy(job.result), show)
    return rendered


# Retention


MAX_RETENTION_SECONDS = 10 * 365 * 24 * 3600  # beyond this a date overflows nothing but intent


_UNREAD: Any = object()


def retention_seconds(job: Job, *, tenant_seconds: int | None = _UNREAD) -> int:
    """How long this job's outputs are kept: the request's own choice, else its organization's, else ours.

    ``tenant_seconds``: the organization's own setting where the caller has already read it (None: it has none).
    """
    requested = job.input.get("retention_seconds") if isinstance(job.input, dict) else None
    if isinstance(requested, int) and not isinstance(requested, bool) and requested > 0:
        return min(requested, MAX_RETENTION_SECONDS)
    if tenant_seconds is _UNREAD:
        return organization_retention_seconds(job.organization_id)
    return _tenant_or_platform(tenant_seconds)


def organization_retention_seconds(organization_id: uuid.UUID | str) -> int:
    """How long the organization's files are kept when a request does not say: its own setting, else ours."""
    tenant_value = (
        TenantSettings.objects.filter(organization_id=organization_id)
        .values_list("output_retention_seconds", flat=True)
        .first()
    )
    return _tenant_or_platform(tenant_value)


def _tenant_or_platform(tenant_seconds: int | None) -> int:
    return min(tenant_seconds or int(settings.OUTPUT_RETENTION_SECONDS), MAX_RETENTION_SECONDS)


def _purged(result: Any) -> Any:
    if not isinstance(result, dict):
        return result

    def forget(file: dict[str, Any]) -> dict[str, Any]:
        if "path" in file:
            return {**file, "path": None}
        if isinstance(file.get("url"), str) and file["url"].startswith("data:"):
            return {**file, "url": None}  # sync_mode outputs are outputs too: retention applies
        return file

    return {**_map_files(result, forget), "outputs_purged": True}


def _referenced_paths(job: Job) -> Iterable[str]:
    found: list[str] = []

    def collect(file: dict[str, Any]) -> dict[str, Any]:
        if isinstance(file.get("path"), str):
            found.append(file["path"])
        return file

    _map_files(job.result, collect)
    image_path = job.input.get("image_path") if isinstance(job.input, dict) else None
    if isinstance(image_path, str):
        found.append(image_path)
    return found


def _delete_job_files(job: Job) -> None:
    """Deletes everything stored for the job; files already gone are fine."""
    storage = default_storage
    names = set(_referenced_paths(job))
    folders = [_job_folder(root, job.organization_id, job.pk) for root in SERVED_ROOTS]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError, NotImplementedError):
            names.update(f"{folder}/{file_name}" for file_name in storage.listdir(folder)[1])
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            storage.delete(name)
    if isinstance(storage, FileSystemStorage):
        # The filesystem keeps empty folders; one per job would pile up.
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(storage.path(folder))


@dataclass(frozen=True)
class PurgeBatch:
    """What one batch of the purge did.

    ``looked_at``: the rows it took up, purged or not; fewer than its limit means none were left, which is how a run
    knows it is done (not ``purged``: a row whose files could not be deleted is taken up and left). ``failed``: the
    rows whose files could not be deleted, each logged with its error and tried again by the next run. ``last``: the
    sort key of the last row taken up, where the next batch of the same run starts, so rows that failed are tried
    once a run instead of heading every batch of it.
    """

    looked_at: int = 0
    purged: int = 0
    failed: int = 0
    last: tuple[datetime, uuid.UUID] | None = None


def _after(field: str, last: tuple[datetime, uuid.UUID] | None) -> Q:
    """Rows past ``last`` in the purge's order (``field``, then id): where a run's previous batch stopped."""
    if last is None:
        return Q()
    moment, row_id = last
    return Q(**{f"{field}__gt": moment}) | Q(**{field: moment, "id__gt": row_id})


def purge_expired_outputs(
    now: datetime | None = None, *, limit: int = PURGE_BATCH_SIZE, after: tuple[datetime, uuid.UUID] | None = None
) -> PurgeBatch:
    """Deletes the files of up to ``limit`` jobs past their retention, oldest expiry first (past ``after``, the
    ``last`` of a previous batch of the same run).

    Files go first, then the row (a conditional UPDATE): a crash in between leaves the job to the next run, which
    deletes again (a missing file is no error). Purging clears ``outputs_expire_at``, so each job is purged once. A
    job whose files could not be deleted (a file we may not remove, a bucket that refuses) keeps its expiry, so the
    next run tries again, and the API shows it expired meanwhile (``_outputs_gone``); it is logged and counted in
    ``failed``, and the run goes on past it (``PurgeBatch``). Celery's soft time limit stops the batch: the rows it
    has purged stay purged.
    """
    now = now or timezone.now()
    expired = list(
        Job.objects.filter(
            _after("outputs_expire_at", after), outputs_expire_at__isnull=False, outputs_expire_at__lte=now
        ).order_by("outputs_expire_at", "id")[:limit]
    )
    purged = failed = 0
    for job in expired:
        try:
            _delete_job_files(job)
        except SoftTimeLimitExceeded:
            raise
        except Exception:
            failed += 1
            logger.exception("could not delete the stored files of job %s; the next purge tries again", job.pk)
            continue
        purged += Job.objects.filter(pk=job.pk, outputs_expire_at=job.outputs_expire_at).update(
            result=_purged(job.result), outputs_expire_at=None
        )
    if purged:
        logger.info("purged the outputs of %d jobs past their retention", purged)
    tail = expired[-1] if expired else None
    last = (tail.outputs_expire_at, tail.pk) if tail is not None and tail.outputs_expire_at is not None else None
    return PurgeBatch(looked_at=len(expired), purged=purged, failed=failed, last=last)


def purge_expired_uploads(
    now: datetime | None = None, *, limit: int = PURGE_BATCH_SIZE, after: tuple[datetime, uuid.UUID] | None = None
) -> PurgeBatch:
    """Deletes the files of up to ``limit`` uploads past their retention (completed or not), oldest expiry first (past
    ``after``), and marks them expired. One whose files could not be deleted stays as it is (its ``expires_at``
    already refuses it everywhere) for the next run, logged and counted in ``failed``, as a job's."""
    now = now or timezone.now()
    expired = list(
        Upload.objects.filter(
            _after("expires_at", after), status__in=(UploadStatus.PENDING, UploadStatus.READY), expires_at__lte=now
        ).order_by("expires_at", "id")[:limit]
    )
    purged = failed = 0
    for upload in expired:
        try:
            delete_upload_files(upload)
        except SoftTimeLimitExceeded:
            raise
        except Exception:
            failed += 1
            logger.exception("could not delete the files of upload %s; the next purge tries again", upload.pk)
            continue
        purged += Upload.objects.filter(pk=upload.pk, status=upload.status).update(status=UploadStatus.EXPIRED)
        UploadPart.objects.filter(upload=upload).delete()
    if purged:
        logger.info("purged %d uploads past their retention", purged)
    last = (expired[-1].expires_at, expired[-1].pk) if expired else None
    return PurgeBatch(looked_at=len(expired), purged=purged, failed=failed, last=last)


def delete_upload_files(upload: Upload) -> None:
    """Deletes an upload's file and any parts of it still stored; files already gone are fine."""
    storage = default_storage
    names = {name for name in [upload.storage_name] if name}
    names.update(UploadPart.objects.filter(upload=upload).values_list("storage_name", flat=True))
    folders = [upload.folder, f"{upload.folder}/parts"]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError, NotImplementedError):
            names.update(f"{folder}/{file_name}" for file_name in storage.listdir(folder)[1])
    for name in sorted(names):
        with contextlib.suppress(FileNotFoundError):
            storage.delete(name)
    if isinstance(storage, FileSystemStorage):
        for folder in reversed(folders):
            with contextlib.suppress(OSError):
                os.rmdir(storage.path(folder))
