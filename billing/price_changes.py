"""Changing the rate card: a new price version, or a correction to one that is not in force yet; each audited.

A price in force is never edited: work that started under it keeps it, and a new version (a new row) is how a price
changes. Nor may a version start in the past: a start up to ``PRICE_BACKDATING_GRACE`` ago (a form opened a moment
before it was saved) starts now, an earlier one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import AuditAction, Organization
from accounts.services import SYSTEM, Actor, record_audit
from billing.ledger import BillingError
from billing.models import Price, PriceUnit
from inference.models import Endpoint

PRICE_BACKDATING_GRACE = timedelta(minutes=15)


@dataclass(frozen=True)
class PriceTerms:
    """What a price line says: what it applies to (a GPU class, an endpoint, an endpoint for one organization), its
    unit and price, its resolution tiers, when it starts (``None``: now), and a note."""

    unit_price_micros: int
    gpu_class: str = ""
    endpoint: Endpoint | None = None
    organization: Organization | None = None
    unit: str = PriceUnit.GPU_SECOND
    resolution_tiers: list[dict[str, int]] = field(default_factory=list)
    effective_from: datetime | None = None
    note: str = ""


def add_price(*, terms: PriceTerms, actor: Actor = SYSTEM) -> Price:
    """A new version of a rate card line, from its start on; audited (``PRICE_CHANGED``, ``change: added``).

    Raises ``ValidationError`` (by field) for a line that is not one: a start in the past, a class priced per image,
    tiers out of order.
    """
    price = Price(created_by=actor.user, created_at=timezone.now())
    _set_terms(price, terms)
    with transaction.atomic(durable=True):
        price.save()
        _audit(price, actor, change="added")
    return price


def change_scheduled_price(*, price: Price, terms: PriceTerms, actor: Actor = SYSTEM) -> Price:
    """Corrects a version that has not started yet; audited with what it said before (``change: edited``).

    Raises ``BillingError`` once the version is in force (add a new one instead), ``ValidationError`` as
    ``add_price`` does.
    """
    with transaction.atomic(durable=True):
        row = Price.objects.select_for_update(of=("self",)).select_related("endpoint").get(pk=price.pk)
        if row.effective_from <= timezone.now():
            raise BillingError("This price is in force and is never edited: add a new version to change it.")
        before = _facts(row)
        _set_terms(row, terms)
        row.save()
        _audit(row, actor, change="edited", before=before)
    return row


def _set_terms(price: Price, terms: PriceTerms) -> None:
    now = timezone.now()
    starts = terms.effective_from or now
    if starts < now - PRICE_BACKDATING_GRACE:
        message = "A price cannot start in the past: work already started keeps the price it started under."
        raise ValidationError({"effective_from": ValidationError(message, code="backdated")})
    price.gpu_class = terms.gpu_class
    price.endpoint = terms.endpoint
    price.organization = terms.organization
    price.unit = terms.unit
    price.unit_price_micros = terms.unit_price_micros
    price.resolution_tiers = terms.resolution_tiers
    price.effective_from = max(starts, now)
    price.note = terms.note
    price.full_clean()


def _facts(price: Price) -> dict[str, Any]:
    return {
        "gpu_class": price.gpu_class,
        "endpoint": price.endpoint.endpoint_id if price.endpoint_id and price.endpoint else None,
        "organization": str(price.organization_id) if price.organization_id else None,
        "unit": price.unit,
        "unit_price_micros": price.unit_price_micros,
        "resolution_tiers": price.resolution_tiers,
        "effective_from": price.effective_from.isoformat(),
        "note": price.note,
    }


def _audit(price: Price, actor: Actor, *, change: str, before: dict[str, Any] | None = None) -> None:
    metadata: dict[str, Any] = {"price_id": price.pk, "change": change, **_facts(price)}
    if before is not None:
        metadata["before"] = before
    record_audit(action=AuditAction.PRICE_CHANGED, actor=actor, target=price, metadata=metadata)
