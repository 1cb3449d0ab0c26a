"""fal's webhook signatures: ED25519 over the request, the organization, the time and the body, keys as a JWKS.

Every webhook delivery carries these headers beside the Standard Webhooks ones (inference/webhooks.py), made
exactly as fal makes its own, so a receiver written from fal's documentation verifies ours once its JWKS URL
points at us (``GET /.well-known/jwks.json``):

- ``X-Fal-Webhook-Request-Id``: the request id;
- ``X-Fal-Webhook-User-Id``: the organization's id (fal's account);
- ``X-Fal-Webhook-Timestamp``: Unix seconds when the try was signed (receivers allow 5 minutes of skew);
- ``X-Fal-Webhook-Signature``: the hex ED25519 signature of the UTF-8 lines
  ``request id``, ``user id``, ``timestamp`` and the hex SHA-256 of the body, joined by ``\\n``.

fal's receivers try every key of the JWKS, so no header names the key. Keys: ``WEBHOOK_SIGNING_KEY`` signs;
``WEBHOOK_EXTRA_PUBLIC_KEYS`` are published beside it, so a rotation announces the next key before it signs and
keeps the previous one while receivers may still hold it (they cache the JWKS up to a day). Without a configured
key the platform signs with one derived from SECRET_KEY: every process that shares the secret key (the web
process serving the JWKS, the workers signing) agrees on it with nothing stored, and the embedded run keeps its
generated secret key in the data directory, so the webhook key survives restarts with it.

A key's ``x`` is served as base64url *with* its padding: fal's published Python verifier decodes it with
``base64.urlsafe_b64decode``, which refuses unpadded text, and JavaScript's base64url decoders take either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.schema import ApiAutoSchema

REQUEST_ID_HEADER = "X-Fal-Webhook-Request-Id"
USER_ID_HEADER = "X-Fal-Webhook-User-Id"
TIMESTAMP_HEADER = "X-Fal-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"
# The label that sets the derived key apart from everything else made from SECRET_KEY.
DERIVED_KEY_LABEL = b"inference.webhook_signing.ed25519-seed"
# fal asks receivers to cache its JWKS for at most a day; an hour lets a rotation reach them sooner.
JWKS_MAX_AGE_SECONDS = 3600


@dataclass(frozen=True)
class SigningKeys:
    signer: Ed25519PrivateKey
    published: tuple[bytes, ...]  # raw public keys, the signer's first


def _seed() -> bytes:
    configured: bytes | None = settings.WEBHOOK_SIGNING_KEY
    if configured:
        return configured
    return hmac.new(settings.SECRET_KEY.encode(), DERIVED_KEY_LABEL, hashlib.sha256).digest()


@lru_cache(maxsize=4)
def _keys_for(seed: bytes, extra_public_keys: tuple[bytes, ...]) -> SigningKeys:
    signer = Ed25519PrivateKey.from_private_bytes(seed)
    own = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    published = (own, *(key for key in dict.fromkeys(extra_public_keys) if key != own))
    return SigningKeys(signer=signer, published=published)


def signing_keys() -> SigningKeys:
    """The key that signs now and every public key the JWKS publishes (from settings, so tests may change them)."""
    return _keys_for(_seed(), tuple(settings.WEBHOOK_EXTRA_PUBLIC_KEYS))


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def key_id(public_key: bytes) -> str:
    """RFC 7638's thumbprint of the key (its JWK members ``crv``, ``kty``, ``x`` without padding, in order)."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _base64url(public_key).rstrip("=")}, separators=(",", ":")
    )
    return _base64url(hashlib.sha256(canonical.encode()).digest()).rstrip("=")


def public_jwk(public_key: bytes) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _base64url(public_key),
        "kid": key_id(public_key),
        "alg": "EdDSA",
        "use": "sig",
    }


def jwks() -> dict[str, list[dict[str, str]]]:
    """The JSON Web Key Set receivers verify with: the signing key first, then the extra public keys."""
    return {"keys": [public_jwk(key) for key in signing_keys().published]}


def signed_message(*, request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")


def signature_headers(*, request_id: str, user_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """fal's four headers for one try of a delivery whose body is exactly ``body``."""
    stamp = str(timestamp)
    message = signed_message(request_id=request_id, user_id=user_id, timestamp=stamp, body=body)
    return {
        REQUEST_ID_HEADER: request_id,
        USER_ID_HEADER: user_id,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: signing_keys().signer.sign(message).hex(),
    }


class PublicKey(serializers.Serializer[Any]):
    kty = serializers.ChoiceField(choices=["OKP"])
    crv = serializers.ChoiceField(choices=["Ed25519"])
    x = serializers.CharField(help_text="The raw 32-byte public key in base64url, padded.")
    kid = serializers.CharField(help_text="RFC 7638 thumbprint of the key.")
    alg = serializers.ChoiceField(choices=["EdDSA"])
    use = serializers.ChoiceField(choices=["sig"])


class KeySet(serializers.Serializer[Any]):
    keys = PublicKey(many=True)


class JwksView(APIView):
    """The public keys of fal-style webhook signatures: the JWKS fal publishes at ``rest.fal.ai``, for us.

    Public, like the model catalogue: it needs no key, and a request that carries one is authenticated and
    throttled as every API request is."""

    permission_classes = (AllowAny,)
    schema = ApiAutoSchema()

    @extend_schema(
        responses={200: OpenApiResponse(KeySet, description="ED25519 keys; a webhook verifies with any one.")},
        summary="Public keys of webhook signatures (X-Fal-Webhook-Signature)",
    )
    def get(self, request: Request) -> Response:
        response = Response(jwks())
        response["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE_SECONDS}"
        return response
