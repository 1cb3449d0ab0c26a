# A spend alert is once per threshold, period and limit (billing.alerts): a budget or a key's limit changed in the
# month re-arms its thresholds. The limit joins the unique constraint as a non-null column, ``limit_key_micros``
# (NULLs never conflict in a unique constraint): the budget or key's limit of the row, 0 for the credit floor,
# filled in here from the rows' ``limit_micros``. Every existing row keeps its key: the old constraint was stricter.
#
# The column comes with a constant default (PostgreSQL adds it in its catalogue alone, without rewriting the table);
# the backfill is one UPDATE of the budget and key rows, a table of a few rows per organization and month.

from typing import Any

from django.db import migrations, models
from django.db.models import F

# Frozen here (billing.models.AlertScope): a migration does not import the application's code.
LIMITED_SCOPES = ("budget", "key")


def fill_limit_keys(apps: Any, schema_editor: Any) -> None:
    spend_alert = apps.get_model("billing", "SpendAlert")
    rows = spend_alert.objects.using(schema_editor.connection.alias)
    rows.filter(scope__in=LIMITED_SCOPES, limit_micros__isnull=False).update(limit_key_micros=F("limit_micros"))


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0016_give_back_earlier_refunds"),
    ]

    operations = [
        migrations.AddField(
            model_name="spendalert",
            name="limit_key_micros",
            field=models.BigIntegerField(
                default=0, help_text="The budget or the key's limit the alert is once for; 0 for the credit floor."
            ),
        ),
        migrations.RunPython(fill_limit_keys, migrations.RunPython.noop, elidable=True),
        migrations.RemoveConstraint(model_name="spendalert", name="spend_alert_once_per_period"),
        migrations.AddConstraint(
            model_name="spendalert",
            constraint=models.UniqueConstraint(
                fields=("organization", "scope", "subject", "threshold", "period", "limit_key_micros"),
                name="spend_alert_once_per_limit",
            ),
        ),
    ]
