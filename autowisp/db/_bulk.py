"""Column-wise bulk writes: tens of thousands of rows in a few statements on every backend.

PostgreSQL takes one ``INSERT ... SELECT FROM json_to_recordset(:rows)`` or ``UPDATE ...
FROM json_to_recordset(:rows)`` per chunk of rows, the chunk as one JSON text parameter
typed by the table's columns: a few statements parsed in C, instead of one per page of
an executemany, or array parameters that psycopg2 spells out element by element. SQLite
takes one DBAPI executemany, each column's values bound once by the column's type
(SQLAlchemy's executemany prepares every row's parameters: most of the time at these
sizes). Values are plain Python: None for NULL, finite floats (Python's float repr
round-trips through JSON exactly), JSON-able dicts for JSON columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Table, Text, bindparam, cast, column, func, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import TableValuedAlias

__all__ = ["insert_columns", "update_columns"]

#: Rows per statement on PostgreSQL.
CHUNK = 10_000


def _length(columns: Mapping[str, Sequence[Any]]) -> int:
    sizes = {len(values) for values in columns.values()}
    if len(sizes) > 1:
        raise ValueError(f"bulk write columns differ in length: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def _recordset(table: Table, names: Sequence[str]) -> TableValuedAlias:
    """``json_to_recordset(:rows) AS rows(name type, ...)`` with the columns' types."""
    rows = func.json_to_recordset(cast(bindparam("rows", type_=Text()), JSON()))
    typed = rows.table_valued(*(column(n, table.c[n].type) for n in names))
    return typed.render_derived(name="rows", with_types=True)


def _json_chunks(columns: Mapping[str, Sequence[Any]], count: int) -> list[dict[str, str]]:
    """The columns' rows as JSON arrays of objects, :data:`CHUNK` rows each."""
    names = list(columns)
    return [
        {"rows": json.dumps([
            dict(zip(names, values, strict=True))
            for values in zip(*(v[start : start + CHUNK] for v in columns.values()), strict=True)
        ])}
        for start in range(0, count, CHUNK)
    ]  # fmt: skip


def _sqlite_executemany(
    session: Session, table: Table, statement: str, columns: Mapping[str, Sequence[Any]]
) -> None:
    """Run ``statement`` (``?`` placeholders in the order of ``columns``) once per row."""
    dialect = session.get_bind().dialect

    def bound(name: str, values: Sequence[Any]) -> Sequence[Any]:
        # The dialect's implementation: SQLite stores DATETIME and JSON as text.
        processor = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        return values if processor is None else [processor(v) for v in values]

    values = [bound(name, column_values) for name, column_values in columns.items()]
    session.connection().exec_driver_sql(statement, list(zip(*values, strict=True)))


def insert_columns(
    session: Session,
    table: Table,
    columns: Mapping[str, Sequence[Any]],
    *,
    constants: Mapping[str, Any] | None = None,
    new_ids: bool = False,
) -> list[int]:
    """Insert one row per element of the ``columns`` (name -> values, equal lengths),
    each also with the ``constants`` (name -> value); with ``new_ids``, returns the new
    rows' ``id`` in row order.

    PostgreSQL draws the ids from the column's sequence first. SQLite gives the ids after
    the largest one (an ordered ``INSERT ... RETURNING`` runs there one row at a time):
    with ``new_ids`` the transaction must hold SQLite's write lock already (have written),
    so that no other writer inserts meanwhile.
    """
    count = _length(columns)
    if count == 0:
        return []
    fixed = dict(constants or {})
    dialect = session.get_bind().dialect.name
    ids: list[int] = []
    if new_ids and dialect == "postgresql":
        sequence = func.pg_get_serial_sequence(table.name, "id")
        drawn = select(func.nextval(sequence)).select_from(func.generate_series(1, count))
        ids = sorted(int(i) for i in session.scalars(drawn))
    elif new_ids:
        first = int(session.scalar(select(func.max(table.c.id))) or 0) + 1
        ids = list(range(first, first + count))
    data: dict[str, Sequence[Any]] = {"id": ids, **columns} if new_ids else dict(columns)
    if dialect == "sqlite":
        data.update({name: [value] * count for name, value in fixed.items()})
        quote = session.get_bind().dialect.identifier_preparer.quote
        _sqlite_executemany(session, table, (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in data)}) "
            f"VALUES ({', '.join('?' for _ in data)})"
        ), data)  # fmt: skip
    elif dialect != "postgresql":
        names = list(data)
        session.execute(insert(table), [
            dict(zip(names, values, strict=True)) | fixed
            for values in zip(*data.values(), strict=True)
        ])  # fmt: skip
    else:
        source = _recordset(table, list(data))
        values = select(
            *(source.c[n] for n in data),
            # Typed: an untyped constant (a NULL) in a SELECT list would be text.
            *(cast(bindparam(f"k_{n}", v, type_=table.c[n].type), table.c[n].type)
              for n, v in fixed.items()),
        )  # fmt: skip
        statement = insert(table).from_select([*data, *fixed], values)
        for chunk in _json_chunks(data, count):
            session.execute(statement, chunk)
    return ids


def update_columns(session: Session, table: Table, columns: Mapping[str, Sequence[Any]]) -> None:
    """Set, in the row whose ``id`` is ``columns["id"][i]``, every other column to its
    ``i``-th value."""
    count = _length(columns)
    names = [name for name in columns if name != "id"]
    if count == 0 or not names:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        quote = session.get_bind().dialect.identifier_preparer.quote
        ordered = {**{n: columns[n] for n in names}, "id": columns["id"]}
        _sqlite_executemany(session, table, (
            f"UPDATE {quote(table.name)} SET {', '.join(f'{quote(n)} = ?' for n in names)} "
            "WHERE id = ?"
        ), ordered)  # fmt: skip
    elif dialect != "postgresql":
        session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values({n: bindparam(f"b_{n}", type_=table.c[n].type) for n in names}),
            [{f"b_{n}": v for n, v in zip(columns, values, strict=True)}
             for values in zip(*columns.values(), strict=True)],
        )  # fmt: skip
    else:
        source = _recordset(table, ["id", *names])
        statement = (
            update(table).where(table.c.id == source.c.id).values({n: source.c[n] for n in names})
        )
        for chunk in _json_chunks(columns, count):
            session.execute(statement, chunk)
