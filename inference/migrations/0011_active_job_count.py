"""An organization's active jobs kept as a sum of rows by triggers, for the dispatch (``inference.models.ActiveJobCount``).

PostgreSQL only: the triggers on the jobs table, and the rows for the jobs active when they are made. ``CREATE
TRIGGER`` locks the jobs table against writes until this migration commits, so the rows counted here and the changes
the triggers count after it meet exactly. It waits at most 5 s for that lock (``lock_timeout``): a long transaction or
an anti-wraparound vacuum on the table fails the migration, to be run again, rather than holding every job's writes
back behind its wait. SQLite counts the jobs at each dispatch and has no rows.
"""

from __future__ import annotations

from django.db import migrations, models

from accounts.migration_operations import RunSQLOnPostgreSQL

ACTIVE = "('DISPATCHED', 'RUNNING')"
SHARDS = 16  # the shards a job that stops being active is taken from (inference.models.ActiveJobCount)

CREATE = f"""
SET LOCAL lock_timeout = '5s';
CREATE OR REPLACE FUNCTION inference_active_job_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The jobs emptied at once (TRUNCATE fires no row trigger): none is active.
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM inference_activejobcount;
        RETURN NULL;
    END IF;
    -- A job that stops being active: one taken from a shard of its backend's (concurrent finishes meet rarely).
    IF TG_OP <> 'INSERT' AND OLD.status IN {ACTIVE}
       AND (TG_OP = 'DELETE' OR NEW.status NOT IN {ACTIVE} OR NEW.organization_id <> OLD.organization_id) THEN
        INSERT INTO inference_activejobcount AS counted (organization_id, shard, jobs)
        VALUES (OLD.organization_id, 1 + mod(pg_backend_pid(), {SHARDS}), -1)
        ON CONFLICT (organization_id, shard) DO UPDATE SET jobs = counted.jobs - 1;
    END IF;
    -- A job that becomes active: one added to shard 0 (a dispatch's, under the organization's lock).
    IF TG_OP <> 'DELETE' AND NEW.status IN {ACTIVE}
       AND (TG_OP = 'INSERT' OR OLD.status NOT IN {ACTIVE} OR NEW.organization_id <> OLD.organization_id) THEN
        INSERT INTO inference_activejobcount AS counted (organization_id, shard, jobs)
        VALUES (NEW.organization_id, 0, 1)
        ON CONFLICT (organization_id, shard) DO UPDATE SET jobs = counted.jobs + 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER inference_job_active_inserted AFTER INSERT ON inference_job FOR EACH ROW
    WHEN (NEW.status IN {ACTIVE}) EXECUTE FUNCTION inference_active_job_counted();
CREATE TRIGGER inference_job_active_changed AFTER UPDATE OF status, organization_id ON inference_job FOR EACH ROW
    WHEN ((OLD.status IN {ACTIVE}) <> (NEW.status IN {ACTIVE})
          OR (OLD.organization_id <> NEW.organization_id AND (OLD.status IN {ACTIVE} OR NEW.status IN {ACTIVE})))
    EXECUTE FUNCTION inference_active_job_counted();
CREATE TRIGGER inference_job_active_deleted AFTER DELETE ON inference_job FOR EACH ROW
    WHEN (OLD.status IN {ACTIVE}) EXECUTE FUNCTION inference_active_job_counted();
CREATE TRIGGER inference_job_active_truncated AFTER TRUNCATE ON inference_job FOR EACH STATEMENT
    EXECUTE FUNCTION inference_active_job_counted();
INSERT INTO inference_activejobcount (organization_id, shard, jobs)
    SELECT organization_id, 0, COUNT(*) FROM inference_job WHERE status IN {ACTIVE} GROUP BY organization_id;
"""
DROP = """
DROP TRIGGER IF EXISTS inference_job_active_inserted ON inference_job;
DROP TRIGGER IF EXISTS inference_job_active_changed ON inference_job;
DROP TRIGGER IF EXISTS inference_job_active_deleted ON inference_job;
DROP TRIGGER IF EXISTS inference_job_active_truncated ON inference_job;
DROP FUNCTION IF EXISTS inference_active_job_counted();
DELETE FROM inference_activejobcount;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0010_job_archived_at"),
    ]

    operations = [
        migrations.CreateModel(
            name="ActiveJobCount",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("organization_id", models.UUIDField()),
                ("shard", models.SmallIntegerField()),
                ("jobs", models.BigIntegerField(default=0)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("organization_id", "shard"), name="active_job_count_unique")
                ],
            },
        ),
        RunSQLOnPostgreSQL(CREATE, DROP),
    ]
