"""fal's queue (/queue/...), sync (/run/...) and streaming (.../stream) APIs, and the platform's /v1/models and
/v1/requests."""

from django.urls import path

from inference import api, requests_api, streaming

REQUEST = "<slug:owner>/<slug:model>/requests/<str:request_id>"

queue_urlpatterns = [
    path(f"{REQUEST}/status/stream", api.status_stream, name="queue-status-stream"),
    path(f"{REQUEST}/status", api.StatusView.as_view(), name="queue-status"),
    path(f"{REQUEST}/cancel", api.CancelView.as_view(), name="queue-cancel"),
    path(REQUEST, api.ResultView.as_view(), name="queue-result"),
    # Before the sub-path patterns: `stream` is never an endpoint's sub-path (Endpoint.clean refuses it).
    path("<slug:owner>/<slug:model>/stream", streaming.run_stream, name="queue-stream"),
    path("<slug:owner>/<slug:model>/<slug:path>/stream", streaming.run_stream, name="queue-stream-path"),
    path("<slug:owner>/<slug:model>", api.SubmitView.as_view(), name="queue-submit"),
    path("<slug:owner>/<slug:model>/<slug:path>", api.SubmitView.as_view(), name="queue-submit-path"),
]

run_urlpatterns = [
    path("<slug:owner>/<slug:model>/stream", streaming.run_stream, name="run-stream"),
    path("<slug:owner>/<slug:model>/<slug:path>/stream", streaming.run_stream, name="run-stream-path"),
    path("<slug:owner>/<slug:model>", api.run_sync, name="run"),
    path("<slug:owner>/<slug:model>/<slug:path>", api.run_sync, name="run-path"),
]

v1_urlpatterns = [
    path("models", api.ModelsView.as_view(), name="models"),
    path("requests", requests_api.RequestListView.as_view(), name="requests"),
    path("requests/<str:request_id>", requests_api.RequestDetailView.as_view(), name="request-detail"),
]
