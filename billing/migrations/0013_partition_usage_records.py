"""Usage records partitioned by UTC month on PostgreSQL, their identity on an unpartitioned key table.

The design and why are in billing/partitions.py. On PostgreSQL this rewrites the table (data kept) under an exclusive
lock: the settlements wait for it, so run it at a quiet hour (10M records: see the README's benchmarks). SQLite keeps a
plain table; the key model exists only in Django's state there.
"""

from datetime import UTC, datetime

from django.db import migrations, models

TABLE = "billing_usagerecord"
OLD = "billing_usagerecord_unpartitioned"
KEY = "billing_usagerecordkey"

# The months as billing.partitions cut and named them when this migration was written, copied: a migration keeps the
# schema it made, whatever that module becomes. One partition per UTC month (billing_usagerecord_p2026_12), from the
# oldest record's month to the third after this one, and a default partition.
MONTHS_AHEAD = 3
DEFAULT_PARTITION = f"{TABLE}_default"


def month_start(moment):
    """The first instant of ``moment``'s UTC month."""
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def next_month(start):
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def create_month_partition(cursor, month):
    # The partitioned table is new, made above in this transaction: no month has its partition yet, and its default
    # partition holds no rows (they are copied in once every month is made), which billing.partitions checks for.
    name = f"{TABLE}_p{month:%Y_%m}"
    start, end = month.isoformat(), next_month(month).isoformat()
    cursor.execute(f"CREATE TABLE \"{name}\" PARTITION OF \"{TABLE}\" FOR VALUES FROM ('{start}') TO ('{end}')")


TRIGGERS = f"""
CREATE FUNCTION billing_usage_record_key_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {KEY} (id, job_id, attempt_number) VALUES (NEW.id, NEW.job_id, NEW.attempt_number)
        ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        -- The id has its key already. Only a row moving to another month (an UPDATE of recorded_at: a delete from
        -- the old partition, which this statement has made, then this insert) may come in under it, as itself.
        IF EXISTS (SELECT 1 FROM {TABLE} WHERE id = NEW.id) OR NOT EXISTS (
            SELECT 1 FROM {KEY} WHERE id = NEW.id AND job_id = NEW.job_id AND attempt_number = NEW.attempt_number
        ) THEN
            RAISE EXCEPTION 'duplicate key value violates unique constraint "{KEY}_pkey"'
                USING ERRCODE = 'unique_violation', DETAIL = format('Key (id)=(%s) already exists.', NEW.id);
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE FUNCTION billing_usage_record_key_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A row that moved months is still there under its id: its key stays.
    DELETE FROM {KEY} WHERE id = OLD.id AND NOT EXISTS (SELECT 1 FROM {TABLE} WHERE id = OLD.id);
    RETURN NULL;
END $$;
CREATE FUNCTION billing_usage_record_identity_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a usage record''s id, job and attempt number are not changed (record %)', OLD.id
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER usage_record_key_insert BEFORE INSERT ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION billing_usage_record_key_insert();
CREATE TRIGGER usage_record_key_delete AFTER DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION billing_usage_record_key_delete();
CREATE TRIGGER usage_record_identity_kept BEFORE UPDATE OF id, job_id, attempt_number ON {TABLE}
    FOR EACH ROW WHEN (
        OLD.id IS DISTINCT FROM NEW.id OR OLD.job_id IS DISTINCT FROM NEW.job_id
        OR OLD.attempt_number IS DISTINCT FROM NEW.attempt_number
    ) EXECUTE FUNCTION billing_usage_record_identity_kept();
"""


def partition_usage_records(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
        # What the plain table has, to be made again on the partitioned one under the same names: its indexes
        # (not the primary key, nor the unique (job, attempt_number), which moves to the key table) and foreign keys.
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname NOT IN (%s, %s)",
            [TABLE, f"{TABLE}_pkey", "usage_one_record_per_attempt"],
        )
        indexes = [row[0] for row in cursor.fetchall()]
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'",
            [TABLE],
        )
        foreign_keys = cursor.fetchall()
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'billing_creditentry'::regclass AND contype = 'f' "
            "AND confrelid = %s::regclass",
            [TABLE],
        )
        (entry_foreign_key,) = cursor.fetchone()

        cursor.execute(
            f"CREATE TABLE {KEY} (id bigint NOT NULL, job_id uuid NOT NULL, "
            "attempt_number integer NOT NULL CHECK (attempt_number >= 0))"
        )
        cursor.execute(f"INSERT INTO {KEY} (id, job_id, attempt_number) SELECT id, job_id, attempt_number FROM {TABLE}")

        cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {OLD}")
        cursor.execute(
            f"CREATE TABLE {TABLE} (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY) "
            "PARTITION BY RANGE (recorded_at)"
        )
        cursor.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")
        cursor.execute(f"SELECT min(recorded_at) FROM {OLD}")
        (oldest,) = cursor.fetchone()
        month = month_start(oldest or _now())
        last = month_start(_now())
        for _ in range(MONTHS_AHEAD):
            last = next_month(last)
        while month <= last:
            create_month_partition(cursor, month)
            month = next_month(month)
        cursor.execute(f"INSERT INTO {TABLE} SELECT * FROM {OLD}")
        cursor.execute(f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), coalesce(max(id), 0) + 1, false) FROM {OLD}")

        cursor.execute(f"ALTER TABLE billing_creditentry DROP CONSTRAINT {entry_foreign_key}")
        cursor.execute(f"DROP TABLE {OLD}")
        cursor.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, recorded_at)")
        cursor.execute(f"ALTER TABLE {KEY} ADD CONSTRAINT {KEY}_pkey PRIMARY KEY (id)")
        cursor.execute(
            f"ALTER TABLE {KEY} ADD CONSTRAINT usage_one_record_per_attempt UNIQUE (job_id, attempt_number)"
        )
        for definition in indexes:
            cursor.execute(definition)
        for name, definition in foreign_keys:
            cursor.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {name} {definition}")
        cursor.execute(
            f"ALTER TABLE {TABLE} ADD CONSTRAINT usage_record_has_key FOREIGN KEY (id) REFERENCES {KEY} (id) "
            "DEFERRABLE INITIALLY DEFERRED"
        )
        cursor.execute(
            f"ALTER TABLE billing_creditentry ADD CONSTRAINT {entry_foreign_key} FOREIGN KEY (usage_record_id) "
            f"REFERENCES {KEY} (id) DEFERRABLE INITIALLY DEFERRED"
        )
        cursor.execute(TRIGGERS)
        cursor.execute(f"ANALYZE {TABLE}")
        cursor.execute(f"ANALYZE {KEY}")


def _now():
    from django.utils import timezone

    return timezone.now()


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0012_end_user_rollup_media_seconds"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="UsageRecordKey",
                    fields=[
                        ("id", models.BigIntegerField(help_text="The usage record's id.", primary_key=True, serialize=False)),
                        ("job_id", models.UUIDField()),
                        ("attempt_number", models.PositiveIntegerField()),
                    ],
                    options={"db_table": "billing_usagerecordkey"},
                ),
            ],
            database_operations=[migrations.RunPython(partition_usage_records, migrations.RunPython.noop)],
        ),
    ]
