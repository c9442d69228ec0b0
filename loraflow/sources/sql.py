"""SQL source: the rows of a query (or a whole table) from any database SQLAlchemy reaches.

`url` is a SQLAlchemy URL without a password (one with a password is refused: the config ends up in logs, the
Prefect UI and the cache key); the password comes from an environment variable (`password_env`) or a Prefect
Secret block (`password_secret`) and is only ever put into the engine. Rows are streamed in chunks
(`chunk_rows`, a server-side cursor where the driver has one) and keep the database's column types.

A SQLite database is a local file: relative paths start at the config file's folder, it is confined to
LORAFLOW_DATA_ROOTS like any file, and it is opened read-only, so a mistyped path is an error, never a new
empty database. The fingerprint hashes what the query returns (or what `fingerprint_query`, a cheap query
such as `SELECT count(*), max(updated_at) FROM shows`, returns), so a changed row re-ingests on the next run
and an unchanged database is a cache hit.
"""

import hashlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Literal

import pandas as pd
import sqlalchemy as sa
from pydantic import ConfigDict, Field, field_validator, model_validator

from loraflow.sources.common import Location, SourceBase, SourceError, resolve_path


class Config(SourceBase):
    """Rows from a SQL database: a query or a table, through SQLAlchemy."""

    # StrictModel's hide_input_in_errors keeps a refused URL (it holds a password) out of the error message.
    model_config = ConfigDict(title="SQL query")
    kind: Literal["sql"] = Field("sql", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the table, else the database name).")
    url: str = Field(..., description=(
        "SQLAlchemy URL without a password, e.g. 'sqlite:///catalog.db' (relative to the config file) or "
        "'postgresql+psycopg://loader@db.internal:5432/catalog'. A URL with a password is refused: use password_env."
    ))
    password_env: str | None = Field(None, description="Name of the environment variable that holds the database password (never the password itself).")
    password_secret: str | None = Field(None, description="Name of a Prefect Secret block that holds the database password.")
    table: str | None = Field(None, description="Read this whole table (set `table` or `query`, not both).")
    query: str | None = Field(None, description="Read the rows of this SELECT (set `table` or `query`); add ORDER BY for a stable `_row` numbering.")
    fingerprint_query: str | None = Field(None, description=(
        "A cheap query whose result changes when the rows do (e.g. 'SELECT count(*), max(updated_at) FROM shows'); "
        "None hashes every row the query returns (always right, reads the data once more per run)."
    ))
    chunk_rows: int = Field(10_000, ge=1, description="Rows fetched per round trip while streaming the result.")
    max_rows: int | None = Field(None, ge=1, description="Read only the first N rows (small demos). None reads all.")

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, url: str) -> str:
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise ValueError("not a SQLAlchemy URL (dialect://user@host/database, or sqlite:///file.db)") from None
        if parsed.password is not None:
            raise ValueError("the URL holds a password, which would reach logs, the UI and the cache key -> remove it from "
                             "the URL and set `password_env:` (an environment variable) or `password_secret:` (a Prefect Secret block)")
        return url

    @model_validator(mode="after")
    def _table_or_query(self):
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of `table:` (a whole table) and `query:` (a SELECT)")
        if self.password_env and self.password_secret:
            raise ValueError("set one of `password_env:` and `password_secret:`, not both")
        return self


# ---- the source interface (loraflow/sources/common.py)
def default_name(config: Config) -> str:
    """The table name, else the database's name (a SQLite file's name)."""
    if config.table:
        return config.table
    database = sa.engine.make_url(config.url).database
    return Path(database).name if database else "sql"


def locations(config: Config, base_dir) -> list[Location]:
    """A SQLite database file (confined like any file), or the server address without credentials."""
    database_file = sqlite_file(config, base_dir)
    if database_file is not None:
        return [Location("url", shown_url(config), database_file)]
    return [Location("url", shown_url(config))]


def read(config: Config, base_dir) -> pd.DataFrame:
    """Stream the query's rows in chunks into one DataFrame, with the database's column types."""
    chunks = list(_chunks(config, base_dir, statement(config), config.max_rows))
    if not chunks:
        return pd.DataFrame()
    rows = pd.concat(chunks, ignore_index=True)
    return rows.head(config.max_rows) if config.max_rows is not None else rows


def read_batches(config: Config, base_dir, batch_rows: int):
    """The query's rows as they are fetched, `chunk_rows` at a time (ingest writes each as it comes); the rows and
    values `read` gives."""
    left = config.max_rows
    for chunk in _chunks(config, base_dir, statement(config), config.max_rows):
        if left is not None:
            chunk, left = chunk.head(left), left - min(left, len(chunk))
        yield chunk


def fingerprint(config: Config, base_dir) -> str:
    """sha256 of what `fingerprint_query` (else the query itself) returns now: column names, types and values."""
    digest = hashlib.sha256()
    query = sa.text(config.fingerprint_query) if config.fingerprint_query else statement(config)
    for chunk in _chunks(config, base_dir, query, None):
        digest.update(repr([(str(c), str(t)) for c, t in chunk.dtypes.items()]).encode())
        digest.update(chunk.to_json(orient="values", date_format="iso", default_handler=str).encode())
    return digest.hexdigest()


def check(config: Config, base_dir) -> list[str]:
    """The database is there and reachable, and the table or query can be run (with LIMIT 0: no rows are read)."""
    probe = sa.select(sa.text("*")).select_from(statement(config).subquery("loraflow_check")).limit(0)
    try:
        list(_chunks(config, base_dir, probe, None))
    except SourceError as error:
        return [str(error)]
    return []


# ---- helpers
def statement(config: Config):
    """The SELECT that reads the source's rows."""
    if config.table:
        return sa.select(sa.text("*")).select_from(sa.table(config.table))
    return sa.text(config.query).columns()


def sqlite_file(config: Config, base_dir) -> Path | None:
    """The database file of a sqlite URL, resolved against the config's folder; None for other databases / memory."""
    url = sa.engine.make_url(config.url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return resolve_path(url.database, base_dir)


def shown_url(config: Config) -> str:
    """The URL as logs and the summary show it (never a password)."""
    return sa.engine.make_url(config.url).render_as_string(hide_password=True)


def password(config: Config) -> str | None:
    """The password from the environment variable or Prefect Secret block the config names; None if neither."""
    if config.password_env:
        if config.password_env not in os.environ:
            raise SourceError(f"sql {shown_url(config)}: environment variable {config.password_env!r} is not set -> "
                              f"export it on the machine that runs the flow (or fix `password_env:`)")
        return os.environ[config.password_env]
    if config.password_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(config.password_secret).get()
        except ValueError as error:
            raise SourceError(f"sql {shown_url(config)}: Prefect Secret block {config.password_secret!r}: {error} -> "
                              f"create it (`prefect block create secret`) or fix `password_secret:`") from None
    return None


def engine(config: Config, base_dir) -> sa.Engine:
    """An engine for the database; SQLite is opened read-only (a missing file is an error, not a new database)."""
    database_file = sqlite_file(config, base_dir)
    if database_file is not None:
        if not database_file.is_file():
            what = "is a folder, not a database file" if database_file.is_dir() else "does not exist"
            raise SourceError(f"{database_file}: {what} -> fix the source's `url:` (sqlite:///relative/to/the/config.db, "
                              f"or sqlite:////absolute/path.db)")
        uri = database_file.resolve().as_uri() + "?mode=ro"
        return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True))
    url = sa.engine.make_url(config.url)
    secret = password(config)
    try:
        return sa.create_engine(url.set(password=secret) if secret is not None else url)
    except ModuleNotFoundError as error:
        raise SourceError(f"sql {shown_url(config)}: the database driver {error.name!r} is not installed -> install it "
                          f"on the machine that runs the flow (e.g. `pip install psycopg` for postgresql+psycopg://)") from None
    except sa.exc.NoSuchModuleError:
        raise SourceError(f"sql {shown_url(config)}: SQLAlchemy has no dialect {url.drivername!r} -> fix `url:` "
                          f"(e.g. sqlite:///file.db, postgresql+psycopg://user@host/db)") from None


def _chunks(config: Config, base_dir, query, max_rows: int | None):
    """DataFrames of `chunk_rows` rows of `query`, streamed; database errors become a SourceError with the fix."""
    database = engine(config, base_dir)
    read_so_far = 0
    try:
        with database.connect() as connection:
            streaming = connection.execution_options(stream_results=True, max_row_buffer=config.chunk_rows)
            for chunk in pd.read_sql_query(query, streaming, chunksize=config.chunk_rows):
                yield chunk
                read_so_far += len(chunk)
                if max_rows is not None and read_so_far >= max_rows:
                    break
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as error:
        # pandas wraps SQLAlchemy's error (and prints the statement): report the driver's own message.
        cause = error.__cause__ if isinstance(error.__cause__, sa.exc.SQLAlchemyError) else error
        raise SourceError(f"sql {shown_url(config)}: {_reason(cause)} -> {_fix(config, cause)}") from None
    finally:
        database.dispose()


def _reason(error: Exception) -> str:
    """The driver's message without SQLAlchemy's statement dump and background link."""
    original = getattr(error, "orig", None)
    message = str(original) if original is not None else str(error)
    return re.sub(r"\s*\(Background on this error at: [^)]*\)", "", message).strip().splitlines()[0]


def _fix(config: Config, error: Exception) -> str:
    if isinstance(error, sa.exc.OperationalError) and not re.search(r"no such (table|column)|syntax error", str(error)):
        return "check `url:` (host, port, database) and the password's environment variable or secret, and that the server is up"
    return "fix `table:`" if config.table else "fix `query:` (run it in a SQL shell first)"
