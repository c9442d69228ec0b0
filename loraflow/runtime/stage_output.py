"""What every stage returns, and the one way a stage writes its output and its quarantine."""

import ctypes
import re

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from data_contracts import QUARANTINE, Contract, ContractViolation, enforce
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS, DigestSet, digests16


class StageResult(BaseModel):
    """A stage's output reference plus the row accounting the run summary shows."""

    stage: str
    output: ArtifactRef
    quarantine: ArtifactRef | None = None
    rows_in: int
    rows_out: int
    rows_quarantined: int
    stats: dict = Field(default_factory=dict, description="Stage-specific counts (skips, truncations, ...).")


def write_stage_output(
    store: ArtifactStore,
    *,
    stage: str,
    contract: Contract,
    frame: pd.DataFrame,
    rows_in: int,
    config_hash: str,
    quarantined: pd.DataFrame | None = None,
    stats: dict | None = None,
) -> StageResult:
    """Enforce `contract` on `frame`, write valid rows and all quarantined rows, and account for every row.

    `quarantined` holds rows the stage itself set aside (same columns as the quarantine contract); rows that
    break the contract's row rules are added to them.
    """
    if len(frame) == 0 and quarantined is not None and len(quarantined) and not contract.allow_empty:
        raise_emptied(store, stage, quarantined, rows_in, config_hash)
    output = StageWriter(store, stage=stage, contract=contract, config_hash=config_hash)
    try:
        output.add(frame, quarantined, raise_if_empty=True)
    except BaseException:
        output.abort()
        raise
    return output.finish(rows_in=rows_in, stats=stats)


class StageWriter:
    """A stage's output written a batch at a time: the contract enforced on each batch, unique columns kept unique
    across batches (16-byte digests), quarantined rows gathered, every row accounted for by `finish`."""

    def __init__(self, store: ArtifactStore, *, stage: str, contract: Contract, config_hash: str,
                 row_group_rows: int = ROW_GROUP_ROWS):
        self.store, self.stage, self.contract, self.config_hash = store, stage, contract, config_hash
        self.output = store.writer(stage=stage, contract=contract.name, schema_version=contract.version,
                                   config_hash=config_hash, row_group_rows=row_group_rows)
        self.quarantined: list[pd.DataFrame] = []
        self.seen = {column: DigestSet() for column in contract.unique}
        self.rows_offered = 0  # rows given to `add` so far: the row_index of a contract-broken row counts from here

    def add(self, frame: pd.DataFrame, quarantined: pd.DataFrame | None = None, *, raise_if_empty: bool = False) -> None:
        """Enforce the contract on one batch, write its valid rows, keep its quarantined ones (the stage's own first)."""
        valid, broken = enforce(frame, self.contract, where=f"stage '{self.stage}'", seen_before=self._seen_before,
                                first_row=self.rows_offered, raise_if_empty=raise_if_empty)
        for column, digests in self.seen.items():
            digests.add(digests16(frame[column].tolist()))
        self.quarantined += [part for part in (quarantined, broken) if part is not None and len(part)]
        self.rows_offered += len(frame)
        if len(valid):
            self.output.append(valid)
        give_back_freed_memory()

    def finish(self, *, rows_in: int, stats: dict | None = None) -> StageResult:
        """Commit the output and the quarantine; raise (keeping the quarantine) when no row is left."""
        quarantined = pd.concat(self.quarantined, ignore_index=True) if self.quarantined else pd.DataFrame()
        if self.output.rows == 0 and not self.contract.allow_empty:
            self.output.abort()
            if len(quarantined):
                raise_emptied(self.store, self.stage, quarantined, rows_in, self.config_hash)
            raise ContractViolation(f"stage '{self.stage}': no valid rows left: the input had no rows. Top reasons: {{}}")
        output = self.output.commit()
        quarantine_ref = None
        if len(quarantined):
            quarantine_ref = self.store.write(
                quarantined, stage=f"{self.stage}-quarantine", contract=QUARANTINE.name,
                schema_version=QUARANTINE.version, config_hash=self.config_hash,
            )
        rows_dropped_silently = rows_in + (stats or {}).get("rows_expanded", 0) - output.rows - len(quarantined)
        return StageResult(
            stage=self.stage, output=output, quarantine=quarantine_ref, rows_in=rows_in, rows_out=output.rows,
            rows_quarantined=len(quarantined), stats={**(stats or {}), "unaccounted_rows": rows_dropped_silently},
        )

    def abort(self) -> None:
        """Drop what was written (the stage failed)."""
        self.output.abort()

    def _seen_before(self, column: str, values: pd.Series) -> np.ndarray:
        return self.seen[column].contains(digests16(values.tolist()))


def give_back_freed_memory() -> None:
    """Return freed heap pages to the system after a batch: Arrow's pool and glibc's malloc otherwise keep them, and
    what they kept grew with the number of batches (tokenize at 100,000 catalog rows: 0.50 GiB RssAnon at its start
    without this, 0.37 GiB with it; benchmarks/data_scale.py measures the whole flow)."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def raise_emptied(store: ArtifactStore, stage: str, quarantined: pd.DataFrame, rows_in: int, config_hash: str) -> None:
    """The stage set every row aside: keep them in its quarantine artifact and stop here, saying why."""
    ref = store.write(quarantined, stage=f"{stage}-quarantine", contract=QUARANTINE.name,
                      schema_version=QUARANTINE.version, config_hash=config_hash)
    top = "; ".join(f"{count} x {reason}" for reason, count in quarantined["reason"].value_counts().head(3).items())
    raise ContractViolation(
        f"stage '{stage}': no rows left: all {rows_in} input rows were set aside ({top}); they are in {ref.uri} "
        f"-> change the data, or the {stage} settings that set them aside"
    )


def read_input_batches(store: ArtifactStore, ref: ArtifactRef, contract: Contract, batch_rows: int = ROW_GROUP_ROWS,
                       columns: list[str] | None = None):
    """An upstream artifact as DataFrames of at most `batch_rows` rows (of `columns` alone when given), verified, each
    checked against its contract's structure; a DataFrame's index is the position of its rows in the artifact."""
    from data_contracts import check_structure

    first_row, expected = 0, contract if columns is None else contract.narrowed(columns)
    for batch in store.read_batches(ref, batch_rows=batch_rows, columns=columns):
        frame = batch.to_pandas()
        frame.index = pd.RangeIndex(first_row, first_row + len(frame))
        check_structure(frame, expected, where=ref.uri)
        first_row += len(frame)
        yield frame


def rows_at(store: ArtifactStore, ref: ArtifactRef, positions, columns: list[str]) -> pd.DataFrame:
    """The `columns` of the rows at `positions` (ascending) of an artifact, read a batch at a time."""
    wanted, parts, first_row = np.asarray(positions, dtype=np.int64), [], 0
    for batch in store.read_batches(ref, columns=columns):
        inside = wanted[(wanted >= first_row) & (wanted < first_row + batch.num_rows)] - first_row
        if len(inside):
            parts.append(batch.take(inside).to_pandas())
        first_row += batch.num_rows
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({column: [] for column in columns})


def read_input(store: ArtifactStore, ref: ArtifactRef, contract: Contract) -> pd.DataFrame:
    """Read an upstream artifact, verifying its hash and its contract's structure."""
    from data_contracts import check_structure

    frame = store.read(ref)
    check_structure(frame, contract, where=ref.uri)
    return frame


# Numbers and quoted values vary row by row ("invalid JSON at line 7", "Producers is 'UNKNOWN'"): reasons that
# differ only there are one kind of reason.
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


def top_reasons(reasons: pd.Series, count: int = 3) -> list[dict]:
    """The `count` most frequent kinds of quarantine reason: [{example, rows, similar}], most rows first.

    `example` is the first reason of its kind as written; `similar` says whether others of the kind differ from it.
    """
    if len(reasons) == 0:
        return []
    kinds = reasons.astype(str).str.replace(_VARYING, "#", regex=True)
    top = []
    for kind, rows in kinds.value_counts(sort=True).head(count).items():
        members = reasons[kinds == kind].astype(str)
        top.append({"example": members.iloc[0], "rows": int(rows), "similar": bool(members.nunique() > 1)})
    return top


def quarantine_reasons(store: ArtifactStore, result: StageResult, count: int = 3) -> list[dict]:
    """top_reasons of a stage's quarantine artifact (none when it set nothing aside)."""
    return top_reasons(store.read(result.quarantine)["reason"], count) if result.quarantine is not None else []
