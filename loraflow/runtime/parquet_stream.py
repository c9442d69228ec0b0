"""Parquet written a batch at a time, in the same bytes whatever the batches: what streaming artifacts are made of.

`ParquetStream` takes Arrow tables of any size and writes row groups of exactly `row_group_rows` rows (the last one
shorter) with pyarrow's ParquetWriter, hashing the bytes as they go out, so a file's bytes (and its sha256, the
artifact's name) depend only on its rows and schema, not on how a stage batched them: a table written whole
(`ArtifactStore.write`) and the same rows streamed in batches are the same artifact.

A later batch may widen the schema (a column that was all null gets a type, a struct gains a field: messages with
an `input`): the rows already written are then copied once, row group by row group, into a file of the widened
schema (`pa.unify_schemas(..., promote_options="permissive")`), which is what one whole-table write would have made.

`DigestSet` answers "seen before?" for 16-byte digests in sorted NumPy runs (16 bytes a row, no Python objects), the
building block of the streaming duplicate, uniqueness and leakage checks.
"""

import hashlib
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 8192  # rows per Parquet row group: what a streaming stage holds of one artifact at a time
COMPRESSION = "zstd"


class HashingFile(io.RawIOBase):
    """A write-only file that passes bytes on to `sink` and keeps their sha256 and count."""

    def __init__(self, sink):
        super().__init__()
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, block) -> int:
        view = memoryview(block)
        self.digest.update(view)
        self.sink.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size


class ParquetStream:
    """Rows appended as Arrow tables, written to `path` (or an open binary `sink`) in fixed-size row groups."""

    def __init__(self, path: str | None = None, *, sink=None, row_group_rows: int = ROW_GROUP_ROWS):
        self.path, self.row_group_rows = path, row_group_rows
        self._sink = sink if sink is not None else open(path, "wb")
        self._hashing = HashingFile(self._sink)
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def append(self, table: pa.Table) -> None:
        """Queue `table`'s rows; full row groups are written out at once."""
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema, check_metadata=False):
            widened = pa.unify_schemas([self.schema, table.schema], promote_options="permissive")
            if not widened.equals(self.schema, check_metadata=False):
                self._widen(widened.with_metadata(self.schema.metadata))
            table = table.cast(self.schema) if table.schema.names == self.schema.names else table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._write_group(self.row_group_rows)

    def close(self, schema: pa.Schema | None = None) -> tuple[str, int]:
        """Write what is left and the footer; return (sha256 of the bytes, byte count). `schema` is used when no
        row was appended (an empty artifact still has its columns)."""
        if self.schema is None:
            self.schema = schema if schema is not None else pa.schema([])
        if self._pending_rows:
            self._write_group(self._pending_rows)
        self._open().close()
        self._sink.flush()
        return self._hashing.digest.hexdigest(), self._hashing.size

    def fileno(self) -> int:
        return self._sink.fileno()

    def discard(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass
        self._sink.close()

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._hashing, self.schema, compression=COMPRESSION)
        return self._writer

    def _write_group(self, rows: int) -> None:
        whole = pa.concat_tables(self._pending).combine_chunks() if len(self._pending) > 1 else self._pending[0]
        self._open().write_table(whole.slice(0, rows), row_group_size=rows)
        rest = whole.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _widen(self, widened: pa.Schema) -> None:
        """Rewrite the row groups already written with the widened schema (same row groups, new types)."""
        self._pending = [table.cast(widened) for table in self._pending]
        self.schema = widened
        if self._writer is None:
            return
        if self.path is None:
            raise ValueError("a Parquet stream to an open sink cannot widen its schema after a row group was written")
        self._writer.close()
        self._sink.close()
        old_path = self.path + ".narrow"
        os.replace(self.path, old_path)
        self._sink = open(self.path, "wb")
        self._hashing, self._writer = HashingFile(self._sink), None
        try:
            narrow = pq.ParquetFile(old_path, pre_buffer=False)
            for group in range(narrow.num_row_groups):
                part = narrow.read_row_group(group).cast(widened)
                self._open().write_table(part, row_group_size=part.num_rows)
        finally:
            os.unlink(old_path)


def table_parquet_bytes(table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> bytes:
    """The bytes a ParquetStream writes for `table` (whole tables and streamed batches give the same)."""
    sink = io.BytesIO()
    stream = ParquetStream(sink=sink, row_group_rows=row_group_rows)
    stream.append(table)
    stream.close(table.schema)
    return sink.getvalue()


def digests16(values) -> np.ndarray:
    """A 16-byte blake2b digest of each value (bytes, or text as UTF-8), as a NumPy `S16` array."""
    out = np.empty(len(values), dtype="S16")
    for position, value in enumerate(values):
        payload = value if isinstance(value, (bytes, memoryview)) else str(value).encode("utf-8", "surrogatepass")
        out[position] = hashlib.blake2b(payload, digest_size=16).digest()
    return out


class DigestSet:
    """A set of 16-byte digests kept as sorted NumPy runs (merged as they grow, log-many runs to search)."""

    def __init__(self):
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """True where a digest is in the set."""
        found = np.zeros(len(digests), dtype=bool)
        for run in self._runs:
            at = np.searchsorted(run, digests)
            found |= (at < len(run)) & (run[np.minimum(at, len(run) - 1)] == digests)
        return found

    def add(self, digests: np.ndarray) -> None:
        """Put `digests` in the set."""
        run = np.unique(digests)
        if not len(run):  # an empty batch
            return
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.union1d(self._runs.pop(), run)
        self._runs.append(run)

    def add_new(self, digests: np.ndarray) -> np.ndarray:
        """True where a digest was neither in the set nor earlier in `digests`; all of them are in the set afterwards."""
        _, first = np.unique(digests, return_index=True)
        new = np.zeros(len(digests), dtype=bool)
        new[first] = True
        new &= ~self.contains(digests)
        self.add(digests)
        return new
