from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from accounts.models import AuditAction
from accounts.services import Actor, record_audit


@receiver(user_login_failed)
def audit_login_failure(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any) -> None:
    # Django has already masked the password in ``credentials``; keep only who was tried.
    ip = request.META.get("REMOTE_ADDR") if request is not None else None
    record_audit(
        action=AuditAction.LOGIN_FAILED,
        actor=Actor(ip_address=ip),
        metadata={"username": str(credentials.get("username") or credentials.get("email") or "")[:254]},
    )
