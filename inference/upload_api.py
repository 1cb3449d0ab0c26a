"""fal's storage upload routes, as ``@fal-ai/client`` 1.10.1 and ``fal_client`` 1.0.3 call them (inference/uploads.py).

On fal's REST host (``rest.fal.ai``), authenticated by the API key:
- ``POST /storage/auth/token?storage_type=fal-cdn-v3`` → ``{token, token_type, base_url, expires_at}``
- ``POST /storage/upload/initiate?storage_type=fal-cdn-v3`` ``{content_type, file_name}`` → ``{upload_url, file_url}``
- ``POST /storage/upload/initiate-multipart?storage_type=fal-cdn-v3`` → the same, for parts

The upload URLs they hand out (fal's presigned URLs), signed, no key:
- ``PUT /storage/upload/{id}`` the bytes
- ``PUT /storage/upload/{id}/multipart/{n}`` → ``{partNumber, etag}``; ``POST .../multipart/complete`` ``{parts}``

On fal's CDN host (``v3.fal.media``), authenticated by the token (``Authorization: Bearer <token>``):
- ``POST /files/upload`` the bytes (``Content-Type``, ``X-Fal-File-Name``) → ``{access_url, ...}``
- ``POST /files/upload/multipart`` → ``{access_url, uploadId}``; ``PUT {access_url}/multipart/{uploadId}/{n}``
  (the part's ETag in the header); ``POST {access_url}/multipart/{uploadId}/complete`` ``{parts}``

Errors are the API's: ``{detail, error_type}``, a located ``detail`` list on every 422.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import ApiKeyPrincipal
from accounts.errors import InvalidInput, problem
from accounts.limits import check_rate
from accounts.models import ApiKey, Scope
from accounts.parsers import query_params
from accounts.permissions import HasScope, request_api_key
from accounts.schema import ApiAutoSchema
from inference import uploads
from inference.models import Upload, UploadStatus
from inference.presenters import base_url

# Preflight answers for browsers: the signed URLs and the CDN routes take a file from a page on any origin.
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, POST, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, X-Fal-File-Name, X-Fal-Object-Lifecycle, X-Fal-Object-Lifecycle-Preference"
    ),
    "Access-Control-Expose-Headers": "ETag",
    "Access-Control-Max-Age": "86400",
}


class StorageQuery(serializers.Serializer[Any]):
    storage_type = serializers.ChoiceField(choices=uploads.STORAGE_TYPES, required=False)


class InitiateBody(serializers.Serializer[Any]):
    content_type = serializers.CharField(help_text="The file's media type: an image, or application/octet-stream.")
    file_name = serializers.CharField(required=False, allow_blank=True, help_text="Shown at the end of the file's URL.")


class InitiateAnswer(serializers.Serializer[Any]):
    upload_url = serializers.URLField(help_text="PUT the bytes here (signed; no API key), within the hour.")
    file_url = serializers.URLField(help_text="The file once uploaded: usable as `image_url` by this organization.")


class TokenAnswer(serializers.Serializer[Any]):
    token = serializers.CharField()
    token_type = serializers.ChoiceField(choices=["Bearer"])
    base_url = serializers.URLField(help_text="Where the token uploads: `POST {base_url}/files/upload`.")
    expires_at = serializers.DateTimeField()


STORAGE_TYPE = OpenApiParameter(
    "storage_type", str, OpenApiParameter.QUERY, enum=list(uploads.STORAGE_TYPES), description="fal's; any is ours."
)
LIFECYCLE = [
    OpenApiParameter(
        name,
        str,
        OpenApiParameter.HEADER,
        description='How long the file is kept: `{"expiration_duration_seconds": N}`.',
    )
    for name in ("X-Fal-Object-Lifecycle", "X-Fal-Object-Lifecycle-Preference")
]


def raw_body(request: HttpRequest) -> bytes:
    """The request's bytes, refused before they are read when the declared length is over the upload limit."""
    declared = request.META.get("CONTENT_LENGTH") or ""
    if declared.isdigit() and int(declared) > settings.UPLOAD_MAX_BYTES:
        raise uploads.too_large(int(declared))
    return request.body


class StorageView(APIView):
    """fal's REST host: the API key, its ``inference`` scope and its rate limit."""

    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.INFERENCE
    schema = ApiAutoSchema()


class CdnTokenView(StorageView):
    @extend_schema(
        request=None,
        parameters=[STORAGE_TYPE],
        responses={200: TokenAnswer},
        summary="A short-lived upload token (fal's storage token)",
    )
    def post(self, request: Request) -> Response:
        query_params(request, StorageQuery)
        issued = uploads.issue_cdn_token(request_api_key(request))
        return Response(
            {
                "token": issued.token,
                "token_type": "Bearer",
                "base_url": base_url(request),
                "expires_at": issued.expires_at.isoformat(),
            }
        )


class InitiateUploadView(StorageView):
    multipart = False

    @extend_schema(
        request=InitiateBody,
        parameters=[STORAGE_TYPE, *LIFECYCLE],
        responses={200: InitiateAnswer},
        summary="Start an upload (fal's storage initiate)",
    )
    def post(self, request: Request) -> Response:
        query_params(request, StorageQuery)
        body = InitiateBody(data=request.data)
        if not body.is_valid():
            raise InvalidInput.from_errors(body.errors, location="body")
        content_type = uploads.declared_type(body.validated_data["content_type"], ["body", "content_type"])
        upload = uploads.start_upload(
            api_key=request_api_key(request),
            file_name=uploads.safe_file_name(body.validated_data.get("file_name"), content_type, ["body", "file_name"]),
            content_type=content_type,
            retention_seconds=uploads.lifecycle_seconds(request.headers),
            multipart=self.multipart,
        )
        base = base_url(request)
        return Response(
            {
                "upload_url": uploads.upload_url(upload, base_url=base),
                "file_url": uploads.file_url(upload, base_url=base),
            }
        )


class InitiateMultipartUploadView(InitiateUploadView):
    multipart = True

    @extend_schema(
        request=InitiateBody,
        parameters=[STORAGE_TYPE, *LIFECYCLE],
        responses={200: InitiateAnswer},
        summary="Start an upload in parts (fal's multipart initiate)",
    )
    def post(self, request: Request) -> Response:
        return super().post(request)


class CorsView(APIView):
    """A route a page's script may call from another origin: its answers carry CORS headers, OPTIONS included."""

    schema = None  # fal's upload protocol, for its clients: raw bytes, not part of the platform API's document

    def check_permissions(self, request: Request) -> None:
        if request.method != "OPTIONS":  # a preflight carries no credentials
            super().check_permissions(request)

    def check_throttles(self, request: Request) -> None:
        if request.method != "OPTIONS":
            super().check_throttles(request)

    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:  # type: ignore[override]
        return Response(status=204)

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in CORS_HEADERS.items():
            response[name] = value
        return response


class SignedUploadView(CorsView):
    """The upload URLs: the signature in the query is the authority, so no key (a key sent anyway is ignored).

    Each request on one still counts against the rate limit of the key that initiated the upload: a URL may be PUT
    again until it expires (a bucket's semantics), and each PUT reads and decodes up to ``UPLOAD_MAX_BYTES`` of
    image, so without it one initiated upload was a way past the key's limit. And each is refused once that key is
    not usable (revoked, expired, deleted, its maker removed, its organization suspended: ``uploads.acting_key``), as
    a CDN token is: the URL lives an hour, and revoking a leaked key must stop what it started."""

    authentication_classes = ()
    permission_classes = (AllowAny,)
    throttle_classes = ()

    def signed(self, request: Request, upload_id: uuid.UUID) -> Upload:
        upload = uploads.signed_upload(
            upload_id, request.query_params.get("expires", ""), request.query_params.get("signature", "")
        )
        maker = uploads.acting_key(
            upload.api_key_id, upload.organization_id, whose="that started this upload", refused=_key_unusable
        )
        wait = check_rate(bucket=f"key:{maker.pk}", limit=maker.rate_limit_per_minute)
        if wait:
            raise exceptions.Throttled(wait=math.ceil(wait))
        return upload


def _key_unusable(detail: str) -> uploads.UploadRefused:
    return uploads.UploadRefused(detail, error_type="api_key_unusable", status_code=403)


class SignedPutView(SignedUploadView):
    def put(self, request: Request, upload_id: uuid.UUID) -> Response:
        upload = uploads.receive_upload(self.signed(request, upload_id), raw_body(request))
        return Response(file_payload(upload, request))


class SignedPartView(SignedUploadView):
    def put(self, request: Request, upload_id: uuid.UUID, part_number: int) -> Response:
        part = uploads.receive_part(self.signed(request, upload_id), part_number, raw_body(request))
        return part_response(part.number, part.etag)


class SignedCompleteView(SignedUploadView):
    def post(self, request: Request, upload_id: uuid.UUID) -> Response:
        upload = uploads.complete_multipart(self.signed(request, upload_id), json_object(request).get("parts"))
        return Response(file_payload(upload, request))


class CdnTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer <token>`` with a token from ``/storage/auth/token``: it acts for the key it was issued
    to, so the key's scope and rate limit apply."""

    def authenticate(self, request: Request) -> tuple[ApiKeyPrincipal, ApiKey] | None:
        header = get_authorization_header(request)
        if not header:
            return None
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise exceptions.AuthenticationFailed(
                "Use the token from /storage/auth/token: 'Authorization: Bearer <token>'.", code="invalid_upload_token"
            )
        api_key = uploads.api_key_of_cdn_token(token.strip())
        return ApiKeyPrincipal(api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="storage"'


class CdnView(CorsView):
    """fal's CDN host: the upload token."""

    authentication_classes = (CdnTokenAuthentication,)
    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.INFERENCE

    def new_upload(self, request: Request, *, multipart: bool) -> Upload:
        content_type = uploads.declared_type(request.headers.get("Content-Type", ""), ["header", "Content-Type"])
        file_name = uploads.safe_file_name(
            request.headers.get("X-Fal-File-Name"), content_type, ["header", "X-Fal-File-Name"]
        )
        return uploads.start_upload(
            api_key=request_api_key(request),
            file_name=file_name,
            content_type=content_type,
            retention_seconds=uploads.lifecycle_seconds(request.headers),
            multipart=multipart,
        )

    def own_upload(self, request: Request, upload_id: uuid.UUID, file_name: str, multipart_id: uuid.UUID) -> Upload:
        upload = Upload.objects.filter(
            pk=upload_id,
            organization_id=request_api_key(request).organization_id,
            file_name=file_name,
            status__in=(UploadStatus.PENDING, UploadStatus.READY),
        ).first()
        if upload is None or multipart_id != upload_id:
            raise uploads.UploadNotFound()
        return upload


class CdnUploadView(CdnView):
    def post(self, request: Request) -> Response:
        data = raw_body(request)
        upload = uploads.receive_upload(self.new_upload(request, multipart=False), data)
        return Response(file_payload(upload, request))


class CdnMultipartView(CdnView):
    def post(self, request: Request) -> Response:
        upload = self.new_upload(request, multipart=True)
        return Response(
            {"access_url": uploads.file_url(upload, base_url=base_url(request)), "uploadId": str(upload.id)}
        )


class CdnPartView(CdnView):
    def put(
        self, request: Request, upload_id: uuid.UUID, file_name: str, multipart_id: uuid.UUID, part_number: int
    ) -> Response:
        upload = self.own_upload(request, upload_id, file_name, multipart_id)
        part = uploads.receive_part(upload, part_number, raw_body(request))
        return part_response(part.number, part.etag)


class CdnCompleteView(CdnView):
    def post(self, request: Request, upload_id: uuid.UUID, file_name: str, multipart_id: uuid.UUID) -> Response:
        upload = self.own_upload(request, upload_id, file_name, multipart_id)
        upload = uploads.complete_multipart(upload, json_object(request).get("parts"))
        return Response(file_payload(upload, request))


def file_payload(upload: Upload, request: HttpRequest) -> dict[str, Any]:
    url = uploads.file_url(upload, base_url=base_url(request))
    return {
        "access_url": url,
        "file_url": url,
        "content_type": upload.content_type,
        "file_name": upload.file_name,
        "file_size": upload.size,
    }


def part_response(number: int, etag: str) -> Response:
    response = Response({"partNumber": number, "etag": etag})
    response["ETag"] = etag
    return response


def json_object(request: Request) -> dict[str, Any]:
    data = request.data
    if not isinstance(data, dict):
        raise InvalidInput([problem(["body"], "Should be a JSON object.", "model_type")])
    return data
