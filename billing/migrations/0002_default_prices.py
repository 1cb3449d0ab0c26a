"""The opening rate card (per GPU-second, per class) and accounts for organizations made before billing."""

from django.db import migrations
from django.utils import timezone

OPENING_PRICES = {"gpu-h100": 1_110, "gpu-a10g": 300, "cpu": 100}  # micro-dollars per GPU-second


def forwards(apps, schema_editor):
    Price = apps.get_model("billing", "Price")
    Account = apps.get_model("billing", "Account")
    Organization = apps.get_model("accounts", "Organization")
    effective_from = timezone.now().replace(year=2020, month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
    for gpu_class, micros in OPENING_PRICES.items():
        Price.objects.get_or_create(
            gpu_class=gpu_class,
            endpoint=None,
            effective_from=effective_from,
            defaults={"unit": "gpu_second", "unit_price_micros": micros, "note": "Opening rate card"},
        )
    for organization in Organization.objects.all():
        Account.objects.get_or_create(organization=organization)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial"), ("accounts", "0001_initial")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
