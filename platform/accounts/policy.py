"""Who may do what, one table for every door: the dashboard, the ``/v1`` API and the keys people make.

A member's role grants a set of actions. A scope names the actions an API key may take with it, and a
role may grant a scope only when the role itself may take every action of that scope. A key made by a
person acts with its scopes intersected with what that person's role grants *now*: demote the maker and
their keys lose the power at once; remove or deactivate the maker and their keys stop authenticating.
A key made by no person (``created_by`` empty: the system) keeps its scopes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from accounts.models import Membership, Role, Scope

if TYPE_CHECKING:
    from accounts.models import ApiKey

_NOT_LOADED = object()

VIEW = "view"
RUN_MODELS = "run_models"
READ_USAGE = "read_usage"
MANAGE_KEYS = "manage_keys"
MANAGE_MEMBERS = "manage_members"
MANAGE_BILLING = "manage_billing"

ACTIONS: tuple[str, ...] = (VIEW, RUN_MODELS, READ_USAGE, MANAGE_KEYS, MANAGE_MEMBERS, MANAGE_BILLING)

ROLE_ACTIONS: dict[str, frozenset[str]] = {
    Role.OWNER: frozenset(ACTIONS),
    Role.ADMIN: frozenset(ACTIONS),
    Role.DEVELOPER: frozenset({VIEW, RUN_MODELS, READ_USAGE, MANAGE_KEYS}),
    Role.BILLING: frozenset({VIEW, READ_USAGE, MANAGE_BILLING}),
}

# What a key with the scope may do through the API. ``admin`` implies every other scope.
SCOPE_ACTIONS: dict[str, frozenset[str]] = {
    Scope.INFERENCE: frozenset({RUN_MODELS}),
    Scope.USAGE_READ: frozenset({VIEW, READ_USAGE}),
    Scope.ADMIN: frozenset(ACTIONS),
}

# A role grants the scopes whose actions it may all take itself: owner and admin every scope,
# developer ``inference`` and ``usage:read``, billing ``usage:read`` (billing members buy on the dashboard).
ROLE_SCOPES: dict[str, frozenset[str]] = {
    role: frozenset(scope for scope, actions in SCOPE_ACTIONS.items() if actions <= ROLE_ACTIONS[role])
    for role in Role.values
}


def role_can(role: str | None, action: str) -> bool:
    if action not in ACTIONS:
        raise KeyError(f"Unknown action {action!r}: add it to accounts.policy.ACTIONS.")
    return role is not None and action in ROLE_ACTIONS.get(role, frozenset())


def grantable_scopes(role: str | None) -> frozenset[str]:
    """The scopes a member of ``role`` may put on a key (none for no role)."""
    return ROLE_SCOPES.get(role, frozenset()) if role is not None else frozenset()


def scopes_beyond(role: str | None, scopes: list[str]) -> list[str]:
    """The requested scopes ``role`` may not grant, sorted; empty when all are allowed."""
    return sorted(set(scopes) - grantable_scopes(role))


def may_give_role(role: str | None, given: str) -> bool:
    """Whether a member of ``role`` may make someone ``given``, by an invitation or a change of role: only an owner
    makes an owner (an admin who could would make an accomplice one, then remove the owners: ``may_manage_member``)."""
    return role_can(role, MANAGE_MEMBERS) and (given != Role.OWNER or role == Role.OWNER)


def may_manage_member(role: str | None, member_role: str) -> bool:
    """Whether a member of ``role`` may change the role of, or remove, a member of ``member_role``: an owner is changed
    or removed by an owner only. Owners and admins may do everything else alike; without this an admin could remove
    every owner, or demote them, and hold the organization, its keys and its billing alone."""
    return role_can(role, MANAGE_MEMBERS) and (member_role != Role.OWNER or role == Role.OWNER)


def may_revoke(role: str | None, user_id: object, api_key: ApiKey) -> bool:
    """Whether a member of ``role`` (the person ``user_id``) may revoke ``api_key``: a key they made, or one whose
    scopes their role may grant. ``manage_keys`` alone would let a developer revoke the owners' ``admin`` keys and the
    system's, keys they could never make (and that may run the organization's billing or deployments)."""
    return (api_key.created_by_id is not None and api_key.created_by_id == user_id) or not scopes_beyond(
        role, list(api_key.scopes)
    )


def effective_scopes(api_key: ApiKey) -> frozenset[str]:
    """The key's scopes (``admin`` standing for all) that its maker's current role still grants; all of its
    scopes for a key made by no one.

    Reads ``maker_role`` when the key was loaded with ``ApiKey.objects.with_maker_role()`` (authentication
    does, in its one query), else asks the database.
    """
    stored = frozenset(api_key.scopes)
    if api_key.created_by_id is None:
        return stored
    # ``admin`` implies every scope: a demoted maker's admin key keeps what the maker may still grant.
    implied = frozenset(Scope.values) if Scope.ADMIN in stored else stored
    return implied & grantable_scopes(maker_role(api_key))


def maker_role(api_key: ApiKey) -> str | None:
    """The role of the key's maker in the key's organization; None when they left it or are deactivated."""
    loaded = getattr(api_key, "maker_role", _NOT_LOADED)
    if loaded is not _NOT_LOADED:
        return loaded if isinstance(loaded, str) else None
    if api_key.created_by_id is None:
        return None
    return (
        Membership.objects.filter(
            user_id=api_key.created_by_id, organization_id=api_key.organization_id, user__is_active=True
        )
        .values_list("role", flat=True)
        .first()
    )
