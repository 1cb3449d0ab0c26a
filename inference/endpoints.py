"""Endpoints kept in this process's memory: every submission reads its endpoint by path, and every close by id.

Operators change endpoints a few times a month; each change reaches every process's kept answers at once
(``accounts/memo.py``; ``inference/signals.py`` announces them).
"""

from __future__ import annotations

from accounts.memo import GenerationMemo
from inference.models import Endpoint

_by_path: GenerationMemo[Endpoint | None] = GenerationMemo("endpoints")
_by_id: GenerationMemo[Endpoint] = GenerationMemo("endpoints by id")


def active_by_path(owner: str, model: str, path: str = "") -> Endpoint | None:
    """The active endpoint served at ``owner/model[/path]``, or None."""
    return _by_path.get((owner, model, path), lambda _kept: Endpoint.objects.by_path(owner, model, path))


def by_id(endpoint_id: int) -> Endpoint:
    """The endpoint with this primary key, active or not (a job keeps the endpoint it was submitted to)."""
    return _by_id.get(endpoint_id, lambda _kept: Endpoint.objects.get(pk=endpoint_id))
