"""The billing benchmark's bulk load (``tests.bench.billing.load_books``) leaves the books' tables indexed as the
migrations made them: its figures are those of the schema the platform runs, not of partitions without indexes."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

from billing.models import CreditEntry, UsageRecord
from inference.models import Job, JobAttempt
from tests.bench import billing as bench

postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="the bulk load mode is PostgreSQL's")
TABLES = [model._meta.db_table for model in (Job, JobAttempt, UsageRecord, CreditEntry)]


def indexes() -> set[tuple[str, str, str, bool, bool]]:
    with connection.cursor() as cursor:
        return bench.index_definitions(cursor, TABLES)


def invalid_indexes() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid")
        return [name for (name,) in cursor.fetchall()]


@pytest.mark.django_db
@postgresql_only
def test_every_partition_has_its_indexes_after_a_bulk_load(capsys: Any) -> None:
    before = indexes()
    usage_partitions = {row[0] for row in before if row[0].startswith(f"{UsageRecord._meta.db_table}_")}
    assert len(usage_partitions) >= 2  # this month's, the months ahead and the default one
    # Each partition has an index of its own for every index of the partitioned table.
    parent = {row[2:] for row in before if row[0] == UsageRecord._meta.db_table}
    for partition in usage_partitions:
        assert {row[2:] for row in before if row[0] == partition} == parent

    world = bench.make_world()
    with connection.cursor() as cursor:
        # The test's own transaction holds the world's deferred foreign-key checks; the load's index builds need none
        # pending (the benchmark makes its world in transactions of their own).
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    bench.load_books(world, 300)

    assert UsageRecord.objects.count() == 300
    assert indexes() == before
    assert invalid_indexes() == []
    assert "indexes built" in capsys.readouterr().out


def test_a_partitioned_tables_index_is_built_on_its_partitions() -> None:
    """``pg_get_indexdef`` writes a partitioned table's index ``ON ONLY`` it: run so, no partition gets it."""
    only = "CREATE INDEX billing_usagerecord_job_id_6704a792 ON ONLY public.billing_usagerecord USING btree (job_id)"
    assert bench.on_every_partition(only) == (
        "CREATE INDEX billing_usagerecord_job_id_6704a792 ON public.billing_usagerecord USING btree (job_id)"
    )
    plain = "CREATE INDEX billing_creditentry_job_id_8f4d0d3a ON public.billing_creditentry USING btree (job_id)"
    assert bench.on_every_partition(plain) == plain
