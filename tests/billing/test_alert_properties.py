"""Spend alerts are exactly once, under any sequence of what an organization's settlements and people do.

A Hypothesis state machine settles requests of random cost with or without the organization's limited key, and in
between changes the budget, the thresholds and the key's limit (to a new figure, or back to one it had before), moves
credit, replays a settlement's look (what concurrent settlements and a redelivered callback do) and loses one (a
process that died after its COMMIT). After every step:

- at most once: one alert per (scope, subject, threshold, period, limit), one webhook delivery and one queued email
  each, whatever was looked at how often and however often a limit came back;
- at least once: after a settlement that cost something and whose look ran, every threshold the organization watches
  that its spend has reached under the budget and the key's limit in force is recorded, for that limit, once (a lost
  look is made good by the next one);
- never early: each alert's figures show its threshold reached when it was recorded.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from django.db import transaction
from django.test import TestCase
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from billing import alerts, controls, pricing
from billing.admission import spent_this_month
from billing.alerts import spent_in_month
from billing.ledger import grant_credits
from billing.models import Account, AlertScope, EntryKind, KeySpendLimit, SpendAlert, UsageRecord
from inference.models import Endpoint, WebhookDelivery
from inference.submission import SubmissionRefused
from tests import lifecycle
from tests.billing.conftest import OneOrganization

pytestmark = pytest.mark.django_db

THRESHOLDS = st.lists(st.integers(1, 100), min_size=0, max_size=4, unique=True)


class Alerting(OneOrganization):
    @initialize(
        budget=st.integers(500, 4_000),
        key_limit=st.one_of(st.none(), st.integers(300, 3_000)),
        budget_thresholds=THRESHOLDS,
        key_thresholds=THRESHOLDS,
    )
    def open_books(
        self, budget: int, key_limit: int | None, budget_thresholds: list[int], key_thresholds: list[int]
    ) -> None:
        pricing.forget_measurement(self.endpoint.pk)
        self.example = transaction.atomic()
        self.example.__enter__()
        self.emails: list[int] = []
        self.patch = mock.patch.object(
            alerts, "enqueue_email", side_effect=lambda alert_id: self.emails.append(alert_id)
        )
        self.patch.start()
        controls.set_monthly_budget(organization=self.organization, budget_micros=budget)
        controls.set_key_limit(api_key=self.api_key, monthly_limit_micros=key_limit)
        controls.set_alert_settings(
            organization=self.organization,
            budget_thresholds=budget_thresholds,
            key_thresholds=key_thresholds,
            webhook_url="http://127.0.0.1:9/billing",  # never called here: deliveries are only counted
        )
        self.budgets = [budget]  # every budget and key limit the organization had: changes may go back to one
        self.key_limits = [key_limit] if key_limit is not None else []
        self.looked = False  # the last step was a settlement whose look ran
        self.looked_at_key = False  # ... with the organization's limited key

    def teardown(self) -> None:
        if hasattr(self, "example"):
            self.patch.stop()
            transaction.set_rollback(True)
            self.example.__exit__(None, None, None)

    # --- What happens ------------------------------------------------------------------------------------------

    @rule(gpu_ms=st.integers(0, 3_000), with_key=st.booleans(), look_runs=st.booleans())
    def settle(self, gpu_ms: int, with_key: bool, look_runs: bool) -> None:
        """A request runs to its end; its commit's work runs, or is lost with its process."""
        api_key = self.api_key if with_key else None
        with TestCase.captureOnCommitCallbacks(execute=look_runs):
            try:
                job = lifecycle.run(self.organization, self.endpoint, api_key=api_key, gpu_ms=gpu_ms)
            except SubmissionRefused:
                self.looked = self.looked_at_key = False
                return
        # Only a settlement that moved spend looks (a free one cannot have reached anything new).
        self.looked = look_runs and UsageRecord.objects.filter(job=job, cost_micros__gt=0).exists()
        self.looked_at_key = self.looked and with_key

    @rule(with_key=st.booleans(), hold_micros=st.integers(0, 500))
    def look_again(self, with_key: bool, hold_micros: int) -> None:
        """What a concurrent settlement's look, or a redelivered callback, does: nothing new (the spend is the same)."""
        before = SpendAlert.objects.filter(organization=self.organization).count()
        with TestCase.captureOnCommitCallbacks(execute=True):
            alerts.look(
                organization_id=self.organization.pk,
                api_key_id=self.api_key.pk if with_key else None,
                hold_micros=hold_micros,
            )
        if self.looked:  # everything reached is already recorded; only exhaustion may depend on the hold given
            made = SpendAlert.objects.filter(organization=self.organization).exclude(threshold__gte=100)
            assert made.count() <= before
        self.looked = self.looked_at_key = False

    @rule(budget=st.integers(300, 4_000))
    def change_the_budget(self, budget: int) -> None:
        controls.set_monthly_budget(organization=self.organization, budget_micros=budget)
        self.budgets.append(budget)
        self.looked = self.looked_at_key = False

    @rule(percent_of_spend=st.integers(50, 200), gpu_ms=st.integers(0, 3_000), with_key=st.booleans())
    def change_the_budget_near_the_spend_and_go_on(self, percent_of_spend: int, gpu_ms: int, with_key: bool) -> None:
        """The budget raised a little above the month's spend (what a customer refused for it does), or lowered under
        it, and a request settled under it: the new budget's thresholds are near, or reached already."""
        spent = spent_this_month(organization_id=self.organization.pk)
        self.change_the_budget(max(spent, 1_000) * percent_of_spend // 100)  # room for a request when nothing is spent
        self.settle(gpu_ms=gpu_ms, with_key=with_key, look_runs=True)

    @rule(data=st.data())
    def go_back_to_an_earlier_budget(self, data: st.DataObject) -> None:
        """Back to a budget the organization had (this month, unless the test crossed its end)."""
        self.change_the_budget(data.draw(st.sampled_from(self.budgets)))

    @rule(key_limit=st.one_of(st.none(), st.integers(300, 3_000)), earlier=st.booleans(), data=st.data())
    def change_the_keys_limit(self, key_limit: int | None, earlier: bool, data: st.DataObject) -> None:
        """A new limit for the key, none, or one it had before."""
        if earlier and self.key_limits:
            key_limit = data.draw(st.sampled_from(self.key_limits))
        with TestCase.captureOnCommitCallbacks(execute=True):  # the limit arms the alerts once it commits
            controls.set_key_limit(api_key=self.api_key, monthly_limit_micros=key_limit)
        if key_limit is not None:
            self.key_limits.append(key_limit)
        self.looked = self.looked_at_key = False

    @rule(budget_thresholds=THRESHOLDS, key_thresholds=THRESHOLDS)
    def change_the_thresholds(self, budget_thresholds: list[int], key_thresholds: list[int]) -> None:
        controls.set_alert_settings(
            organization=self.organization, budget_thresholds=budget_thresholds, key_thresholds=key_thresholds
        )
        self.looked = self.looked_at_key = False

    @rule(amount=st.integers(1, 2_000), take_back=st.booleans())
    def move_credit(self, amount: int, take_back: bool) -> None:
        grant_credits(
            organization=self.organization,
            amount_micros=-amount if take_back else amount,
            reason="property test",
            kind=EntryKind.ADJUSTMENT if take_back else EntryKind.GRANT,
        )

    @precondition(lambda self: hasattr(self, "example"))
    @rule(floor=st.one_of(st.none(), st.integers(0, 1_000_000)))
    def change_the_floor(self, floor: int | None) -> None:
        controls.set_alert_settings(organization=self.organization, credit_floor_micros=floor)
        self.looked = self.looked_at_key = False

    # --- What must hold ----------------------------------------------------------------------------------------

    def alerts(self) -> list[SpendAlert]:
        return list(SpendAlert.objects.filter(organization=self.organization))

    @invariant()
    def each_alert_is_told_once(self) -> None:
        if not hasattr(self, "example"):
            return
        made = self.alerts()
        keys = [(alert.scope, alert.subject, alert.threshold, alert.period, alert.limit_micros) for alert in made]
        assert len(keys) == len(set(keys))
        deliveries = WebhookDelivery.objects.filter(organization=self.organization)
        assert sorted(deliveries.values_list("message_id", flat=True)) == sorted(
            alerts.message_id_of(alert) for alert in made
        )
        assert sorted(self.emails) == sorted(alert.pk for alert in made)

    @invariant()
    def no_alert_before_its_threshold(self) -> None:
        if not hasattr(self, "example"):
            return
        for alert in self.alerts():
            if alert.scope == AlertScope.CREDITS:
                assert alert.available_micros < alert.threshold
            elif alert.threshold < 100:
                assert alert.limit_micros is not None
                assert alert.spent_micros * 100 >= alert.threshold * alert.limit_micros

    @invariant()
    def every_threshold_reached_is_recorded_once_a_look_ran(self) -> None:
        if not getattr(self, "looked", False):
            return
        account = Account.objects.get(pk=self.organization.pk)
        watched = alerts.settings_of(self.organization.pk)
        now = lifecycle_now()
        period = alerts.period_of(alerts.month_start(now))
        recorded = [
            (alert.scope, alert.subject, alert.threshold, alert.limit_micros)
            for alert in self.alerts()
            if alert.period == period
        ]
        spent = spent_this_month(organization_id=self.organization.pk)
        budget = account.monthly_budget_micros
        assert budget is not None
        for percent in watched.budget_thresholds:
            if spent * 100 >= percent * budget:
                assert recorded.count((AlertScope.BUDGET, "", percent, budget)) == 1, (spent, budget, percent)
        key_limit = KeySpendLimit.objects.filter(api_key=self.api_key).values_list("monthly_limit_micros", flat=True)
        if not self.looked_at_key or key_limit.first() is None:
            return
        limit = key_limit.get()
        spent = spent_in_month(organization_id=self.organization.pk, month=now, key_id=self.api_key.pk)
        for percent in watched.key_thresholds:
            if spent * 100 >= percent * limit:
                assert recorded.count((AlertScope.KEY, str(self.api_key.pk), percent, limit)) == 1, (spent, limit)


def lifecycle_now() -> Any:
    from django.utils import timezone

    return timezone.now()


def test_spend_alerts_are_exactly_once(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None, settings: Any
) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True
    grant_credits(organization=tenant["organization"], amount_micros=1_000_000, reason="property test")
    Alerting.run_for(tenant, builtin_endpoint, max_examples=40, steps=30)
