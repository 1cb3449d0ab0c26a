"""The Stripe sweep, the scheduler's safety net for payments (``billing.stripe_sweep``, every minute): what a lost
message, a failed processing or a lost answer from Stripe left undone is done here.

Each part belongs to its own module: the inbox's events (``stripe_events.process_due_events``), the payments left
pending (``stale_payments.settle_stale_payments``), and the auto top-ups whose message was lost
(``topups.accounts_needing_top_up``, queued as a debit queues them).
"""

from __future__ import annotations

from accounts.sweeps import all_parts, each_apart
from billing import stale_payments, stripe_events, topups
from billing.stripe_client import payments_enabled


def sweep(*, limit: int = 200) -> dict[str, int]:
    """Events whose message was lost or whose processing failed (with backoff), payments left pending, and top-ups a
    lost message missed; how many of each. Nothing while payments are off."""
    if not payments_enabled():
        return {}
    # Each part whatever the others did: a payment that raises does not keep the top-ups a lost message missed unsent.
    return all_parts(
        {
            "events": lambda: stripe_events.process_due_events(limit=limit),
            "payments": stale_payments.settle_stale_payments,
            "top_ups": lambda: each_apart(
                topups.accounts_needing_top_up().values_list("organization_id", flat=True)[:limit],
                lambda organization_id: topups.enqueue_top_up(str(organization_id)),
                name=lambda organization_id: f"the auto top-up of organization {organization_id}",
            ),
        }
    )
