"""API key authentication: ``Authorization: Key <id>:<secret>`` (or ``Bearer``), as fal's clients send it."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from accounts import key_cache
from accounts.models import ApiKey, Organization, User, hash_secret
from accounts.policy import maker_role

logger = logging.getLogger(__name__)

SCHEMES = ("key", "bearer")
# When this process last wrote each key's last_used_at, as a monotonic deadline: until then the shared guard's key
# exists, so asking the cache would only be refused.
_written_until: dict[uuid.UUID, float] = {}
# Compared against when the key id is unknown, so both failures cost the same time.
_DUMMY_HASH = hash_secret("no-such-key")


class InvalidApiKey(exceptions.AuthenticationFailed):
    default_detail = "Invalid API key."
    default_code = "invalid_api_key"


class OrganizationSuspended(exceptions.PermissionDenied):
    default_detail = "This organization is suspended. Contact support."
    default_code = "organization_suspended"


@dataclass(frozen=True)
class ApiKeyPrincipal:
    """``request.user`` for a request authenticated by a key: it acts for the key's organization."""

    api_key: ApiKey

    is_authenticated = True
    is_anonymous = False
    is_active = True

    @property
    def organization(self) -> Organization:
        return self.api_key.organization

    @property
    def user(self) -> User | None:
        return self.api_key.created_by

    @property
    def pk(self) -> str:
        return f"key:{self.api_key.pk}"


def authenticate_token(token: str) -> ApiKey:
    """The usable key for ``<id>:<secret>``, or ``AuthenticationFailed`` saying why not."""
    key_id, sep, secret = token.strip().partition(":")
    try:
        key_uuid = uuid.UUID(key_id)
    except ValueError:
        key_uuid = None
    if not sep or key_uuid is None or not secret:
        raise InvalidApiKey("Malformed API key: expected '<key_id>:<secret>'.")
    current = key_cache.generation()
    api_key = key_cache.lookup(key_uuid, current) if current is not None else None
    kept = api_key is not None
    if api_key is None:
        # The maker's current role comes in the same query (a subquery), so the policy costs no extra round trip.
        api_key = (
            ApiKey.objects.select_related("organization", "created_by").with_maker_role().filter(pk=key_uuid).first()
        )
    stored_hash = api_key.secret_hash if api_key else _DUMMY_HASH
    if not hmac.compare_digest(stored_hash, hash_secret(secret)) or api_key is None:
        raise InvalidApiKey()
    if api_key.is_revoked:
        raise InvalidApiKey("This API key has been revoked.", code="api_key_revoked")
    if api_key.is_expired:
        raise InvalidApiKey("This API key has expired.", code="api_key_expired")
    if api_key.organization.is_suspended:
        raise OrganizationSuspended()
    if api_key.created_by_id is not None and maker_role(api_key) is None:
        # As GitHub and fal do: a person's keys stop when they leave the organization or are deactivated.
        raise InvalidApiKey(
            "The member who made this API key is no longer in the organization.", code="api_key_maker_removed"
        )
    wrote = touch_last_used(api_key)
    if current is not None and (wrote or not kept):
        key_cache.keep(api_key, current)  # as it is now, last_used_at included
    return api_key


def touch_last_used(api_key: ApiKey) -> bool:
    """Keeps ``last_used_at`` to within a minute with at most one write per key per minute; True if it wrote.

    While Redis is down the cache keeps this guard in process memory (config/cache.py): one write
    per key per minute per process, so the outage neither skips the touch nor writes per request.
    """
    resolution = settings.API_KEY_LAST_USED_RESOLUTION_SECONDS
    if _written_until.get(api_key.pk, 0.0) > time.monotonic():
        return False  # this process wrote it within the period: the shared guard would refuse anyway
    try:
        first_in_period = cache.add(f"apikey:touched:{api_key.pk}", 1, timeout=resolution)
    except Exception as exc:  # any other cache error costs a write, not the request
        logger.warning("last_used_at throttle unavailable: %s", exc)
        first_in_period = True
    if first_in_period:
        if len(_written_until) >= key_cache.LOCAL_MAX_ENTRIES:
            _written_until.clear()
        _written_until[api_key.pk] = time.monotonic() + resolution
        now = timezone.now()
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
        return True
    return False


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ApiKeyPrincipal, ApiKey] | None:
        header = get_authorization_header(request)
        if not header:
            return None
        try:
            scheme, _, token = header.decode("ascii").partition(" ")
        except UnicodeDecodeError:
            raise InvalidApiKey("Malformed Authorization header.") from None
        if scheme.lower() not in SCHEMES:
            raise InvalidApiKey("Unsupported Authorization scheme: use 'Key <key_id>:<secret>'.")
        api_key = authenticate_token(token)
        return ApiKeyPrincipal(api_key), api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Key realm="api"'
