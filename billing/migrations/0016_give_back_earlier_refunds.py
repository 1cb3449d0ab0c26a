# The refunds of requests made before the rollups counted them (0015): given back in the rows their usage records
# were added to, as a refund now does (billing.metering.count_as_refunded), so the limits count them too.
#
# One organization at a time, in a transaction of its own under its account's lock, as a refund takes it: its rows'
# refunded amounts are counted again from scratch, from every refund of a request it has. So a refund made meanwhile
# by the code that counts refunds (a release already serving) is counted once whichever commits first, running this
# again changes nothing, and no row is locked longer than its organization's turn.

from datetime import UTC, datetime
from typing import Any

from django.db import migrations, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone


# The UTC hour and day a record's rollup rows start at: billing.periods' cuts, copied (a migration keeps the code it
# ran with, whatever that module becomes).
def _in_utc(moment: datetime) -> datetime:
    if timezone.is_naive(moment):
        raise ValueError(f"{moment!r} has no time zone: its UTC day and month cannot be known.")
    return moment.astimezone(UTC)


def hour_start(moment: datetime) -> datetime:
    return _in_utc(moment).replace(minute=0, second=0, microsecond=0)


def day_start(moment: datetime) -> datetime:
    return _in_utc(moment).replace(hour=0, minute=0, second=0, microsecond=0)


def _give_back(rows: Any, amount: int) -> None:
    rooms = rows.annotate(room=F("cost_micros") - F("refunded_micros")).filter(room__gt=0).order_by("pk")
    for pk, room in rooms.values_list("pk", "room"):
        taken = min(room, amount)
        rows.model.objects.using(rows.db).filter(pk=pk).update(refunded_micros=F("refunded_micros") + taken)
        amount -= taken
        if not amount:
            return


def _refunded_records(usage_records: Any, refunds: Any) -> Any:
    """The records each refund gave back: its request's billed records in the order of their attempts, as far as they
    add up to its amount (an operator may have run the request again after its refund, and billed it again)."""
    for job_id, amount in refunds.values_list("job_id", "amount_micros").order_by("pk"):
        records = usage_records.filter(job_id=job_id, billable=True, cost_micros__gt=0).order_by("attempt_number")
        for record in records:
            if amount < record.cost_micros:
                break
            amount -= record.cost_micros
            yield record


def give_back_earlier_refunds(apps: Any, schema_editor: Any) -> None:
    alias = schema_editor.connection.alias
    Account = apps.get_model("billing", "Account")
    CreditEntry = apps.get_model("billing", "CreditEntry")
    UsageRecord = apps.get_model("billing", "UsageRecord")
    UsageRollup = apps.get_model("billing", "UsageRollup")
    EndUserRollup = apps.get_model("billing", "EndUserRollup")
    ApiKey = apps.get_model("accounts", "ApiKey")
    refunds = CreditEntry.objects.using(alias).filter(kind="refund", job__isnull=False)
    for organization_id in list(refunds.values_list("organization_id", flat=True).distinct().order_by()):
        with transaction.atomic(using=alias):
            accounts = Account.objects.using(alias).select_for_update().filter(pk=organization_id)
            list(accounts.values_list("pk", flat=True))
            usage_rows = UsageRollup.objects.using(alias).filter(organization_id=organization_id)
            tag_rows = EndUserRollup.objects.using(alias).filter(organization_id=organization_id)
            usage_rows.exclude(refunded_micros=0).update(refunded_micros=0)
            tag_rows.exclude(refunded_micros=0).update(refunded_micros=0)
            for record in _refunded_records(
                UsageRecord.objects.using(alias), refunds.filter(organization_id=organization_id)
            ):
                for granularity, start in (("hour", hour_start), ("day", day_start)):
                    rows = usage_rows.filter(
                        granularity=granularity,
                        bucket_start=start(record.recorded_at),
                        endpoint_id=record.endpoint_id,
                        gpu_class=record.gpu_class,
                    )
                    if record.api_key_id is not None:
                        rows = rows.filter(key_id=record.api_key_id)
                    else:  # no key, or one deleted since: the rows of its bucket whose key is gone
                        rows = rows.exclude(Exists(ApiKey.objects.using(alias).filter(pk=OuterRef("key_id"))))
                    _give_back(rows, record.cost_micros)
                if record.end_user:
                    rows = tag_rows.filter(
                        end_user=record.end_user,
                        bucket_start=day_start(record.recorded_at),
                        endpoint_id=record.endpoint_id,
                    )
                    _give_back(rows, record.cost_micros)


class Migration(migrations.Migration):
    atomic = False  # each organization in a transaction of its own

    dependencies = [
        ("billing", "0015_rollup_refunded_micros"),
    ]

    operations = [
        migrations.RunPython(give_back_earlier_refunds, migrations.RunPython.noop, elidable=True),
    ]
