"""Content-addressed Parquet artifact store (a local folder, or any fsspec URL).

Layout: `<root>/artifacts/<stage>/<sha256>.parquet` plus `<sha256>.manifest.json`, the manifest written last
so its existence proves the Parquet file is complete. Local writes go to a temp file in the same folder,
are fsynced and renamed; readers verify the manifest's sha256 and row count before using a file.
"""

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable pointer to a verified artifact: what stages pass each other."""

    uri: str = Field(..., description="Location of the Parquet file.")
    sha256: str = Field(..., description="sha256 of the file's bytes (also its name).")
    rows: int = Field(..., description="Number of rows.")
    contract: str = Field(..., description="Name of the data contract the rows satisfy.")
    schema_version: int = Field(..., description="Version of that contract.")
    stage: str = Field(..., description="Stage that produced it.")
    config_hash: str = Field(..., description="Hash of the stage config that produced it.")


class CorruptArtifact(RuntimeError):
    """An artifact whose bytes or manifest do not match: never used, recomputed by the flow."""


class ArtifactStore:
    """Write and read Parquet artifacts by content hash."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def write(self, frame: pd.DataFrame, *, stage: str, contract: str, schema_version: int, config_hash: str) -> ArtifactRef:
        """Write `frame` as a Parquet artifact and return its reference (idempotent for equal content)."""
        payload = table_bytes(frame)
        sha = hashlib.sha256(payload).hexdigest()
        folder = f"{self.base}/artifacts/{stage}"
        data_path, manifest_path = f"{folder}/{sha}.parquet", f"{folder}/{sha}.manifest.json"
        ref = ArtifactRef(
            uri=self._uri(data_path), sha256=sha, rows=len(frame), contract=contract,
            schema_version=schema_version, stage=stage, config_hash=config_hash,
        )
        manifest = json.dumps({**ref.model_dump(), "bytes": len(payload), "written_at": time.time()}, indent=1)
        self._write_atomic(data_path, payload)
        # The manifest goes last: a reader that finds it knows the Parquet file is whole.
        self._write_atomic(manifest_path, manifest.encode())
        return ref

    def read(self, ref: ArtifactRef, *, verify: bool = True) -> pd.DataFrame:
        """Read an artifact, checking its manifest and sha256 first."""
        payload = self._read_verified(ref) if verify else self._cat(self._path(ref.uri))
        return pq.read_table(pa.BufferReader(payload)).to_pandas()

    def read_arrow(self, ref: ArtifactRef) -> pa.Table:
        """Read an artifact as an Arrow table (verified)."""
        return pq.read_table(pa.BufferReader(self._read_verified(ref)))

    def is_valid(self, ref: ArtifactRef) -> bool:
        """True when the artifact's file and manifest exist and match its hash and row count."""
        try:
            self._read_verified(ref)
            return True
        except CorruptArtifact:
            return False

    def _read_verified(self, ref: ArtifactRef) -> bytes:
        data_path = self._path(ref.uri)
        manifest_path = data_path[: -len(".parquet")] + ".manifest.json"
        if not self.fs.exists(manifest_path):
            raise CorruptArtifact(f"{ref.uri}: no manifest (partial or foreign write); it will be recomputed")
        try:
            manifest = json.loads(self._cat(manifest_path))
        except (ValueError, OSError) as error:
            raise CorruptArtifact(f"{manifest_path}: unreadable manifest ({error})") from None
        if not self.fs.exists(data_path):
            raise CorruptArtifact(f"{ref.uri}: file missing")
        payload = self._cat(data_path)
        actual = hashlib.sha256(payload).hexdigest()
        if actual != ref.sha256 or manifest.get("sha256") != ref.sha256:
            raise CorruptArtifact(
                f"{ref.uri}: sha256 is {actual[:12]}…, manifest says {str(manifest.get('sha256'))[:12]}…, "
                f"expected {ref.sha256[:12]}… (truncated or modified file)"
            )
        if manifest.get("rows") != ref.rows:
            raise CorruptArtifact(f"{ref.uri}: manifest has {manifest.get('rows')} rows, expected {ref.rows}")
        return payload

    def _write_atomic(self, path: str, payload: bytes) -> None:
        if not self.is_local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(path, payload)  # object stores replace whole objects atomically
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp_path, path)
        except BaseException:
            if os.path.exists(temp_path):
                os.unlink(temp_path)
            raise

    def _cat(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def _uri(self, path: str) -> str:
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def _path(self, uri: str) -> str:
        return uri if self.is_local else self.fs._strip_protocol(uri)


def table_bytes(frame: pd.DataFrame) -> bytes:
    """Deterministic Parquet bytes of a DataFrame (same rows -> same bytes -> same hash)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
