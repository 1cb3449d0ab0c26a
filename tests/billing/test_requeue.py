"""An operator's requeue goes through admission as a submission does: it holds credit again, or it is refused and
nothing changes. The books still reconcile after a requeued job runs to its end."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.conf import settings
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent, Organization, User
from accounts.services import revoke_api_key, set_organization_suspended
from billing import controls, holds, pricing, reconciliation
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Hold, Price, UsageRecord
from inference import closing, requeue
from inference.models import AttemptOutcome, Endpoint, Job, JobLog, JobStatus
from tests.lifecycle import finish, run, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]

REQUEUED_BY_OPERATOR = "job.requeued_by_operator"


def account(organization: Organization) -> Account:
    return Account.objects.get(pk=organization.pk)


def open_holds(job: Job) -> list[Hold]:
    return list(Hold.objects.filter(job=job, released_at=None))


def admission_estimate(job: Job) -> int:
    endpoint = job.endpoint
    return pricing.estimate_cost_micros(endpoint, job.input, pricing.price_for(endpoint, timezone.now()))


def ended(how: str, organization: Organization, endpoint: Endpoint) -> Job:
    """A job that reached a final state one of the ways an operator may requeue it from."""
    if how == "failed":
        return run(organization, endpoint, outcome=AttemptOutcome.FAILED, gpu_ms=400, error="bad input")
    if how == "cancelled_running":
        running = start(submit(organization, endpoint))
        closing.cancel_job(job=running)
        return finish(running, AttemptOutcome.CANCELLED, gpu_ms=900)
    queued = submit(organization, endpoint)
    closing.cancel_job(job=queued)
    return Job.objects.get(pk=queued.pk)


@pytest.mark.parametrize("how", ["failed", "cancelled_running", "cancelled_queued"])
def test_a_requeued_job_holds_credit_again_and_the_books_reconcile_once_it_finishes(
    how: str, tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = ended(how, organization, builtin_endpoint)
    [first_hold] = Hold.objects.filter(job=job)
    assert first_hold.released_at is not None  # released when the job ended
    assert account(organization).held_micros == 0

    assert requeue.requeue_job(job=job)

    [hold] = open_holds(job)
    # What admission holds for this request now (the estimate learns from the usage recorded since).
    assert hold.amount_micros == admission_estimate(job) > 0
    assert account(organization).held_micros == hold.amount_micros
    assert Hold.objects.filter(job=job).count() == 1

    finished = finish(start(job), gpu_ms=2_000)
    assert finished.status == JobStatus.COMPLETED
    assert open_holds(job) == []
    state = account(organization)
    assert state.held_micros == 0
    spent = sum(UsageRecord.objects.filter(job=job).values_list("cost_micros", flat=True))
    assert spent >= 200  # the requeued run's 2 s at 100 µ$/s, and whatever the first run was billed
    assert state.balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS - spent
    assert state.balance_micros == sum(
        CreditEntry.objects.filter(organization=organization).values_list("amount_micros", flat=True)
    )
    checked = reconciliation.run_reconciliation()
    assert checked.drift == []
    assert checked.ok
    out = io.StringIO()
    call_command("reconcile", stdout=out)  # raises CommandError on drift
    assert "no drift" in out.getvalue()


def test_a_requeue_holds_the_price_in_force_when_it_is_admitted(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = ended("failed", tenant["organization"], builtin_endpoint)
    assert Hold.objects.get(job=job).unit_price_micros == 100
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000, effective_from=timezone.now())
    assert requeue.requeue_job(job=job)
    [hold] = open_holds(job)
    # The heartbeat compares the time used with this price: the one the new run will be billed at.
    assert hold.unit_price_micros == 1_000


def test_a_requeue_without_credit_is_refused_and_changes_nothing(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = ended("failed", organization, builtin_endpoint)
    grant_credits(
        organization=organization, amount_micros=-account(organization).available_micros,
        reason="test: empty the balance", kind=EntryKind.ADJUSTMENT,
    )  # fmt: skip
    job_before = Job.objects.filter(pk=job.pk).values().get()
    hold_before = Hold.objects.filter(job=job).values().get()
    account_before = Account.objects.filter(pk=organization.pk).values().get()
    logs_before = JobLog.objects.filter(job=job).count()

    with pytest.raises(requeue.RequeueRefused) as refused:
        requeue.requeue_job(job=job)

    assert refused.value.error_type == "insufficient_credits"
    assert "Not enough credits" in refused.value.detail
    assert Job.objects.filter(pk=job.pk).values().get() == job_before
    assert job_before["status"] == JobStatus.FAILED
    assert Hold.objects.filter(job=job).values().get() == hold_before
    assert Account.objects.filter(pk=organization.pk).values().get() == account_before
    assert JobLog.objects.filter(job=job).count() == logs_before
    assert reconciliation.run_reconciliation().drift == []


def test_a_suspended_organizations_job_is_not_requeued_until_it_is_unsuspended(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = ended("failed", organization, builtin_endpoint)
    set_organization_suspended(organization=organization, suspended=True)
    job_before = Job.objects.filter(pk=job.pk).values().get()
    account_before = Account.objects.filter(pk=organization.pk).values().get()

    with pytest.raises(requeue.RequeueRefused) as refused:
        requeue.requeue_job(job=job)

    # It would have waited in the queue holding credit: dispatch skips suspended organizations.
    assert (refused.value.error_type, refused.value.status_code) == ("organization_suspended", 403)
    assert Job.objects.filter(pk=job.pk).values().get() == job_before
    assert Account.objects.filter(pk=organization.pk).values().get() == account_before
    assert open_holds(job) == []

    set_organization_suspended(organization=organization, suspended=False)
    assert requeue.requeue_job(job=job)
    assert len(open_holds(job)) == 1


def test_a_request_sent_with_a_key_since_revoked_is_not_requeued(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = finish(
        start(submit(organization, builtin_endpoint, api_key=tenant["api_key"])),
        AttemptOutcome.FAILED,
        gpu_ms=400,
        error="bad input",
    )
    revoke_api_key(api_key=tenant["api_key"])
    job_before = Job.objects.filter(pk=job.pk).values().get()
    account_before = Account.objects.filter(pk=organization.pk).values().get()

    with pytest.raises(requeue.RequeueRefused) as refused:
        requeue.requeue_job(job=job)

    # The key may have leaked: what was sent with it is not run again on the organization's credit.
    assert (refused.value.error_type, refused.value.status_code) == ("api_key_revoked", 403)
    assert "revoked" in refused.value.detail
    assert Job.objects.filter(pk=job.pk).values().get() == job_before
    assert Account.objects.filter(pk=organization.pk).values().get() == account_before
    assert open_holds(job) == []
    # A request sent without a key (the dashboard's playground) is not affected.
    keyless = ended("failed", organization, builtin_endpoint)
    assert requeue.requeue_job(job=keyless)


def test_the_admin_requeues_what_admission_allows_and_says_why_the_rest_was_refused(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=50)
    keyed = finish(
        start(submit(organization, builtin_endpoint, api_key=tenant["api_key"])),
        AttemptOutcome.FAILED,
        gpu_ms=400,
        error="bad input",
    )
    keyless = ended("failed", organization, builtin_endpoint)
    controls.set_key_limit(api_key=tenant["api_key"], monthly_limit_micros=1)
    operator = Client()
    operator.force_login(User.objects.create_superuser(email="ops@example.com", password="operator password 1"))

    response = operator.post(
        "/admin/inference/job/",
        {"action": "requeue_selected", "_selected_action": [str(keyed.pk), str(keyless.pk)], "index": 0},
    )

    assert response.status_code == 302
    shown = [(message.level_tag, str(message)) for message in get_messages(response.wsgi_request)]
    assert ("success", "Requeued 1 request(s).") in shown
    [refusal] = [text for level, text in shown if level == "error"]
    assert refusal.startswith(f"Not requeued, refused by admission: {keyed.pk}: This API key's monthly limit")
    assert refusal.endswith("(spend_limit_exceeded)")
    keyed.refresh_from_db()
    keyless.refresh_from_db()
    assert (keyed.status, keyed.error) == (JobStatus.FAILED, "bad input")
    assert keyless.status != JobStatus.FAILED  # queued, and dispatched at once
    assert open_holds(keyed) == []
    [hold] = open_holds(keyless)
    assert account(organization).held_micros == hold.amount_micros
    [event] = AuditEvent.objects.filter(action=REQUEUED_BY_OPERATOR)
    assert event.target_id == str(keyless.pk)


def test_a_hold_left_open_by_a_final_job_is_replaced_on_requeue_never_counted_twice(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = ended("failed", organization, builtin_endpoint)
    amount = Hold.objects.get(job=job).amount_micros
    # Books that reconciliation flags (a final job holding credit): a requeue must not add a second hold to them.
    Hold.objects.filter(job=job).update(released_at=None)
    Account.objects.filter(pk=organization.pk).update(held_micros=amount)

    assert requeue.requeue_job(job=job)

    [hold] = open_holds(job)
    assert account(organization).held_micros == hold.amount_micros == admission_estimate(job)
    assert reconciliation.run_reconciliation().drift == []


def test_a_hold_placed_for_a_new_job_never_replaces_one_already_there(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """A submission's admission inserts its hold without looking for an earlier one (``holds.place(new=True)``, one
    statement fewer): were one there, the insert fails on the job's key and rolls back, never counting twice."""
    organization = tenant["organization"]
    queued = submit(organization, builtin_endpoint)
    placed = Hold.objects.get(job=queued)
    held_before = account(organization).held_micros
    second = Hold(
        job=queued,
        organization_id=placed.organization_id,
        api_key_id=placed.api_key_id,
        amount_micros=placed.amount_micros + 5,
        unit_price_micros=placed.unit_price_micros,
        unit=placed.unit,
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        holds.place(hold=second, new=True)
    assert account(organization).held_micros == held_before
    assert [hold.amount_micros for hold in open_holds(queued)] == [placed.amount_micros]
