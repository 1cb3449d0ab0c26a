"""A model instance inserted or updated by one statement written out, for the few rows every request writes.

Django's ``save()`` and ``create()`` build each statement anew through the query compiler, about half a
millisecond of CPU for a row of twenty columns; a finished job writes three such rows (its usage record, its log
line, its own update) and a submission as many. These functions send the same statement, built once per model and
columns: the values pass through each field's ``pre_save`` and ``get_db_prep_save`` exactly as the compiler passes
them, so what lands in the row is what ``save()`` writes (``tests/accounts/test_statements.py`` compares the two).

What they do not do, and ``save()`` does: send ``pre_save``/``post_save`` (a model whose changes others hear of
through signals, such as API keys and prices, is never written here), take expressions as values, or save parents
of a multi-table model. A table needing any of those goes through the ORM.
"""

from __future__ import annotations

import hashlib
import logging
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any, NamedTuple

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model
from django.db.models.functions import Now
from django.db.models.sql import Query

logger = logging.getLogger(__name__)

# A statement and its parameters, positional or named.
Statement = tuple[str, Sequence[Any] | Mapping[str, Any]]
# ``in_turn``'s rows to keep: by a statement's index among those sent (negative: from the end), the list to fill.
Rows = Mapping[int, list[Any]]


class FromDatabase(NamedTuple):
    """A column an insert writes as an SQL expression of the database's own, not from the instance's value: a moment by
    the database's clock (``now_sql``), which every process that compares it shares. ``sql`` takes ``values`` for its
    ``%s`` placeholders, and its text stays the same whatever they are, so the statement's does (a prepared statement's
    must). The insert returns what it wrote, and the instance holds that (``returned``)."""

    field: str
    sql: str
    values: tuple[Any, ...] = ()


@cache
def now_sql(vendor: str) -> str:
    """The database's clock in a statement written out, as Django's ``Now()`` writes it for ``vendor``: PostgreSQL's
    ``STATEMENT_TIMESTAMP()``, SQLite's own clock (``STRFTIME(..., 'NOW')``, its ``%`` doubled as a statement with
    parameters takes it)."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != vendor:
        raise ValueError(f"The default database is {db.vendor}, not {vendor}.")
    sql, parameters = Query(None).get_compiler(connection=db).compile(Now())
    if parameters:
        raise ValueError(f"Now() takes parameters on {vendor}: {parameters}")
    return str(sql)


@cache
def _insert_statement(
    model: type[Model], vendor: str, returning: bool, from_database: tuple[tuple[str, str], ...] = ()
) -> tuple[str, tuple[Field[Any, Any], ...]]:
    """The INSERT of ``model``'s row and its fields, in order; ``from_database``: the fields written by SQL expressions
    of their own (``FromDatabase``, as name and expression), which take their own values, returned after the key."""
    meta = model._meta
    fields = tuple(
        field for field in meta.local_concrete_fields if not field.generated and field is not meta.auto_field
    )
    expressions = dict(from_database)
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(str(field.column)) for field in fields)}) "  # noqa: S608
        f"VALUES ({', '.join(expressions.get(field.name, '%s') for field in fields)})"
    )
    by_name = {field.name: field for field in fields}
    returned = [str(meta.pk.column)] if returning else []
    returned += [str(by_name[name].column) for name in expressions]
    if returned:
        sql += f" RETURNING {', '.join(quote(column) for column in returned)}"
    return sql, fields


def insert(
    instance: Model, *, want_pk: bool = True, along: Model | None = None, from_database: Sequence[FromDatabase] = ()
) -> None:
    """INSERTs ``instance`` as ``save()`` would (its defaults, ``auto_now_add`` and field conversions) and gives it
    the primary key the database chose. ``want_pk=False``: a row no one reads back by its key (a log line), and the
    statement returns nothing. ``along``: as for ``update``. ``from_database``: columns written by the database's
    expressions (``FromDatabase``), set on the instance as the database wrote them."""
    db = connections[DEFAULT_DB_ALIAS]
    sql, values, returning = _insertion(db, instance, want_pk=want_pk, from_database=from_database)
    sql, values = _with(db, along, sql, values)
    with db.cursor() as cursor:
        cursor.execute(sql, values)
        row: Sequence[Any] = (cursor.fetchone() or ()) if returning or from_database else ()
        if want_pk and instance._meta.auto_field is not None:
            written(instance, row[0] if returning else cursor.lastrowid)
    returned(instance, row[1:] if returning else row, from_database)
    _saved(instance, db)


def insertion(
    instance: Model, *, along: Model | None = None, from_database: Sequence[FromDatabase] = ()
) -> tuple[str, list[Any]]:
    """The statement ``insert`` sends, returning the new row's key (PostgreSQL), for a caller that makes it part of a
    larger statement; ``written(instance, key)`` once that has run. ``along``: as for ``update`` (PostgreSQL only
    here: elsewhere it would be inserted at once). ``from_database``: as for ``insert``; the statement returns those
    columns, for ``returned``."""
    db = connections[DEFAULT_DB_ALIAS]
    sql, values, _ = _insertion(db, instance, want_pk=True, from_database=from_database)
    if along is not None:
        if db.vendor != "postgresql":
            raise ValueError("A row along an insertion needs PostgreSQL's data-modifying WITH.")
        sql, values = _with(db, along, sql, values)
    return sql, values


def returned(instance: Model, row: Sequence[Any] | None, from_database: Sequence[FromDatabase]) -> None:
    """The values of ``from_database``'s columns an insert returned (``row``, in their order), set on ``instance``
    as the ORM converts them (SQLite's text made a datetime)."""
    if not from_database:
        return
    if not row:
        raise DatabaseError(f"The insert of {instance._meta.label} {instance.pk} returned nothing.")
    db = connections[DEFAULT_DB_ALIAS]
    for computed, value in zip(from_database, row, strict=True):
        attname, converters, column = _returned_field(type(instance), computed.field, db.vendor)
        for converter in converters:
            value = converter(value, column, db)
        setattr(instance, attname, value)


@cache
def _returned_field(model: type[Model], name: str, vendor: str) -> tuple[str, tuple[Any, ...], Any]:
    """A field's attribute name, and the converters the ORM runs on a value of its column read back, with the column."""
    db = connections[DEFAULT_DB_ALIAS]
    field = model._meta.get_field(name)
    column = field.get_col(model._meta.db_table)  # type: ignore[union-attr]
    return field.attname, tuple(db.ops.get_db_converters(column) + column.get_db_converters(db)), column  # type: ignore[union-attr]


def insertion_for_each(instance: Model, source: str) -> Statement:
    """``instance`` INSERTed once for each row of ``source`` (a ``WITH`` query of the same statement, usually one row
    or none): a row written only if the statement's own change happened, in that statement. Its values as ``insert``
    converts them; PostgreSQL types each from its column. ``instance`` takes no key back (``want_pk=False``)."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql":
        raise ValueError("A row inserted for each row of a WITH query needs PostgreSQL's data-modifying WITH.")
    _, values, _ = _insertion(db, instance, want_pk=False)
    return _insert_for_each_statement(type(instance), source), values


@cache
def _insert_for_each_statement(model: type[Model], source: str) -> str:
    sql, fields = _insert_statement(model, "postgresql", False)
    head = sql[: sql.index(" VALUES (")]
    return f"{head} SELECT {', '.join(['%s'] * len(fields))} FROM {source}"  # noqa: S608 - names only


def written(instance: Model, pk: Any) -> None:
    instance.pk = instance._meta.pk.to_python(pk)
    _saved(instance, connections[DEFAULT_DB_ALIAS])


def _insertion(
    db: BaseDatabaseWrapper, instance: Model, *, want_pk: bool, from_database: Sequence[FromDatabase] = ()
) -> tuple[str, list[Any], bool]:
    meta = instance._meta
    auto = meta.auto_field is not None
    if auto and instance.pk is not None:
        raise ValueError(f"{meta.label} already has a primary key: an explicit key goes through save()")
    if from_database and not db.features.can_return_columns_from_insert:
        raise ValueError(f"Columns written by the database need an INSERT that returns them, which {db.vendor} lacks.")
    returning = want_pk and auto and db.features.can_return_columns_from_insert
    expressions = tuple((computed.field, computed.sql) for computed in from_database)
    sql, fields = _insert_statement(type(instance), db.vendor, returning, expressions)
    if not from_database:
        return sql, [field.get_db_prep_save(field.pre_save(instance, True), db) for field in fields], returning
    by_field = {computed.field: computed for computed in from_database}
    values: list[Any] = []
    for field in fields:  # each expression's values where its column's value would be
        computed = by_field.get(field.name)
        if computed is None:
            values.append(field.get_db_prep_save(field.pre_save(instance, True), db))
        else:
            values.extend(computed.values)
    return sql, values, returning


def _saved(instance: Model, db: BaseDatabaseWrapper) -> None:
    instance._state.adding = False
    instance._state.db = db.alias


@cache
def _update_statement(
    model: type[Model], vendor: str, names: tuple[str, ...]
) -> tuple[str, tuple[Field[Any, Any], ...]]:
    meta = model._meta
    fields = tuple(meta.get_field(name) for name in names)
    for field in fields:
        if not field.concrete or field.primary_key:
            raise ValueError(f"{meta.label}.{field.name} is not a column this update may write")
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    assignments = ", ".join(f"{quote(str(field.column))} = %s" for field in fields)  # type: ignore[union-attr]
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(str(meta.pk.column))} = %s"  # noqa: S608
    return sql, fields  # type: ignore[return-value]


def update(instance: Model, fields: list[str] | tuple[str, ...], *, along: Model | None = None) -> None:
    """``instance.save(update_fields=fields)`` as one statement built once: raises ``DatabaseError``, as that does,
    when no row has the instance's key.

    ``along``: a new row (one no one reads back by its key, such as the log line that tells of the change) inserted
    with the update, in the same statement on PostgreSQL (a data-modifying ``WITH``: one round trip, not two), just
    before it elsewhere. It may point at the instance: PostgreSQL checks foreign keys at the statement's end.
    """
    db = connections[DEFAULT_DB_ALIAS]
    sql, concrete = _update_statement(type(instance), db.vendor, tuple(dict.fromkeys(fields)))
    values = [field.get_db_prep_save(field.pre_save(instance, False), db) for field in concrete]
    values.append(instance._meta.pk.get_db_prep_value(instance.pk, db))
    sql, values = _with(db, along, sql, values)
    with db.cursor() as cursor:
        cursor.execute(sql, values)
        if cursor.rowcount == 0:
            raise DatabaseError(f"{instance._meta.label} {instance.pk} is not there to update.")


def in_one_query(db: BaseDatabaseWrapper) -> bool:
    """Whether ``in_turn`` sends its statements as one query: PostgreSQL with Django's client-side binding (its
    default). With ``server_side_binding`` the extended protocol takes one statement per query."""
    return db.vendor == "postgresql" and not db.settings_dict["OPTIONS"].get("server_side_binding")


# The SQLSTATE of ``platform_condition_unmet()`` (accounts migration 0008).
UNMET_SQLSTATE = "PU001"


def or_unmet(statement: Statement) -> Statement:
    """``statement``, an UPDATE, INSERT or DELETE, made to fail with ``UNMET_SQLSTATE`` when it changes no row: sent as
    the part of an ``in_turn`` query that is a transaction of its own, it ends that transaction, and PostgreSQL rolls
    back every statement of the query (``was_unmet`` tells that failure from others). PostgreSQL only."""
    sql, values = statement
    if "RETURNING" in sql.upper():
        raise ValueError("or_unmet adds its own RETURNING: the statement must have none.")
    return (
        f"WITH changed AS ({sql} RETURNING 1) "  # noqa: S608 - the caller's statement, written out
        "SELECT platform_condition_unmet() WHERE NOT EXISTS (SELECT 1 FROM changed)",
        values,
    )


def was_unmet(error: BaseException) -> bool:
    """Whether ``error`` is the failure of an ``or_unmet`` statement (as Django raises it, or psycopg)."""
    cause = error.__cause__ if error.__cause__ is not None else error
    return getattr(cause, "sqlstate", None) == UNMET_SQLSTATE


# Inside ``last_of_the_transaction``: what is sent writes the last rows of the transaction open.
_last_writes: ContextVar[bool] = ContextVar("platform_last_writes", default=False)
# Inside ``at_the_top``: the transaction open is the one ``accounts.locking.retrying_atomic`` began, and runs again
# where a statement that was to commit it found its condition unmet.
_at_the_top: ContextVar[bool] = ContextVar("platform_at_the_top", default=False)
# Inside ``no_commit_along``: that second run, deciding under its locks as before.
_commit_along_refused: ContextVar[bool] = ContextVar("platform_commit_along_refused", default=False)
# What ``commit_along`` did in the transaction under way, kept on the connection: sent its query, or committed.
SENT, COMMITTED = "sent", "committed"
_ALONG = "platform_commit_along"


@contextmanager
def _set(variable: ContextVar[bool]) -> Iterator[None]:
    token = variable.set(True)
    try:
        yield
    finally:
        variable.reset(token)


def last_of_the_transaction() -> Any:
    """The code inside writes the last rows of the transaction that is open: its caller writes nothing after it (it
    may still read, and register ``on_commit`` callbacks). Where ``commits_along`` allows, the statement of it that
    takes the most contended lock carries the transaction's COMMIT with it."""
    return _set(_last_writes)


def at_the_top() -> Any:
    """The transaction open is the outermost, begun by ``accounts.locking.retrying_atomic``, which runs it again
    with ``no_commit_along`` where a statement sent by ``commit_along`` failed with its condition unmet."""
    return _set(_at_the_top)


def no_commit_along() -> Any:
    """No statement sent inside carries a COMMIT (``accounts.locking.retrying_atomic``'s second run)."""
    return _set(_commit_along_refused)


def commits_along(db: BaseDatabaseWrapper) -> bool:
    """Whether the statement about to be sent may end the transaction: ``COMMIT`` sent after it in the same query
    (``commit_along``), so the locks it takes are held to the end of that query and the COMMIT, and for no round trip
    of the client's (the answer, the client's scheduling on a busy machine, its COMMIT's own trip) after it.

    Only inside ``last_of_the_transaction`` and ``at_the_top`` (``retrying_atomic``'s own transaction, Django's
    outermost atomic block: no caller's transaction around it and no savepoint), on PostgreSQL's one-query path, and
    not in ``no_commit_along``. Django's COMMIT at the end of the block then finds the transaction ended and sends
    nothing (psycopg commits only a transaction that is open); its ``on_commit`` callbacks run as usual. A statement
    sent this way must fail where its condition is unmet (``unless_unmet``), never commit a transaction that should
    have gone on: ``retrying_atomic`` then runs the transaction again with ``no_commit_along``."""
    return (
        _last_writes.get()
        and _at_the_top.get()
        and not _commit_along_refused.get()
        and in_one_query(db)
        and db.in_atomic_block
        and db.commit_on_exit
        and len(db.atomic_blocks) == 1
        and not db.savepoint_ids
        and not db.needs_rollback
    )


def commit_along(cursor: Any, *sent: Statement) -> None:
    """Sends ``sent`` and ``COMMIT`` after them as one query (``commits_along`` must hold). PostgreSQL runs them in
    turn; a failing statement ends the query before the COMMIT, and the transaction is rolled back as any failed one.
    The cursor is left on the first statement's result."""
    db = cursor.db
    setattr(db, _ALONG, SENT)
    _in_turn(cursor, (*sent, COMMIT), on_first=True)
    setattr(db, _ALONG, COMMITTED)


def along(db: BaseDatabaseWrapper) -> str | None:
    """What ``commit_along`` did in the transaction under way on ``db``: ``SENT``, ``COMMITTED`` or None."""
    return getattr(db, _ALONG, None)


def forget_along(db: BaseDatabaseWrapper) -> None:
    """A transaction begins on ``db``: nothing sent along yet (``retrying_atomic``)."""
    setattr(db, _ALONG, None)


def unless_unmet(condition: str) -> str:
    """A SQL expression true where ``condition`` is, that fails the statement with ``UNMET_SQLSTATE`` where it is
    not (``CASE`` evaluates the function only in the branch taken)."""
    return f"CASE WHEN {condition} THEN true ELSE platform_condition_unmet() = 0 END"


_NAMED = re.compile(r"%\((\w+)\)s")


@cache
def _positional_sql(sql: str) -> tuple[str, tuple[str, ...]]:
    return _NAMED.sub("%s", sql), tuple(_NAMED.findall(sql))


def _positional(statement: Statement) -> Statement:
    """A statement with named parameters written with positional ones, its values in their order."""
    sql, values = statement
    if not isinstance(values, Mapping):
        return statement
    positional_sql, names = _positional_sql(sql)
    return positional_sql, [values[name] for name in names]


_PLACEHOLDER = re.compile(r"%%|%s")
# Per server connection (psycopg's connection object), the names of the statements prepared on it.
_prepared: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@cache
def _preparation(sql: str) -> tuple[str, str]:
    """The name of ``sql`` (positional parameters) prepared, and the PREPARE that plans it: ``$1``... for ``%s``."""
    numbers = iter(range(1, sql.count("%s") + 1))
    numbered = _PLACEHOLDER.sub(lambda match: "%" if match.group() == "%%" else f"${next(numbers)}", sql)
    name = "platform_" + hashlib.sha1(sql.encode(), usedforsecurity=False).hexdigest()[:20]
    return name, f"PREPARE {name} AS {numbered}"


_PREPARED_ON_THE_SERVER = "SELECT name FROM pg_prepared_statements"


def is_preparation(sql: str) -> bool:
    """Whether ``sql`` is what ``in_turn``'s ``plan_once`` sends once per connection and statement, not per call."""
    return sql.startswith("PREPARE ") or sql == _PREPARED_ON_THE_SERVER


def _planned_once(cursor: Any, statement: Statement) -> Statement:
    """``statement`` as an EXECUTE of it prepared on the cursor's server connection, preparing it there first if
    this connection has not (one round trip, once per connection and statement)."""
    sql, values = _positional(statement)
    if sql in _NOT_PREPARED:
        return sql, values  # not a statement PREPARE takes
    name, prepare = _preparation(sql)
    raw = cursor.db.connection
    names = _prepared.get(raw)
    if names is None:
        # What the server connection holds already: a statement prepared before the client lost track of it (a
        # failure between the PREPARE and its record) would otherwise be prepared again, and refused.
        cursor.execute(_PREPARED_ON_THE_SERVER)
        names = _prepared[raw] = {row[0] for row in cursor.fetchall()}
    if name not in names:
        cursor.execute(prepare)
        names.add(name)
    count = len(values)
    return (f"EXECUTE {name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"), values


def plans_once(db: BaseDatabaseWrapper) -> bool:
    """Whether ``in_turn(..., plan_once=True)`` prepares its statements: one query of several, and a server
    connection that stays this connection's (not behind a pooler that hands each transaction another)."""
    return in_one_query(db) and _preparing and not getattr(settings, "DATABASE_TRANSACTION_POOLING", False)


# Among ``in_turn``'s statements on PostgreSQL's one-query path with no transaction open: the statements before it
# are committed as it runs, and those after it are a transaction of their own, committed as the query ends (or
# rolled back, alone, if one of them fails). On a failure the caller must tell whether the part before the COMMIT
# committed (``inference.submission`` looks for its job): with ``plan_once`` a prepared statement found gone or stale
# sends the whole query again, so the failure may also be the repeat of what had committed.
COMMIT: Statement = ("COMMIT", ())
# Among ``in_turn``'s statements, first in a transaction whose loss in a crash costs nothing the rest of the system
# relies on: its COMMIT does not wait for the WAL to reach the disk (it is durable once anything after it commits
# durably, the WAL being written in order). For what is redone if lost (``inference.dispatch.dispatch_statements``).
NO_WAIT_FOR_DISK: Statement = ("SET LOCAL synchronous_commit = off", ())
# Among ``in_turn``'s statements on PostgreSQL, in a transaction after transactions that did not wait for the disk
# (``NO_WAIT_FOR_DISK``): its COMMIT waits for the WAL to reach the disk, however little the transaction wrote, and
# with it every earlier commit of the server, the WAL being flushed in order. A transactional logical decoding message
# (a WAL record, and the transaction id that makes its COMMIT a commit record; any role may write one, at any
# wal_level) with nothing in it. So a query can make its work visible to other sessions at once, without waiting for
# the disk, and still end, and answer its caller, only once that work is durable: the wait comes after the work,
# not in the middle of it (``inference.submission``).
DURABLE_FROM_HERE: Statement = ("SELECT pg_logical_emit_message(true, 'platform', '')", ())
_NOT_PREPARED = {COMMIT[0], NO_WAIT_FOR_DISK[0]}


def in_turn(cursor: Any, first: Statement, *then: Statement, plan_once: bool = False, rows: Rows | None = None) -> None:
    """Runs ``first``, then each of ``then`` in order, each reading the database as it is once those before it have
    run: after the lock ``first`` took (and may have waited for), so what follows sees what that lock's holder
    committed. The cursor is left on the last statement's result.

    On PostgreSQL they go in one round trip, as one query of several statements (the simple query protocol, which
    Django's client-side binding cursor uses for a query with several): under READ COMMITTED each statement of such a
    query takes its own snapshot when it starts, as it would sent alone. One statement holding both the lock and the
    read could not do this: its one snapshot is taken before it waits for the lock
    (``tests/accounts/test_statements.py`` shows the difference). Sent as one query with no transaction open, they
    are a transaction of their own, committed as the query ends (``accounts.locking.retrying``; only where
    ``in_one_query``). Elsewhere, one execute each.

    ``plan_once``: the statements, each always the same text, are prepared on the server connection the first time
    it runs them (``PREPARE``, one round trip) and executed by name from then on: PostgreSQL plans each once per
    connection instead of on every call (the dispatch statement took 0.6 ms to plan and 0.4 ms to run). Not behind
    a pooler that hands each transaction another server connection (``DATABASE_TRANSACTION_POOLING``). A statement
    gone or stale on the server (deallocated, or a table it reads altered by a migration while the process ran) is
    prepared afresh and the query sent again, where no transaction was open (inside one, the caller's transaction
    fails and its retry prepares afresh); if that fails the same way, the process stops preparing.

    ``rows``: by the index of a statement among them (negative: from the end), a list filled with the rows that
    statement returns (an insert's ``RETURNING``, a dispatch's before a last read), read on the way past it.
    """
    if plan_once and plans_once(cursor.db):
        sent = (first, *then)
        if _sent_prepared(cursor, sent, rows):
            return
        # Sent with no transaction open, the failed query took nothing with it: every statement prepared afresh.
        cursor.execute("DEALLOCATE ALL")
        if _sent_prepared(cursor, sent, rows):
            return
        _stop_preparing()
    _in_turn(cursor, (first, *then), rows=rows)


def _sent_prepared(cursor: Any, sent: tuple[Statement, ...], rows: Rows | None = None) -> bool:
    """``sent`` as EXECUTEs of statements prepared on the connection. False: one was gone or stale, and no transaction
    was open (the connection's record of them is read from the server again at the next use); inside a transaction
    that error is raised: the caller's transaction has failed, and its retry prepares afresh."""
    try:
        _in_turn(cursor, tuple(_planned_once(cursor, statement) for statement in sent), rows=rows)
    except DatabaseError as error:
        if getattr(error.__cause__, "sqlstate", None) not in _STALE_PREPARED:
            raise
        _prepared.pop(cursor.db.connection, None)
        if not cursor.db.get_autocommit():
            raise
        return False
    return True


# What a prepared statement that is gone or stale answers: deallocated on the server (DEALLOCATE or DISCARD ALL), a
# table it reads changed (0A000, "cached plan must not change result type"), or prepared already where the client
# had no record of it.
_STALE_PREPARED = frozenset({"26000", "0A000", "42P05"})
_preparing = True


def _stop_preparing() -> None:
    """Prepared statements that vanish between two queries on one connection: a pooler that hands each transaction
    another server connection, undeclared. The process stops preparing, and says so."""
    global _preparing
    _preparing = False
    logger.error(
        "prepared statements vanish between queries on one connection: is DATABASE_URL a pooler in transaction mode? "
        "Set DATABASE_TRANSACTION_POOLING=1. This process no longer prepares statements."
    )


def _in_turn(cursor: Any, sent: tuple[Statement, ...], *, on_first: bool = False, rows: Rows | None = None) -> None:
    """``sent`` as one query where ``in_one_query``, the cursor left on the last statement's result (on the first's
    with ``on_first``, which only one query can do), else one execute each; ``rows``: as for ``in_turn``."""
    wanted = {index % len(sent): kept for index, kept in (rows or {}).items()}
    if in_one_query(cursor.db):
        # Each statement bound on its own, the query sent with no parameters of its own: psycopg keeps the parsed
        # form of a statement with at most 50 parameters (``psycopg._queries``), not that of a whole query with more,
        # which it parses afresh on every call. A submission's query (67 parameters) is bound in 0.09-0.12 ms this
        # way, against 0.15 as one.
        bind = cursor.cursor.mogrify
        with cursor.db.wrap_database_errors:  # a value psycopg cannot bind raises as the execute would
            query = "; ".join(bind(sql, values) for sql, values in sent)
        cursor.execute(query)
        for index in range(1 if on_first else len(sent)):
            if index:
                cursor.nextset()
            if index in wanted:
                wanted[index][:] = cursor.fetchall()
        return
    if on_first:
        raise ValueError("Only statements sent as one query can leave the cursor on the first's result.")
    for index, (sql, statement_values) in enumerate(sent):
        cursor.execute(sql, statement_values)
        if index in wanted:
            wanted[index][:] = cursor.fetchall()


def _with(db: BaseDatabaseWrapper, along: Model | None, sql: str, values: list[Any]) -> tuple[str, list[Any]]:
    """``sql`` with ``along``'s insert in front of it: inside it on PostgreSQL, sent on its own elsewhere."""
    if along is None:
        return sql, values
    along_sql, along_values, _ = _insertion(db, along, want_pk=False)
    if db.vendor == "postgresql":
        sql, values = f"WITH along AS ({along_sql}) {sql}", [*along_values, *values]
    else:
        with db.cursor() as cursor:
            cursor.execute(along_sql, along_values)
    _saved(along, db)
    return sql, values


@cache
def _reading(model: type[Model], vendor: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[Any, ...], ...]]:
    db = connections[DEFAULT_DB_ALIAS]
    fields = tuple(field for field in model._meta.concrete_fields if not field.generated)
    converters = []
    for field in fields:
        column = field.get_col(model._meta.db_table)
        converters.append((tuple(db.ops.get_db_converters(column) + column.get_db_converters(db)), column))
    return (
        tuple(db.ops.quote_name(str(field.column)) for field in fields),
        tuple(field.attname for field in fields),
        tuple(converters),
    )


def columns(model: type[Model], alias: str = "") -> str:
    """Every column of ``model``'s table (under ``alias``), in the order ``built`` takes them: a select or RETURNING
    list, also where a statement returns several tables' rows side by side."""
    names, _, _ = _reading(model, connections[DEFAULT_DB_ALIAS].vendor)
    return ", ".join(f"{alias}.{name}" if alias else name for name in names)


def width(model: type[Model]) -> int:
    return len(_reading(model, connections[DEFAULT_DB_ALIAS].vendor)[0])


def built(model: type[Model], values: Sequence[Any]) -> Model:
    """The instance a row selected with ``columns(model, ...)`` holds, its values converted as the ORM converts
    them (a JSON column decoded, SQLite's text made a datetime)."""
    db = connections[DEFAULT_DB_ALIAS]
    _, attnames, converters = _reading(model, db.vendor)
    converted = list(values)
    for position, (field_converters, column) in enumerate(converters):
        for converter in field_converters:
            converted[position] = converter(converted[position], column, db)
    return model.from_db(db.alias, attnames, converted)
