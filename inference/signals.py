"""Endpoint changes reach every process's kept endpoints at once (accounts/memo.py)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from accounts import key_cache
from inference.models import Endpoint


@receiver([post_save, post_delete], sender=Endpoint)
def forget_kept_endpoints(sender: Any, **kwargs: Any) -> None:
    key_cache.forget_all()
