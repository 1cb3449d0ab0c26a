from __future__ import annotations

from typing import Any

from rest_framework.exceptions import NotAuthenticated
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from accounts.models import ApiKey, Organization


class HasScope(BasePermission):
    """The view's ``required_scope`` must be one of the key's scopes (``admin`` implies all)."""

    message = "This API key lacks the required scope."
    code = "insufficient_scope"

    def has_permission(self, request: Request, view: Any) -> bool:
        api_key = request.auth
        if not isinstance(api_key, ApiKey):
            return False
        required = getattr(view, "required_scope", None)
        if required is None:
            return True
        if api_key.has_scope(required):
            return True
        self.message = f"This API key lacks the '{required}' scope."
        return False


def request_api_key(request: Request) -> ApiKey:
    api_key = request.auth
    if not isinstance(api_key, ApiKey):
        raise NotAuthenticated()
    return api_key


def request_organization(request: Request) -> Organization:
    """The tenant a request acts for: the one obvious place tenant scoping starts."""
    return request_api_key(request).organization
