"""``platform_condition_unmet()``: what a statement of a one-query transaction calls to end it when a condition it
needs does not hold (``accounts.statements.or_unmet``). PostgreSQL only: elsewhere such queries are not sent."""

from __future__ import annotations

from typing import Any

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION platform_condition_unmet() RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'a condition this query needs does not hold: nothing of it was written'
        USING ERRCODE = 'PU001';
END
$$
"""
DROP = "DROP FUNCTION IF EXISTS platform_condition_unmet()"


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0007_alter_auditevent_action"),
    ]

    operations = [migrations.RunPython(create, drop)]
