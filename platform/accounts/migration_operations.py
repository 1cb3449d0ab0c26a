"""Migration operations the apps' migrations share (platform core: every app may import it).

Besides these, a migration imports no application code but the callables its fields and managers name (defaults,
``UserManager``), as Django writes them. Each operation is generic (what it builds, the migration passes it), and every
migration that uses one replays whatever it does now: a change must keep what each of them makes the same.
"""

from __future__ import annotations

from typing import Any

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations


class _ConcurrentlyOnPostgreSQL:
    """An index operation CONCURRENTLY on PostgreSQL, and ``elsewhere``, its plain form, on other databases."""

    elsewhere: Any

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)  # type: ignore[misc]
        else:
            self.elsewhere.database_forwards(self, app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)  # type: ignore[misc]
        else:
            self.elsewhere.database_backwards(self, app_label, schema_editor, from_state, to_state)


class AddIndexConcurrentlyOnPostgreSQL(_ConcurrentlyOnPostgreSQL, AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY on PostgreSQL: the table keeps taking writes while the index builds (a plain
    CREATE INDEX blocks them for the whole build, minutes at 100M rows). A plain CREATE INDEX elsewhere (SQLite).

    The migration that uses it sets ``atomic = False``: CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    """

    elsewhere = migrations.AddIndex


class RemoveIndexConcurrentlyOnPostgreSQL(_ConcurrentlyOnPostgreSQL, RemoveIndexConcurrently):
    """DROP INDEX CONCURRENTLY on PostgreSQL: a plain DROP INDEX takes the table's exclusive lock, and waiting for it
    behind a long read holds every write of the table waiting behind it. A plain DROP INDEX elsewhere (SQLite).

    The migration that uses it sets ``atomic = False``, as for ``AddIndexConcurrentlyOnPostgreSQL``.
    """

    elsewhere = migrations.RemoveIndex


class RunSQLOnPostgreSQL(migrations.RunSQL):
    """SQL run on PostgreSQL only (functions, triggers): elsewhere (SQLite) the operation does nothing, and what the
    SQL provides is done another way there."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)


class DropFieldIndexConcurrentlyOnPostgreSQL(migrations.AlterField):
    """A field's own index dropped (``db_index`` True to False, nothing else of the field changed): DROP INDEX
    CONCURRENTLY on PostgreSQL, found by its column whatever it was named; Django's AlterField elsewhere (SQLite).
    Backwards, the index is built again (CONCURRENTLY on PostgreSQL). The migration sets ``atomic = False``."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        model, old_field, new_field = self._fields(app_label, from_state, to_state)
        if not old_field.db_index or new_field.db_index:
            raise ValueError(f"{self.model_name}.{self.name}: only a field's index dropped is done concurrently")
        meta_indexes = {index.name for index in model._meta.indexes}
        names = schema_editor._constraint_names(
            model, [old_field.column], index=True, unique=False, primary_key=False, exclude=meta_indexes
        )
        for name in names:
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(name)}")

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        if schema_editor.connection.vendor != "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
            return
        model, _, field = self._fields(app_label, to_state, from_state)
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field], concurrently=True))

    def _fields(self, app_label: str, before: Any, after: Any) -> tuple[Any, Any, Any]:
        """The model as it is after, and the field as it was before and is after."""
        model = after.apps.get_model(app_label, self.model_name)
        old_model = before.apps.get_model(app_label, self.model_name)
        return model, old_model._meta.get_field(self.name), model._meta.get_field(self.name)
