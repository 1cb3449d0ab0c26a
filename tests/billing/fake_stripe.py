"""localstripe (a stateful fake Stripe from PyPI) with the few things our tests need that it lacks.

Run as ``python tests/billing/fake_stripe.py --port N``. What is added or changed, and why:

- The store stays in memory: localstripe pickles it to ``/tmp/localstripe.pickle`` on every write,
  one file shared by every process on the machine.
- PaymentIntents carry ``amount_received`` and can be listed with the ``customer`` and
  ``created[gt|gte|lt|lte]`` filters, newest first, as Stripe does (localstripe refuses any filter).
- A refund sends ``charge.refunded`` (localstripe sends no event for refunds).
- Disputes, absent from localstripe: ``GET /v1/disputes/{id}``; a test opens one with
  ``POST /_test/disputes`` and closes it with ``POST /_test/disputes/{id}/close`` (status won or lost),
  which send ``charge.dispute.created`` and ``charge.dispute.closed``.
- Checkout Sessions, absent from localstripe: ``POST/GET /v1/checkout/sessions``; a test pays one with
  ``POST /_test/checkout/sessions/{id}/pay`` (a PaymentIntent with the session's
  ``payment_intent_data``, then ``checkout.session.completed``) or lets it expire with ``.../expire``.

Stripe's real behaviour is the reference for each; only the fields our code reads are modelled.
"""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError

resources.Store.dump_to_disk = lambda self: None


def _amount_received(self: Any) -> int:
    return int(self.amount) if self.status == "succeeded" else 0


resources.PaymentIntent.amount_received = property(_amount_received)
_plain_list = resources.StripeObject._api_list_all.__func__
_COMPARE = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _list_payment_intents(
    cls: Any, url: str, limit: Any = None, starting_after: Any = None, customer: Any = None, created: Any = None
) -> Any:
    listing = _plain_list(cls, url, limit=limit, starting_after=starting_after)
    if customer is not None:
        listing._list = [intent for intent in listing._list if intent.customer == customer]
    for operator, bound in (created or {}).items():
        if operator not in _COMPARE:
            raise UserError(400, "Bad request")
        listing._list = [intent for intent in listing._list if _COMPARE[operator](intent.created, int(bound))]
    listing._list.sort(key=lambda intent: intent.created, reverse=True)
    return listing


resources.PaymentIntent._api_list_all = classmethod(_list_payment_intents)
_refund_init = resources.Refund.__init__


def _refund_then_event(self: Any, *args: Any, **kwargs: Any) -> None:
    _refund_init(self, *args, **kwargs)
    resources.schedule_webhook(resources.Event("charge.refunded", resources.Charge._api_retrieve(self.charge)))


resources.Refund.__init__ = _refund_then_event


class Dispute(resources.StripeObject):
    object = "dispute"
    _id_prefix = "dp_"

    def __init__(self, charge: Any = None, amount: Any = None) -> None:
        charge_object = resources.Charge._api_retrieve(charge)
        super().__init__()
        self.charge = charge
        self.amount = int(amount) if amount is not None else charge_object.amount
        self.currency = charge_object.currency
        self.payment_intent = charge_object.payment_intent
        self.reason = "fraudulent"
        self.status = "needs_response"
        self.metadata: dict[str, Any] = {}

    @classmethod
    def _api_create(cls, **data: Any) -> Any:
        raise UserError(405, "Method Not Allowed")


def _open_dispute(charge: Any = None, amount: Any = None, **_: Any) -> Dispute:
    dispute = Dispute(charge=charge, amount=amount)
    resources.schedule_webhook(resources.Event("charge.dispute.created", dispute))
    return dispute


def _close_dispute(id: str, status: Any = None, **_: Any) -> Dispute:  # noqa: A002  (localstripe's name)
    if status not in ("won", "lost"):
        raise UserError(400, "Bad request")
    dispute = Dispute._api_retrieve(id)
    dispute.status = status
    resources.schedule_webhook(resources.Event("charge.dispute.closed", dispute))
    return dispute


class CheckoutSession(resources.StripeObject):
    object = "checkout.session"
    _id_prefix = "cs_test_"

    def __init__(
        self,
        mode: Any = None,
        customer: Any = None,
        client_reference_id: Any = None,
        line_items: Any = None,
        success_url: Any = None,
        cancel_url: Any = None,
        metadata: Any = None,
        payment_intent_data: Any = None,
        payment_method_types: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs or mode != "payment" or not success_url or not cancel_url or not isinstance(line_items, list):
            raise UserError(400, "Bad request")
        try:
            amount_total = sum(
                int(item["price_data"]["unit_amount"]) * int(item.get("quantity", 1)) for item in line_items
            )
            currency = line_items[0]["price_data"]["currency"]
        except (KeyError, TypeError, ValueError, IndexError):
            raise UserError(400, "Bad request") from None
        if customer is not None:
            resources.Customer._api_retrieve(customer)
        super().__init__()
        self.mode = mode
        self.customer = customer
        self.client_reference_id = client_reference_id
        self.amount_total = amount_total
        self.currency = currency
        self.success_url = success_url
        self.cancel_url = cancel_url
        self.metadata = metadata or {}
        self._payment_intent_metadata = (payment_intent_data or {}).get("metadata") or {}
        self.payment_intent: str | None = None
        self.status = "open"
        self.payment_status = "unpaid"
        self.url = f"https://checkout.stripe.test/c/pay/{self.id}"


def _pay_checkout(id: str, payment_method: Any = None, **_: Any) -> CheckoutSession:  # noqa: A002
    session = CheckoutSession._api_retrieve(id)
    if session.status != "open":
        raise UserError(400, "Bad request")
    intent = resources.PaymentIntent._api_create(
        confirm=True,
        amount=session.amount_total,
        currency=session.currency,
        customer=session.customer,
        payment_method=payment_method or "pm_card_visa",
        metadata=dict(session._payment_intent_metadata),
    )
    session.payment_intent = intent.id
    session.status = "complete"
    session.payment_status = "paid"
    resources.schedule_webhook(resources.Event("checkout.session.completed", session))
    return session


def _expire_checkout(id: str, **_: Any) -> CheckoutSession:  # noqa: A002
    session = CheckoutSession._api_retrieve(id)
    if session.status != "open":
        raise UserError(400, "Bad request")
    session.status = "expired"
    resources.schedule_webhook(resources.Event("checkout.session.expired", session))
    return session


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/v1/disputes/{id}", server.api_retrieve(Dispute, "/v1/disputes"))
    app.router.add_route("POST", "/_test/disputes", server.api_extra(_open_dispute, "/_test/disputes"))
    app.router.add_route("POST", "/_test/disputes/{id}/close", server.api_extra(_close_dispute, ""))
    app.router.add_route("POST", "/v1/checkout/sessions", server.api_create(CheckoutSession, "/v1/checkout/sessions"))
    app.router.add_route("GET", "/v1/checkout/sessions/{id}", server.api_retrieve(CheckoutSession, ""))
    app.router.add_route("POST", "/_test/checkout/sessions/{id}/pay", server.api_extra(_pay_checkout, ""))
    app.router.add_route("POST", "/_test/checkout/sessions/{id}/expire", server.api_extra(_expire_checkout, ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    add_routes(server.app)
    web.run_app(server.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
