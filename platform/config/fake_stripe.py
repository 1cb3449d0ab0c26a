"""localstripe (a stateful fake Stripe from PyPI) with the few things the platform needs that it lacks.

The tests run it (tests/stripe_support.py), and so does the embedded run when it is given no Stripe key
(``config.embedded_stripe``), so that buying credits, saved cards and auto top-up can be tried offline. It lives
here, in the project's wiring, because the embedded run starts it; localstripe is a development dependency, which
``make install`` installs. Run as ``python -m config.fake_stripe --port N``. What is added or changed, and why:

- The store stays in memory, or with ``--store PATH`` is kept in that file after every request that writes
  (the embedded run's data directory): localstripe pickles it to ``/tmp/localstripe.pickle`` on every write,
  one file shared by every process on the machine. A fake that started empty again forgot the customers the
  run's database names, and refused every purchase after the run or the fake was restarted.
- PaymentIntents carry ``amount_received`` and can be listed with the ``customer`` and
  ``created[gt|gte|lt|lte]`` filters, newest first, as Stripe does (localstripe refuses any filter).
- A refund sends ``charge.refunded`` (localstripe sends no event for refunds).
- Disputes, absent from localstripe: ``GET /v1/disputes/{id}``; a test opens one with
  ``POST /_test/disputes`` and closes it with ``POST /_test/disputes/{id}/close`` (status won or lost),
  which send ``charge.dispute.created`` and ``charge.dispute.closed``.
- Checkout Sessions, absent from localstripe: ``POST/GET /v1/checkout/sessions``; a test pays one with
  ``POST /_test/checkout/sessions/{id}/pay`` (a PaymentIntent with the session's
  ``payment_intent_data``, then ``checkout.session.completed``) or lets it expire with ``.../expire``.
  A person pays one on the session's ``url``: a page of the fake's own (``/checkout/{id}``, no API key, like
  Stripe's hosted page), whose button pays with the test card 4242 and goes on to the session's ``success_url``.
  As at Stripe, a session whose ``payment_intent_data`` asks for ``setup_future_usage`` saves the card it was paid
  with to its customer.
- Idempotent requests (localstripe ignores ``Idempotency-Key``): a POST whose key was seen before, under the
  same API key, replays the first answer with ``Idempotent-Replayed: true`` if its method, path and parameters
  are the same, and answers 400 ``idempotency_error`` if they are not (409 while the first is still running).
  As at Stripe, an answer is kept once the endpoint ran (a success, a declined card), not when the request was
  refused before (a validation error): that key may be used again. Keys are never forgotten (Stripe: 24 hours).
- Lost answers: ``POST /_test/faults`` (``request_path``, ``count``) makes the next ``count`` POSTs to it be
  processed and then answered with a dropped connection, as when Stripe acted but its answer never arrived
  (the SDK's network retries then resend the request with its key); ``GET /_test/faults`` lists those still
  to fire and ``DELETE /_test/faults`` clears them.

Stripe's real behaviour is the reference for each; only the fields our code reads are modelled.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import pickle
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError

# Where the store is kept (``--store``); None: in memory only. localstripe saves it after every request that writes.
STORE_FILE: Path | None = None


def _dump_store(store: Any) -> None:
    if STORE_FILE is None:
        return
    partial = STORE_FILE.with_name(STORE_FILE.name + ".partial")
    with partial.open("wb") as file:
        pickle.dump(dict(store), file, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, STORE_FILE)  # whole or not at all: a fake killed while saving keeps the last store


def _load_store(store: Any) -> None:
    if STORE_FILE is None:
        return
    with contextlib.suppress(FileNotFoundError):
        store.update(pickle.loads(STORE_FILE.read_bytes()))  # noqa: S301  (our own file, in the run's data directory)


resources.Store.dump_to_disk = _dump_store
# Each object written saved the whole store again; the request's end saves it once (server.save_store_middleware).
resources.Store.__setitem__ = dict.__setitem__
resources.Store.__delitem__ = dict.__delitem__

# Where this fake answers (``main`` sets it): the base of the Checkout pages' URLs.
PUBLIC_URL = "http://127.0.0.1"
TEST_CARD = "4242424242424242"


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
        self._saves_card = bool((payment_intent_data or {}).get("setup_future_usage"))
        self.payment_intent: str | None = None
        self.status = "open"
        self.payment_status = "unpaid"
        self.url = f"{PUBLIC_URL}/checkout/{self.id}"


def _saved_test_card(customer: str) -> Any:
    """A new card (the test card 4242) saved to ``customer``, as Checkout saves the card it is paid with."""
    card = {"number": TEST_CARD, "exp_month": 12, "exp_year": datetime.now(UTC).year + 5, "cvc": "123"}
    method = resources.PaymentMethod(type="card", card=card)
    return resources.PaymentMethod._api_attach(method.id, customer=customer)


def _pay_checkout(id: str, payment_method: Any = None, **_: Any) -> CheckoutSession:  # noqa: A002
    session = CheckoutSession._api_retrieve(id)
    if session.status != "open":
        raise UserError(400, "Bad request")
    if payment_method is None and session._saves_card and session.customer:
        payment_method = _saved_test_card(session.customer).id
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


# Stripe's messages, word for word: the SDK raises IdempotencyError on their type.
IDEMPOTENCY_MISMATCH = (
    "Keys for idempotent requests can only be used with the same parameters they were first used with. "
    "Try using a key other than '{key}' if you meant to execute a different request."
)
IDEMPOTENCY_IN_PROGRESS = (
    "There is currently another in-progress request using this Idempotent Key (that probably means you "
    "submitted twice, and the other request is still going through): {key}. Please try again later."
)


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str


@dataclass
class _KeyUse:
    request: tuple[str, str, Any]  # method, path with query, parameters
    answer: _Answer | None = None  # None while the first request runs


# (API key, connected account, Idempotency-Key) -> its first use.
_key_uses: dict[tuple[str, str, str], _KeyUse] = {}


def _kept(response: web.StreamResponse) -> bool:
    """Stripe keeps the answer of an endpoint that ran: a success, or a declined card (402). A request refused
    before (bad parameters, no such object) keeps nothing."""
    return (
        isinstance(response, web.Response)
        and isinstance(response.body, bytes | None)
        and (response.status < 400 or response.status == 402)
    )


async def _parameters(request: web.Request) -> Any:
    body = await request.read()
    if request.content_type == "application/x-www-form-urlencoded":
        # Stripe compares parameters, not bytes: the same ones in another order are the same request.
        return tuple(sorted(parse_qsl(body.decode(), keep_blank_values=True)))
    return body


def _idempotency_error(status: int, message: str) -> web.Response:
    return server.json_response({"error": {"type": "idempotency_error", "message": message}}, status=status)


@web.middleware
async def idempotency_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        return await handler(request)
    scope = (
        server.get_api_key(request) or request.headers.get("Authorization", ""),
        request.headers.get("Stripe-Account", ""),
        key,
    )
    this_request = (request.method, request.path_qs, await _parameters(request))
    first = _key_uses.get(scope)
    if first is not None:
        if first.request != this_request:
            return _idempotency_error(400, IDEMPOTENCY_MISMATCH.format(key=key))
        if first.answer is None:
            return _idempotency_error(409, IDEMPOTENCY_IN_PROGRESS.format(key=key))
        return web.Response(
            status=first.answer.status,
            body=first.answer.body,
            headers={"Content-Type": first.answer.content_type, "Idempotency-Key": key, "Idempotent-Replayed": "true"},
        )
    use = _key_uses[scope] = _KeyUse(request=this_request)
    try:
        try:
            response = await handler(request)
        except UserError as exc:  # answered here, not by localstripe's outer middleware, so it can be kept
            response = exc.to_response()
    except BaseException:
        del _key_uses[scope]
        raise
    if _kept(response):
        use.answer = _Answer(response.status, response.body or b"", response.headers.get("Content-Type", ""))
    else:
        del _key_uses[scope]
    response.headers["Idempotency-Key"] = key
    return response


@dataclass
class _Fault:
    path: str
    remaining: int


_faults: list[_Fault] = []


@web.middleware
async def fault_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Processes the request, then drops the connection instead of answering if a fault is set for it."""
    try:
        response = await handler(request)
    except UserError as exc:
        response = exc.to_response()
    fault = next((f for f in _faults if request.method == "POST" and f.path == request.path), None)
    if fault is None:
        return response
    fault.remaining -= 1
    if fault.remaining <= 0:
        _faults.remove(fault)
    if request.transport is not None:
        request.transport.abort()  # no answer at all: the client sees the connection reset
    return response


async def _set_fault(request: web.Request) -> web.Response:
    data = await server.get_post_data(request) or {}
    path, count = data.get("request_path"), data.get("count", "1")
    if not isinstance(path, str) or not path.startswith("/v1/") or not str(count).isdigit() or int(count) < 1:
        raise UserError(400, "Bad request")
    _faults.append(_Fault(path=path, remaining=int(count)))
    return server.json_response({"path": path, "count": int(count)})


async def _list_faults(request: web.Request) -> web.Response:
    return server.json_response({"data": [{"path": f.path, "remaining": f.remaining} for f in _faults]})


async def _clear_faults(request: web.Request) -> web.Response:
    _faults.clear()
    return server.json_response({"cleared": True})


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Checkout (test mode)</title><style>
body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f8fa; color: #1d2330; }}
.test-mode {{ margin: 0; padding: .5rem; background: #ffecb3; color: #783c00; font-weight: 600; text-align: center; }}
main {{ max-width: 26rem; margin: 3rem auto; background: #fff; border: 1px solid #dde2e8; border-radius: 10px;
  padding: 1.5rem; }}
button {{ font: inherit; padding: .6rem 1rem; border: 0; border-radius: 6px; background: #4b3fd6; color: #fff;
  width: 100%; }}
.muted {{ color: #5f6b7a; }}
</style></head><body>
<p class="test-mode" data-testid="test-mode">Test mode: a fake Stripe on this machine. No real money moves.</p>
<main>{body}</main></body></html>"""


def _amount(session: CheckoutSession) -> str:
    return (
        f"${session.amount_total / 100:,.2f}"
        if session.currency == "usd"
        else f"{session.amount_total} {session.currency}"
    )


def _checkout_page(session: CheckoutSession) -> web.Response:
    amount = html.escape(_amount(session))
    if session.status == "open":
        body = (
            f"<h1>Pay {amount}</h1><p>Prepaid credits</p>"
            f'<form method="post"><p class="muted">Card: 4242 4242 4242 4242 (a test card), '
            f'12/{datetime.now(UTC).year + 5}</p><button type="submit">Pay {amount}</button></form>'
            f'<p><a href="{html.escape(session.cancel_url)}">Cancel and go back</a></p>'
        )
    else:
        body = (
            f"<h1>{'Paid' if session.status == 'complete' else 'Expired'}</h1>"
            f'<p><a href="{html.escape(session.success_url)}">Go back</a></p>'
        )
    return web.Response(text=_PAGE.format(body=body), content_type="text/html")


@web.middleware
async def checkout_page_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/checkout/{id}``: the page a payer is sent to, without an API key (Stripe's hosted page needs none)."""
    prefix, _, session_id = request.path.partition("/checkout/")
    if prefix or not session_id or "/" in session_id:
        return await handler(request)
    try:
        session = CheckoutSession._api_retrieve(session_id)
    except UserError:
        return web.Response(status=404, text="No such Checkout Session.")
    if request.method == "POST" and session.status == "open":
        _pay_checkout(session_id)
        raise web.HTTPSeeOther(session.success_url.replace("{CHECKOUT_SESSION_ID}", session.id))
    if request.method not in ("GET", "POST"):
        return web.Response(status=405)
    return _checkout_page(session)


def add_middlewares(app: web.Application) -> None:
    """After localstripe's authentication (a key is scoped to its API key) and before its handlers: a fault
    drops the answer after the idempotency layer has kept it, so the SDK's retry gets the replay."""
    position = list(app.middlewares).index(server.auth_middleware) + 1
    app.middlewares.insert(position, idempotency_middleware)
    app.middlewares.insert(position, fault_middleware)
    app.middlewares.insert(0, checkout_page_middleware)


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/v1/disputes/{id}", server.api_retrieve(Dispute, "/v1/disputes"))
    app.router.add_route("POST", "/_test/disputes", server.api_extra(_open_dispute, "/_test/disputes"))
    app.router.add_route("POST", "/_test/disputes/{id}/close", server.api_extra(_close_dispute, ""))
    app.router.add_route("POST", "/v1/checkout/sessions", server.api_create(CheckoutSession, "/v1/checkout/sessions"))
    app.router.add_route("GET", "/v1/checkout/sessions/{id}", server.api_retrieve(CheckoutSession, ""))
    app.router.add_route("POST", "/_test/checkout/sessions/{id}/pay", server.api_extra(_pay_checkout, ""))
    app.router.add_route("POST", "/_test/checkout/sessions/{id}/expire", server.api_extra(_expire_checkout, ""))
    app.router.add_route("POST", "/_test/faults", _set_fault)
    app.router.add_route("GET", "/_test/faults", _list_faults)
    app.router.add_route("DELETE", "/_test/faults", _clear_faults)


def set_store_file(path: Path | None) -> None:
    global STORE_FILE
    STORE_FILE = path
    _load_store(server.store)


def main() -> None:
    global PUBLIC_URL
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, help="Keep the store in this file (default: in memory only).")
    args = parser.parse_args()
    PUBLIC_URL = f"http://127.0.0.1:{args.port}"
    set_store_file(args.store)
    add_routes(server.app)
    add_middlewares(server.app)
    web.run_app(server.app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
