"""The opening rate card (per GPU-second, per class) and accounts for organizations made before billing."""

from django.db import migrations

from billing.rates import ensure_opening_prices


def forwards(apps, schema_editor):
    ensure_opening_prices(apps.get_model("billing", "Price"))
    Account = apps.get_model("billing", "Account")
    for organization in apps.get_model("accounts", "Organization").objects.all():
        Account.objects.get_or_create(organization=organization)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial"), ("accounts", "0001_initial")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
