"""Many machines, simulated on one: the production process types as separate processes, each started by the image's
entrypoint in its own data directory, sharing only what pods share (PostgreSQL, Redis, an S3 bucket).

- two web processes (gunicorn + uvicorn) behind a round-robin load balancer;
- three GPU workers on two classes: two on `cpu`, one on `gpu-a10g` (an endpoint of that class served by the tiny
  model; the worker runs it on the CPU here);
- a housekeeping worker and beat;
- PostgreSQL, a private Redis (broker, cache, pub/sub), and moto's S3 server for outputs, through django-storages.

A few hundred jobs from four tenants, one of them submitting most of them first. Checked: dispatch is fair (no tenant
runs more than its concurrency limit at once, and the small tenants are not queued behind the big one's backlog);
every output is readable through either web process (their data directories hold none of them); /metrics answers
the same through both and agrees with the database; the books reconcile with no drift.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from django.db import connection
from django.db.models import Sum
from prometheus_client.parser import text_string_to_metric_families

from config.embedded_redis import EmbeddedRedis
from tests.deploy.processes import ENTRYPOINT, RoundRobinProxy, base_env, database_url, free_port, platform
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BODY = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
BUCKET = "platform-outputs"
METRICS_TOKEN = "many-machines-" + "m" * 40
# (cpu jobs, gpu-a10g jobs) per tenant: one big tenant that submits first, three small ones after it.
BIG = (100, 25)
SMALL = (20, 5)
SMALL_TENANTS = 3
CONCURRENCY_LIMIT = 2
ENDPOINTS = {"cpu": "platform/tiny-sd", "gpu-a10g": "platform/tiny-sd-a10g"}


@contextmanager
def moto_s3(folder: Path) -> Iterator[str]:
    """moto's S3 server on loopback, with the outputs bucket; yields its URL."""
    import shutil
    import sys

    port = free_port()
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert executable, "moto_server (moto[server], a dev dependency) is not installed"
    log = folder / "moto.log"
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is None and httpx.get(url, timeout=5).status_code < 500,
            timeout=60,
            message=lambda: f"moto's S3 server\n{log.read_text(errors='replace')}",
            ignoring=(httpx.TransportError,),
            interval=0.2,
        )
        s3(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def s3(url: str) -> Any:
    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def new_tenant(name: str) -> dict[str, Any]:
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up
    from billing.ledger import grant_credits

    user = sign_up(email=f"{name}-{uuid.uuid4().hex[:6]}@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    organization.concurrency_limit = CONCURRENCY_LIMIT
    organization.save(update_fields=["concurrency_limit"])
    grant_credits(organization=organization, amount_micros=50_000_000, reason="test")
    _, key = create_api_key(organization=organization, name=name, scopes=[Scope.INFERENCE], created_by=user)
    return {"name": name, "organization": organization, "key": key}


def a10g_endpoint() -> None:
    """The tiny model registered a second time, on the gpu-a10g class: a registry entry, not code
    (docs/architecture.md, "The model registry")."""
    from inference.catalog import COMMON, ensure_builtin_endpoints
    from inference.models import Endpoint, GpuClass

    ensure_builtin_endpoints(Endpoint)
    Endpoint.objects.create(
        **{**COMMON, "gpu_class": GpuClass.A10G},
        owner="platform",
        name="tiny-sd-a10g",
        path="",
        kind="text-to-image",
        title="Tiny Stable Diffusion on A10G",
        default_steps=2,
    )


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_many_machines(tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("machines share PostgreSQL: run with DATABASE_URL=postgres://...")
    from billing.models import Price, ReconciliationRun, UsageRecord
    from billing.rates import ensure_opening_prices
    from inference.models import Job, JobStatus

    ensure_opening_prices(Price)
    a10g_endpoint()
    big = new_tenant("big")
    small = [new_tenant(f"small{n}") for n in range(SMALL_TENANTS)]

    clock = {"start": time.monotonic()}
    with EmbeddedRedis(tmp_path / "redis") as redis, moto_s3(tmp_path / "s3") as s3_url:
        env = base_env(
            SECRET_KEY="many-machines-" + "s" * 40,
            DATABASE_URL=database_url(),
            DATABASE_POOL_MAX_SIZE="2",
            REDIS_URL=redis.url,
            METRICS_TOKEN=METRICS_TOKEN,
            OUTPUT_BUCKET=BUCKET,
            OUTPUT_BUCKET_ENDPOINT_URL=s3_url,
            OUTPUT_BUCKET_REGION="us-east-1",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
        )
        with platform(tmp_path / "machines", env) as machines:
            webs = [machines.start_web(f"web{n}", free_port()) for n in (1, 2)]
            machines.start("gpu-cpu-1", "worker", "cpu", "--hostname", "cpu@machine-1")
            machines.start("gpu-cpu-2", "worker", "cpu", "--hostname", "cpu@machine-2")
            machines.start("gpu-a10g-1", "worker", "gpu-a10g", "--hostname", "gpu-a10g@machine-3")
            machines.start("housekeeping", "housekeeping", "--hostname", "housekeeping@machine-4")
            machines.start("beat", "beat")
            workers = ("gpu-cpu-1", "gpu-cpu-2", "gpu-a10g-1", "housekeeping")
            wait_until(
                lambda: all(machines.worker_ready(name) for name in workers) and machines.running("beat"),
                timeout=180,
                message=lambda: f"every worker to be ready\n{machines.all_logs()}",
                interval=0.5,
            )
            backends = [("127.0.0.1", int(base.rsplit(":", 1)[1])) for base in webs]
            clock["ready"] = time.monotonic()

            submitted: dict[str, list[str]] = defaultdict(list)  # tenant name -> request ids
            with (
                RoundRobinProxy(backends) as balancer,
                # A new connection per request, so the balancer spreads requests, not just clients.
                httpx.Client(
                    base_url=balancer.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
                ) as api,
            ):
                for tenant, (cpu_jobs, a10g_jobs) in [(big, BIG), *((each, SMALL) for each in small)]:
                    for gpu_class, count in (("cpu", cpu_jobs), ("gpu-a10g", a10g_jobs)):
                        for n in range(count):
                            answer = api.post(
                                f"/queue/{ENDPOINTS[gpu_class]}",
                                json={**BODY, "seed": n},
                                headers={"Authorization": f"Key {tenant['key']}"},
                            )
                            assert answer.status_code == 200, answer.text
                            submitted[tenant["name"]].append(answer.json()["request_id"])
                assert min(balancer.connections) > 0.4 * sum(balancer.connections)  # both web processes served
                clock["submitted"] = time.monotonic()
                every_id = [request_id for ids in submitted.values() for request_id in ids]

                def all_done() -> bool:
                    machines.all_running()
                    return not Job.objects.filter(pk__in=every_id).exclude(status=JobStatus.COMPLETED).exists()

                wait_until(
                    all_done,
                    timeout=900,
                    message=lambda: (
                        f"every job to complete: {Counter(Job.objects.values_list('status', flat=True))}\n"
                        f"{machines.all_logs()}"
                    ),
                    interval=1,
                )

            clock["done"] = time.monotonic()
            print(  # a figure for deploy/CAPACITY.md, not an assertion
                f"\nmany machines: {len(every_id)} jobs; start-up {clock['ready'] - clock['start']:.1f} s, "
                f"submitted in {clock['submitted'] - clock['ready']:.1f} s "
                f"({len(every_id) / (clock['submitted'] - clock['ready']):.1f} submits/s through the balancer), "
                f"all done {clock['done'] - clock['ready']:.1f} s after the first submit "
                f"({len(every_id) / (clock['done'] - clock['ready']):.2f} jobs/s on 3 workers)"
            )
            check_fair_dispatch(big, small, submitted)
            check_outputs_through_each_web(webs, submitted, [big, *small], s3_url)
            check_metrics_agree_with_the_database(webs)

            # The books: a full reconciliation run as an operator's one-off pod would, then /metrics reports it.
            reconcile = subprocess.run(
                [str(ENTRYPOINT), "manage", "reconcile", "--full"],
                env={**env, "PLATFORM_DATA_DIR": str(tmp_path / "machines" / "operator")},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
            run = ReconciliationRun.objects.latest("finished_at")
            assert run.drift == []
            assert run.ok
            assert UsageRecord.objects.filter(billable=True).count() == len(every_id)
            for base in webs:
                samples = scrape(base)
                assert value(samples, "platform_reconciliation_last_ok") == 1
                assert all(
                    amount == 0 for (name, _), amount in samples.items() if name == "platform_reconciliation_last_drift"
                )


def check_fair_dispatch(big: dict[str, Any], small: list[dict[str, Any]], submitted: dict[str, list[str]]) -> None:
    """No tenant ever ran more jobs at once than its limit, and the small tenants, who submitted after the big one's
    whole backlog, did not wait behind it: once a small tenant's job was sent to its class's queue, at most the big
    tenant's jobs already sent there (its concurrency limit's worth, twice over for a prefetched or re-sent one)
    started before it, never its backlog; and the small tenants were done first. Counted in jobs, not seconds, so a
    loaded machine changes nothing."""
    from inference.models import Job

    jobs: dict[str, list[dict[str, Any]]] = {}
    for tenant in [big, *small]:
        jobs[tenant["name"]] = list(
            Job.objects.filter(pk__in=submitted[tenant["name"]]).values(
                "gpu_class", "dispatched_at", "started_at", "finished_at"
            )
        )
        assert all(job["started_at"] and job["finished_at"] for job in jobs[tenant["name"]])
        assert most_at_once([(job["started_at"], job["finished_at"]) for job in jobs[tenant["name"]]]) <= (
            CONCURRENCY_LIMIT
        )
    last_big_finish = max(job["finished_at"] for job in jobs["big"])
    for tenant in small:
        for job in jobs[tenant["name"]]:
            overtaken_by = sum(
                1
                for big_job in jobs["big"]
                if big_job["gpu_class"] == job["gpu_class"]
                and job["dispatched_at"] < big_job["started_at"] < job["started_at"]
            )
            assert overtaken_by <= 2 * CONCURRENCY_LIMIT, (tenant["name"], job["gpu_class"], overtaken_by)
        assert max(job["finished_at"] for job in jobs[tenant["name"]]) < last_big_finish


def check_outputs_through_each_web(
    webs: list[str], submitted: dict[str, list[str]], tenants: list[dict[str, Any]], s3_url: str
) -> None:
    """Each tenant's results through each web process directly: the same image, in the bucket, downloadable."""
    from inference.models import Job

    stored = {item["Key"] for page in s3(s3_url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
              for item in page.get("Contents", [])}  # fmt: skip
    assert len(stored) >= sum(len(ids) for ids in submitted.values())
    for tenant in tenants:
        headers = {"Authorization": f"Key {tenant['key']}"}
        for request_id in submitted[tenant["name"]][:: max(1, len(submitted[tenant["name"]]) // 5)]:
            endpoint = Job.objects.select_related("endpoint").get(pk=request_id).endpoint
            images = []
            for base in webs:
                answer = httpx.get(
                    f"{base}/queue/{endpoint.owner}/{endpoint.name}/requests/{request_id}", headers=headers, timeout=30
                )
                assert answer.status_code == 200, answer.text
                [image] = answer.json()["images"]
                download = httpx.get(image["url"], timeout=30)
                assert download.status_code == 200
                assert download.content.startswith(b"\x89PNG")
                images.append(download.content)
            assert images[0] == images[1]


def check_metrics_agree_with_the_database(webs: list[str]) -> None:
    """With every job ended: nothing queued or in flight, and the GPU seconds of the counter's day (it restarts at
    00:00 UTC) are the sums of the usage records recorded that day, through both web processes alike."""
    from billing.models import UsageRecord

    overall = UsageRecord.objects.aggregate(billed=Sum("gpu_ms"))
    assert overall["billed"] > 0
    assert set(UsageRecord.objects.values_list("gpu_class", flat=True).distinct()) == {"cpu", "gpu-a10g"}
    for base in webs:
        samples = scrape(base)
        # The day the counter counts is its creation time: a run that crosses midnight compares that day's records.
        day_start = datetime.fromtimestamp(
            value(samples, "platform_gpu_seconds_created", gpu_class="cpu", billed="true"), tz=UTC
        )
        usage = {
            row["gpu_class"]: row
            for row in UsageRecord.objects.filter(
                recorded_at__gte=day_start, recorded_at__lt=day_start + timedelta(days=1)
            )
            .values("gpu_class")
            .annotate(billed=Sum("gpu_ms"), unbilled=Sum("unbilled_gpu_ms"))
        }
        for gpu_class in ("cpu", "gpu-a10g"):
            assert value(samples, "platform_jobs_queued", gpu_class=gpu_class) == 0
            assert value(samples, "platform_jobs_in_flight", gpu_class=gpu_class) == 0
            assert (
                value(samples, "platform_gpu_seconds_created", gpu_class=gpu_class, billed="false")
                == day_start.timestamp()
            )
            billed = value(samples, "platform_gpu_seconds_total", gpu_class=gpu_class, billed="true")
            unbilled = value(samples, "platform_gpu_seconds_total", gpu_class=gpu_class, billed="false")
            day = usage.get(gpu_class, {})
            assert billed == pytest.approx((day.get("billed") or 0) / 1000)
            assert unbilled == pytest.approx((day.get("unbilled") or 0) / 1000)
        assert value(samples, "platform_webhook_deliveries_pending") == 0
