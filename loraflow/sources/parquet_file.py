"""Parquet source: one .parquet file, columns and types as stored (the worked example in docs/add_a_source.md)."""

from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field

from loraflow.sources.common import SourceBase, SourceError, existing_file
# The rest of the source interface (loraflow/sources/common.py) is the one every single-file source shares.
from loraflow.sources.common import file_check as check, file_default_name as default_name  # noqa: F401
from loraflow.sources.common import file_fingerprint as fingerprint, file_locations as locations  # noqa: F401


class Config(SourceBase):
    """A Parquet file."""

    model_config = ConfigDict(title="Parquet file")
    kind: Literal["parquet"] = Field("parquet", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the file name).")
    path: str = Field(..., description="Path of the .parquet file (relative to the config file).")
    columns: list[str] | None = Field(None, description="Read only these columns. None reads all.")
    max_rows: int | None = Field(None, ge=1, description="Read only the first N rows (small demos). None reads all.")


def read(config: Config, base_dir) -> pd.DataFrame:
    """Read the file (or its first max_rows rows) into a DataFrame."""
    path = existing_file(config.path, base_dir)
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceError(f"{path}: not a readable Parquet file ({error}) -> check `path:` points at a .parquet file") from None
    missing = [column for column in config.columns or [] if column not in names]
    if missing:
        raise SourceError(f"{path}: no column(s) {missing} -> fix `columns:` (the file has {names})")
    rows = pq.read_table(path, columns=config.columns).to_pandas()
    # A named pandas index (written by `to_parquet`) is data, e.g. anime_id: keep it as a column; an unnamed one is not.
    rows = rows.reset_index(drop=all(name is None for name in rows.index.names))
    return rows.head(config.max_rows) if config.max_rows is not None else rows


def read_batches(config: Config, base_dir, batch_rows: int):
    """The file's rows as DataFrames of `batch_rows` rows, a row group at a time: the rows and values `read` gives."""
    path = existing_file(config.path, base_dir)
    try:
        parquet = pq.ParquetFile(path, pre_buffer=False)  # pre-buffered row groups would pile up (read_batches)
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceError(f"{path}: not a readable Parquet file ({error}) -> check `path:` points at a .parquet file") from None
    names = parquet.schema_arrow.names
    missing = [column for column in config.columns or [] if column not in names]
    if missing:
        raise SourceError(f"{path}: no column(s) {missing} -> fix `columns:` (the file has {names})")
    left = config.max_rows
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=config.columns):
        rows = pa.Table.from_batches([batch]).to_pandas()
        rows = rows.reset_index(drop=all(name is None for name in rows.index.names))
        if left is not None:
            rows, left = rows.head(left), left - min(left, len(rows))
        yield rows
        if left == 0:
            return


def column_names(config: Config, base_dir) -> list[str]:
    """The columns read() returns, from the file's schema (for `loraflow check`)."""
    names = [name for name in pq.read_schema(existing_file(config.path, base_dir)).names if not name.startswith("__index_level_")]
    return list(config.columns) if config.columns else names
