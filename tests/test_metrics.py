"""``/metrics`` (config/metrics.py) and the KEDA trigger's SQL (deploy/keda/inflight.sql).

A scenario built through the platform's own services (jobs in every state on two GPU classes, usage billed and
unbilled, a pending webhook, pending and failed Stripe events, a reconciliation run, two workers' heartbeats) is
scraped over HTTP, and every metric is compared with what the database holds, computed here in Python from the
rows. Timestamps the services would stamp "now" are moved apart afterwards, so the latency histograms have
durations in several buckets and jobs outside their window.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import stripe
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.db.models import F, Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from accounts.models import Organization
from billing import reconciliation, stripe_events
from billing.models import Account, ReconciliationRun, StripeEvent, StripeEventStatus, UsageRecord
from config import metrics
from inference import attempts, closing, dispatch, submission, webhooks
from inference.models import (
    AttemptOutcome,
    Endpoint,
    GpuClass,
    Job,
    JobAttempt,
    JobStatus,
    PipelineKind,
    WebhookDelivery,
    WebhookStatus,
)
from tests.lifecycle import SMALL, finish, run, start, submit
from tests.test_entrypoints import clean_env, run_python

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[1]
INFLIGHT_SQL = ROOT / "deploy" / "keda" / "inflight.sql"
TOKEN = "metrics-token-for-tests-" + "x" * 24
STRIPE_SECRET = "whsec_metrics_tests"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# At most this many statements per scrape, whatever the number of rows (one per metric group, and on PostgreSQL
# the statement timeout).
MAX_QUERIES = 10
# Tables that grow with traffic: every scrape must reach their rows through an index condition or a partial index.
BIG_TABLES = {
    "inference_job",
    "inference_jobattempt",
    "inference_webhookdelivery",
    "billing_usagerecord",
    "billing_usagerollup",
    "billing_stripeevent",
}


@pytest.fixture
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN


@pytest.fixture
def books(priced_without_broker: None, sent_tasks: list[Any], settings: Any) -> None:
    """Jobs dispatched with no broker, the opening rate card in force, Stripe off (reconciliation skips it), and
    the inbox's signing secret set."""
    settings.STRIPE_SECRET_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = STRIPE_SECRET
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the webhooks' receiver is on loopback (never called here)


def scrape(client: Any, *, accept: str = OPENMETRICS, **headers: Any) -> Any:
    headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {TOKEN}")
    return client.get("/metrics", HTTP_ACCEPT=accept, **headers)


def families(client: Any) -> dict[str, Any]:
    response = scrape(client)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("application/openmetrics-text")
    return {family.name: family for family in parse_openmetrics(response.content.decode())}


def samples(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """A family's samples named ``<family><suffix>``, keyed by their sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in family.samples
        if sample.name == family.name + suffix
    }


def by(label: str, family: Any, suffix: str = "") -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in samples(family, suffix).items()}


def h100_endpoint() -> Endpoint:
    endpoint, _ = Endpoint.objects.get_or_create(
        owner="platform",
        name="tiny-sd-h100",
        defaults={"kind": PipelineKind.TEXT_TO_IMAGE, "weights": "builtin:tiny-sd", "gpu_class": GpuClass.H100},
    )
    return endpoint


def signed_event(event_type: str, object_id: str) -> tuple[bytes, str]:
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "type": event_type,
        "livemode": False,
        "created": int(timezone.now().timestamp()),
        "data": {"object": {"id": object_id, "object": event_type.split(".")[0]}},
    }
    payload = json.dumps(event)
    return payload.encode(), stripe.WebhookSignature.generate_signature_header(payload, STRIPE_SECRET)


def submit_with_webhook(organization: Organization, endpoint: Endpoint) -> Job:
    job, _ = submission.submit_job(
        organization=organization, api_key=None, endpoint=endpoint, payload=SMALL, webhook_url="http://127.0.0.1:9/done"
    )
    return job


def age_job(
    job: Job, *, created: timedelta, started: timedelta | None = None, finished: timedelta | None = None
) -> None:
    """Moves a job's times back from now: submitted ``created`` ago, started and finished so long ago."""
    now = timezone.now()
    values: dict[str, Any] = {"created_at": now - created}
    if started is not None:
        values["started_at"] = now - started
    if finished is not None:
        values["finished_at"] = now - finished
    Job.objects.filter(pk=job.pk).update(**values)


@pytest.fixture
def scenario(
    books: None,
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    settings: Any,
) -> dict[str, Any]:
    """Jobs in every state on the cpu and gpu-h100 classes, usage, webhooks, Stripe events and a reconciliation."""
    cpu_org, h100_org = tenant["organization"], other_tenant["organization"]
    h100 = h100_endpoint()
    Organization.objects.filter(pk__in=[cpu_org.pk, h100_org.pk]).update(concurrency_limit=50)

    # Ended: completed (billed, with a cold start unbilled), failed by its input (billed), failed by the platform
    # after a retry (both attempts unbilled), cancelled while running (billed), cancelled in the queue (nothing).
    completed = run(cpu_org, builtin_endpoint, gpu_ms=1_500, cold_start_ms=400)
    failed = run(cpu_org, builtin_endpoint, outcome=AttemptOutcome.FAILED, gpu_ms=300, error="bad input")
    errored = start(submit(h100_org, h100))
    finish(errored, AttemptOutcome.ERRORED, gpu_ms=700, error="out of memory", retry=True)
    errored = finish(start(errored), AttemptOutcome.ERRORED, gpu_ms=200, error="out of memory", retry=False)
    cancelled_running = start(submit(h100_org, h100))
    closing.cancel_job(job=cancelled_running)
    cancelled_running = finish(cancelled_running, AttemptOutcome.CANCELLED, gpu_ms=900)
    cancelled_queued = submit(cpu_org, builtin_endpoint)
    closing.cancel_job(job=cancelled_queued)
    long_ago = run(h100_org, h100, gpu_ms=2_000)  # ended an hour ago: outside the latency window
    with_webhook = finish(start(submit_with_webhook(cpu_org, builtin_endpoint)), gpu_ms=250)
    delivered = finish(start(submit_with_webhook(cpu_org, builtin_endpoint)), gpu_ms=250)
    for job in (with_webhook, delivered):
        webhooks.schedule_webhook(job.pk)  # what the final transaction's commit runs
    WebhookDelivery.objects.filter(job=delivered).update(
        status=WebhookStatus.DELIVERED, delivered_at=timezone.now(), next_attempt_at=None
    )

    # Unfinished: running on two workers (one of them silent past its lease), dispatched, and queued behind the
    # organization's concurrency limit.
    running_cpu = start(submit(cpu_org, builtin_endpoint))
    running_h100 = start(submit(h100_org, h100))
    attempts.heartbeat(job_id=str(running_h100.pk), attempt=running_h100.attempt, step=1, total=2, gpu_ms=10)
    lapsed = submit(h100_org, h100)
    dispatch.dispatch_organization(h100_org.pk)
    lapsed.refresh_from_db()
    lapsed = attempts.claim_job(job_id=str(lapsed.pk), attempt=lapsed.attempt, worker="worker-2")
    assert lapsed is not None
    Job.objects.filter(pk=lapsed.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    JobAttempt.objects.filter(job=lapsed).update(heartbeat_at=timezone.now() - timedelta(seconds=40))
    dispatched = submit(cpu_org, builtin_endpoint)
    dispatch.dispatch_organization(cpu_org.pk)
    submit(h100_org, h100)  # dispatched on the other class
    dispatch.dispatch_organization(h100_org.pk)
    Organization.objects.filter(pk=cpu_org.pk).update(concurrency_limit=2)  # running + dispatched: full
    queued = [submit(cpu_org, builtin_endpoint), submit(cpu_org, builtin_endpoint)]
    dispatch.dispatch_organization(cpu_org.pk)

    # Spread the times: durations in several buckets, and jobs outside the window.
    age_job(completed, created=timedelta(seconds=40), started=timedelta(seconds=39.8), finished=timedelta(seconds=30))
    age_job(failed, created=timedelta(seconds=70), started=timedelta(seconds=64), finished=timedelta(seconds=60))
    age_job(errored, created=timedelta(seconds=200), started=timedelta(seconds=150), finished=timedelta(seconds=20))
    age_job(
        cancelled_running,
        created=timedelta(seconds=900),
        started=timedelta(seconds=100),
        finished=timedelta(seconds=10),
    )
    age_job(cancelled_queued, created=timedelta(seconds=45), finished=timedelta(seconds=44))
    age_job(long_ago, created=timedelta(hours=2), started=timedelta(hours=1, minutes=50), finished=timedelta(hours=1))
    age_job(running_cpu, created=timedelta(seconds=30), started=timedelta(seconds=27))
    age_job(running_h100, created=timedelta(minutes=20), started=timedelta(minutes=10))  # started before the window
    age_job(queued[0], created=timedelta(seconds=600))
    Job.objects.filter(pk=dispatched.pk).update(dispatched_at=timezone.now() - timedelta(seconds=90))

    # The Stripe inbox: one event waiting, one that failed (Stripe is off: its object cannot be fetched), one done.
    stripe_events.receive_event(*signed_event("payment_intent.succeeded", "pi_pending"))
    failed_event, _ = stripe_events.receive_event(*signed_event("payment_intent.succeeded", "pi_failing"))
    failed_event = stripe_events.process_event(failed_event.id)
    assert failed_event.status == StripeEventStatus.FAILED, failed_event.error
    done_event, _ = stripe_events.receive_event(*signed_event("customer.created", "cus_done"))
    done_event = stripe_events.process_event(done_event.id)
    assert done_event.status in (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)
    settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS = 1  # the failed event has had its one try: given up

    run_ = reconciliation.run_reconciliation(full=True)
    assert run_.ok, run_.drift
    return {"queued": queued, "dispatched": dispatched, "lapsed": lapsed, "run": run_}


def test_refused_without_the_token(client: Any, settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    assert scrape(client).status_code == 404  # off: no token configured
    settings.METRICS_TOKEN = TOKEN
    for headers in (
        {"HTTP_AUTHORIZATION": ""},
        {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}x"},
        {"HTTP_AUTHORIZATION": f"Bearer {TOKEN[:-1]}"},
        {"HTTP_AUTHORIZATION": f"Key {TOKEN}"},
        {"HTTP_AUTHORIZATION": TOKEN},
    ):
        response = scrape(client, **headers)
        assert response.status_code == 401, headers
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert response.json()["error_type"] == "unauthorized"
        assert b"platform_" not in response.content
    assert scrape(client, HTTP_AUTHORIZATION=f"bearer {TOKEN}").status_code == 200
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405


def test_a_short_token_refuses_to_start(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="metrics-test-key", METRICS_TOKEN="too-short")
    result = run_python("-c", "import django; django.setup()", env=env)
    assert result.returncode != 0
    assert "METRICS_TOKEN" in result.stderr
    env["METRICS_TOKEN"] = TOKEN
    assert run_python("-c", "import django; django.setup()", env=env).returncode == 0


def test_jobs_per_class_and_state(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """Waiting and in-flight jobs per class, the oldest of each, the lapsed leases: as the rows say."""
    found = families(client)
    now = timezone.now()
    classes = sorted(GpuClass.values)
    jobs: Counter[tuple[str, str]] = Counter(Job.objects.values_list("gpu_class", "status"))
    states = samples(found["platform_jobs"])
    assert states == {
        (("gpu_class", gpu_class), ("status", status)): jobs[(gpu_class, status)]
        for gpu_class in classes
        for status in ("QUEUED", "DISPATCHED", "RUNNING")
    }
    queued = by("gpu_class", found["platform_jobs_queued"])
    in_flight = by("gpu_class", found["platform_jobs_in_flight"])
    assert queued == {gpu_class: jobs[(gpu_class, "QUEUED")] for gpu_class in classes}
    assert in_flight == {
        gpu_class: jobs[(gpu_class, "DISPATCHED")] + jobs[(gpu_class, "RUNNING")] for gpu_class in classes
    }
    assert queued["cpu"] == 2
    assert in_flight == {"cpu": 2, "gpu-a10g": 0, "gpu-h100": 3}

    unfinished = list(Job.objects.filter(status__in=["QUEUED", "DISPATCHED", "RUNNING"]))
    oldest_queued = by("gpu_class", found["platform_jobs_queued_oldest_age_seconds"])
    oldest_dispatched = by("gpu_class", found["platform_jobs_dispatched_oldest_age_seconds"])
    for gpu_class in classes:
        created = [job.created_at for job in unfinished if job.gpu_class == gpu_class and job.status == "QUEUED"]
        sent = [job.dispatched_at for job in unfinished if job.gpu_class == gpu_class and job.status == "DISPATCHED"]
        expected_queued = (now - min(created)).total_seconds() if created else 0
        expected_dispatched = (now - min(sent)).total_seconds() if sent else 0
        assert oldest_queued[gpu_class] == pytest.approx(expected_queued, abs=5)
        assert oldest_dispatched[gpu_class] == pytest.approx(expected_dispatched, abs=5)
    assert oldest_queued["cpu"] >= 600
    assert oldest_dispatched["cpu"] >= 90
    lapsed = Counter(job.gpu_class for job in unfinished if job.status == "RUNNING" and job.lease_expires_at < now)
    assert by("gpu_class", found["platform_jobs_lease_expired"]) == {
        gpu_class: lapsed[gpu_class] for gpu_class in classes
    }
    assert lapsed == {"gpu-h100": 1}


def test_latency_histograms(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """Submit-to-start and submit-to-end, against the window's definitions applied to every row."""
    found = families(client)
    now = timezone.now()
    since = now - metrics.LATENCY_WINDOW
    all_jobs = list(Job.objects.all())
    started = defaultdict(list)
    for job in all_jobs:
        ended_since = job.finished_at is not None and job.finished_at >= since
        if job.started_at is not None and job.started_at >= since and (job.status == "RUNNING" or ended_since):
            started[job.gpu_class].append((job.started_at - job.created_at).total_seconds())
    ended = defaultdict(list)
    for job in all_jobs:
        if job.finished_at and job.finished_at >= since:
            ended[(job.gpu_class, job.status)].append((job.finished_at - job.created_at).total_seconds())
    assert sum(len(durations) for durations in started.values()) == 8
    assert sum(len(durations) for durations in ended.values()) == 7
    assert_histogram(
        found["platform_job_submit_to_start_seconds"], started, ("gpu_class",), metrics.SUBMIT_TO_START_BUCKETS
    )
    assert_histogram(
        found["platform_job_submit_to_end_seconds"], ended, ("gpu_class", "status"), metrics.SUBMIT_TO_END_BUCKETS
    )


def test_gpu_seconds_billed_and_unbilled(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """GPU seconds since the day's start (the counter's creation), from the usage records themselves."""
    before = timezone.now()
    found = families(client)
    after = timezone.now()
    classes = sorted(GpuClass.values)
    gpu = found["platform_gpu_seconds"]
    created = set(samples(gpu, "_created").values())
    assert len(created) == 1
    day_start = datetime.fromtimestamp(created.pop(), tz=UTC)
    assert (day_start.hour, day_start.minute, day_start.second, day_start.microsecond) == (0, 0, 0, 0)
    # The day of the scrape: the scenario's day, or the next when the test crossed midnight (its records are then
    # yesterday's, and the counter restarted without them).
    assert before - timedelta(days=1) < day_start <= after
    billed: Counter[str] = Counter()
    unbilled: Counter[str] = Counter()
    for record in UsageRecord.objects.filter(recorded_at__gte=day_start, recorded_at__lt=day_start + timedelta(days=1)):
        billed[record.gpu_class] += record.gpu_ms
        unbilled[record.gpu_class] += record.unbilled_gpu_ms
    assert samples(gpu, "_total") == {
        **{(("billed", "true"), ("gpu_class", c)): billed[c] / 1000 for c in classes},
        **{(("billed", "false"), ("gpu_class", c)): unbilled[c] / 1000 for c in classes},
    }
    # The scenario recorded both kinds of time on both classes (compared above when recorded that day).
    every = (
        UsageRecord.objects.order_by()
        .values("gpu_class")
        .annotate(billed=Sum("gpu_ms"), unbilled=Sum("unbilled_gpu_ms"))
    )
    assert {row["gpu_class"] for row in every if row["billed"] and row["unbilled"]} >= {"cpu", "gpu-h100"}


def test_webhook_backlog(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """Customer webhooks not delivered yet."""
    found = families(client)
    now = timezone.now()
    pending = list(WebhookDelivery.objects.filter(status=WebhookStatus.PENDING))
    assert len(pending) == 1
    assert samples(found["platform_webhook_deliveries_pending"]) == {(): len(pending)}
    due = [delivery for delivery in pending if delivery.next_attempt_at <= now]
    assert samples(found["platform_webhook_deliveries_due"]) == {(): len(due)}
    (oldest_webhook,) = samples(found["platform_webhook_deliveries_pending_oldest_age_seconds"]).values()
    assert oldest_webhook == pytest.approx((now - pending[0].created_at).total_seconds(), abs=5)


def test_stripe_backlog(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """The Stripe inbox: events pending, failed, and given up."""
    found = families(client)
    events = Counter(StripeEvent.objects.values_list("status", flat=True))
    assert by("status", found["platform_stripe_events_unprocessed"]) == {
        "pending": events["pending"],
        "failed": events["failed"],
    }
    assert (events["pending"], events["failed"]) == (1, 1)
    ages = by("status", found["platform_stripe_events_unprocessed_oldest_age_seconds"])
    assert set(ages) == {"pending", "failed"}
    assert all(0 <= age < 60 for age in ages.values())
    given_up = StripeEvent.objects.filter(
        status="failed", attempts__gte=django_settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS
    ).count()
    assert samples(found["platform_stripe_events_given_up"]) == {(): given_up} == {(): 1}


def test_last_reconciliation(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """The last reconciliation run: when, whether it proved the books, what each check found."""
    found = families(client)
    run_ = ReconciliationRun.objects.order_by("-pk").first()
    assert run_ is not None
    assert run_.finished_at is not None
    assert samples(found["platform_reconciliation_last_finished_timestamp_seconds"]) == {
        (): run_.finished_at.timestamp()
    }
    assert samples(found["platform_reconciliation_last_ok"]) == {(): 1}
    assert by("check", found["platform_reconciliation_last_drift"]) == {
        check: summary["drift"] for check, summary in run_.checked.items()
    }
    skipped = by("check", found["platform_reconciliation_last_skipped"])
    assert skipped == {check: int(bool(summary.get("skipped"))) for check, summary in run_.checked.items()}
    assert skipped["stripe"] == 1  # Stripe is off here


def test_worker_heartbeats(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """The last heartbeat of each worker running a job, from the running attempts."""
    found = families(client)
    heartbeats: dict[str, datetime] = {}
    running: Counter[str] = Counter()
    for attempt in JobAttempt.objects.filter(outcome=AttemptOutcome.RUNNING):
        heartbeats[attempt.worker] = max(attempt.heartbeat_at, heartbeats.get(attempt.worker, attempt.heartbeat_at))
        running[attempt.worker] += 1
    assert by("worker", found["platform_worker_last_heartbeat_timestamp_seconds"]) == {
        worker: moment.timestamp() for worker, moment in heartbeats.items()
    }
    assert by("worker", found["platform_worker_running_attempts"]) == dict(running) == {"worker-1": 2, "worker-2": 1}


def assert_histogram(
    family: Any, durations: dict[Any, list[float]], labels: tuple[str, ...], bounds: tuple[float, ...]
) -> None:
    """The gauge histogram's buckets, count and sum per label set against ``durations`` bucketed here."""
    assert family.type == "gaugehistogram"
    buckets = samples(family, "_bucket")
    counts = samples(family, "_gcount")
    sums = samples(family, "_gsum")
    for key, values in durations.items():
        label_values = key if isinstance(key, tuple) else (key,)
        series = tuple(sorted(zip(labels, label_values, strict=True)))
        for bound in bounds:
            expected = sum(1 for value in values if value <= bound)
            assert buckets[tuple(sorted((*series, ("le", str(float(bound))))))] == expected, (series, bound)
        assert buckets[tuple(sorted((*series, ("le", "+Inf"))))] == len(values)
        assert counts[series] == len(values)
        assert sums[series] == pytest.approx(sum(values), abs=1e-3)
    lowest = {
        min((bound for bound in bounds if value <= bound), default=None)
        for values in durations.values()
        for value in values
    }
    assert len(lowest) > 3  # the scenario's durations fall in several buckets
    observed = {labels_ for labels_, count in counts.items() if count}
    assert observed == {
        tuple(sorted(zip(labels, key if isinstance(key, tuple) else (key,), strict=True))) for key in durations
    }


def test_plain_text_format_for_curl(client: Any, metrics_on: None, scenario: dict[str, Any]) -> None:
    """Without OpenMetrics in Accept, Prometheus' plain text format (what curl and older scrapers read)."""
    response = scrape(client, accept="*/*")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    names = {family.name for family in parse_text(response.content.decode())}
    assert {"platform_jobs_in_flight", "platform_gpu_seconds", "platform_job_submit_to_start_seconds"} <= names


def test_a_reconciliation_that_found_drift(client: Any, metrics_on: None, books: None, tenant: dict[str, Any]) -> None:
    Account.objects.filter(organization=tenant["organization"]).update(balance_micros=F("balance_micros") + 1)
    run_ = reconciliation.run_reconciliation(full=True)
    assert not run_.ok
    found = families(client)
    assert samples(found["platform_reconciliation_last_ok"]) == {(): 0}
    drift = by("check", found["platform_reconciliation_last_drift"])
    assert drift == {check: summary["drift"] for check, summary in run_.checked.items()}
    assert sum(drift.values()) >= 1


def test_an_empty_platform(client: Any, metrics_on: None) -> None:
    """Before any job or run: every class at zero, no reconciliation yet (its time 0), no workers."""
    found = families(client)
    assert set(by("gpu_class", found["platform_jobs_in_flight"]).values()) == {0}
    assert samples(found["platform_reconciliation_last_finished_timestamp_seconds"]) == {(): 0}
    assert samples(found["platform_reconciliation_last_ok"]) == {}
    assert samples(found["platform_worker_last_heartbeat_timestamp_seconds"]) == {}
    assert set(samples(found["platform_job_submit_to_start_seconds"], "_gcount").values()) == {0}


def scrape_queries(client: Any) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert scrape(client).status_code == 200
    # The scrape's transaction is a savepoint inside the test's own: not a statement a scrape sends.
    return [query["sql"] for query in queries.captured_queries if "SAVEPOINT" not in query["sql"]]


def test_a_scrape_runs_a_fixed_number_of_queries(
    client: Any, metrics_on: None, scenario: dict[str, Any], tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    few = scrape_queries(client)
    assert len(few) <= MAX_QUERIES
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=50)
    for _ in range(3):
        run(tenant["organization"], builtin_endpoint, gpu_ms=100)
        start(submit(tenant["organization"], builtin_endpoint))
    many = scrape_queries(client)
    assert len(many) == len(few)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="query plans are PostgreSQL's")
def test_every_scrape_query_reads_big_tables_through_an_index(
    client: Any, metrics_on: None, scenario: dict[str, Any]
) -> None:
    """With sequential scans priced out, each statement must still reach the tables that grow with traffic through
    an index condition or a partial index: if none served it, PostgreSQL would scan the table anyway."""
    statements = [sql for sql in scrape_queries(client) if not sql.lstrip().upper().startswith("SELECT SET_CONFIG")]
    statements.append(keda_sql("gpu-h100").replace("%s", "'gpu-h100'"))
    for sql in statements:
        for node in plan_nodes(sql):
            assert node.get("Relation Name") not in BIG_TABLES or bounded(node), (sql, node)


def plan_nodes(sql: str) -> Iterator[dict[str, Any]]:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}")
        (plan,) = cursor.fetchone()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    pending = [plan[0]["Plan"]]
    while pending:
        node = pending.pop()
        pending.extend(node.get("Plans", []))
        yield node


def bounded(node: dict[str, Any]) -> bool:
    if node["Node Type"] == "Bitmap Heap Scan":
        indexes = [child for child in node["Plans"] if child["Node Type"] == "Bitmap Index Scan"]
        or_nodes = [child for child in node["Plans"] if child["Node Type"] == "BitmapOr"]
        for or_node in or_nodes:
            indexes.extend(or_node["Plans"])
        return bool(indexes) and all(index_bounded(index) for index in indexes)
    if node["Node Type"] in ("Index Scan", "Index Only Scan"):
        return index_bounded(node)
    return False


def index_bounded(node: dict[str, Any]) -> bool:
    return "Index Cond" in node or is_partial(node["Index Name"])


def is_partial(index_name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indpred IS NOT NULL FROM pg_index JOIN pg_class ON pg_class.oid = indexrelid WHERE relname = %s",
            [index_name],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def keda_sql(gpu_class: str) -> str:
    """deploy/keda/inflight.sql as a renderer puts it in a KEDA trigger: comments off, the class in its place (here
    as a bound parameter)."""
    text = INFLIGHT_SQL.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    sql = "\n".join(lines).strip().rstrip(";")
    assert sql.count(":'gpu_class'") == 1
    return sql.replace(":'gpu_class'", "%s")


def test_the_keda_trigger_counts_the_work_in_flight_per_class(
    client: Any, metrics_on: None, scenario: dict[str, Any]
) -> None:
    """Jobs in every state on two classes: the trigger's count is DISPATCHED + RUNNING of its class only, and
    /metrics' in-flight gauge says the same."""
    jobs = Counter(Job.objects.values_list("gpu_class", "status"))
    assert {status for _, status in jobs} == set(JobStatus.values)  # every state is there
    in_flight = by("gpu_class", families(client)["platform_jobs_in_flight"])
    for gpu_class in GpuClass.values:
        with connection.cursor() as cursor:
            cursor.execute(keda_sql(gpu_class), [gpu_class])
            (count,) = cursor.fetchone()
        assert count == jobs[(gpu_class, "DISPATCHED")] + jobs[(gpu_class, "RUNNING")] == in_flight[gpu_class]
    assert jobs[("cpu", "QUEUED")] == 2  # waiting for the organization's limit: not counted


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="needs the Redis broker")
def test_the_redis_trigger_reads_the_queue_named_after_the_class() -> None:
    """The KEDA redis trigger's listName is the Celery queue's name, the GPU class: a message sent to a queue waits
    in the Redis list of that name."""
    import redis

    from config.celery import app

    queue = f"metrics-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    try:
        app.send_task(dispatch.RUN_TASK, args=[str(uuid.uuid4()), 1], queue=queue, retry=False)
        assert client.llen(queue) == 1
    finally:
        client.delete(queue)
