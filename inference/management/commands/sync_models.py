from typing import Any

from django.core.management.base import BaseCommand

from inference.registry import sync_local_models


class Command(BaseCommand):
    help = "Register every diffusers folder under MODELS_DIR as an endpoint (local/<folder>)."

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(str(sync_local_models()))
