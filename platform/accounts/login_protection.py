"""Throttles for the forms a person signs in with: log in (``/auth/login`` and ``/admin/login/``), sign up and
password reset.

- Log-in failures are counted per account (the username as typed, whether or not it exists, so a lockout
  says nothing about which addresses have accounts) and per client address. After
  ``LOGIN_FAILURES_PER_ACCOUNT`` failures for one account, or ``LOGIN_FAILURES_PER_ADDRESS`` from one
  address, within ``LOGIN_LOCKOUT_SECONDS``, further attempts are refused for ``LOGIN_LOCKOUT_SECONDS``
  without checking the password (HTTP 429, ``Retry-After``, the page says when to try again). A successful
  log-in resets its account's count; it does not reset the address's, so an attacker's own account cannot
  launder guesses against others. Anyone can lock an account by failing on purpose: a password reset, which
  proves the mailbox, ends the account's lock (``unlock_account``).
- Sign-up and password-reset submissions are counted per client address (``AUTH_FORM_POSTS_PER_ADDRESS``
  an hour), and the emails they send to any one address are capped (``AUTH_EMAILS_PER_RECIPIENT`` an hour)
  silently, so the forms answer the same whether or not an account exists.

An attempt is counted before the password is checked, so parallel requests cannot slip past the limit
between the check and the count. The counters live in the shared cache (Redis in production): every web
process sees the same counts. While Redis is down the cache counts in each process's memory
(config/cache.py), so the limits still hold per process.

Client addresses: ``REMOTE_ADDR``, which the ASGI server sets from ``X-Forwarded-For`` only for the
proxies in ``FORWARDED_ALLOW_IPS`` (deploy/gunicorn.conf.py). IPv6 clients are counted per /64, the
block one subscriber usually holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.http import HttpRequest, HttpResponseBase

logger = logging.getLogger(__name__)

HOUR = 3600


@dataclass(frozen=True)
class Throttle:
    """At most ``limit`` events per subject in a window of ``period`` seconds from its first event; a subject
    over the limit is locked for ``period`` seconds from then."""

    scope: str
    limit: int
    period: int

    def _key(self, subject: str) -> str:
        # Hashed: cache keys have a length limit and a character set, and need not hold an email in clear.
        digest = hashlib.sha256(subject.encode()).hexdigest()[:32]
        return f"throttle:{self.scope}:{digest}"

    def locked_for(self, subject: str, now: float) -> float:
        """Seconds until ``subject`` may try again (0: now)."""
        try:
            until = cache.get(self._key(subject) + ":locked")
        except Exception as exc:
            logger.warning("throttle %s not checked: %s", self.scope, exc)
            return 0.0
        return max(float(until) - now, 0.0) if until else 0.0

    def count(self, subject: str) -> int:
        """Counts one event (atomically: the cache's increment) and answers the count in this window."""
        key = self._key(subject)
        try:
            cache.add(key, 0, timeout=self.period)
            return int(cache.incr(key))
        except Exception as exc:  # a key expired between add and incr, a cache that refuses: let this one pass
            logger.warning("throttle %s not counted: %s", self.scope, exc)
            return 0

    def lock(self, subject: str, now: float) -> float:
        """Locks ``subject`` (if not already) and answers the seconds left."""
        # add, not set: requests arriving together over the limit must not push the end of the lock further out.
        try:
            cache.add(self._key(subject) + ":locked", now + self.period, timeout=self.period)
        except Exception as exc:
            logger.warning("throttle %s not locked: %s", self.scope, exc)
        return self.locked_for(subject, now) or float(self.period)

    def uncount(self, subject: str) -> None:
        # ValueError: the window expired meanwhile, nothing is left to take back.
        with contextlib.suppress(Exception):
            cache.decr(self._key(subject))

    def reset(self, subject: str) -> None:
        try:
            cache.delete_many([self._key(subject), self._key(subject) + ":locked"])
        except Exception as exc:
            logger.warning("throttle %s not reset: %s", self.scope, exc)


def login_per_account() -> Throttle:
    return Throttle("login-account", settings.LOGIN_FAILURES_PER_ACCOUNT, settings.LOGIN_LOCKOUT_SECONDS)


def login_per_address() -> Throttle:
    return Throttle("login-address", settings.LOGIN_FAILURES_PER_ADDRESS, settings.LOGIN_LOCKOUT_SECONDS)


def form_posts_per_address(form: str) -> Throttle:
    return Throttle(f"{form}-address", settings.AUTH_FORM_POSTS_PER_ADDRESS, HOUR)


def emails_per_recipient() -> Throttle:
    return Throttle("email-recipient", settings.AUTH_EMAILS_PER_RECIPIENT, HOUR)


def client_address(request: HttpRequest | None) -> str:
    """The address the request came from; an IPv6 address as its /64."""
    raw = (request.META.get("REMOTE_ADDR") if request is not None else None) or "unknown"
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_key(username: str) -> str:
    # Emails log in whatever their case (accounts.models.UserManager.get_by_natural_key): so are they counted.
    return username.strip().lower()


LOGIN_REFUSED = "Too many failed log-in attempts"
FORM_REFUSED = "Too many requests from your network"


def wait_message(seconds: float, what: str) -> str:
    minutes = max(math.ceil(seconds / 60), 1)
    at = datetime.fromtimestamp(time.time() + seconds, tz=UTC).strftime("%H:%M UTC")
    return f"{what}. Try again in {minutes} minute{'' if minutes == 1 else 's'} (after {at})."


class Throttled(forms.ValidationError):
    """A form refused because its subject is throttled; ``retry_after`` is in whole seconds."""

    def __init__(self, seconds: float, what: str) -> None:
        self.retry_after = max(math.ceil(seconds), 1)
        super().__init__(wait_message(seconds, what), code="throttled")


def check_form_post(request: HttpRequest, form: str) -> Throttled | None:
    """Counts one submission of ``form`` from the request's address; a ``Throttled`` once over the limit."""
    throttle, address, now = form_posts_per_address(form), client_address(request), time.time()
    wait = throttle.locked_for(address, now)
    if wait:
        return Throttled(wait, FORM_REFUSED)
    count = throttle.count(address)
    if count >= throttle.limit:
        wait = throttle.lock(address, now)
        if count > throttle.limit:
            return Throttled(wait, FORM_REFUSED)
    return None


def may_email(recipient: str) -> bool:
    """Whether one more sign-up or reset email may go to ``recipient`` this hour (counted if so)."""
    throttle = emails_per_recipient()
    if throttle.count(recipient.strip().lower()) > throttle.limit:
        logger.warning("auth email not sent: its recipient had %d this hour", throttle.limit)
        return False
    return True


def unlock_account(email: str) -> None:
    """Ends the account's log-in lock: its owner has just proved the mailbox (a password reset)."""
    login_per_account().reset(account_key(email))


class LoginAttempt:
    """One log-in attempt, counted against its account and its address before the password is checked."""

    def __init__(self, request: HttpRequest | None, username: str) -> None:
        self.account = account_key(username)
        self.address = client_address(request)
        self.per_account, self.per_address = login_per_account(), login_per_address()
        self.counts: list[tuple[Throttle, str, int]] = []

    def begin(self) -> None:
        """Raises ``Throttled`` while either limit is reached; otherwise counts the attempt."""
        now = time.time()
        subjects = [(self.per_account, self.account), (self.per_address, self.address)]
        wait = max(throttle.locked_for(subject, now) for throttle, subject in subjects)
        if wait:
            raise Throttled(wait, LOGIN_REFUSED)
        self.counts = [(throttle, subject, throttle.count(subject)) for throttle, subject in subjects]
        over = [(throttle, subject) for throttle, subject, count in self.counts if count > throttle.limit]
        if over:
            # Attempts sent together all passed the check above: only the first ``limit`` go on.
            logger.warning("log-in refused: %s over the limit", ", ".join(throttle.scope for throttle, _ in over))
            raise Throttled(max(throttle.lock(subject, now) for throttle, subject in over), LOGIN_REFUSED)

    def failed(self) -> None:
        now = time.time()
        for throttle, subject, count in self.counts:
            if count >= throttle.limit:
                logger.warning("log-in locked for %d s: %s reached its limit", throttle.period, throttle.scope)
                throttle.lock(subject, now)

    def succeeded(self) -> None:
        # The account's count starts again; the address keeps its failures (this attempt was not one).
        self.per_account.reset(self.account)
        self.per_address.uncount(self.address)


class ThrottledLoginMixin:
    """For Django's ``AuthenticationForm``s: the password is checked only while neither limit is reached."""

    request: HttpRequest | None
    cleaned_data: dict[str, Any]
    user_cache: Any
    retry_after: int | None = None

    def clean(self) -> dict[str, Any]:
        username, password = self.cleaned_data.get("username"), self.cleaned_data.get("password")
        if username is None or not password:
            return super().clean()  # type: ignore[misc]
        attempt = LoginAttempt(self.request, str(username))
        try:
            attempt.begin()
        except Throttled as exc:
            self.retry_after = exc.retry_after
            raise
        try:
            cleaned: dict[str, Any] = super().clean()  # type: ignore[misc]
        except forms.ValidationError:
            # With the right password but not allowed in here (inactive, not staff) it was no guess.
            if self.user_cache is None:
                attempt.failed()
            else:
                attempt.succeeded()
            raise
        attempt.succeeded()
        return cleaned


class ThrottledAuthenticationForm(ThrottledLoginMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottledLoginMixin, AdminAuthenticationForm):
    pass


Response = TypeVar("Response", bound=HttpResponseBase)


def refused_with_retry_after(response: Response, retry_after: int | None) -> Response:
    """The page answered for a throttled form, as 429 with ``Retry-After``; any other page as it is."""
    if retry_after:
        response.status_code = 429
        response["Retry-After"] = str(retry_after)
    return response


def throttled_login_response(response: Response) -> Response:
    """A log-in view's page, made 429 when its form was throttled (the form is in its template context)."""
    context = getattr(response, "context_data", None) or {}
    form = context.get("form")
    return refused_with_retry_after(response, getattr(form, "retry_after", None))
