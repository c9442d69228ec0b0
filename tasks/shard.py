"""Shard: the RAW rows of every source -> `shards` sets of RAW artifacts, by a stable hash of each row's id;
and the way shard outputs are put back into the single-process order.

A row's shard is blake2b(row id) mod shards. The row id is the value of the id column its synthesizer groups
questions by (anime_qa `columns.id`, the others' `id_column`), else `<source>:<_row>`. So all questions of a
row are made in one shard, a row keeps its shard when rows are added, and a changed row changes only its
shard's artifacts: the other shards' synthesize/format/tokenize tasks are cache hits.

Merging: inside a shard, rows keep their source order, and every stage keeps its rows' order. Sorting the
concatenated shard outputs by (source position in the config, `source_row`), stably, therefore gives exactly
the order the single-process path produces, which the dataset-level steps (which copy of a duplicate is
kept) and the artifact bytes depend on.
"""

import hashlib

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from data_contracts import FORMATTED, RAW
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.runtime.shard_merge import merge_sequence, merged_frames, shard_keys
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.stage_output import StageResult, StageWriter, read_input, read_input_batches
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_task import stage_task
from loraflow.synthesizers.common import column_text

__all__ = ["Shard", "ShardPlan", "id_column_for", "shard_numbers", "shard_frames", "run_shard", "shard_task",
           "example_origins", "in_source_order", "run_merge_formatted", "merge_formatted_task"]


class Shard(BaseModel):
    """One shard's input: a RAW artifact per source that has rows in it."""

    number: int = Field(..., description="The shard's hash bucket (0 .. shards-1).")
    raw_refs: list[ArtifactRef] = Field(..., description="RAW artifacts, in config source order.")
    kinds: list[str | None] = Field(..., description="The synthesizer of each artifact's source (None = synthesize.kind).")
    rows: int = Field(..., description="Source rows in the shard.")


class ShardPlan(BaseModel):
    """What the shard stage returns: the non-empty shards and the row accounting."""

    shards: list[Shard]
    rows_in: int
    rows_out: int
    stats: dict = Field(default_factory=dict)

    def refs(self) -> list[ArtifactRef]:
        return [ref for shard in self.shards for ref in shard.raw_refs]


def id_column_for(config: SynthesizeConfig, kind: str | None) -> str | None:
    """The column the source's synthesizer takes its row id from (None: it uses source + row position)."""
    options = getattr(config, kind or config.kind)
    columns = getattr(options, "columns", None)
    return getattr(options, "id_column", None) or getattr(columns, "id", None)


def row_ids(raw: pd.DataFrame, id_column: str | None) -> list[str]:
    """Each row's shard key: its id column's value (trimmed, non-empty), else '<source>:<_row>'."""
    fallback = [f"{source}:{row}" for source, row in zip(raw["_source"].tolist(), raw["_row"].tolist())]
    if id_column is None or id_column not in raw.columns:  # a wrong column name fails in synthesize, with the fix
        return fallback
    given = column_text(raw, id_column)
    return [value.strip() if value is not None and value.strip() else default for value, default in zip(given, fallback)]


def shard_numbers(ids: list[str], shards: int) -> np.ndarray:
    """blake2b of each id, mod `shards`: the same id gets the same shard on every machine and run."""
    digests = np.fromiter(
        (int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") for value in ids),
        dtype=np.uint64, count=len(ids),
    )
    return (digests % np.uint64(shards)).astype(np.int64)


def shard_frames(raw_frames: list[pd.DataFrame], id_columns: list[str | None], shards: int) -> list[list[pd.DataFrame]]:
    """Per shard, per source: that source's rows in the shard, in source order. Pure."""
    per_shard: list[list[pd.DataFrame]] = [[] for _ in range(shards)]
    for raw, id_column in zip(raw_frames, id_columns):
        numbers = shard_numbers(row_ids(raw, id_column), shards)
        order = np.argsort(numbers, kind="stable")  # by shard, source order inside each: one pass for any shard count
        bounds = np.searchsorted(numbers[order], np.arange(shards + 1))
        for number in range(shards):
            per_shard[number].append(raw.take(order[bounds[number]:bounds[number + 1]]).reset_index(drop=True))
    return per_shard


def run_shard(raw_refs: list[ArtifactRef], kinds: list[str | None], id_columns: list[str | None], shards: int,
              store: ArtifactStore, batch_rows: int = ROW_GROUP_ROWS) -> ShardPlan:
    """Read the RAW artifacts a batch at a time into one RAW artifact per (shard, source with rows there), return the
    plan. A process holds a batch plus, per shard, the rows of its row group not yet written."""
    shard_refs: list[list[tuple[ArtifactRef, str | None]]] = [[] for _ in range(shards)]
    rows_in = rows_out = 0
    for raw_ref, kind, id_column in zip(raw_refs, kinds, id_columns):
        outputs = [StageWriter(store, stage="shard", contract=RAW, config_hash=f"shard-{number}-of-{shards}")
                   for number in range(shards)]
        try:
            for raw in read_input_batches(store, raw_ref, RAW, batch_rows):
                numbers = shard_numbers(row_ids(raw, id_column), shards)
                for number, output in enumerate(outputs):
                    if (numbers == number).any():
                        output.add(raw[numbers == number].reset_index(drop=True))
                rows_in += len(raw)
            for number, output in enumerate(outputs):
                if output.rows_offered:
                    written = output.finish(rows_in=output.rows_offered)
                    shard_refs[number].append((written.output, kind))
                    rows_out += written.rows_out
                else:
                    output.abort()
        except BaseException:
            for output in outputs:
                output.abort()
            raise
    plan = [Shard(number=number, raw_refs=[ref for ref, _ in refs], kinds=[kind for _, kind in refs],
                  rows=sum(ref.rows for ref, _ in refs)) for number, refs in enumerate(shard_refs) if refs]
    rows = [shard.rows for shard in plan]
    return ShardPlan(shards=plan, rows_in=rows_in, rows_out=rows_out,
                     stats={"shards": shards, "non_empty_shards": len(plan), "rows_per_shard_min": min(rows, default=0),
                            "rows_per_shard_max": max(rows, default=0)})


@stage_task(name="shard")
def shard_task(raw_refs: list[ArtifactRef], kinds: list[str | None], id_columns: list[str | None], shards: int,
               store_root: str) -> ShardPlan:
    """Prefect task around run_shard; cached on the RAW artifacts' hashes, the shard count and this code."""
    return run_shard(raw_refs, kinds, id_columns, shards, ArtifactStore(store_root))


# ---- back to one artifact, in the single-process order


def example_origins(store: ArtifactStore, conversations_refs: list[ArtifactRef]) -> pd.DataFrame:
    """id, source and source_row of every conversation of the shards (hash-verified; Arrow keeps the
    messages column compact, and only these three columns become pandas)."""
    return pd.concat([store.read_arrow(ref).select(["id", "source", "source_row"]).to_pandas() for ref in conversations_refs],
                     ignore_index=True)


def in_source_order(frames: list[pd.DataFrame], origin: pd.DataFrame, source_names: list[str]) -> pd.DataFrame:
    """Concatenate shard outputs and sort them into the single-process order (see the module docstring).

    `origin` maps each example id to its source and row (`example_origins`).
    """
    position = {name: index for index, name in enumerate(source_names)}
    keys = origin["source"].map(position).to_numpy(dtype=np.int64) * (1 << 40) + origin["source_row"].to_numpy(dtype=np.int64)
    merged = pd.concat(frames, ignore_index=True)
    found = pd.Index(origin["id"]).get_indexer(merged["id"])
    if (found < 0).any():
        unknown = merged["id"][found < 0].head(3).tolist()
        raise ValueError(f"merge: {int((found < 0).sum())} example(s) (e.g. {unknown}) come from no conversation of these "
                         "shards: the shard artifacts are from different runs; re-run prepare with a fresh store folder")
    return merged.take(np.argsort(keys[found], kind="stable")).reset_index(drop=True)


def run_merge_formatted(conversations_refs: list[ArtifactRef], formatted_refs: list[ArtifactRef], source_names: list[str],
                        format_config_hash: str, store: ArtifactStore) -> StageResult:
    """The shards' FORMATTED artifacts as one, in single-process order: what pre-flight reads, the same bytes as
    the single-process path's. A k-way merge a batch at a time (loraflow/runtime/shard_merge.py)."""
    keys = [shard_keys(store, conversations, formatted, source_names)
            for conversations, formatted in zip(conversations_refs, formatted_refs)]
    sequence = merge_sequence(keys)
    if sequence is None:  # a shard out of source order (not made by this code): merge it whole, as before
        origin = example_origins(store, conversations_refs)
        frames = [in_source_order([read_input(store, ref, FORMATTED) for ref in formatted_refs], origin, source_names)]
    else:
        frames = merged_frames(store, formatted_refs, sequence)
    output = StageWriter(store, stage="format", contract=FORMATTED, config_hash=format_config_hash)
    control_text_rows = 0
    try:
        for frame in frames:
            output.add(frame, raise_if_empty=False)
            control_text_rows += int(frame["literal_spans"].map(len).gt(0).sum())
    except BaseException:
        output.abort()
        raise
    return output.finish(rows_in=output.rows_offered, stats={"shards": len(formatted_refs), "control_text_rows": control_text_rows})


@stage_task(name="format-merge")
def merge_formatted_task(conversations_refs: list[ArtifactRef], formatted_refs: list[ArtifactRef], source_names: list[str],
                         format_config_hash: str, store_root: str) -> StageResult:
    """Prefect task around run_merge_formatted; cached on the shard artifacts' hashes and this code."""
    return run_merge_formatted(conversations_refs, formatted_refs, source_names, format_config_hash, ArtifactStore(store_root))
