"""Log-in throttling and account enumeration, through the pages (429 with Retry-After).

Every test comes from addresses of its own (``REMOTE_ADDR``), so the counters it fills in the shared cache
never meet another test's.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from django.core import mail, signing
from django.test import Client

from accounts.models import User
from tests.conftest import TEST_PASSWORD
from tests.dashboard.test_password_reset_worker import deliver_reset_emails
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files")]

WRONG = "not the password 1"


def address() -> str:
    """A documentation address (RFC 5737) no other test uses."""
    number = uuid.uuid4().int
    return f"198.51.{number % 256}.{(number >> 8) % 254 + 1}"


def email(name: str) -> str:
    """An address no other test uses (the counters and email caps in the cache outlive a test)."""
    return f"{name}-{uuid.uuid4().hex[:8]}@example.com"


def browser() -> Client:
    return Client(REMOTE_ADDR=address())


def log_in(client: Client, email: str, password: str, path: str = "/auth/login") -> Any:
    return client.post(path, {"username": email, "password": password, "next": "/admin/"})


def assert_throttled(response: Any, wait_up_to: int) -> None:
    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= wait_up_to
    page = response.content.decode()
    assert "Too many failed log-in attempts. Try again in" in page
    assert "_auth_user_id" not in response.wsgi_request.session


@pytest.mark.parametrize("path", ["/auth/login", "/admin/login/"])
def test_fifty_wrong_passwords_then_the_right_one_is_refused(
    path: str, make_user: Callable[..., User], settings: Any
) -> None:
    user = make_user()
    User.objects.filter(pk=user.pk).update(is_staff=True, is_superuser=True)
    client = browser()
    statuses = [log_in(client, user.email, WRONG, path).status_code for _ in range(50)]
    # The first LOGIN_FAILURES_PER_ACCOUNT are checked (the form again, 200); then none is.
    assert statuses == [200] * settings.LOGIN_FAILURES_PER_ACCOUNT + [429] * (50 - settings.LOGIN_FAILURES_PER_ACCOUNT)
    refused = log_in(client, user.email, TEST_PASSWORD, path)
    assert_throttled(refused, settings.LOGIN_LOCKOUT_SECONDS)
    assert "Try again in 15 minutes" in refused.content.decode()
    # Not in, on either door: the account is locked, not the page.
    assert browser().get("/dashboard/").status_code == 302
    assert (
        log_in(
            browser(), user.email, TEST_PASSWORD, "/admin/login/" if path == "/auth/login" else "/auth/login"
        ).status_code
        == 429
    )


def test_an_account_is_locked_whatever_addresses_the_guesses_come_from(
    make_user: Callable[..., User], settings: Any
) -> None:
    user = make_user()
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        assert log_in(browser(), user.email.upper(), WRONG).status_code == 200
    assert_throttled(log_in(browser(), user.email, TEST_PASSWORD), settings.LOGIN_LOCKOUT_SECONDS)


def test_an_address_is_locked_after_guessing_at_many_accounts(make_user: Callable[..., User], settings: Any) -> None:
    user = make_user()
    attacker = browser()
    for n in range(settings.LOGIN_FAILURES_PER_ADDRESS):
        assert log_in(attacker, email(f"victim-{n}"), WRONG).status_code == 200
    assert_throttled(log_in(attacker, user.email, TEST_PASSWORD), settings.LOGIN_LOCKOUT_SECONDS)
    # The account itself is not locked: its owner, elsewhere, gets in.
    assert log_in(browser(), user.email, TEST_PASSWORD).status_code == 302


def test_a_successful_log_in_starts_the_account_count_again(make_user: Callable[..., User], settings: Any) -> None:
    user = make_user()
    client = browser()
    for _ in range(3):  # three rounds of one failure short of the lock, each ended by the right password
        for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT - 1):
            assert log_in(client, user.email, WRONG).status_code == 200
        assert log_in(client, user.email, TEST_PASSWORD).status_code == 302
        client.post("/auth/logout")


def test_a_nonexistent_account_is_locked_like_a_real_one(settings: Any) -> None:
    """A lock-out never tells which addresses have accounts."""
    client, nobody = browser(), email("nobody-here")
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        assert log_in(client, nobody, WRONG).status_code == 200
    assert_throttled(log_in(client, nobody, WRONG), settings.LOGIN_LOCKOUT_SECONDS)


def test_the_lock_ends_by_itself(make_user: Callable[..., User], settings: Any) -> None:
    settings.LOGIN_FAILURES_PER_ACCOUNT = 2
    settings.LOGIN_LOCKOUT_SECONDS = 1
    user = make_user()
    client = browser()
    # Two failures inside the one-second window lock the account (a slow machine may need another go).
    for _ in range(5):
        statuses = [log_in(client, user.email, WRONG).status_code for _ in range(3)]
        if statuses == [200, 200, 429]:
            break
    assert statuses == [200, 200, 429]

    def answered_unlocked() -> Any:
        response = log_in(client, user.email, TEST_PASSWORD)
        return None if response.status_code == 429 else response

    response = wait_until(answered_unlocked, timeout=10, interval=0.1, message="the lock-out period to end")
    assert response.status_code == 302


@pytest.mark.parametrize(("path", "form"), [("/auth/signup", {"name": "x"}), ("/auth/password-reset", {})])
def test_sign_up_and_password_reset_are_throttled_per_address(
    path: str, form: dict[str, str], make_user: Callable[..., User], settings: Any
) -> None:
    settings.AUTH_FORM_POSTS_PER_ADDRESS = 3
    client = browser()
    for n in range(3):
        assert client.post(path, {**form, "email": email(f"someone-{n}")}).status_code == 302
    refused = client.post(path, {**form, "email": email("someone-else")})
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert "Too many requests from your network. Try again in" in refused.content.decode()
    assert browser().post(path, {**form, "email": email("someone-else")}).status_code == 302


# Enumeration: the same answer whether or not an address has an account.


def test_sign_up_with_a_taken_address_answers_as_with_a_new_one(make_user: Callable[..., User]) -> None:
    owner, fresh = make_user(email("owner")), email("fresh")
    client = browser()
    taken = client.post("/auth/signup", {"email": owner.email.upper(), "name": "Mallory"})
    new = client.post("/auth/signup", {"email": fresh, "name": "Mallory"})
    assert (taken.status_code, taken["Location"]) == (new.status_code, new["Location"]) == (302, "/auth/signup/sent")
    assert taken.content == new.content
    page = client.get(taken["Location"]).content.decode()
    assert "Check your email" in page
    assert "already" not in page
    # One email each: the owner is told someone tried (no link that makes an account); the new address gets its link.
    to_owner, to_new = mail.outbox
    assert to_owner.to == [owner.email]
    assert "Someone tried to sign up" in to_owner.subject
    assert "/auth/signup/confirm/" not in to_owner.body
    assert "/auth/password-reset" in to_owner.body
    assert to_new.to == [fresh]
    assert "/auth/signup/confirm/" in to_new.body
    # Nothing was created or changed.
    owner.refresh_from_db()
    assert owner.check_password(TEST_PASSWORD)
    assert not User.objects.filter(email=fresh).exists()


def test_the_sign_up_link_makes_the_account_once_and_a_forged_one_nothing(
    make_user: Callable[..., User],
) -> None:
    client, grace = browser(), email("grace")
    client.post("/auth/signup", {"email": grace, "name": "Grace"})
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/signup/confirm/\S+)", message.body)
    assert link is not None
    forged = link.group(1)[:-3] + ("aaa" if not link.group(1).endswith("aaa") else "bbb")
    assert "This link has expired" in client.get(forged).content.decode()
    assert client.post(forged, {"password": TEST_PASSWORD}).status_code == 200
    assert not User.objects.filter(email=grace).exists()
    assert client.post(link.group(1), {"password": TEST_PASSWORD}).status_code == 302
    user = User.objects.get(email=grace)
    assert (user.name, user.check_password(TEST_PASSWORD)) == ("Grace", True)
    # Used: a second visit cannot set another password.
    other = browser()
    assert other.post(link.group(1), {"password": "another long secret"}).status_code == 200
    user.refresh_from_db()
    assert user.check_password(TEST_PASSWORD)


def test_an_expired_sign_up_link_makes_nothing(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, late = browser(), email("late")
    client.post("/auth/signup", {"email": late})
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/signup/confirm/\S+)", message.body)
    assert link is not None
    # The link's signature is checked a day and a minute later.
    later = time.time() + settings.SIGNUP_LINK_MAX_AGE_SECONDS + 60
    monkeypatch.setattr(signing, "time", SimpleNamespace(time=lambda: later))
    assert "This link has expired" in client.post(link.group(1), {"password": TEST_PASSWORD}).content.decode()
    assert not User.objects.filter(email=late).exists()


def test_password_reset_answers_the_same_and_caps_its_emails(
    make_user: Callable[..., User], settings: Any, sent_tasks: list[Any]
) -> None:
    forgetful = make_user(email("forgetful")).email
    client = browser()
    known = client.post("/auth/password-reset", {"email": forgetful})
    unknown = client.post("/auth/password-reset", {"email": email("stranger")})
    assert (
        (known.status_code, known["Location"])
        == (unknown.status_code, unknown["Location"])
        == (302, "/auth/password-reset/sent")
    )
    for _ in range(settings.AUTH_EMAILS_PER_RECIPIENT + 2):
        assert browser().post("/auth/password-reset", {"email": forgetful}).status_code == 302
    deliver_reset_emails(sent_tasks)
    assert len(mail.outbox) == settings.AUTH_EMAILS_PER_RECIPIENT
    assert {tuple(message.to) for message in mail.outbox} == {(forgetful,)}


def test_a_password_reset_ends_the_accounts_lock(
    make_user: Callable[..., User], settings: Any, sent_tasks: list[Any]
) -> None:
    """Anyone can lock an account by failing on purpose; its owner, proving the mailbox, gets back in at once."""
    user = make_user(email("locked-out"))
    for _ in range(settings.LOGIN_FAILURES_PER_ACCOUNT):
        log_in(browser(), user.email, WRONG)
    owner = browser()
    assert log_in(owner, user.email, TEST_PASSWORD).status_code == 429
    owner.post("/auth/password-reset", {"email": user.email})
    deliver_reset_emails(sent_tasks)
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/password-reset/\S+)", message.body)
    assert link is not None
    form = owner.get(link.group(1), follow=True)
    new_password = "a brand new secret 42"
    saved = owner.post(form.redirect_chain[-1][0], {"new_password1": new_password, "new_password2": new_password})
    assert saved.status_code == 302
    assert log_in(owner, user.email, new_password).status_code == 302
