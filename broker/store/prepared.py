"""Statements of the issuance path, compiled once per dialect and run on the DB-API cursor.

SQLAlchemy's execution path (cache key, parameter processing, result wrapping) costs ~0.1-0.3 ms of
CPU per statement, more than SQLite spends running one; an issuance runs a dozen (measured with
callgrind: ~5.5 M instructions per issuance in the store, scripts/bench_store.py). The statements stay
written in Core (``broker.store.statements``, one source for both dialects); this module renders each
once per dialect, with its parameter order, and executes the text on the raw cursor inside the same
SQLAlchemy transaction. Only statements whose parameters are plain values (no ``IN`` lists to expand)
and whose columns need no type processing on the way in or out (strings, numbers, bytes) may be
prepared: ``Boolean`` columns come back as 0/1 from SQLite, so callers convert those themselves.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.sql import Executable

__all__ = ["Prepared", "one_row"]


class Prepared:
    """One Core statement, rendered once per dialect (its SQL and the order of its parameters).

    ``per_dialect`` gives a dialect its own statement where the Core differs (``ON CONFLICT`` lives in
    each dialect's ``insert``); the statements must take the same parameters.
    """

    __slots__ = ("_by_dialect", "_per_dialect", "_stmt")

    def __init__(self, stmt: Executable, *, per_dialect: Mapping[str, Executable] | None = None) -> None:
        self._stmt = stmt
        self._per_dialect = dict(per_dialect or {})
        self._by_dialect: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}

    def _render(self, conn: Connection) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        dialect = conn.dialect
        done = self._by_dialect.get(dialect.name)
        if done is None:
            stmt = self._per_dialect.get(dialect.name, self._stmt)
            compiled = stmt.compile(dialect=dialect)  # type: ignore[attr-defined]
            positional = tuple(compiled.positiontup) if dialect.positional else None
            done = (str(compiled), positional, dict(compiled.params))
            self._by_dialect[dialect.name] = done
        return done

    def rendered(self, conn: Connection) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        """Its SQL for ``conn``'s database, the order of its parameters (None: by name) and their defaults."""
        sql, order, defaults = self._render(conn)
        return sql, order, dict(defaults)

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """Run it on ``conn``'s DB-API connection (in its transaction); the DB-API cursor."""
        sql, order, defaults = self._render(conn)
        values = {**defaults, **params} if params else defaults
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(sql, tuple(values[k] for k in order) if order is not None else values)
        return cursor

    def executemany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        sql, order, defaults = self._render(conn)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if defaults:  # a row naming every parameter (the usual case) is used as it is
            keys = defaults.keys()
            rows = [r if keys <= r.keys() else {**defaults, **r} for r in rows]
        if order is None:
            cursor.executemany(sql, rows)
        elif len(order) == 1:
            cursor.executemany(sql, [(r[order[0]],) for r in rows])
        else:
            # itemgetter builds each row's tuple in C: the merge of Vault's audit lines inserts thousands.
            pick = operator.itemgetter(*order)
            cursor.executemany(sql, [pick(r) for r in rows])


def one_row(cursor: Any) -> dict[str, Any] | None:
    """The cursor's first row as a mapping by column name, or None."""
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip((d[0] for d in cursor.description), row, strict=True))
