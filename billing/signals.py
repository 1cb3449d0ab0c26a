"""Rate card changes reach every process's kept prices at once (billing/pricing.py, accounts/memo.py)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from accounts import key_cache
from billing.models import Price


@receiver([post_save, post_delete], sender=Price)
def forget_kept_prices(sender: Any, **kwargs: Any) -> None:
    key_cache.forget_all()
