"""Creates (once) a demo developer with an organization and API key, and an operator; prints them.

The secrets exist in plain text only in a 0600 file under the data directory, so the embedded run
can print the same credentials on every start without keeping them anywhere else.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import ApiKey, Organization, Scope, User
from accounts.services import create_api_key, sign_up

DEVELOPER_EMAIL = "demo@example.com"
OPERATOR_EMAIL = "admin@example.com"


def credentials_path() -> Path:
    return Path(settings.DATA_DIR) / "demo_credentials.json"


@transaction.atomic
def create_demo() -> dict[str, str]:
    developer_password = secrets.token_urlsafe(12)
    operator_password = secrets.token_urlsafe(12)
    developer = User.objects.filter(email=DEVELOPER_EMAIL).first()
    if developer is None:
        developer = sign_up(email=DEVELOPER_EMAIL, password=developer_password, name="Demo Developer")
    else:
        developer.set_password(developer_password)
        developer.save(update_fields=["password"])
    organization = Organization.objects.get(memberships__user=developer, is_personal=True)
    operator = User.objects.filter(email=OPERATOR_EMAIL).first()
    if operator is None:
        operator = User.objects.create_superuser(email=OPERATOR_EMAIL, password=operator_password, name="Operator")
    else:
        operator.set_password(operator_password)
        operator.save(update_fields=["password"])
    _, token = create_api_key(
        organization=organization,
        name="demo key",
        scopes=[Scope.INFERENCE, Scope.USAGE_READ, Scope.ADMIN],
        created_by=developer,
    )
    return {
        "organization": organization.slug,
        "developer_email": DEVELOPER_EMAIL,
        "developer_password": developer_password,
        "operator_email": OPERATOR_EMAIL,
        "operator_password": operator_password,
        "api_key": token,
    }


def demo_key_works(token: str) -> bool:
    """False once the database was reset or the demo key revoked: then make everything afresh."""
    key_id = token.partition(":")[0]
    return (
        ApiKey.objects.usable()
        .filter(
            pk=key_id,
            organization__suspended_at__isnull=True,
            organization__memberships__user__email=DEVELOPER_EMAIL,
            organization__memberships__user__is_active=True,
        )
        .exists()
    )


class Command(BaseCommand):
    help = "Create the demo organization, user, operator and API key (once) and print them."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="Print the credentials as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        path = credentials_path()
        credentials = json.loads(path.read_text()) if path.exists() else None
        if credentials is None or not demo_key_works(credentials["api_key"]):
            credentials = create_demo()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(json.dumps(credentials, indent=2))
        if options["json"]:
            self.stdout.write(json.dumps(credentials))
            return
        self.stdout.write(
            "\n".join(
                [
                    f"Demo credentials (kept in {path}):",
                    f"  organization : {credentials['organization']}",
                    f"  developer    : {credentials['developer_email']} / {credentials['developer_password']}",
                    f"  operator     : {credentials['operator_email']} / {credentials['operator_password']}",
                    f"  API key      : {credentials['api_key']}",
                ]
            )
        )
