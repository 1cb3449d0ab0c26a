# Built concurrently on PostgreSQL, so the inbox keeps taking Stripe's deliveries meanwhile.
#
# A partial index of the Stripe events not processed yet (pending, or failed and retried): /metrics counts the
# inbox's backlog and the sweep finds its due events from it, instead of reading every event ever received.

from django.db import migrations, models

from accounts.migration_operations import AddIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("billing", "0008_billing_documents"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgreSQL(
            model_name="stripeevent",
            index=models.Index(
                condition=models.Q(("status__in", ["pending", "failed"])),
                fields=["received_at"],
                name="stripe_event_unprocessed",
            ),
        ),
    ]
