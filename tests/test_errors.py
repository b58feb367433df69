"""The one table that maps backend exceptions into the project's (lookalike.errors)."""

from __future__ import annotations

import sqlite3

import pytest

from lookalike.errors import (
    BACKEND_ERRORS,
    BrokerError,
    LookalikeError,
    NotFoundError,
    QueryError,
    StoreBusyError,
    StoreError,
    translate,
)


def test_a_locked_sqlite_database_is_store_busy(tmp_path):
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (a)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("INSERT INTO t VALUES (1)")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        other.close()
    err = translate(caught.value)
    assert isinstance(err, StoreBusyError)
    assert "locked" in str(err) and "\n" not in str(err)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not an SQLite file at all" * 100)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError) as caught:
        conn.execute("SELECT * FROM sqlite_master").fetchall()
    conn.close()
    err = translate(caught.value)
    assert type(err) is StoreError
    assert "not a database" in str(err)


def test_postgres_and_nats_errors_map_by_class():
    psycopg = pytest.importorskip("psycopg")
    nats_errors = pytest.importorskip("nats.errors")
    assert isinstance(translate(psycopg.OperationalError("connection refused")), StoreError)
    # a subclass defined in psycopg.errors still matches psycopg.Error
    assert isinstance(translate(psycopg.errors.UniqueViolation("dup")), StoreError)
    assert isinstance(translate(nats_errors.NoServersError()), BrokerError)


def test_project_errors_pass_through_and_others_are_not_translated():
    mine = NotFoundError("no image 'x'")
    assert translate(mine) is mine
    assert translate(ValueError("x")) is None
    assert translate(KeyError("x")) is None


def test_every_table_entry_maps_to_a_project_error():
    for name, kind, message in BACKEND_ERRORS:
        assert "." in name and issubclass(kind, LookalikeError) and "{exc}" in message


def test_a_spark_analysis_error_is_a_query_error():
    base = pytest.importorskip("pyspark.errors.exceptions.base")
    err = translate(base.AnalysisException("[PATH_NOT_FOUND] Path does not exist: /nope"))
    assert isinstance(err, QueryError) and "PATH_NOT_FOUND" in str(err)
