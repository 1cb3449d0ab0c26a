"""The playground (run a model from a form, watch its progress) and the history of requests."""

from __future__ import annotations

import json
import uuid
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib import auth
from django.contrib.sessions.backends.base import SessionBase
from django.core.paginator import Paginator
from django.db.models import IntegerField, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_POST

from accounts.errors import AppError
from accounts.models import Membership, Scope, User
from billing.models import UsageRecord
from dashboard.access import Context, dashboard_view, resolve
from inference import files, stream_limits
from inference.api import release_connection, status_event_stream
from inference.inputs import input_schema
from inference.models import Endpoint, Job, JobStatus
from inference.presenters import base_url, usage_of
from inference.submission import submit_job
from inference.webhooks import where_it_goes

PAGE_SIZE = 25


def endpoint_choices() -> list[dict[str, Any]]:
    return [
        {"id": endpoint.endpoint_id, "title": endpoint.title or endpoint.endpoint_id, "schema": input_schema(endpoint)}
        for endpoint in Endpoint.objects.active().order_by("owner", "name", "path")
    ]


@dashboard_view("run_models")
def playground(request: HttpRequest, context: Context) -> HttpResponse:
    endpoints = endpoint_choices()
    chosen = request.GET.get("endpoint") or (endpoints[0]["id"] if endpoints else "")
    return render(
        request,
        "dashboard/playground.html",
        {**context.as_template(), "endpoints": endpoints, "chosen": chosen},
    )


@require_POST
@dashboard_view("run_models")
def playground_run(request: HttpRequest, context: Context) -> JsonResponse:
    """Submits the form's JSON as the organization (no API key: usage shows as “dashboard”)."""
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return JsonResponse({"detail": "The form did not send JSON.", "error_type": "invalid_json"}, status=400)
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return JsonResponse({"detail": "Send {endpoint, input}.", "error_type": "validation_error"}, status=422)
    owner, _, rest = str(body.get("endpoint", "")).partition("/")
    name, _, path = rest.partition("/")
    endpoint = Endpoint.objects.by_path(owner, name, path)
    if endpoint is None:
        return JsonResponse({"detail": "Unknown endpoint.", "error_type": "endpoint_not_found"}, status=404)
    try:
        job, _ = submit_job(organization=context.organization, api_key=None, endpoint=endpoint, payload=body["input"])
    except AppError as exc:
        return JsonResponse(exc.body(), status=exc.status_code)
    return JsonResponse(
        {
            "request_id": str(job.pk),
            "events_url": reverse("dashboard:request-events", args=[job.pk]),
            "page_url": reverse("dashboard:request", args=[job.pk]),
            "outcome_url": reverse("dashboard:request-outcome", args=[job.pk]),
        },
        status=202,
    )


async def request_events(request: HttpRequest, request_id: uuid.UUID) -> HttpResponseBase:
    """The status stream of one of the organization's requests, for the signed-in browser."""
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"detail": "Log in first.", "error_type": "unauthorized"}, status=401)
    request.user = user

    def find() -> Job | None:
        try:
            context = resolve(request)
            if context is None:
                return None
            jobs = Job.objects.filter(pk=request_id, organization=context.organization)
            return jobs.select_related("endpoint").first()
        finally:
            release_connection()

    job = await sync_to_async(find)()
    if job is None:
        return JsonResponse({"detail": "Request not found.", "error_type": "request_not_found"}, status=404)
    # Counted per person, whichever session or tab opens it: 429 ``too_many_streams`` past the cap.
    slot = await stream_limits.open_slot(stream_limits.dashboard_holder(user.pk))
    if not isinstance(slot, stream_limits.Slot):
        return slot
    session_key = request.session.session_key
    session_store = type(request.session)

    def still_a_member() -> bool:
        """The session still signs the person in and they are still a member: asked again while the page is open."""
        try:
            return (
                session_key is not None
                and still_signed_in(session_store(session_key=session_key), user.pk)
                and Membership.objects.filter(user_id=user.pk, organization_id=job.organization_id).exists()
            )
        finally:
            release_connection()

    return status_event_stream(job, request, with_logs=False, slot=slot, still_allowed=still_a_member)


def still_signed_in(session: SessionBase, user_id: Any) -> bool:
    """Whether the stored ``session`` still signs in the person ``user_id`` as Django's ``get_user`` judges it at each
    request: not logged out (the row is there), an active person, and the hash of their password as it is now (a new
    password signs out every session that was opened with the old one). Read only: what to do with a session that no
    longer signs in is the next request's to decide, as it is for every page."""
    if str(session.get(auth.SESSION_KEY)) != str(user_id):
        return False
    person = User.objects.filter(pk=user_id, is_active=True).first()
    session_hash = session.get(auth.HASH_SESSION_KEY)
    if person is None or not session_hash:
        return False
    hashes = [person.get_session_auth_hash(), *person.get_session_auth_fallback_hash()]
    return any(constant_time_compare(session_hash, current) for current in hashes)


def with_cost(jobs: Any) -> Any:
    cost = (
        # Bounded by the job's creation: prunes the months of usage before it (billing.partitions).
        UsageRecord.objects.filter(job=OuterRef("pk"), billable=True, recorded_at__gte=OuterRef("created_at"))
        .values("job")
        .annotate(total=Sum("cost_micros"))
        .values("total")
    )
    return jobs.annotate(cost_micros=Coalesce(Subquery(cost, output_field=IntegerField()), 0))


def org_job(context: Context, request_id: uuid.UUID) -> Job:
    return get_object_or_404(
        with_cost(Job.objects.select_related("endpoint", "api_key")), pk=request_id, organization=context.organization
    )


def present(job: Job, request: HttpRequest) -> dict[str, Any]:
    """A request's outputs as pages show them: its images, or its video (with its poster) or audio clip, while their
    URLs live (None past the retention)."""
    result = files.render_result(job, base_url=base_url(request)) or {}
    images = [image for image in result.get("images") or [] if image.get("url")]
    video = result.get("video") if isinstance(result.get("video"), dict) and result["video"].get("url") else None
    audio = (
        result.get("audio_file")
        if isinstance(result.get("audio_file"), dict) and result["audio_file"].get("url")
        else None
    )
    duration = (job.finished_at - job.created_at).total_seconds() if job.finished_at else None
    return {"job": job, "images": images, "video": video, "audio": audio, "duration": duration}


@dashboard_view()
def request_outcome(request: HttpRequest, context: Context, request_id: uuid.UUID) -> HttpResponse:
    """The images, GPU time and cost of a finished request (the playground swaps this in)."""
    job = org_job(context, request_id)
    if not job.is_final:
        raise Http404("Not finished yet.")
    return render(request, "dashboard/_outcome.html", {**present(job, request), "usage": usage_of(job)})


STATUS_FILTERS = list(JobStatus.choices)


@dashboard_view()
def request_list(request: HttpRequest, context: Context) -> HttpResponse:
    jobs = with_cost(Job.objects.filter(organization=context.organization).select_related("endpoint"))
    status, endpoint = request.GET.get("status", ""), request.GET.get("endpoint", "")
    if status in JobStatus.values:
        jobs = jobs.filter(status=status)
    endpoints = list(Endpoint.objects.order_by("owner", "name", "path"))
    if endpoint:
        jobs = jobs.filter(endpoint__in=[e for e in endpoints if e.endpoint_id == endpoint])
    page = Paginator(jobs.order_by("-created_at", "-id"), PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [present(job, request) for job in page.object_list]
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "dashboard/requests.html",
        {
            **context.as_template(),
            "page": page,
            "rows": rows,
            "statuses": STATUS_FILTERS,
            "endpoints": endpoints,
            "status": status,
            "endpoint": endpoint,
            "query": query.urlencode(),
        },
    )


def webhook_url_shown(context: Context, job: Job) -> str:
    """The request's webhook URL in full for the member whose key sent it and the organization's owners and admins;
    for any other member, where it goes (``inference.webhooks.where_it_goes``): its path and query may be a secret."""
    sent_it = job.api_key is not None and job.api_key.created_by_id == context.user.pk
    if sent_it or Scope.ADMIN in context.grantable_scopes:
        return job.webhook_url
    return where_it_goes(job.webhook_url)


@dashboard_view()
def request_detail(request: HttpRequest, context: Context, request_id: uuid.UUID) -> HttpResponse:
    job = org_job(context, request_id)
    webhook = getattr(job, "webhook", None) if job.webhook_url else None
    return render(
        request,
        "dashboard/request.html",
        {
            **context.as_template(),
            **present(job, request),
            "input": json.dumps({k: v for k, v in job.input.items() if k != "image_path"}, indent=2),
            "archived_at": job.archived_at,
            "logs": job.logs.order_by("id"),
            "attempts": job.attempts.order_by("number"),
            "webhook": webhook,
            "webhook_url": webhook_url_shown(context, job),
            "webhook_log": webhook.log.order_by("number") if webhook else [],
            "usage": usage_of(job),
        },
    )
