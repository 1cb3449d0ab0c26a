"""Members and roles, and API keys."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.mail import send_mail
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts.login_protection import HOUR, Throttle, may_email
from accounts.models import ApiKey, Invitation, Membership, Role
from accounts.services import (
    AccountsError,
    Actor,
    change_member_role,
    create_api_key,
    invite_member,
    remove_member,
    revoke_api_key,
    revoke_invitation,
)
from billing.api import key_spend_this_month
from billing.models import KeySpendLimit
from dashboard.access import Context, dashboard_view
from dashboard.forms import InviteForm, KeyForm, RoleForm
from dashboard.views.invitations import pending_invitations


def actor_of(request: HttpRequest, context: Context) -> Actor:
    return Actor(user=context.user, ip_address=request.META.get("REMOTE_ADDR"))


@dashboard_view()
def members(request: HttpRequest, context: Context) -> HttpResponse:
    rows = list(
        Membership.objects.filter(organization=context.organization).select_related("user").order_by("user__email")
    )
    for row in rows:
        row.manageable = context.may_manage_member(row)  # type: ignore[attr-defined]
    waiting = pending_invitations(context.organization.pk) if context.can("manage_members") else []
    return render(
        request,
        "dashboard/members.html",
        {
            **context.as_template(),
            "members": rows,
            "invitations": waiting,
            "invite_form": InviteForm(roles=context.givable_roles),
            "role_form": RoleForm(roles=context.givable_roles),
        },
    )


def send_invitation(request: HttpRequest, invitation: Invitation, secret: str, context: Context) -> None:
    """The link that joins: it shows the organization, the role and who invites, and joins only when the person
    signed in with the address says so (``dashboard.views.invitations``)."""
    link = request.build_absolute_uri(reverse("invitation_link", args=[secret]))
    days = max(settings.INVITATION_MAX_AGE_SECONDS // 86400, 1)
    send_mail(
        subject=f"You are invited to {context.organization.name}",
        message=(
            f"{context.user.email} invited you to the organization {context.organization.name} "
            f"as {invitation.get_role_display().lower()}.\n\n"
            f"To accept (or decline), open: {link}\n\n"
            f"The link works for {days} day{'s' if days != 1 else ''}. If you do not know this organization, "
            "ignore this email: nothing happens unless you accept.\n"
        ),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=[invitation.email],
    )


# Invitations emailed per organization an hour: an organization's name is in the email, so without a cap anyone
# who signs up could mail any number of addresses through us.
INVITATIONS_PER_HOUR = 20


def _may_invite(context: Context, email: str) -> bool:
    """Whether one more invitation may go out: the organization's hourly cap, and the cap on emails to any one
    address that sign-up and password resets share (``may_email``)."""
    invitations = Throttle("invite-organization", INVITATIONS_PER_HOUR, HOUR)
    return invitations.count(str(context.organization.pk)) <= INVITATIONS_PER_HOUR and may_email(email)


@require_POST
@dashboard_view("manage_members")
def invite(request: HttpRequest, context: Context) -> HttpResponse:
    _may_give(context, request.POST.get("role"))
    form = InviteForm(request.POST, roles=context.givable_roles)
    if not form.is_valid():
        messages.error(request, "Give a valid email address and a role.")
        return redirect("dashboard:members")
    email, actor = form.cleaned_data["email"].lower(), actor_of(request, context)
    if Membership.objects.filter(organization=context.organization, user__email__iexact=email).exists():
        messages.error(request, f"{email} is already a member.")
        return redirect("dashboard:members")
    if not _may_invite(context, email):
        messages.error(request, "Too many invitations this hour: try again later.")
        return redirect("dashboard:members")
    try:
        invitation, secret = invite_member(
            organization=context.organization, email=email, role=form.cleaned_data["role"], actor=actor
        )
    except AccountsError as exc:
        messages.error(request, str(exc))
        return redirect("dashboard:members")
    send_invitation(request, invitation, secret, context)
    messages.success(request, f"Invitation sent to {email}: they join when they accept it.")
    return redirect("dashboard:members")


@require_POST
@dashboard_view("manage_members", while_suspended=True)  # takes access away: allowed while suspended
def revoke_invitation_view(request: HttpRequest, context: Context, invitation_id: int) -> HttpResponse:
    invitation = get_object_or_404(Invitation, pk=invitation_id, organization=context.organization)
    revoke_invitation(invitation=invitation, actor=actor_of(request, context))
    messages.success(request, f"The invitation to {invitation.email} was withdrawn.")
    return redirect("dashboard:members")


@require_POST
@dashboard_view("manage_members")
def change_role(request: HttpRequest, context: Context, membership_id: int) -> HttpResponse:
    """Within ``accounts.policy.may_manage_member`` and ``may_give_role``: an owner's role, and the owner role, are an
    owner's to give; 403 for a member who may not (the page offers them no such choice)."""
    membership = get_object_or_404(Membership, pk=membership_id, organization=context.organization)
    _may_manage(context, membership)
    _may_give(context, request.POST.get("role"))
    form = RoleForm(request.POST, roles=context.givable_roles)
    if form.is_valid():
        try:
            change_member_role(membership=membership, role=form.cleaned_data["role"], actor=actor_of(request, context))
            messages.success(request, f"{membership.user.email} is now {form.cleaned_data['role']}.")
        except AccountsError as exc:
            messages.error(request, str(exc))
    return redirect("dashboard:members")


@require_POST
@dashboard_view("manage_members", while_suspended=True)  # takes access away: allowed while suspended
def remove(request: HttpRequest, context: Context, membership_id: int) -> HttpResponse:
    membership = get_object_or_404(Membership, pk=membership_id, organization=context.organization)
    _may_manage(context, membership)
    try:
        remove_member(membership=membership, actor=actor_of(request, context))
        messages.success(request, f"{membership.user.email} was removed.")
    except AccountsError as exc:
        messages.error(request, str(exc))
    return redirect("dashboard:members")


def _may_manage(context: Context, membership: Membership) -> None:
    if not context.may_manage_member(membership):
        raise PermissionDenied(
            f"Your role ({context.membership.get_role_display()}) cannot change or remove an owner: ask an owner."
        )


def _may_give(context: Context, role: str | None) -> None:
    """403 for a role there is that this member may not give (``accounts.policy.may_give_role``); an unknown one is
    the form's to refuse."""
    if role in Role.values and role not in context.givable_roles:
        label = Role(role).label.lower()
        raise PermissionDenied(f"Your role ({context.membership.get_role_display()}) cannot make someone {label}.")


@dashboard_view("manage_keys")
def keys(request: HttpRequest, context: Context) -> HttpResponse:
    form = KeyForm(request.POST or None, grantable=context.grantable_scopes)
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            api_key, token = create_api_key(
                organization=context.organization,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                created_by=context.user,
                actor=actor_of(request, context),
            )
        except AccountsError as exc:
            messages.error(request, str(exc))
        else:
            created = {"key": api_key, "token": token}
            form = KeyForm(grantable=context.grantable_scopes)
    rows = list(
        ApiKey.objects.filter(organization=context.organization).select_related("created_by").order_by("-created_at")
    )
    # Each key's spend this month and its monthly limit: two queries, whatever the number of keys.
    spend = key_spend_this_month(context.organization.pk)
    limits = dict(KeySpendLimit.objects.filter(api_key__in=rows).values_list("api_key_id", "monthly_limit_micros"))
    for row in rows:
        row.spent_this_month = spend.get(str(row.pk), 0)  # type: ignore[attr-defined]
        row.monthly_limit = limits.get(row.pk)  # type: ignore[attr-defined]
        row.revocable = context.may_revoke(row)  # type: ignore[attr-defined]
    return render(
        request, "dashboard/keys.html", {**context.as_template(), "keys": rows, "form": form, "created": created}
    )


@require_POST
@dashboard_view("manage_keys", while_suspended=True)  # takes access away: allowed while suspended
def revoke_key(request: HttpRequest, context: Context, key_id: str) -> HttpResponse:
    """A key the member made, or one their role could make (``accounts.policy.may_revoke``); 403 for the others."""
    api_key = get_object_or_404(ApiKey, pk=key_id, organization=context.organization)
    if not context.may_revoke(api_key):
        raise PermissionDenied(
            f"Your role ({context.membership.get_role_display()}) cannot revoke a key with the scopes "
            f"{', '.join(api_key.scopes)}: ask an owner or admin."
        )
    revoke_api_key(api_key=api_key, actor=actor_of(request, context))
    messages.success(request, f"The key “{api_key.name}” is revoked; requests with it fail from now on.")
    return redirect("dashboard:keys")
