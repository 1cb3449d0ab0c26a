"""fal's storage uploads: a client sends a file, it is kept with the outputs, and its URL is usable as an input.

An upload belongs to the organization of the API key that started it; it is checked (an image we can use, at most
``UPLOAD_MAX_BYTES``), stored under ``uploads/<org>/<upload>/<file_name>`` in the default storage, served at
``/files/uploads/<upload>/<file_name>`` and purged at the end of its retention like outputs (inference/files.py).

Two ways in, as fal's official clients speak them (the HTTP side is inference/upload_api.py):

- **initiate, then PUT** (``@fal-ai/client``; Python's fallback): the API key starts an upload and gets
  ``upload_url``, a signed URL that takes the bytes with no key (as a presigned bucket URL would), and ``file_url``.
  Multipart: parts PUT to ``{upload_url path}/{n}``, then ``{upload_url path}/complete``.
- **a CDN token, then the CDN host** (Python ``fal_client``): the API key gets a short-lived token bound to the key
  and its organization (``issue_cdn_token``), then sends the bytes with ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core import signing
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac

from accounts.errors import AppError, InvalidInput, problem
from accounts.models import ApiKey, Scope
from accounts.policy import maker_role
from inference import files
from inference.files import MAX_RETENTION_SECONDS
from inference.inputs import image_pixels_problem, lifecycle_header_object
from inference.models import Upload, UploadPart, UploadStatus

# What an upload may hold: images, the one kind of file the endpoints take (Pillow reads each of them).
IMAGE_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}
# Declared when the client does not know the type (a Blob without one): the bytes decide.
UNTYPED = ("application/octet-stream", "binary/octet-stream", "")
STORAGE_TYPES = ("fal-cdn-v3", "fal-cdn", "gcs")
CDN_TOKEN_SECONDS = 30 * 60
# The client renews a token at the expiry it is told: told a little early, it never sends one just refused.
CDN_TOKEN_MARGIN_SECONDS = 60
UPLOAD_URL_SECONDS = 60 * 60
MAX_PARTS = 10_000
MAX_FILE_NAME = 100
_CDN_TOKEN_SALT = "inference.uploads.cdn-token"  # noqa: S105 - a salt, not a secret
_UPLOAD_URL_SALT = "inference.uploads.upload-url"
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


class UploadRefused(AppError):
    """An upload request the rules refuse; ``status_code`` and ``error_type`` say which rule."""


class UploadNotFound(UploadRefused):
    status_code = 404
    error_type = "not_found"

    def __init__(self, detail: str = "No such upload.") -> None:
        super().__init__(detail)


def too_large(size: int | None = None) -> UploadRefused:
    limit = settings.UPLOAD_MAX_BYTES
    what = f"The file ({size} bytes)" if size is not None else "The file"
    return UploadRefused(
        f"{what} is larger than the upload limit of {limit} bytes.", error_type="payload_too_large", status_code=413
    )


# Checks


def declared_type(value: Any, loc: list[str | int]) -> str:
    """The base media type a client declares, if it is one an upload may hold (or untyped); else a 422 at ``loc``."""
    if not isinstance(value, str) or len(value) > 200:
        raise InvalidInput([problem(loc, "Should be a media type such as image/png.", "string_type")])
    base = value.split(";", 1)[0].strip().lower()
    base = "image/jpeg" if base == "image/jpg" else base
    if base in IMAGE_TYPES or base in UNTYPED:
        return base
    raise InvalidInput(
        [problem(loc, f"Only images can be uploaded ({', '.join(IMAGE_TYPES)}); got {base!r}.", "unsupported_type")],
        error_type="unsupported_content_type",
    )


def safe_file_name(value: Any, content_type: str, loc: list[str | int]) -> str:
    """The file name as it appears in the upload's URL: one path segment of safe characters."""
    if value is None or value == "":
        return f"upload.{IMAGE_TYPES.get(content_type, 'bin')}"
    if not isinstance(value, str):
        raise InvalidInput([problem(loc, "Should be a file name.", "string_type")])
    base = re.split(r"[/\\]", value)[-1]
    cleaned = _UNSAFE_NAME_CHARACTERS.sub("_", base).lstrip(".")
    if len(cleaned) > MAX_FILE_NAME:
        stem, dot, extension = cleaned.rpartition(".")
        keep = extension[:16] if dot else ""
        cleaned = f"{(stem if dot else cleaned)[: MAX_FILE_NAME - len(keep) - 1]}.{keep}".rstrip(".")
    return cleaned or f"upload.{IMAGE_TYPES.get(content_type, 'bin')}"


def lifecycle_seconds(headers: Any) -> int | None:
    """fal's ``X-Fal-Object-Lifecycle`` (or ``-Preference``) header: ``{"expiration_duration_seconds": N}``."""
    for name in ("X-Fal-Object-Lifecycle", "X-Fal-Object-Lifecycle-Preference"):
        value = headers.get(name)
        if not value:
            continue
        try:
            seconds = lifecycle_header_object(value).get("expiration_duration_seconds")
        except ValueError as refusal:
            raise InvalidInput([problem(["header", name], str(refusal), "json")]) from None
        if seconds is None:
            return None
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 60 <= seconds <= MAX_RETENTION_SECONDS:
            raise InvalidInput(
                [
                    problem(
                        ["header", name, "expiration_duration_seconds"],
                        f"Should be an integer from 60 to {MAX_RETENTION_SECONDS} seconds.",
                        "out_of_range",
                    )
                ]
            )
        return seconds
    return None


def image_type_of(data: bytes) -> str:
    """The media type of the image in ``data``, if it is one we can use; else the refusal a client is shown."""
    from PIL import Image

    if not data:
        raise InvalidInput([problem(["body"], "The file is empty.", "empty")], error_type="empty_file")
    problem_text = image_pixels_problem(data)
    if problem_text is not None:
        raise UploadRefused(problem_text, error_type="image_too_large", status_code=413)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            content_type = Image.MIME.get(image.format or "", "")
    except Exception:  # Pillow raises many kinds for what is not an image it reads
        content_type = ""
    if content_type == "image/mpo":  # a phone camera's JPEG with extra frames: a JPEG to every reader
        content_type = "image/jpeg"
    if content_type not in IMAGE_TYPES:
        raise InvalidInput(
            [problem(["body"], f"The file is not an image we can use ({', '.join(IMAGE_TYPES)}).", "unsupported_type")],
            error_type="unsupported_content_type",
        )
    return content_type


# Starting and receiving


def start_upload(
    *,
    api_key: ApiKey,
    file_name: str,
    content_type: str,
    retention_seconds: int | None = None,
    multipart: bool = False,
) -> Upload:
    """A pending upload of the key's organization, waiting for its bytes until its retention ends."""
    seconds = retention_seconds or files.organization_retention_seconds(api_key.organization_id)
    return Upload.objects.create(
        organization_id=api_key.organization_id,
        api_key=api_key,
        file_name=file_name,
        content_type=content_type,
        multipart=multipart,
        expires_at=timezone.now() + timedelta(seconds=seconds),
    )


def receive_upload(upload: Upload, data: bytes) -> Upload:
    """Checks and stores the whole file: the upload is ready. A second PUT replaces the file, as on a bucket."""
    if upload.multipart:
        raise UploadNotFound("This is a multipart upload: send its parts.")
    return _store(upload, data)


def _store(upload: Upload, data: bytes) -> Upload:
    if len(data) > settings.UPLOAD_MAX_BYTES:
        raise too_large(len(data))
    content_type = image_type_of(data)
    name = f"{upload.folder}/{upload.file_name}"
    if upload.storage_name:
        default_storage.delete(upload.storage_name)
    stored_name = default_storage.save(name, ContentFile(data))
    now = timezone.now()
    updated = Upload.objects.filter(
        pk=upload.pk, status__in=(UploadStatus.PENDING, UploadStatus.READY), expires_at__gt=now
    ).update(
        status=UploadStatus.READY, storage_name=stored_name, size=len(data), content_type=content_type, completed_at=now
    )
    if not updated:
        default_storage.delete(stored_name)
        raise UploadNotFound("This upload has expired.")
    upload.refresh_from_db()
    return upload


def receive_part(upload: Upload, number: int, data: bytes) -> UploadPart:
    """Stores one part of a multipart upload (again: replaces it); the parts together stay within the limit."""
    if not upload.multipart:
        raise UploadNotFound("This upload takes its file in one PUT, not in parts.")
    if upload.status != UploadStatus.PENDING:
        raise UploadRefused("This upload is already complete.", error_type="upload_completed", status_code=400)
    if not 1 <= number <= MAX_PARTS:
        raise InvalidInput([problem(["path", "part_number"], f"Should be from 1 to {MAX_PARTS}.", "out_of_range")])
    others = sum(UploadPart.objects.filter(upload=upload).exclude(number=number).values_list("size", flat=True))
    if others + len(data) > settings.UPLOAD_MAX_BYTES:
        raise too_large(others + len(data))
    etag = f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
    name = f"{upload.folder}/parts/{number}"
    default_storage.delete(name)
    stored_name = default_storage.save(name, ContentFile(data))
    part, _ = UploadPart.objects.update_or_create(
        upload=upload, number=number, defaults={"size": len(data), "etag": etag, "storage_name": stored_name}
    )
    return part


def complete_multipart(upload: Upload, parts: Any) -> Upload:
    """Joins the parts the client lists (each with the ETag it was given), in order, into the file; checks it."""
    if not upload.multipart:
        raise UploadNotFound("This upload takes its file in one PUT, not in parts.")
    if upload.status == UploadStatus.READY:
        return upload  # a retried completion
    listed = _listed_parts(parts)
    stored = {part.number: part for part in UploadPart.objects.filter(upload=upload)}
    problems = [
        problem(["body", "parts", index, "etag"], f"Part {number} was not received with this ETag.", "etag_mismatch")
        for index, (number, etag) in enumerate(listed)
        if number not in stored or stored[number].etag.strip('"') != etag.strip('"')
    ]
    if problems:
        raise InvalidInput(problems)
    if sum(stored[number].size for number, _ in listed) > settings.UPLOAD_MAX_BYTES:
        raise too_large()
    data = b"".join(files.read_input(stored[number].storage_name) for number, _ in listed)
    upload = _store(upload, data)
    for part in stored.values():
        default_storage.delete(part.storage_name)
    UploadPart.objects.filter(upload=upload).delete()
    return upload


def _listed_parts(parts: Any) -> list[tuple[int, str]]:
    if not isinstance(parts, list) or not parts:
        raise InvalidInput(
            [problem(["body", "parts"], "Should be a non-empty list of {partNumber, etag}.", "list_type")]
        )
    listed: list[tuple[int, str]] = []
    for index, part in enumerate(parts):
        number = part.get("partNumber") if isinstance(part, dict) else None
        etag = part.get("etag") if isinstance(part, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(etag, str):
            raise InvalidInput(
                [problem(["body", "parts", index], "Should be {partNumber: integer, etag: string}.", "model_type")]
            )
        if listed and number <= listed[-1][0]:
            raise InvalidInput(
                [problem(["body", "parts", index, "partNumber"], "Parts should be listed in ascending order.", "order")]
            )
        listed.append((number, etag))
    return listed


# URLs


def file_url(upload: Upload, *, base_url: str) -> str:
    return f"{base_url.rstrip('/')}/files/uploads/{upload.id}/{upload.file_name}"


def _url_signature(upload_id: uuid.UUID | str, expires: int, secret: str | bytes | None = None) -> str:
    return salted_hmac(_UPLOAD_URL_SALT, f"{upload_id}\n{expires}", secret=secret, algorithm="sha256").hexdigest()


def upload_url(upload: Upload, *, base_url: str) -> str:
    """The signed URL that takes the bytes (``/multipart`` for parts), alive for an hour at most."""
    seconds = min(UPLOAD_URL_SECONDS, max(1, int((upload.expires_at - timezone.now()).total_seconds())))
    expires = int(timezone.now().timestamp()) + seconds
    path = f"/storage/upload/{upload.id}" + ("/multipart" if upload.multipart else "")
    return f"{base_url.rstrip('/')}{path}?expires={expires}&signature={_url_signature(upload.id, expires)}"


def signed_upload(upload_id: uuid.UUID, expires: str, signature: str) -> Upload:
    """The upload an upload URL names, if its signature is ours and it has not expired; else a 403 or 404."""
    valid = expires.isascii() and expires.isdigit() and len(expires) <= 12
    secrets = [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]
    if not valid or not any(
        constant_time_compare(_url_signature(upload_id, int(expires), secret), signature) for secret in secrets
    ):
        raise UploadRefused("The upload URL's signature is not valid.", error_type="invalid_signature", status_code=403)
    if int(expires) <= timezone.now().timestamp():
        raise UploadRefused(
            "The upload URL has expired: initiate the upload again.", error_type="url_expired", status_code=403
        )
    upload = Upload.objects.filter(pk=upload_id).first()
    if upload is None or upload.status == UploadStatus.EXPIRED:
        raise UploadNotFound()
    return upload


# CDN tokens


@dataclass(frozen=True)
class CdnToken:
    token: str
    expires_at: datetime


class InvalidCdnToken(AppError):
    status_code = 401
    error_type = "invalid_upload_token"


def issue_cdn_token(api_key: ApiKey) -> CdnToken:
    """A token that uploads for this key's organization, for ``CDN_TOKEN_SECONDS``, while the key stays usable."""
    token = signing.dumps({"key": str(api_key.pk), "org": str(api_key.organization_id)}, salt=_CDN_TOKEN_SALT)
    told = CDN_TOKEN_SECONDS - CDN_TOKEN_MARGIN_SECONDS
    return CdnToken(token=token, expires_at=timezone.now() + timedelta(seconds=told))


def api_key_of_cdn_token(token: str) -> ApiKey:
    """The key a token was issued to, if the token is ours and alive and the key still usable."""
    try:
        claims = signing.loads(token, salt=_CDN_TOKEN_SALT, max_age=CDN_TOKEN_SECONDS)
    except signing.SignatureExpired:
        raise InvalidCdnToken("The upload token has expired: get a new one from /storage/auth/token.") from None
    except signing.BadSignature:
        raise InvalidCdnToken("Invalid upload token: get one from /storage/auth/token.") from None
    return acting_key(claims.get("key"), claims.get("org"), whose="this upload token was issued to",
                      refused=InvalidCdnToken)  # fmt: skip


def acting_key(key_id: Any, organization_id: Any, *, whose: str, refused: Callable[[str], AppError]) -> ApiKey:
    """The key an upload acts for (a CDN token's, or the one that started an upload whose signed URL is used), as it
    stands now: not revoked, expired or deleted, its maker still a member, with the ``inference`` scope, of an
    organization that is not suspended; else ``refused`` (the organization suspended: a 403 ``UploadRefused``).
    Asked on every use: a URL or token lives up to an hour, and taking a key away stops what it started at once."""
    api_key = (
        ApiKey.objects.usable()
        .select_related("organization")
        .with_maker_role()
        .filter(pk=key_id, organization_id=organization_id)
        .first()
        if key_id is not None
        else None
    )
    if api_key is None or (api_key.created_by_id is not None and maker_role(api_key) is None):
        raise refused(f"The API key {whose} is no longer usable.")
    if api_key.organization.is_suspended:
        raise UploadRefused(
            "This organization is suspended. Contact support.", error_type="organization_suspended", status_code=403
        )
    if not api_key.has_scope(Scope.INFERENCE):
        raise refused(f"The API key {whose} lacks the 'inference' scope.")
    return api_key
