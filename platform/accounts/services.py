"""State changes of the platform core, each a function named for what it does.

Each is atomic and writes its audit row in the same transaction (Zulip's ``do_*`` actions).
"""

from __future__ import annotations

import enum
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from django.conf import settings
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from accounts import key_cache, policy
from accounts.errors import AppError
from accounts.locking import lock_organization
from accounts.models import (
    ApiKey,
    AuditAction,
    AuditEvent,
    Invitation,
    Membership,
    Organization,
    Role,
    Scope,
    User,
    hash_secret,
)
from accounts.outages import ServiceUnavailable, on_a_new_connection

logger = logging.getLogger(__name__)


class AccountsError(AppError):
    """A request that is well-formed but not allowed by the rules of the domain."""

    status_code = 422
    error_type = "validation_error"


class InsufficientRole(AccountsError):
    """The maker asked for scopes their role may not grant (accounts.policy): a key never outranks its maker."""

    status_code = 403
    error_type = "insufficient_role"


class TooManyKeys(AccountsError):
    """The organization already has as many usable keys as it may (``API_KEYS_PER_ORGANIZATION``)."""

    error_type = "too_many_keys"


DEFAULT_KEYS_PER_ORGANIZATION = 100


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


def _slug_base(name: str) -> str:
    return slugify(name)[:48] or "org"


def _unique_slug(name: str) -> str:
    base = _slug_base(name)
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


# A concurrent create can take the free slug between the check and the insert: then a random suffix, a few times.
_SLUG_ATTEMPTS = 5


def _insert_organization(*, name: str, is_personal: bool) -> Organization:
    slug = _unique_slug(name)
    for _ in range(_SLUG_ATTEMPTS - 1):
        try:
            with transaction.atomic():
                return Organization.objects.create(name=name, slug=slug, is_personal=is_personal)
        except IntegrityError:
            slug = f"{_slug_base(name)}-{secrets.token_hex(3)}"
    return Organization.objects.create(name=name, slug=slug, is_personal=is_personal)


@transaction.atomic
def create_organization(*, name: str, owner: User, is_personal: bool = False, actor: Actor = SYSTEM) -> Organization:
    organization = _insert_organization(name=name, is_personal=is_personal)
    add_member(organization=organization, user=owner, role=Role.OWNER, actor=actor)
    return organization


@transaction.atomic
def sign_up(*, email: str, password: str | None, name: str = "", actor: Actor = SYSTEM) -> User:
    """A new person and their personal organization, which they own."""
    email = User.objects.normalize_email(email).lower()
    taken = AccountsError("An account with this email address already exists.")
    if User.objects.filter(email__iexact=email).exists():
        raise taken
    try:
        # A concurrent sign-up can insert the same address after the check: the unique index has the last word.
        with transaction.atomic():
            user = User.objects.create_user(email=email, password=password, name=name)
    except IntegrityError:
        raise taken from None
    organization = create_organization(name=name or email.split("@")[0], owner=user, is_personal=True, actor=actor)
    record_audit(action=AuditAction.USER_SIGNED_UP, actor=actor, organization=organization, target=user)
    return user


@transaction.atomic
def deactivate_user(*, user: User, actor: Actor = SYSTEM) -> User:
    """The person can no longer log in; organizations where they are the only member are suspended.

    Refused while they are the only owner of an organization that has other members: someone else must be made
    owner first. Idempotent: deactivating an inactive person changes nothing and audits nothing.
    """
    if not User.objects.filter(pk=user.pk, is_active=True).exists():
        user.refresh_from_db(fields=["is_active"])
        return user
    organization_ids = set(Membership.objects.filter(user=user).values_list("organization_id", flat=True))
    # Lock the memberships of all their organizations in one fixed order (the primary key, as change_member_role
    # does), so that nobody is demoted past the checks below.
    members = list(
        Membership.objects.select_for_update(of=("self",))
        .filter(organization_id__in=organization_ids)
        .select_related("organization")
        .order_by("pk")
    )
    by_organization: dict[Any, list[Membership]] = {}
    for membership in members:
        by_organization.setdefault(membership.organization_id, []).append(membership)
    orphaned, solo = [], []
    for organization_members in by_organization.values():
        organization = organization_members[0].organization
        owners = [m.user_id for m in organization_members if m.role == Role.OWNER]
        if len(organization_members) == 1:
            solo.append(organization)
        elif owners == [user.pk]:
            orphaned.append(organization)
    if orphaned:
        names = ", ".join(sorted(str(o) for o in orphaned))
        raise AccountsError(
            f"{user} is the only owner of an organization with other members ({names}): make someone else owner first."
        )
    updated = User.objects.filter(pk=user.pk, is_active=True).update(is_active=False)
    key_cache.forget_all()
    user.is_active = False
    if not updated:
        return user  # deactivated meanwhile by someone else, who did the rest
    _withdraw_invitations_of(user)
    # Keys belong to organizations: one with no other member would keep working with nobody to answer for it.
    for organization in sorted(solo, key=lambda o: str(o.pk)):
        set_organization_suspended(organization=organization, suspended=True, actor=actor)
    record_audit(
        action=AuditAction.USER_DEACTIVATED,
        actor=actor,
        target=user,
        metadata={"suspended_organizations": sorted(str(o.pk) for o in solo)},
    )
    return user


def validate_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise AccountsError(f"Unknown scopes: {', '.join(unknown)}. Valid scopes: {', '.join(Scope.values)}.")
    if not scopes:
        raise AccountsError("A key needs at least one scope.")
    return sorted(set(scopes))


def validate_key_name(name: str) -> str:
    max_length = ApiKey._meta.get_field("name").max_length or 0
    if not name.strip():
        raise AccountsError("A key needs a name.")
    if len(name) > max_length:
        raise AccountsError(f"A key's name has at most {max_length} characters.")
    return name


def validate_expires_at(expires_at: datetime | None) -> datetime | None:
    if expires_at is not None and expires_at <= timezone.now():
        raise AccountsError("expires_at must be in the future.")
    return expires_at


def validate_requests_per_minute(requests_per_minute: int | None) -> int | None:
    if requests_per_minute is not None and requests_per_minute < 1:
        raise AccountsError("requests_per_minute must be at least 1, or empty for the platform default.")
    return requests_per_minute


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
    """Returns the key and its full token ``<id>:<secret>``, which is never shown again.

    A key made by a person carries only scopes their role grants (``InsufficientRole`` otherwise);
    ``created_by=None`` makes a system key, which the policy leaves as asked.

    A database that fails under it (a connection lost as the COMMIT went) may have made the key all the same: its id
    and secret are chosen first, so a new connection tells which, and the key is answered with its token when it is
    there (else it would count against the organization's keys with a secret no one has); ``ServiceUnavailable``
    (503) when it is not, or when the database cannot tell.
    """
    key_id, secret = uuid.uuid4(), secrets.token_hex(32)
    try:
        api_key = _create_api_key(
            key_id=key_id, secret=secret, organization=organization, name=name, scopes=scopes, created_by=created_by,
            expires_at=expires_at, requests_per_minute=requests_per_minute, actor=actor,
        )  # fmt: skip
    except (OperationalError, InterfaceError) as error:
        if connection.in_atomic_block:  # the caller's transaction decides
            raise
        api_key = _stored_key(key_id, error)
    return api_key, f"{api_key.id}:{secret}"


def _stored_key(key_id: uuid.UUID, error: BaseException) -> ApiKey:
    """The key ``key_id`` after its creation's database failed, as a new connection finds it."""
    try:
        stored = on_a_new_connection(lambda: ApiKey.objects.filter(pk=key_id).first())
    except DatabaseError:
        logger.error("key %s: its database failed (%s) and does not answer again", key_id, error)
        raise ServiceUnavailable(
            f"The database failed while the key was being made and cannot tell whether it was. If key {key_id} is in "
            "the organization's list, revoke it (its secret cannot be shown again), then make another."
        ) from error
    if stored is None:
        raise ServiceUnavailable("The database failed while the key was being made; no key was made.") from error
    logger.warning("key %s was made, then its connection failed (%s): answered as made", key_id, error)
    return stored


@transaction.atomic
def _create_api_key(
    *,
    key_id: uuid.UUID,
    secret: str,
    organization: Organization,
    name: str,
    scopes: list[str],
    created_by: User | None,
    expires_at: datetime | None,
    requests_per_minute: int | None,
    actor: Actor,
) -> ApiKey:
    scopes = validate_scopes(scopes)
    if created_by is not None:
        role = (
            Membership.objects.filter(user=created_by, organization=organization, user__is_active=True)
            .values_list("role", flat=True)
            .first()
        )
        beyond = policy.scopes_beyond(role, scopes)
        if beyond:
            raise InsufficientRole(
                f"Your role ({role or 'not a member'}) cannot grant the scope(s): {', '.join(beyond)}. "
                f"It may grant: {', '.join(sorted(policy.grantable_scopes(role))) or 'none'}."
            )
    limit = getattr(settings, "API_KEYS_PER_ORGANIZATION", DEFAULT_KEYS_PER_ORGANIZATION)
    # Two concurrent creations cannot both take the last place; and a change of the maker's spend limit, which takes
    # this lock before it locks the maker's keys (billing.locks.lock_member_keys), sees this key or none made meanwhile.
    lock_organization(organization.pk)
    if ApiKey.objects.filter(organization=organization).usable().count() >= limit:
        raise TooManyKeys(f"An organization has at most {limit} active keys: revoke one first.")
    api_key = ApiKey.objects.create(
        id=key_id,
        organization=organization,
        created_by=created_by,
        name=validate_key_name(name),
        scopes=scopes,
        secret_hash=hash_secret(secret),
        secret_hint=secret[-4:],
        expires_at=validate_expires_at(expires_at),
        requests_per_minute=validate_requests_per_minute(requests_per_minute),
    )
    record_audit(
        action=AuditAction.KEY_CREATED,
        actor=actor,
        organization=organization,
        target=api_key,
        metadata={"name": name, "scopes": api_key.scopes},
    )
    return api_key


class _Unchanged(enum.Enum):
    UNCHANGED = enum.auto()


UNCHANGED: Final = _Unchanged.UNCHANGED


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@transaction.atomic
def update_api_key(
    *,
    api_key: ApiKey,
    name: str | _Unchanged = UNCHANGED,
    requests_per_minute: int | _Unchanged | None = UNCHANGED,
    expires_at: datetime | _Unchanged | None = UNCHANGED,
    actor: Actor = SYSTEM,
) -> ApiKey:
    """Writes only the given columns; a change of rate or expiry is audited from and to.

    Only those columns: a full save would write back a ``revoked_at`` read before a concurrent revocation.
    """
    stored = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    wanted: dict[str, Any] = {}
    if not isinstance(name, _Unchanged):
        wanted["name"] = validate_key_name(name)
    if not isinstance(requests_per_minute, _Unchanged):
        wanted["requests_per_minute"] = validate_requests_per_minute(requests_per_minute)
    if not isinstance(expires_at, _Unchanged) and expires_at != stored.expires_at:
        wanted["expires_at"] = validate_expires_at(expires_at)
    changes = {field: value for field, value in wanted.items() if getattr(stored, field) != value}
    for field, value in wanted.items():
        setattr(api_key, field, value)
    if not changes:
        return api_key
    ApiKey.objects.filter(pk=api_key.pk).update(**changes)
    key_cache.forget_all()
    limits = {
        field: {"from": _jsonable(getattr(stored, field)), "to": _jsonable(value)}
        for field, value in changes.items()
        if field in ("requests_per_minute", "expires_at")
    }
    if limits:
        record_audit(
            action=AuditAction.LIMITS_CHANGED,
            actor=actor,
            organization=stored.organization,
            target=api_key,
            metadata=limits,
        )
    return api_key


@transaction.atomic
def revoke_api_key(*, api_key: ApiKey, actor: Actor = SYSTEM) -> ApiKey:
    """Idempotent: revoking a revoked key changes nothing and audits nothing."""
    updated = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    key_cache.forget_all()
    api_key.refresh_from_db(fields=["revoked_at"])
    if updated:
        record_audit(action=AuditAction.KEY_REVOKED, actor=actor, organization=api_key.organization, target=api_key)
    return api_key


def _validate_role(role: str) -> str:
    if role not in Role.values:
        raise AccountsError(f"Unknown role {role!r}. Valid roles: {', '.join(Role.values)}.")
    return role


def _locked_members(membership: Membership) -> tuple[Membership, list[Membership]]:
    """The membership as stored and all of its organization's, locked in a fixed order (the primary key), so that
    two changes to one organization's owners cannot both pass the last-owner check."""
    members = list(
        Membership.objects.select_for_update().filter(organization_id=membership.organization_id).order_by("pk")
    )
    current = next((m for m in members if m.pk == membership.pk), None)
    if current is None:
        raise AccountsError("This membership no longer exists.")
    return current, members


@transaction.atomic
def add_member(*, organization: Organization, user: User, role: str, actor: Actor = SYSTEM) -> Membership:
    _validate_role(role)
    already = AccountsError(f"{user} is already a member of {organization}.")
    if Membership.objects.filter(organization=organization, user=user).exists():
        raise already
    try:
        with transaction.atomic():  # a concurrent add of the same person: the unique constraint decides
            membership = Membership.objects.create(user=user, organization=organization, role=role)
    except IntegrityError:
        raise already from None
    record_audit(
        action=AuditAction.MEMBER_ADDED,
        actor=actor,
        organization=organization,
        target=user,
        metadata={"role": role},
    )
    return membership


class InvitationUnusable(AccountsError):
    """The invitation link is unknown, expired, already used or withdrawn, or names another address."""

    error_type = "invitation_unusable"


def _invitation_by_secret(secret: str) -> Invitation | None:
    return Invitation.objects.select_related("organization").filter(secret_hash=hash_secret(secret)).first()


@transaction.atomic
def invite_member(
    *, organization: Organization, email: str, role: str, actor: Actor = SYSTEM
) -> tuple[Invitation, str]:
    """An invitation for ``email`` to join ``organization`` as ``role``, and the secret of its link (shown once, in
    the email). Nobody is added until the person accepts (``accept_invitation``); no account is made for a new
    address either: the link proves the address, and the account is made when it is accepted. Inviting an address
    again while its invitation waits gives it a new secret, role and expiry (the old link stops working)."""
    _validate_role(role)
    email = User.objects.normalize_email(email).lower()
    lock_organization(organization.pk)  # one organization's invitations in turn: the unique address stays one row
    if Membership.objects.filter(organization=organization, user__email__iexact=email).exists():
        raise AccountsError(f"{email} is already a member of {organization}.")
    secret = secrets.token_urlsafe(32)
    invitation, _ = Invitation.objects.update_or_create(
        organization=organization,
        email=email,
        defaults={
            "role": role,
            "invited_by": actor.user,
            "secret_hash": hash_secret(secret),
            "created_at": timezone.now(),
            "expires_at": timezone.now() + timedelta(seconds=settings.INVITATION_MAX_AGE_SECONDS),
        },
    )
    record_audit(
        action=AuditAction.MEMBER_INVITED,
        actor=actor,
        organization=organization,
        metadata={"email": email, "role": role},
    )
    return invitation, secret


def _check_usable(invitation: Invitation | None, *, inviter: Membership | None) -> Invitation:
    """``invitation`` if it can be accepted now, else ``InvitationUnusable`` saying why.

    An invitation is a grant its sender makes with their own power, as a key is (``accounts.policy``): it holds only
    while its sender is still an active member who may manage members (``inviter``: their membership as it stands
    now), and may still give its role. An admin removed, demoted or deactivated after inviting someone as admin does
    not make them admin later; an owner made an admin after inviting someone as owner does not make them owner.
    A suspended organization grants nothing until an operator unsuspends it: the invitation waits meanwhile."""
    if invitation is None or invitation.expired:
        raise InvitationUnusable("This invitation link is not valid any more: ask for a new invitation.")
    if inviter is None or not inviter.user.is_active or not policy.role_can(inviter.role, policy.MANAGE_MEMBERS):
        raise InvitationUnusable("Whoever sent this invitation can no longer invite members: ask for a new one.")
    if not policy.may_give_role(inviter.role, invitation.role):
        # An owner who invited someone as owner, then was made an admin (``accounts.policy.may_give_role``).
        raise InvitationUnusable(
            f"Whoever sent this invitation can no longer make someone {invitation.get_role_display().lower()}: "
            "ask for a new one."
        )
    if invitation.organization.is_suspended:
        raise InvitationUnusable(
            f"{invitation.organization.name} is suspended: the invitation can be accepted once it is active again."
        )
    return invitation


def _inviter(invitation: Invitation, *, lock: bool = False) -> Membership | None:
    if invitation.invited_by_id is None:  # the person who sent it was deleted
        return None
    members = Membership.objects.select_related("user")
    if lock:
        members = members.select_for_update(of=("self",))
    return members.filter(organization_id=invitation.organization_id, user_id=invitation.invited_by_id).first()


def waiting_invitation(secret: str) -> Invitation:
    """The invitation a link's secret names, while it can still be accepted; else ``InvitationUnusable``."""
    invitation = _invitation_by_secret(secret)
    return _check_usable(invitation, inviter=_inviter(invitation) if invitation else None)


@transaction.atomic
def accept_invitation(*, secret: str, user: User, actor: Actor = SYSTEM) -> Membership:
    """``user`` joins the organization of the invitation whose link carries ``secret``, with its role, if the
    invitation is for ``user``'s email address and can still be used (``_check_usable``); the invitation is used
    up. Raises ``InvitationUnusable`` otherwise (a link used twice at once: one of the two joins). The sender's
    membership is locked while it is checked: a removal or demotion of theirs waits, or is seen."""
    found = _invitation_by_secret(secret)
    invitation = (
        Invitation.objects.select_for_update(of=("self",)).select_related("organization").filter(pk=found.pk).first()
        if found
        else None
    )
    if invitation is not None and invitation.secret_hash != hash_secret(secret):
        invitation = None  # invited again meanwhile: this link's secret was replaced
    invitation = _check_usable(invitation, inviter=_inviter(invitation, lock=True) if invitation else None)
    if invitation.email.lower() != user.email.lower():
        raise InvitationUnusable(f"This invitation is for {invitation.email}: sign in with that address to accept it.")
    invitation.delete()
    return add_member(organization=invitation.organization, user=user, role=invitation.role, actor=actor)


def _withdraw_invitations_of(user: User, *, organization_ids: list[Any] | None = None) -> None:
    """The invitations ``user`` sent (in ``organization_ids``, or anywhere), once they may no longer invite: they
    could not be accepted any more (``_check_usable``); gone, they no longer show as waiting."""
    sent = Invitation.objects.filter(invited_by=user)
    if organization_ids is not None:
        sent = sent.filter(organization_id__in=organization_ids)
    sent.delete()


@transaction.atomic
def revoke_invitation(*, invitation: Invitation, actor: Actor = SYSTEM) -> None:
    deleted, _ = Invitation.objects.filter(pk=invitation.pk).delete()
    if deleted:
        record_audit(
            action=AuditAction.INVITATION_REVOKED,
            actor=actor,
            organization=invitation.organization,
            metadata={"email": invitation.email, "role": invitation.role},
        )


@transaction.atomic
def remove_member(*, membership: Membership, actor: Actor = SYSTEM) -> None:
    current, members = _locked_members(membership)
    owners = [m for m in members if m.role == Role.OWNER]
    if current.role == Role.OWNER and len(owners) == 1:
        raise AccountsError(
            "An organization needs at least one owner; make someone else owner first, or delete the organization."
        )
    Membership.objects.filter(pk=current.pk).delete()
    _withdraw_invitations_of(current.user, organization_ids=[current.organization_id])
    record_audit(
        action=AuditAction.MEMBER_REMOVED,
        actor=actor,
        organization=current.organization,
        target=current.user,
        metadata={"role": current.role},
    )


@transaction.atomic
def change_member_role(*, membership: Membership, role: str, actor: Actor = SYSTEM) -> Membership:
    _validate_role(role)
    current, members = _locked_members(membership)
    old_role = current.role
    if old_role == role:
        return current
    owners = [m for m in members if m.role == Role.OWNER]
    if old_role == Role.OWNER and len(owners) == 1:
        raise AccountsError("An organization needs at least one owner; make someone else owner first.")
    current.role = role
    current.save(update_fields=["role"])
    if not policy.role_can(role, policy.MANAGE_MEMBERS):
        _withdraw_invitations_of(current.user, organization_ids=[current.organization_id])
    record_audit(
        action=AuditAction.ROLE_CHANGED,
        actor=actor,
        organization=current.organization,
        target=current.user,
        metadata={"from": old_role, "to": role},
    )
    return current


@transaction.atomic
def set_organization_suspended(*, organization: Organization, suspended: bool, actor: Actor = SYSTEM) -> Organization:
    """Idempotent: suspending a suspended organization (or unsuspending an active one) changes nothing and audits
    nothing; in particular ``suspended_at`` keeps the time of the first suspension."""
    updated = Organization.objects.filter(pk=organization.pk, suspended_at__isnull=suspended).update(
        suspended_at=timezone.now() if suspended else None
    )
    key_cache.forget_all()
    organization.refresh_from_db(fields=["suspended_at"])
    if updated:
        record_audit(
            action=AuditAction.ORG_SUSPENDED if suspended else AuditAction.ORG_UNSUSPENDED,
            actor=actor,
            organization=organization,
            target=organization,
        )
    return organization


@transaction.atomic
def set_concurrency_limit(*, organization: Organization, limit: int, actor: Actor = SYSTEM) -> Organization:
    """How many of the organization's jobs may run at once (at least 1). Unchanged: nothing written or audited."""
    if limit < 1:
        raise AccountsError("The concurrency limit must be at least 1.")
    stored = Organization.objects.select_for_update().only("concurrency_limit").get(pk=organization.pk)
    organization.concurrency_limit = limit
    if stored.concurrency_limit == limit:
        return organization
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=limit)
    record_audit(
        action=AuditAction.LIMITS_CHANGED,
        actor=actor,
        organization=organization,
        target=organization,
        metadata={"concurrency_limit": {"from": stored.concurrency_limit, "to": limit}},
    )
    return organization


def organizations_of(user: User) -> list[Organization]:
    return list(Organization.objects.filter(Q(memberships__user=user)).order_by("-is_personal", "name"))
