"""Who is looking, for which organization, and what their role lets them do on the dashboard.

The organization a person works in is kept in their session; every page reads it through
``dashboard_view``, which also checks the role. Nothing outside a membership is ever shown.

A suspended organization (``accounts.services.set_organization_suspended``) is read, not changed: its members
still read every page their role shows (requests, usage and its CSV, statements, receipts), and every other
request is refused with 403, as its API keys are (``organization_suspended``), so nothing is run, bought, made or
granted in it until an operator unsuspends it. The few views that only take access away (revoking a key,
removing a member) or only hide a notice say so with ``while_suspended=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.functional import SimpleLazyObject

from accounts import policy
from accounts.models import ApiKey, Membership, Organization, Role, User
from billing import alerts

SESSION_KEY = "organization_id"

# What a suspended organization's members may still do: read (requests that change nothing).
READING_METHODS = frozenset({"GET", "HEAD"})
# As key authentication words it (accounts.authentication.OrganizationSuspended).
SUSPENDED_DETAIL = "This organization is suspended. Contact support."

# The dashboard asks the one policy every door asks (accounts.policy); a capability is one of its actions.
CAPABILITIES: tuple[str, ...] = policy.ACTIONS


@dataclass(frozen=True)
class Context:
    """The signed-in person, the organization they are acting in and their membership of it."""

    user: User
    membership: Membership
    memberships: list[Membership]

    @property
    def organization(self) -> Organization:
        return self.membership.organization

    def can(self, capability: str) -> bool:
        return policy.role_can(self.membership.role, capability)

    @property
    def suspended(self) -> bool:
        return self.organization.is_suspended

    @property
    def grantable_scopes(self) -> frozenset[str]:
        return policy.grantable_scopes(self.membership.role)

    @property
    def givable_roles(self) -> list[str]:
        """The roles this member may make someone (``accounts.policy.may_give_role``), in the roles' order."""
        return [role for role in Role.values if policy.may_give_role(self.membership.role, role)]

    def may_manage_member(self, membership: Membership) -> bool:
        return policy.may_manage_member(self.membership.role, membership.role)

    def may_revoke(self, api_key: ApiKey) -> bool:
        return policy.may_revoke(self.membership.role, self.user.pk, api_key)

    def as_template(self) -> dict[str, Any]:
        organization_id = self.organization.pk
        return {
            "current": self,
            "can": {name: self.can(name) for name in CAPABILITIES},
            "suspended": self.suspended,  # the banner on top of every page
            # The spend alerts every page shows on top, read only when a page renders them.
            "spend_alerts": SimpleLazyObject(lambda: alerts.recent_alerts(organization_id)),
        }


def resolve(request: HttpRequest) -> Context | None:
    """The person's memberships (one query) and the one their session points at (else the first)."""
    user = request.user
    if not isinstance(user, User):
        return None
    memberships = list(
        Membership.objects.filter(user=user).select_related("organization").order_by("-organization__is_personal")
    )
    if not memberships:
        return None
    wanted = request.session.get(SESSION_KEY)
    current = next((m for m in memberships if str(m.organization_id) == wanted), memberships[0])
    return Context(user=user, membership=current, memberships=memberships)


def dashboard_view(
    capability: str = "view", *, while_suspended: bool = False
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Signed in, a member of an organization, and allowed ``capability`` there; else login or 403.

    While the organization is suspended only reading passes (GET and HEAD), unless ``while_suspended``: a view
    that may run then only takes access away or hides a notice.
    """

    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            context = resolve(request)
            if context is None:
                raise PermissionDenied("You are not a member of any organization.")
            if not context.can(capability):
                raise PermissionDenied(f"Your role ({context.membership.get_role_display()}) cannot do this here.")
            if context.suspended and not while_suspended and request.method not in READING_METHODS:
                return refused_while_suspended(request)
            return view(request, context, *args, **kwargs)

        return wrapped

    return decorate


def refused_while_suspended(request: HttpRequest) -> HttpResponse:
    """403: JSON to the playground's script (it sends JSON and shows ``detail``), the error page to a form."""
    if request.content_type == "application/json":
        return JsonResponse({"detail": SUSPENDED_DETAIL, "error_type": "organization_suspended"}, status=403)
    raise PermissionDenied(SUSPENDED_DETAIL)
