"""``/metrics``: the platform's state in Prometheus' exposition format, read from the database at each scrape.

What is exposed (README "Metrics" says what each means and how to alert on it): jobs waiting and in flight per GPU
class, submit-to-start and submit-to-end latency, GPU seconds billed and unbilled, the webhook and Stripe event
backlogs, the last reconciliation's result, the heartbeat of every worker running a job, and when each task of beat's
schedule last succeeded.

**Computed from the database, not counted in process memory.** The web tier is several gunicorn/uvicorn worker
processes on several machines, and the work happens in Celery workers, other processes again: a counter kept in
one process's memory sees only the requests that process served. prometheus-client's multiprocess mode would
merge the web processes' files (a shared ``PROMETHEUS_MULTIPROC_DIR`` per machine, cleaned at each start), but not
the workers' on other machines, and it would count events, which drift from the rows that record them whenever a
process dies between the two. The database rows are the truth the platform bills from, so every value here is a
query over them at scrape time: any web process answers the same, a restart loses nothing, and the figures agree
with the database by construction. The cost is a few queries per scrape, each bounded: it reads through an index
only the rows that are waiting, in flight, pending, or inside a short recent window, never a whole table of history
(tests/test_metrics.py checks every plan on PostgreSQL). Scrape one target (the Service, not every pod): every
process answers the same, and each scrape costs the database.

Shapes, given that each value is a snapshot:

- states (jobs, backlogs, heartbeats, reconciliation) are gauges;
- GPU seconds are counters that restart at 00:00 UTC: the day's usage from the daily rollups (the same rows the
  pages read), with ``_created`` at the day's start; ``rate()`` and ``increase()`` take the restart as a counter
  reset. Usage stamped just before midnight that commits just after it is counted in neither day's series;
- latencies are gauge histograms (OpenMetrics ``gaugehistogram``; ``histogram`` with ``_gsum``/``_gcount`` in
  the plain text format) over the jobs that started, or ended, in the last ``LATENCY_WINDOW``: take
  ``histogram_quantile`` of the buckets as they are, not of their ``rate()``.

Access: the view answers only a request bearing ``Authorization: Bearer <METRICS_TOKEN>``; with no token set,
``/metrics`` does not exist (404).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, DurationField, ExpressionWrapper, F, Max, Min, Q, Sum
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from accounts.models import ScheduledTask
from billing.metering import bucket_start
from billing.models import Granularity, ReconciliationRun, StripeEvent, StripeEventStatus, UsageRollup
from config.scheduled_runs import scheduled_tasks
from inference.models import (
    AttemptOutcome,
    GpuClass,
    Job,
    JobAttempt,
    JobStatus,
    WebhookDelivery,
    WebhookStatus,
)

# Jobs that started (or ended) this recently make up the latency histograms.
LATENCY_WINDOW = timedelta(minutes=5)
# Upper bounds of the buckets, in seconds (+Inf is added).
SUBMIT_TO_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
SUBMIT_TO_END_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# A scrape's queries give up after this long on PostgreSQL, so a slow one never piles up behind Prometheus' retries.
STATEMENT_TIMEOUT_MS = 10_000
# The states a job waits or works in, in the order the lifecycle moves through them.
UNFINISHED = (JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING)
UNPROCESSED_STRIPE = (StripeEventStatus.PENDING, StripeEventStatus.FAILED)


@dataclass(frozen=True)
class Snapshot(Collector):
    """The metric families of one scrape, handed to prometheus-client's encoders as a collector."""

    families: tuple[Metric, ...]

    def collect(self) -> Iterable[Metric]:
        return self.families


def collect(now: datetime) -> Snapshot:
    """Every metric family, read from the database as of ``now``: one query per function below."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('statement_timeout', %s, true)", [str(STATEMENT_TIMEOUT_MS)])
        families = [
            *job_states(now),
            submit_to_start(now),
            submit_to_end(now),
            gpu_seconds(now),
            *webhook_backlog(now),
            *stripe_backlog(now),
            *last_reconciliation(),
            *worker_heartbeats(),
            *scheduled_task_runs(),
        ]
    return Snapshot(tuple(families))


def _classes(found: Iterable[str]) -> list[str]:
    """Every GPU class the registry knows, so each has its series even at zero, and any other the rows name."""
    return sorted({*GpuClass.values, *found})


def _age(now: datetime, since: datetime | None) -> float:
    return (now - since).total_seconds() if since is not None else 0.0


def job_states(now: datetime) -> Iterator[Metric]:
    """Jobs waiting and in flight per GPU class, from the unfinished jobs only (the status index).

    A lease has lapsed by the database's clock, the one leases are written and reaped by
    (``inference.attempts.lease_deadline``), not by this process's ``now``: the figure is the jobs the reaper will
    take at its next pass, whatever this host's clock says. The ages are this host's ``now`` less the stamps."""
    rows = (
        Job.objects.filter(status__in=UNFINISHED)
        .order_by()
        .values("gpu_class", "status")
        .annotate(
            jobs=Count("pk"),
            oldest_created=Min("created_at"),
            oldest_dispatched=Min("dispatched_at"),
            lease_lapsed=Count("pk", filter=Q(lease_expires_at__lt=Now())),
        )
    )
    found: dict[tuple[str, str], dict[str, Any]] = {(row["gpu_class"], row["status"]): row for row in rows}
    by_status = GaugeMetricFamily(
        "platform_jobs", "Jobs in each unfinished state (QUEUED, DISPATCHED, RUNNING).", labels=["gpu_class", "status"]
    )
    queued = GaugeMetricFamily(
        "platform_jobs_queued",
        "Jobs waiting for their organization's concurrency limit (QUEUED): not yet sent to any worker.",
        labels=["gpu_class"],
    )
    in_flight = GaugeMetricFamily(
        "platform_jobs_in_flight",
        "Jobs sent to the workers and not finished (DISPATCHED + RUNNING): what the GPU workers scale on.",
        labels=["gpu_class"],
    )
    queued_age = GaugeMetricFamily(
        "platform_jobs_queued_oldest_age_seconds",
        "Seconds since the oldest QUEUED job was submitted; 0 when none waits.",
        labels=["gpu_class"],
    )
    dispatched_age = GaugeMetricFamily(
        "platform_jobs_dispatched_oldest_age_seconds",
        "Seconds since the oldest DISPATCHED job was dispatched without a worker claiming it; 0 when none.",
        labels=["gpu_class"],
    )
    lease_expired = GaugeMetricFamily(
        "platform_jobs_lease_expired",
        "RUNNING jobs whose worker's lease has lapsed and which the sweep has not reaped yet.",
        labels=["gpu_class"],
    )
    empty: dict[str, Any] = {"jobs": 0, "oldest_created": None, "oldest_dispatched": None, "lease_lapsed": 0}
    for gpu_class in _classes(gpu_class for gpu_class, _ in found):
        row = {status: found.get((gpu_class, status), empty) for status in UNFINISHED}
        for status in UNFINISHED:
            by_status.add_metric([gpu_class, status], row[status]["jobs"])
        queued.add_metric([gpu_class], row[JobStatus.QUEUED]["jobs"])
        in_flight.add_metric([gpu_class], row[JobStatus.DISPATCHED]["jobs"] + row[JobStatus.RUNNING]["jobs"])
        queued_age.add_metric([gpu_class], _age(now, row[JobStatus.QUEUED]["oldest_created"]))
        dispatched_age.add_metric([gpu_class], _age(now, row[JobStatus.DISPATCHED]["oldest_dispatched"]))
        lease_expired.add_metric([gpu_class], row[JobStatus.RUNNING]["lease_lapsed"])
    yield from (by_status, queued, in_flight, queued_age, dispatched_age, lease_expired)


def _duration_aggregates(bounds: tuple[float, ...]) -> dict[str, Any]:
    """Per group: how many durations fall at or below each bound, how many in all, and their sum."""
    aggregates: dict[str, Any] = {
        f"le_{index}": Count("pk", filter=Q(duration__lte=timedelta(seconds=bound)))
        for index, bound in enumerate(bounds)
    }
    aggregates["count"] = Count("pk")
    aggregates["total"] = Sum("duration")
    return aggregates


def _buckets(row: dict[str, Any], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = [(_le(bound), row[f"le_{index}"]) for index, bound in enumerate(bounds)]
    buckets.append(("+Inf", row["count"]))
    return buckets


def _le(bound: float) -> str:
    return str(float(bound))


def _seconds(total: timedelta | None) -> float:
    return total.total_seconds() if total is not None else 0.0


def submit_to_start(now: datetime) -> Metric:
    """Seconds from submission to first start, of the jobs that started in the window.

    A job that started in the window is running now or has ended since (a retried job waiting again for a worker
    is left out until it runs): the RUNNING ones come from the status index, the ended ones from ``finished_at``'s.
    """
    since = now - LATENCY_WINDOW
    rows = (
        Job.objects.filter(Q(status=JobStatus.RUNNING) | Q(finished_at__gte=since), started_at__gte=since)
        .annotate(duration=ExpressionWrapper(F("started_at") - F("created_at"), output_field=DurationField()))
        .order_by()
        .values("gpu_class")
        .annotate(**_duration_aggregates(SUBMIT_TO_START_BUCKETS))
    )
    family = GaugeHistogramMetricFamily(
        "platform_job_submit_to_start_seconds",
        f"Seconds from submission to first start, of the jobs that started in the last "
        f"{int(LATENCY_WINDOW.total_seconds())} s.",
        labels=["gpu_class"],
    )
    found = {row["gpu_class"]: row for row in rows}
    for gpu_class in _classes(found):
        row = found.get(gpu_class) or _no_durations(SUBMIT_TO_START_BUCKETS)
        family.add_metric([gpu_class], _buckets(row, SUBMIT_TO_START_BUCKETS), _seconds(row["total"]))
    return family


def submit_to_end(now: datetime) -> Metric:
    """Seconds from submission to the final state, of the jobs that ended in the window (``finished_at``'s index)."""
    rows = (
        Job.objects.filter(finished_at__gte=now - LATENCY_WINDOW)
        .annotate(duration=ExpressionWrapper(F("finished_at") - F("created_at"), output_field=DurationField()))
        .order_by()
        .values("gpu_class", "status")
        .annotate(**_duration_aggregates(SUBMIT_TO_END_BUCKETS))
    )
    family = GaugeHistogramMetricFamily(
        "platform_job_submit_to_end_seconds",
        f"Seconds from submission to the final state (COMPLETED, FAILED, CANCELLED), of the jobs that ended in the "
        f"last {int(LATENCY_WINDOW.total_seconds())} s.",
        labels=["gpu_class", "status"],
    )
    found = {(row["gpu_class"], row["status"]): row for row in rows}
    for gpu_class in _classes(gpu_class for gpu_class, _ in found):
        for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
            row = found.get((gpu_class, status)) or _no_durations(SUBMIT_TO_END_BUCKETS)
            family.add_metric([gpu_class, status], _buckets(row, SUBMIT_TO_END_BUCKETS), _seconds(row["total"]))
    return family


def _no_durations(bounds: tuple[float, ...]) -> dict[str, Any]:
    return {**{f"le_{index}": 0 for index in range(len(bounds))}, "count": 0, "total": None}


def gpu_seconds(now: datetime) -> Metric:
    """GPU time recorded today (UTC), billed and unbilled, from today's daily rollups."""
    day = bucket_start(now, Granularity.DAY)
    rows = (
        UsageRollup.objects.filter(granularity=Granularity.DAY, bucket_start=day)
        .order_by()
        .values("gpu_class")
        .annotate(billed_ms=Sum("gpu_ms"), unbilled_ms=Sum("unbilled_gpu_ms"))
    )
    family = CounterMetricFamily(
        "platform_gpu_seconds",
        "GPU seconds recorded since 00:00 UTC (restarts then): billed=true is the time customers pay for, "
        "billed=false cold starts and the platform's own failures.",
        labels=["gpu_class", "billed"],
    )
    found: dict[str, Mapping[str, Any]] = {row["gpu_class"]: row for row in rows}
    created = day.timestamp()
    for gpu_class in _classes(found):
        row = found.get(gpu_class, {})
        family.add_metric([gpu_class, "true"], (row.get("billed_ms") or 0) / 1000, created=created)
        family.add_metric([gpu_class, "false"], (row.get("unbilled_ms") or 0) / 1000, created=created)
    return family


def webhook_backlog(now: datetime) -> Iterator[Metric]:
    """Webhooks not delivered yet: the pending deliveries, each with its next try set (``next_attempt_at``'s index)."""
    backlog = (
        WebhookDelivery.objects.filter(status=WebhookStatus.PENDING, next_attempt_at__isnull=False)
        .order_by()
        .aggregate(
            pending=Count("pk"),
            due=Count("pk", filter=Q(next_attempt_at__lte=now)),
            oldest=Min("created_at"),
        )
    )
    yield GaugeMetricFamily(
        "platform_webhook_deliveries_pending",
        "Customer webhooks not delivered yet (first try to come, or retrying with backoff).",
        value=backlog["pending"],
    )
    yield GaugeMetricFamily(
        "platform_webhook_deliveries_due",
        "Pending webhooks whose next try is due now and not taken yet: grows when the delivery sweep falls behind.",
        value=backlog["due"],
    )
    yield GaugeMetricFamily(
        "platform_webhook_deliveries_pending_oldest_age_seconds",
        "Seconds since the oldest pending webhook was created; 0 when none is pending.",
        value=_age(now, backlog["oldest"]),
    )


def stripe_backlog(now: datetime) -> Iterator[Metric]:
    """Stripe events stored and not processed: pending, or failed and retried (the inbox's unprocessed index)."""
    rows = (
        StripeEvent.objects.filter(status__in=UNPROCESSED_STRIPE)
        .order_by()
        .values("status")
        .annotate(
            events=Count("pk"),
            oldest=Min("received_at"),
            given_up=Count("pk", filter=Q(attempts__gte=settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS)),
        )
    )
    found: dict[str, Mapping[str, Any]] = {row["status"]: row for row in rows}
    events = GaugeMetricFamily(
        "platform_stripe_events_unprocessed",
        "Stripe webhook events stored and not processed yet: pending, or failed and retried with backoff.",
        labels=["status"],
    )
    oldest = GaugeMetricFamily(
        "platform_stripe_events_unprocessed_oldest_age_seconds",
        "Seconds since the oldest unprocessed Stripe event of each status was received; 0 when none.",
        labels=["status"],
    )
    for status in UNPROCESSED_STRIPE:
        row = found.get(status, {})
        events.add_metric([status], row.get("events", 0))
        oldest.add_metric([status], _age(now, row.get("oldest")))
    given_up = found.get(StripeEventStatus.FAILED, {}).get("given_up", 0)
    yield events
    yield oldest
    yield GaugeMetricFamily(
        "platform_stripe_events_given_up",
        "Failed Stripe events past BILLING_STRIPE_EVENT_MAX_ATTEMPTS: no longer retried, waiting for "
        "`manage.py replay_stripe_events`.",
        value=given_up,
    )


def last_reconciliation() -> Iterator[Metric]:
    """The newest finished reconciliation run (by primary key: one row per run, a small table)."""
    run = (
        ReconciliationRun.objects.filter(finished_at__isnull=False)
        .order_by("-pk")
        .values("finished_at", "ok", "checked")
        .first()
    )
    finished: datetime | None = run["finished_at"] if run else None
    yield GaugeMetricFamily(
        "platform_reconciliation_last_finished_timestamp_seconds",
        "When the last reconciliation run finished (Unix time); 0 when none has run.",
        value=finished.timestamp() if finished else 0,
    )
    ok = GaugeMetricFamily(
        "platform_reconciliation_last_ok", "1 when the last reconciliation run found no drift, else 0."
    )
    drift = GaugeMetricFamily(
        "platform_reconciliation_last_drift",
        "Discrepancies the last reconciliation run found, per check (expected: 0).",
        labels=["check"],
    )
    skipped = GaugeMetricFamily(
        "platform_reconciliation_last_skipped",
        "1 for each check the last reconciliation run could not run (e.g. Stripe without a key), else 0.",
        labels=["check"],
    )
    if run is not None:
        ok.add_metric([], 1 if run["ok"] else 0)
        for check, summary in sorted(run["checked"].items()):
            drift.add_metric([check], summary.get("drift", 0))
            skipped.add_metric([check], 1 if summary.get("skipped") else 0)
    yield from (ok, drift, skipped)


def worker_heartbeats() -> Iterator[Metric]:
    """The last heartbeat of each worker running a job, from the running attempts (their partial index).

    A worker with nothing to run writes nothing, so it is absent here: idle workers' liveness is their process
    supervisor's to check (Kubernetes' probes, ``celery inspect ping``), not the database's.
    """
    rows = (
        JobAttempt.objects.filter(outcome=AttemptOutcome.RUNNING)
        .order_by()
        .values("worker")
        .annotate(last=Max("heartbeat_at"), attempts=Count("pk"))
        .order_by("worker")
    )
    last = GaugeMetricFamily(
        "platform_worker_last_heartbeat_timestamp_seconds",
        "The last heartbeat (Unix time) of each worker running a job; a worker beats every JOB_HEARTBEAT_MS.",
        labels=["worker"],
    )
    running = GaugeMetricFamily(
        "platform_worker_running_attempts", "Attempts each worker is running now.", labels=["worker"]
    )
    for row in rows:
        last.add_metric([row["worker"]], row["last"].timestamp())
        running.add_metric([row["worker"]], row["attempts"])
    yield from (last, running)


def scheduled_task_runs() -> Iterator[Metric]:
    """Every task of beat's schedule, each with a series whether it ever ran or not (``config.scheduled_runs``): when
    it last succeeded, when it last failed, and the longest it may go between two runs. A task that never succeeded
    counts from when beat first scheduled it; one no beat ever scheduled against this database, from 0 (Unix time):
    an alert on the first series fires for a beat that never started, a queue nobody consumes, a task failing each
    time."""
    intervals = scheduled_tasks()
    rows = {
        row["name"]: row
        for row in ScheduledTask.objects.filter(name__in=intervals).values(
            "name", "scheduled_since", "last_succeeded_at", "last_failed_at"
        )
    }
    succeeded = GaugeMetricFamily(
        "platform_scheduled_task_last_success_timestamp_seconds",
        "When each scheduled task last succeeded (Unix time); if never, when beat first scheduled it; else 0.",
        labels=["task"],
    )
    failed = GaugeMetricFamily(
        "platform_scheduled_task_last_failure_timestamp_seconds",
        "When each scheduled task last failed (Unix time); 0 if never.",
        labels=["task"],
    )
    interval = GaugeMetricFamily(
        "platform_scheduled_task_interval_seconds",
        "The longest each scheduled task may go between two runs by beat's schedule, in seconds.",
        labels=["task"],
    )
    for name, seconds in sorted(intervals.items()):
        row: Mapping[str, Any] = rows.get(name, {})
        since: datetime | None = row.get("last_succeeded_at") or row.get("scheduled_since")
        last_failed: datetime | None = row.get("last_failed_at")
        succeeded.add_metric([name], since.timestamp() if since else 0)
        failed.add_metric([name], last_failed.timestamp() if last_failed else 0)
        interval.add_metric([name], seconds)
    yield from (succeeded, failed, interval)


def _authorized(request: HttpRequest, token: str) -> bool:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The scrape: every metric, in OpenMetrics when the scraper asks for it (Prometheus does), else plain text."""
    token = settings.METRICS_TOKEN
    if not token:
        return JsonResponse({"detail": "Not found.", "error_type": "not_found"}, status=404)
    if not _authorized(request, token):
        refused = JsonResponse(
            {"detail": "A valid bearer token is required (METRICS_TOKEN).", "error_type": "unauthorized"}, status=401
        )
        refused["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refused
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = HttpResponse(encoder(collect(timezone.now())), content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
