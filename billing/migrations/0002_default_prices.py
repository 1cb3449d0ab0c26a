"""The opening rate card (per GPU-second, per class) and accounts for organizations made before billing."""

from datetime import UTC, datetime

from django.db import migrations

# The opening rate card as billing.rates had it when this migration was written, copied: a migration keeps the rows
# it wrote, whatever that module becomes.
OPENING_PRICES = {"gpu-h100": 1_110, "gpu-a10g": 300, "cpu": 100}  # micro-dollars per GPU-second
OPENING_FROM = datetime(2020, 1, 1, tzinfo=UTC)


def forwards(apps, schema_editor):
    Price = apps.get_model("billing", "Price")
    for gpu_class, micros in OPENING_PRICES.items():
        Price.objects.get_or_create(
            gpu_class=gpu_class,
            endpoint=None,
            effective_from=OPENING_FROM,
            defaults={"unit": "gpu_second", "unit_price_micros": micros, "note": "Opening rate card"},
        )
    Account = apps.get_model("billing", "Account")
    for organization in apps.get_model("accounts", "Organization").objects.all():
        Account.objects.get_or_create(organization=organization)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial"), ("accounts", "0001_initial")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
