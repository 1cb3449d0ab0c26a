"""The hook seam: billing answers every hook inference asks, and registering sets only the hooks given."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from billing import admission, metering
from inference import hooks as seam


def test_billing_answers_every_hook() -> None:
    registered = {field.name: getattr(seam.hooks, field.name) for field in dataclasses.fields(seam.Hooks)}
    assert registered == {
        "admit": admission.admit,
        "admit_in_query": admission.admit_in_query,
        "reserve": admission.reserve,
        "may_continue": admission.may_continue,
        "attempt_finished": metering.record_attempt,
        "ended_unstarted": admission.ended_unstarted,
        "usage": admission.job_usage,
        "price": admission.endpoint_price,
    }


def test_registering_sets_the_hooks_given_and_keeps_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    def usage(job: Any) -> None:
        return None

    def price(endpoint: Any) -> None:
        return None

    fresh = seam.Hooks(usage=usage)
    monkeypatch.setattr(seam, "hooks", fresh)
    seam.register(price=price)
    assert (fresh.price, fresh.usage, fresh.admit) == (price, usage, None)
