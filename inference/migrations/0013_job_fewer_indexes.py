# Three indexes fewer on the jobs table, each written by every insert and status change of a job:
#
# - the organization's own index (its foreign key's): every look by organization, and a deletion's cascade, is served
#   by the indexes that start with it (organization and creation, organization and status);
# - (status, lease_expires_at) and (status, sent_at): the sweep's looks at running jobs whose lease lapsed and at
#   dispatched jobs not claimed read the (status, gpu_class, dispatched_at) index's range of that status, a few rows.
#   With neither column in an index, a heartbeat (the lease renewed, the progress) and a message sent again are HOT
#   updates: written on the row's page, no index entry at all, where each wrote one in every index of the table.
#
# Dropped CONCURRENTLY on PostgreSQL: the table keeps taking writes meanwhile.

from django.db import migrations, models

from accounts.migration_operations import DropFieldIndexConcurrentlyOnPostgreSQL, RemoveIndexConcurrentlyOnPostgreSQL


class Migration(migrations.Migration):
    atomic = False  # DROP INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("accounts", "0009_invitation"),
        ("inference", "0012_attempt_wasted_ms"),
    ]

    operations = [
        RemoveIndexConcurrentlyOnPostgreSQL(model_name="job", name="job_status_lease"),
        RemoveIndexConcurrentlyOnPostgreSQL(model_name="job", name="job_status_sent"),
        DropFieldIndexConcurrentlyOnPostgreSQL(
            model_name="job",
            name="organization",
            field=models.ForeignKey(
                db_index=False, on_delete=models.deletion.CASCADE, related_name="+", to="accounts.organization"
            ),
        ),
    ]
