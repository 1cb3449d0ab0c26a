"""State changes of the platform core, each a function named for what it does.

Each is atomic and writes its audit row in the same transaction (Zulip's ``do_*`` actions).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import (
    ApiKey,
    AuditAction,
    AuditEvent,
    Membership,
    Organization,
    Role,
    Scope,
    User,
    hash_secret,
)


class AccountsError(Exception):
    """A request that is well-formed but not allowed by the rules of the domain."""


@dataclass(frozen=True)
class Actor:
    """Who is acting: a person (dashboard, admin), a key (API), or the system (None for both)."""

    user: User | None = None
    api_key: ApiKey | None = None
    ip_address: str | None = None


SYSTEM = Actor()


def record_audit(
    *,
    action: str,
    actor: Actor = SYSTEM,
    organization: Organization | None = None,
    target: Any = None,
    metadata: dict[str, Any] | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        action=action,
        organization=organization,
        actor_user=actor.user,
        actor_api_key=actor.api_key,
        ip_address=actor.ip_address,
        target_type=target._meta.label_lower if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        metadata=metadata or {},
    )


def _unique_slug(name: str) -> str:
    base = slugify(name)[:48] or "org"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


@transaction.atomic
def create_organization(*, name: str, owner: User, is_personal: bool = False, actor: Actor = SYSTEM) -> Organization:
    organization = Organization.objects.create(name=name, slug=_unique_slug(name), is_personal=is_personal)
    Membership.objects.create(user=owner, organization=organization, role=Role.OWNER)
    record_audit(
        action=AuditAction.MEMBER_ADDED,
        actor=actor,
        organization=organization,
        target=owner,
        metadata={"role": Role.OWNER},
    )
    return organization


@transaction.atomic
def sign_up(*, email: str, password: str | None, name: str = "", actor: Actor = SYSTEM) -> User:
    """A new person and their personal organization, which they own."""
    email = User.objects.normalize_email(email).lower()
    if User.objects.filter(email__iexact=email).exists():
        raise AccountsError("An account with this email address already exists.")
    user = User.objects.create_user(email=email, password=password, name=name)
    organization = create_organization(name=name or email.split("@")[0], owner=user, is_personal=True, actor=actor)
    record_audit(action=AuditAction.USER_SIGNED_UP, actor=actor, organization=organization, target=user)
    return user


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise AccountsError(f"Unknown scopes: {', '.join(unknown)}. Valid scopes: {', '.join(Scope.values)}.")
    if not scopes:
        raise AccountsError("A key needs at least one scope.")
    return sorted(set(scopes))


@transaction.atomic
def create_api_key(
    *,
    organization: Organization,
    name: str,
    scopes: list[str],
    created_by: User | None,
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    actor: Actor = SYSTEM,
) -> tuple[ApiKey, str]:
    """Returns the key and its full token ``<id>:<secret>``, which is never shown again."""
    if expires_at is not None and expires_at <= timezone.now():
        raise AccountsError("expires_at must be in the future.")
    secret = secrets.token_hex(32)
    api_key = ApiKey.objects.create(
        organization=organization,
        created_by=created_by,
        name=name,
        scopes=validate_scopes(scopes),
        secret_hash=hash_secret(secret),
        secret_hint=secret[-4:],
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
    )
    record_audit(
        action=AuditAction.KEY_CREATED,
        actor=actor,
        organization=organization,
        target=api_key,
        metadata={"name": name, "scopes": api_key.scopes},
    )
    return api_key, f"{api_key.id}:{secret}"


@transaction.atomic
def revoke_api_key(*, api_key: ApiKey, actor: Actor = SYSTEM) -> ApiKey:
    """Idempotent: revoking a revoked key changes nothing and audits nothing."""
    updated = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])
    if updated:
        record_audit(action=AuditAction.KEY_REVOKED, actor=actor, organization=api_key.organization, target=api_key)
    return api_key


@transaction.atomic
def change_member_role(*, membership: Membership, role: str, actor: Actor = SYSTEM) -> Membership:
    if role not in Role.values:
        raise AccountsError(f"Unknown role {role!r}. Valid roles: {', '.join(Role.values)}.")
    # Lock the organization's memberships in a fixed order so two demotions cannot race past the check.
    members = list(
        Membership.objects.select_for_update().filter(organization_id=membership.organization_id).order_by("pk")
    )
    current = next(m for m in members if m.pk == membership.pk)
    old_role = current.role
    if old_role == role:
        return current
    owners = [m for m in members if m.role == Role.OWNER]
    if old_role == Role.OWNER and len(owners) == 1:
        raise AccountsError("An organization needs at least one owner; make someone else owner first.")
    current.role = role
    current.save(update_fields=["role"])
    record_audit(
        action=AuditAction.ROLE_CHANGED,
        actor=actor,
        organization=current.organization,
        target=current.user,
        metadata={"from": old_role, "to": role},
    )
    return current


@transaction.atomic
def set_organization_suspended(*, organization: Organization, suspended: bool, actor: Actor = SYSTEM) -> None:
    Organization.objects.filter(pk=organization.pk).update(suspended_at=timezone.now() if suspended else None)
    organization.refresh_from_db(fields=["suspended_at"])
    record_audit(
        action=AuditAction.ORG_SUSPENDED if suspended else AuditAction.ORG_UNSUSPENDED,
        actor=actor,
        organization=organization,
        target=organization,
    )


def organizations_of(user: User) -> list[Organization]:
    return list(Organization.objects.filter(Q(memberships__user=user)).order_by("-is_personal", "name"))
