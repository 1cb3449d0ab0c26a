# What refunds gave back of each rollup row's cost (billing.metering.count_as_refunded): the spend that budgets, keys'
# and end users' limits and the budget alerts count is the rows' cost less it (billing.models.net_spend). The refunds
# made before it are given back by the next migration, in a transaction of its own: this one holds the tables'
# exclusive lock to its COMMIT, and every settlement upserts these rows.
#
# Signed columns with a constant default and no CHECK: PostgreSQL adds each in its catalogue alone, without rewriting
# or scanning the table under that lock.

from django.db import migrations, models

HELP = "What was given back of this row's cost by refunds of the requests (billing.ledger.refund_job)."


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0014_credit_entry_stamped"),
    ]

    operations = [
        migrations.AddField(
            model_name="enduserrollup",
            name="refunded_micros",
            field=models.BigIntegerField(db_default=0, default=0, help_text=HELP),
        ),
        migrations.AddField(
            model_name="usagerollup",
            name="refunded_micros",
            field=models.BigIntegerField(db_default=0, default=0, help_text=HELP),
        ),
    ]
