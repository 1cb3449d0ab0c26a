"""The signed file URLs of outputs and input images kept on local storage (see inference.files)."""

from django.urls import path

from inference.files import serve_file

urlpatterns = [path("files/<path:name>", serve_file, name="output-file")]
