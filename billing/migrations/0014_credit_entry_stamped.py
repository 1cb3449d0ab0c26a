# Built concurrently on PostgreSQL, so the ledger keeps taking entries meanwhile.
#
# The entries of an organization by their stamp: a statement's balances (``statements.balance_before``) read the
# entries stamped within the closing grace around each end of the month, and the last one before it, as ranges of
# this index instead of a walk through every organization's entries on ``created_at``.

from django.db import migrations, models

from accounts.migration_operations import AddIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("billing", "0013_partition_usage_records"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name="creditentry",
            index=models.Index(fields=["organization", "created_at"], name="credit_entry_stamped"),
        ),
    ]
