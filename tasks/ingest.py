"""Ingest: one configured source -> its rows as read, plus provenance columns, as a RAW artifact.

`_source` (the source's name) and `_row` (0-based record position within the source) are added to every
row so any later example can be traced back to the line it came from. Records a reader cannot parse (a bad
JSON line) go to the quarantine artifact with their line number; a source that cannot be read at all
raises SourceError naming the file, the offset and the fix. Values are not interpreted here.
"""

import logging

import pandas as pd
import pyarrow as pa
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from data_contracts import RAW
from data_contracts.base import quarantine_rows
from loraflow.config.pipeline import config_hash
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.stage_output import StageResult, StageWriter
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_task import stage_task
from loraflow.sources import SOURCES, Rejected, SourceConfig, SourceError, source_fingerprint, source_name

PROVENANCE = ("_source", "_row")

__all__ = ["SourceError", "ingest_frame", "run_ingest", "source_fingerprint", "ingest_task"]


def ingest_frame(source, base_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read one source; return (rows with `_source` and `_row` first, quarantine rows for unparseable records)."""
    name = source_name(source)
    result = SOURCES[source.kind].read(source, base_dir)
    # A plain DataFrame is in source order; a (rows, rejected) pair carries record positions in its index.
    rows, rejected = result if isinstance(result, tuple) else (result.reset_index(drop=True), [])
    if source.max_rows is not None:  # sources cut early for speed; this makes the limit hold for every source
        rows = rows[rows.index < source.max_rows]
        rejected = [record for record in rejected if record.row < source.max_rows]
    clashes = [column for column in PROVENANCE if column in rows.columns]
    if clashes:
        raise SourceError(f"source {name!r}: has column(s) {clashes}, which ingest adds itself -> rename them in the data")
    if len(rows) == 0:
        reasons = "; ".join(record.reason for record in rejected[:3])
        found = f"all {len(rejected)} records are broken ({reasons})" if rejected else "it has no data rows"
        raise SourceError(f"source {name!r}: nothing to ingest: {found} -> fix the data (or `max_rows:`)")
    check_arrow_types(rows, name)
    rows = rows.copy()
    rows.insert(0, "_row", rows.index.to_numpy(dtype="int64"))
    rows.insert(0, "_source", pd.Series(name, index=rows.index, dtype=str))
    return rows.reset_index(drop=True), rejected_rows(rejected, name)


def rejected_rows(rejected: list[Rejected], name: str) -> pd.DataFrame:
    """Quarantine rows (QUARANTINE contract) for records a reader could not parse, kept verbatim."""
    positions = pd.Index([record.row for record in rejected], dtype="int64")
    records = pd.DataFrame(
        {"_source": name, "_row": positions.to_numpy(), "text": [record.text for record in rejected]}, index=positions
    )
    return quarantine_rows(records, pd.Series([record.reason for record in rejected], index=positions, dtype=object), "ingest")


def check_arrow_types(rows: pd.DataFrame, name: str) -> None:
    """Refuse a column Parquet cannot store (e.g. numbers in some rows, text in others) before writing."""
    for column in rows.columns[rows.dtypes == object]:
        try:
            pa.array(rows[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            kinds = rows[column].dropna().map(lambda value: type(value).__name__).value_counts().to_dict()
            nested = {"list", "dict"} & set(kinds)
            hint = "make every value a list (or every value text)" if nested else "quote the numbers so every value is text"
            raise SourceError(
                f"source {name!r}: column {column!r} mixes value types {kinds} with no kind held by most rows "
                f"({error}) -> give the column one type in the data (e.g. {hint})"
            ) from None


def run_ingest(source, store: ArtifactStore, base_dir, batch_rows: int = ROW_GROUP_ROWS) -> StageResult:
    """Read one source and write its RAW artifact (and quarantine); every record read is accounted for. A source
    that reads in batches (`read_batches`: csv) is written a batch at a time; others are read whole."""
    name = source_name(source)
    output = StageWriter(store, stage="ingest", contract=RAW, config_hash=config_hash(source), row_group_rows=batch_rows)
    rows_in, columns = 0, None
    try:
        for rows, quarantine in ingested_batches(source, base_dir, batch_rows):
            output.add(rows, quarantine)
            rows_in, columns = rows_in + len(rows) + len(quarantine), len(rows.columns) - len(PROVENANCE)
    except BaseException:
        output.abort()
        raise
    result = output.finish(rows_in=rows_in, stats={"source": name, "kind": source.kind, "columns": columns,
                                                   "max_rows": source.max_rows})
    _logger().info(
        "ingest %s (%s): %d rows read, %d quarantined, %d columns",
        name, source.kind, result.rows_in, result.rows_quarantined, result.stats["columns"],
    )
    return result


def ingested_batches(source, base_dir, batch_rows: int):
    """(rows with provenance, quarantine rows) per batch of the source; ingest_frame's checks, batch by batch. A
    batch is a DataFrame in source order, or (rows indexed by record position, rejected records) like `read`'s."""
    read_batches = getattr(SOURCES[source.kind], "read_batches", None)
    if read_batches is None:
        yield ingest_frame(source, base_dir)
        return
    name, rows_seen, rejected_seen, broken = source_name(source), 0, [], 0
    for batch in read_batches(source, base_dir, batch_rows):
        rows, rejected = batch if isinstance(batch, tuple) else (batch, [])
        clashes = [column for column in PROVENANCE if column in rows.columns]
        if clashes:
            raise SourceError(f"source {name!r}: has column(s) {clashes}, which ingest adds itself -> rename them in the data")
        check_arrow_types(rows, name)
        positions = rows.index if isinstance(batch, tuple) else pd.RangeIndex(rows_seen, rows_seen + len(rows))
        rows = rows.set_axis(positions)
        rows.insert(0, "_row", rows.index.to_numpy(dtype="int64"))
        rows.insert(0, "_source", pd.Series(name, index=rows.index, dtype=str))
        rows_seen, rejected_seen, broken = rows_seen + len(rows), rejected_seen + rejected[:3], broken + len(rejected)
        yield rows.reset_index(drop=True), rejected_rows(rejected, name)
    if rows_seen == 0:
        reasons = "; ".join(record.reason for record in rejected_seen[:3])
        found = f"all {broken} records are broken ({reasons})" if broken else "it has no data rows"
        raise SourceError(f"source {name!r}: nothing to ingest: {found} -> fix the data (or `max_rows:`)")


@stage_task(name="ingest")
def ingest_task(source: SourceConfig, base_dir: str, store_root: str, source_fingerprint: str) -> StageResult:
    """Prefect task: ingest one source. `source_fingerprint` (what the data is now) is only there for the cache key."""
    return run_ingest(source, ArtifactStore(store_root), base_dir)


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("loraflow.ingest")
