"""An invitation's link: the invited person joins the organization, or says no, or makes their account first.

Nobody is made a member of an organization by someone else alone (``accounts.services.invite_member``): the
emailed link shows who invites them where and with which role, and only a POST by the person signed in with the
invited address joins. Without an account yet, the link proves the address as a sign-up link does: choosing a
password makes the account (with its personal organization) and joins at once. Signed in with another address,
the page says which address to sign in with and joins nothing.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache

from accounts.login_protection import check_form_post, refused_with_retry_after
from accounts.models import Invitation, User
from accounts.services import (
    AccountsError,
    Actor,
    InvitationUnusable,
    accept_invitation,
    revoke_invitation,
    sign_up,
    waiting_invitation,
)
from dashboard.access import SESSION_KEY
from dashboard.forms import ChoosePasswordForm

TEMPLATE = "dashboard/auth/invitation.html"
# The link's secret, kept in the session once the link is opened: the page that follows has a URL without it, so
# the secret is not in the access logs, the browser's history or a Referer after the first request (Django's
# password reset does the same with its token).
SESSION_SECRET = "_invitation_secret"  # noqa: S105 - a session key's name


def open_link(request: HttpRequest, secret: str) -> HttpResponse:
    """The emailed link: its secret goes to the session, and the browser to the invitation's page."""
    request.session[SESSION_SECRET] = secret
    return redirect("invitation")


@never_cache
def invitation(request: HttpRequest) -> HttpResponse:
    secret = str(request.session.get(SESSION_SECRET, ""))
    if not secret:  # a new session (signed out since, another browser): the link again
        reason = "Open the link in your invitation email to see the invitation."
        return render(request, TEMPLATE, {"state": "unusable", "reason": reason}, status=404)
    try:
        waiting = waiting_invitation(secret)
    except InvitationUnusable as exc:
        return render(request, TEMPLATE, {"state": "unusable", "reason": str(exc)}, status=404)
    page = {"invitation": waiting, "organization": waiting.organization}
    actor = Actor(
        user=request.user if request.user.is_authenticated else None, ip_address=request.META.get("REMOTE_ADDR")
    )
    if request.user.is_authenticated:
        if request.user.email.lower() != waiting.email.lower():
            return render(request, TEMPLATE, {**page, "state": "other_address"}, status=403)
        if request.method == "POST":
            if request.POST.get("answer") == "decline":
                revoke_invitation(invitation=waiting, actor=actor)
                request.session.pop(SESSION_SECRET, None)
                messages.info(request, f"You declined the invitation to {waiting.organization.name}.")
                return redirect("dashboard:home")
            return _joined(request, secret, request.user, actor)
        return render(request, TEMPLATE, {**page, "state": "signed_in"})
    if User.objects.filter(email__iexact=waiting.email).exists():
        login_url = f"{reverse('login')}?next={reverse('invitation')}"
        return render(request, TEMPLATE, {**page, "state": "sign_in", "login_url": login_url})
    form = ChoosePasswordForm(request.POST or None, email=waiting.email, name="")
    if request.method == "POST":
        refusal = check_form_post(request, "signup")
        if refusal is not None:
            form.is_valid()
            form.add_error(None, refusal)
            response = render(request, TEMPLATE, {**page, "state": "new_account", "form": form})
            return refused_with_retry_after(response, refusal.retry_after)
        if form.is_valid():
            try:
                user = sign_up(email=waiting.email, password=form.cleaned_data["password"], actor=actor)
            except AccountsError:  # the address got an account meanwhile (this link used twice at once)
                return redirect("invitation")
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return _joined(request, secret, user, Actor(user=user, ip_address=actor.ip_address))
    return render(request, TEMPLATE, {**page, "state": "new_account", "form": form})


def _joined(request: HttpRequest, secret: str, user: User, actor: Actor) -> HttpResponse:
    try:
        membership = accept_invitation(secret=secret, user=user, actor=actor)
    except AccountsError as exc:  # used or withdrawn meanwhile, or already a member
        return render(request, TEMPLATE, {"state": "unusable", "reason": str(exc)}, status=409)
    request.session.pop(SESSION_SECRET, None)
    request.session[SESSION_KEY] = str(membership.organization_id)
    messages.success(request, f"You joined {membership.organization.name} ({membership.get_role_display()}).")
    return redirect("dashboard:home")


def pending_invitations(organization_id: Any) -> list[Invitation]:
    return list(Invitation.objects.filter(organization_id=organization_id).order_by("email"))
