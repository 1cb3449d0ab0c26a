from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_login_failed
from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import receiver
from django.http import HttpRequest

from accounts import key_cache
from accounts.models import ApiKey, AuditAction, Membership, Organization, User
from accounts.services import Actor, record_audit, revoke_api_key


@receiver([post_save, post_delete], sender=ApiKey)
@receiver([post_save, post_delete], sender=Organization)
@receiver([post_save, post_delete], sender=Membership)
@receiver([post_save, post_delete], sender=User)
def forget_verified_keys(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    """Whatever authentication reads changed: no process may answer from a key it kept (accounts/key_cache.py).
    A new key, a new person and a log-in change nothing a kept key carries."""
    update_fields = kwargs.get("update_fields")
    if created and sender in (ApiKey, User):
        return
    if update_fields is not None and set(update_fields) <= {"last_login", "last_used_at"}:
        return
    key_cache.forget_all()


@receiver(pre_delete, sender=User)
def revoke_keys_of_deleted_person(sender: Any, instance: User, **kwargs: Any) -> None:
    """A person's keys go before the person does. Deleting the row empties their keys' ``created_by``
    (``SET_NULL``), and an empty maker means a key made by no one, which keeps every scope it stores and skips the
    maker checks (accounts.policy): a departed or demoted member's key would come back with its full scopes.
    Revoked through the service, so every process stops answering from a kept key; inside the deletion's
    transaction, so a deletion that fails revokes nothing."""
    made = ApiKey.objects.filter(created_by_id=instance.pk, revoked_at__isnull=True).select_related("organization")
    for api_key in made.order_by("pk"):
        revoke_api_key(api_key=api_key)


@receiver(user_login_failed)
def audit_login_failure(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any) -> None:
    # Django has already masked the password in ``credentials``; keep only who was tried.
    ip = request.META.get("REMOTE_ADDR") if request is not None else None
    record_audit(
        action=AuditAction.LOGIN_FAILED,
        actor=Actor(ip_address=ip),
        metadata={"username": str(credentials.get("username") or credentials.get("email") or "")[:254]},
    )
