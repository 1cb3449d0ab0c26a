# An attempt's share of its batch's wasted GPU time (inference.engine.batch_shares): recorded, never billed.
#
# A signed column with a constant default and no CHECK: PostgreSQL adds it in its catalogue alone, without rewriting
# or scanning the attempts table under the exclusive lock. The database's default keeps inserts that do not name it
# (a worker of the release before, a bulk load) working.

from django.db import migrations, models

HELP = (
    "GPU time of its batch that did no request's work, recorded with it and never billed "
    "(inference.engine.batch_shares)."
)


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0011_active_job_count"),
    ]

    operations = [
        migrations.AddField(
            model_name="jobattempt",
            name="wasted_ms",
            field=models.BigIntegerField(db_default=0, default=0, help_text=HELP),
        ),
    ]
