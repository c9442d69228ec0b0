"""An artifact written a batch at a time: same file, name and manifest as `ArtifactStore.write`, bounded memory.

The rows go to a temp file in the artifact's folder (on an object store: in this machine's temp folder, then one
PUT), through a `ParquetStream` that hashes the bytes as they are written; `commit` fsyncs it, renames it to
`<sha256>.parquet` and writes the manifest last, so the usual rules hold: a reader that finds the manifest finds a
whole file, a killed writer leaves only a temp file that the next write in that folder removes.
"""

import os
import socket
import tempfile

import pandas as pd
import pyarrow as pa

from loraflow.runtime.artifact_store import TEMP_PREFIX, ArtifactRef, ArtifactStore, disk_full, remove_stale_temp_files
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS, ParquetStream


class ArtifactWriter:
    """Append Arrow tables (or DataFrames), then `commit()` for the ArtifactRef; `abort()` leaves nothing."""

    def __init__(self, store: ArtifactStore, *, stage: str, contract: str, schema_version: int, config_hash: str,
                 row_group_rows: int = ROW_GROUP_ROWS):
        self.store, self.stage, self.contract = store, stage, contract
        self.schema_version, self.config_hash = schema_version, config_hash
        self.folder = f"{store.base}/artifacts/{stage}"
        temp_folder = self.folder if store.is_local else tempfile.gettempdir()
        os.makedirs(temp_folder, exist_ok=True)
        if store.is_local:
            remove_stale_temp_files(temp_folder)
        # The temp name carries host and pid, so a later write can tell a dead writer's leftover from a live one.
        handle, self.temp_path = tempfile.mkstemp(dir=temp_folder, prefix=f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                                  suffix=".part")
        os.close(handle)
        self.stream = ParquetStream(self.temp_path, row_group_rows=row_group_rows)

    @property
    def rows(self) -> int:
        return self.stream.rows

    def append(self, rows: pa.Table | pd.DataFrame) -> None:
        """Add rows (a DataFrame is converted without its index)."""
        table = pa.Table.from_pandas(rows, preserve_index=False) if isinstance(rows, pd.DataFrame) else rows
        try:
            self.stream.append(table)
        except OSError as error:
            self._fail(error)

    def commit(self, schema: pa.Schema | None = None) -> ArtifactRef:
        """Finish the file, move it to its content address, write the manifest; `schema` types an empty artifact."""
        try:
            sha, size = self.stream.close(schema)
            os.fsync(self.stream.fileno())
            self.stream.discard()
            data_path = f"{self.folder}/{sha}.parquet"
            if self.store.is_local:
                os.replace(self.temp_path, data_path)
            else:
                self.store.fs.makedirs(self.folder, exist_ok=True)
                self.store.fs.put_file(self.temp_path, data_path)  # one PUT: visible whole or not at all
                os.unlink(self.temp_path)
        except OSError as error:
            self._fail(error)
        ref = ArtifactRef(uri=self.store._uri(data_path), sha256=sha, rows=self.stream.rows, contract=self.contract,
                          schema_version=self.schema_version, stage=self.stage, config_hash=self.config_hash)
        self.store._write_manifest(ref, size)
        return ref

    def abort(self) -> None:
        """Drop the rows written so far."""
        self.stream.discard()
        if os.path.exists(self.temp_path):
            os.unlink(self.temp_path)

    def _fail(self, error: OSError):
        self.abort()
        full = disk_full(error, self.folder, "an artifact into", "Nothing partial was left and earlier artifacts are intact")
        if full is not None:
            raise full from error
        raise error
