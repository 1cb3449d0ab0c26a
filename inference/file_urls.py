"""Stored files and fal's storage upload routes, at the root: fal's clients call them on their REST and CDN hosts.

``/files/upload`` and ``/files/uploads/...`` come before ``/files/<name>`` (signed outputs and inputs, whose names
start with ``outputs/`` or ``inputs/``), so neither shadows the other.
"""

from django.urls import path

from inference import upload_api
from inference.files import serve_file, serve_upload

UPLOADED = "files/uploads/<uuid:upload_id>/<str:file_name>"
CDN_MULTIPART = f"{UPLOADED}/multipart/<uuid:multipart_id>"
SIGNED = "storage/upload/<uuid:upload_id>"

urlpatterns = [
    # fal's REST host (rest.fal.ai), with the API key.
    path("storage/auth/token", upload_api.CdnTokenView.as_view(), name="storage-token"),
    path("storage/upload/initiate", upload_api.InitiateUploadView.as_view(), name="storage-initiate"),
    path(
        "storage/upload/initiate-multipart",
        upload_api.InitiateMultipartUploadView.as_view(),
        name="storage-initiate-multipart",
    ),
    # The signed upload URLs those hand out.
    path(SIGNED, upload_api.SignedPutView.as_view(), name="storage-upload"),
    path(f"{SIGNED}/multipart/complete", upload_api.SignedCompleteView.as_view(), name="storage-upload-complete"),
    path(f"{SIGNED}/multipart/<int:part_number>", upload_api.SignedPartView.as_view(), name="storage-upload-part"),
    # fal's CDN host (v3.fal.media), with the upload token.
    path("files/upload", upload_api.CdnUploadView.as_view(), name="cdn-upload"),
    path("files/upload/multipart", upload_api.CdnMultipartView.as_view(), name="cdn-multipart"),
    path(f"{CDN_MULTIPART}/complete", upload_api.CdnCompleteView.as_view(), name="cdn-multipart-complete"),
    path(f"{CDN_MULTIPART}/<int:part_number>", upload_api.CdnPartView.as_view(), name="cdn-multipart-part"),
    # The files.
    path(UPLOADED, serve_upload, name="uploaded-file"),
    path("files/<path:name>", serve_file, name="output-file"),
]
