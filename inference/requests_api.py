"""``/v1/requests``: the organization's request history, and one request with everything about it."""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import ApiKey, Scope
from accounts.parsers import StrictCursorPagination, query_params
from accounts.permissions import HasScope, request_api_key, request_organization
from accounts.schema import ApiAutoSchema, error
from inference import files
from inference.models import END_USER_MAX_LENGTH, Job, JobStatus
from inference.presenters import FAL_STATUS, base_url, logs_of, usage_of


class RequestsPage(StrictCursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50


def summary(job: Job) -> dict[str, Any]:
    return {
        "request_id": str(job.id),
        "endpoint_id": job.endpoint.endpoint_id,
        "status": job.status,
        "fal_status": FAL_STATUS[JobStatus(job.status)],
        "error_type": job.error_type or None,
        "gpu_ms": job.gpu_ms,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "api_key_id": str(job.api_key_id) if job.api_key_id else None,
        "end_user": job.end_user or None,
    }


class UsageOrInference(HasScope):
    """Reading request history: keys that run models, or that read usage."""

    def has_permission(self, request: Request, view: Any) -> bool:
        api_key = request.auth
        if isinstance(api_key, ApiKey) and (api_key.has_scope(Scope.INFERENCE) or api_key.has_scope(Scope.USAGE_READ)):
            return True
        self.message = "This API key needs the 'inference' or 'usage:read' scope."
        return False


class RequestQuery(serializers.Serializer[Any]):
    status = serializers.CharField(required=False, help_text=f"One of {', '.join(JobStatus.values)} (any case).")
    endpoint_id = serializers.CharField(required=False, max_length=300, help_text="e.g. platform/tiny-sd.")
    end_user = serializers.CharField(
        required=False, max_length=END_USER_MAX_LENGTH, help_text="Only the requests of this end user tag."
    )

    def validate_status(self, value: str) -> str:
        if value.upper() not in JobStatus.values:
            raise serializers.ValidationError(f"Use one of {', '.join(JobStatus.values)}.", code="enum")
        return value.upper()


class RequestSummary(serializers.Serializer[Any]):
    request_id = serializers.UUIDField()
    endpoint_id = serializers.CharField()
    status = serializers.ChoiceField(choices=JobStatus.values)
    fal_status = serializers.ChoiceField(choices=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"])
    error_type = serializers.CharField(allow_null=True)
    gpu_ms = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    api_key_id = serializers.UUIDField(allow_null=True)
    end_user = serializers.CharField(allow_null=True, help_text="The X-Fal-End-User tag it was submitted with.")


class RequestListView(APIView):
    permission_classes = (IsAuthenticated, UsageOrInference)
    schema = ApiAutoSchema()
    pagination_class = RequestsPage

    @extend_schema(
        parameters=[RequestQuery], responses=RequestSummary(many=True), summary="This organization's requests"
    )
    def get(self, request: Request) -> Response:
        jobs: QuerySet[Job] = Job.objects.filter(organization=request_organization(request)).select_related("endpoint")
        query = query_params(request, RequestQuery, paginated=True)
        if query.get("status"):
            jobs = jobs.filter(status=query["status"])
        if query.get("end_user"):
            # The partial index of tagged jobs serves it: the exclusion tells the planner so.
            jobs = jobs.filter(end_user=query["end_user"]).exclude(end_user="")
        endpoint_id = query.get("endpoint_id")
        if endpoint_id:
            owner, _, rest = endpoint_id.partition("/")
            name, _, path = rest.partition("/")
            jobs = jobs.filter(endpoint__owner=owner, endpoint__name=name, endpoint__path=path)
        paginator = RequestsPage()
        page = paginator.paginate_queryset(jobs, request, view=self) or []
        return paginator.get_paginated_response([summary(job) for job in page])


def sent_it_or_admin(api_key: ApiKey, job: Job) -> bool:
    """Whether ``api_key`` reads the request's webhook URL in full: the key that sent it, or one with the ``admin``
    scope (any other key of the organization reads where it goes: ``inference.webhooks.where_it_goes``)."""
    return job.api_key_id == api_key.pk or api_key.has_scope(Scope.ADMIN)


class RequestDetailView(APIView):
    permission_classes = (IsAuthenticated, UsageOrInference)
    schema = ApiAutoSchema()

    @extend_schema(
        responses={200: OpenApiTypes.OBJECT, 404: error("No such request of this organization.")},
        summary="One request: input, result, logs, attempts, usage and webhook deliveries",
    )
    def get(self, request: Request, request_id: str) -> Response:
        try:
            job_id = uuid.UUID(request_id)
        except ValueError:
            raise exceptions.NotFound() from None
        job = (
            Job.objects.filter(pk=job_id, organization=request_organization(request)).select_related("endpoint").first()
        )
        if job is None:
            raise exceptions.NotFound()
        from inference.webhooks import delivery_log

        public_input = {key: value for key, value in job.input.items() if key not in ("image_path", "seeds")}
        return Response(
            {
                **summary(job),
                "input": public_input,
                "result": files.render_result(job, base_url=base_url(request)) if job.status == "COMPLETED" else None,
                "error": job.error or None,
                "logs": logs_of(job),
                "timeline": {
                    "queued_at": job.created_at,
                    "dispatched_at": job.dispatched_at,
                    "started_at": job.started_at,
                    "finished_at": job.finished_at,
                },
                "attempts": [
                    {
                        "number": attempt.number,
                        "outcome": attempt.outcome,
                        "worker": attempt.worker,
                        "gpu_ms": attempt.gpu_ms,
                        "cold_start_ms": attempt.cold_start_ms,
                        "wasted_ms": attempt.wasted_ms,
                        "billable": attempt.billable,
                        "started_at": attempt.started_at,
                        "finished_at": attempt.finished_at,
                        "error": attempt.error or None,
                    }
                    for attempt in job.attempts.order_by("number")
                ],
                "usage": usage_of(job),
                "webhook": delivery_log(job, in_full=sent_it_or_admin(request_api_key(request), job)),
            }
        )
