"""Sign up, log in, password reset and the organization switcher.

Log in and password reset are Django's views with throttled forms (accounts/login_protection.py). Sign-up
proves the address before anything is created: the form only sends an email, the same page follows whether
or not the address has an account (a link to choose a password, or a note to the owner that someone tried),
so neither sign-up nor password reset tells anyone which addresses have accounts. A password reset does not tell by
its time either: the request hands the address to a worker (``dashboard.tasks``), which looks it up and sends the link
(a thread of the web process does, when the broker is down).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import current_app
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.core import signing
from django.core.mail import send_mail
from django.db import connections
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse, reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts.login_protection import (
    ThrottledAuthenticationForm,
    check_form_post,
    may_email,
    refused_with_retry_after,
    throttled_login_response,
    unlock_account,
)
from accounts.models import User
from accounts.services import AccountsError, Actor, sign_up
from dashboard.access import SESSION_KEY, resolve
from dashboard.forms import ChoosePasswordForm, PasswordResetForm, SignUpForm, send_password_reset_email
from dashboard.tasks import RESET_TASK

logger = logging.getLogger(__name__)

SIGNUP_SALT = "dashboard.signup"


class LoginView(auth_views.LoginView):
    template_name = "dashboard/auth/login.html"
    authentication_form = ThrottledAuthenticationForm

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return throttled_login_response(super().post(request, *args, **kwargs))


class PasswordResetView(auth_views.PasswordResetView):
    template_name = "dashboard/auth/password_reset_form.html"
    form_class = PasswordResetForm
    success_url = reverse_lazy("password_reset_done")

    def form_valid(self, form: Any) -> HttpResponse:
        """Hands the address to a worker and answers at once, whether or not an account has it: looking it up, making
        the token and sending the email (Django's does them here) would make the answer slower for an address that
        has an account than for one that has none."""
        request_password_reset(
            email=form.cleaned_data["email"], domain=self.request.get_host(), use_https=self.request.is_secure()
        )
        return HttpResponseRedirect(self.get_success_url())

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        refusal = check_form_post(request, "password-reset")
        if refusal is None:
            return super().post(request, *args, **kwargs)
        form = self.get_form()
        form.is_valid()
        form.add_error(None, refusal)
        return refused_with_retry_after(self.form_invalid(form), refusal.retry_after)


def request_password_reset(*, email: str, domain: str, use_https: bool) -> None:
    """One message for the worker, the same for every address. A broker that is down does not lose it: the email is
    looked up and sent by a thread of this process instead (logged), after the answer as a worker would, so the
    answer is still the same, in content and in time, for every address."""
    try:
        current_app.send_task(RESET_TASK, args=[email, domain, use_https], retry=False)
    except Exception as exc:
        logger.warning("broker refused a password reset email: %s; sending it from this process", exc)
        threading.Thread(
            target=_send_here,
            kwargs={"email": email, "domain": domain, "use_https": use_https},
            name="password-reset",
            daemon=True,
        ).start()


def _send_here(*, email: str, domain: str, use_https: bool) -> None:
    """The worker's half of a password reset, on a thread of the web process; its database connection closed at the
    end (Django opens one per thread, and a thread's is never closed for it)."""
    try:
        send_password_reset_email(email=email, domain=domain, use_https=use_https)
    except Exception:
        logger.exception("a password reset email could not be sent")
    finally:
        connections.close_all()


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    template_name = "dashboard/auth/password_reset_confirm.html"
    success_url = reverse_lazy("password_reset_complete")

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        # Someone else's failures may have locked the account: its owner, with a new password, may log in now.
        unlock_account(form.user.email)
        return response


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("dashboard:home")
    form = SignUpForm(request.POST or None)
    if request.method == "POST":
        refusal = check_form_post(request, "signup")
        if refusal is not None:
            form.is_valid()
            form.add_error(None, refusal)
            response = render(request, "dashboard/auth/signup.html", {"form": form})
            refused_with_retry_after(response, refusal.retry_after)
            return response
        if form.is_valid():
            send_signup_email(request, email=form.cleaned_data["email"], name=form.cleaned_data["name"])
            return redirect("signup_sent")
    return render(request, "dashboard/auth/signup.html", {"form": form})


def send_signup_email(request: HttpRequest, *, email: str, name: str) -> None:
    """The link that creates the account, or, if the address has one, a note to its owner (one email either way)."""
    if User.objects.filter(email__iexact=email).exists():
        subject, template = "Someone tried to sign up with your email address", "dashboard/auth/signup_exists_email.txt"
        context = {
            "email": email,
            "login_url": request.build_absolute_uri(reverse("login")),
            "reset_url": request.build_absolute_uri(reverse("password_reset")),
        }
    else:
        token = signing.dumps({"email": email, "name": name}, salt=SIGNUP_SALT, compress=True)
        subject, template = "Confirm your email address", "dashboard/auth/signup_email.txt"
        context = {"email": email, "link": request.build_absolute_uri(reverse("signup_confirm", args=[token]))}
    if may_email(email):
        send_mail(subject, render_to_string(template, context), None, [email])


def signup_sent(request: HttpRequest) -> HttpResponse:
    return render(
        request, "dashboard/auth/signup_sent.html", {"link_hours": max(settings.SIGNUP_LINK_MAX_AGE_SECONDS // 3600, 1)}
    )


def signup_confirm(request: HttpRequest, token: str) -> HttpResponse:
    """The emailed link: choose a password, and the account is created and logged in."""
    try:
        claim = signing.loads(token, salt=SIGNUP_SALT, max_age=settings.SIGNUP_LINK_MAX_AGE_SECONDS)
        email, name = str(claim["email"]), str(claim.get("name") or "")
    except (signing.BadSignature, KeyError, TypeError):
        return render(request, "dashboard/auth/signup_confirm.html", {"state": "invalid"})
    if User.objects.filter(email__iexact=email).exists():
        return render(request, "dashboard/auth/signup_confirm.html", {"state": "used"})
    form = ChoosePasswordForm(request.POST or None, email=email, name=name)
    if request.method == "POST" and form.is_valid():
        try:
            user = sign_up(
                email=email,
                password=form.cleaned_data["password"],
                name=name,
                actor=Actor(ip_address=request.META.get("REMOTE_ADDR")),
            )
        except AccountsError:  # the same link used twice at once
            return render(request, "dashboard/auth/signup_confirm.html", {"state": "used"})
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("dashboard:home")
    return render(request, "dashboard/auth/signup_confirm.html", {"state": "valid", "form": form, "email": email})


@require_POST
def switch_organization(request: HttpRequest) -> HttpResponse:
    context = resolve(request)
    wanted = request.POST.get("organization", "")
    if context is not None and any(str(m.organization_id) == wanted for m in context.memberships):
        request.session[SESSION_KEY] = wanted
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("dashboard:home")
    return HttpResponseRedirect(target)
