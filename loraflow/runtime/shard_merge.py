"""Shards' artifacts put back into one stream in the single-process order, a batch at a time (a k-way merge).

    keys = [shard_keys(store, conversations, output, source_names) for conversations, output in zip(...)]
    for frame in merged_frames(store, outputs, keys): ...   # DataFrames indexed by their position in the merge

Inside a shard every stage keeps its rows' order, so a shard's output is a subsequence of its conversations; each
row's key is its example's (source position in the config, source_row), found by walking the two in step. Sorting
all shards' keys stably gives the order a whole-table merge (`tasks/shard.in_source_order`) makes; as each shard's
keys ascend, the merge draws every shard's rows in file order, a record batch at a time. What stays in memory is
8 bytes of key and 2 of shard number a row, and one batch per shard.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS

SOURCE_SHIFT = 40  # key = source position << 40 | source_row


class ForeignRows(ValueError):
    """A shard output holds an example that is in none of the shard's conversations."""


def shard_keys(store: ArtifactStore, conversations: ArtifactRef, output: ArtifactRef, source_names: list[str]) -> np.ndarray:
    """Per row of `output` (one shard's artifact, its rows a subsequence of the shard's `conversations` in the same
    order), the key of its example: source position << 40 | source_row."""
    position = {name: index for index, name in enumerate(source_names)}
    origins = store.read_batches(conversations, columns=["id", "source", "source_row"])
    window: dict[str, int] = {}  # conversations read and not yet matched (the rows a later stage set aside)
    keys = []
    for batch in store.read_batches(output, columns=["id"]):
        found = np.empty(batch.num_rows, dtype=np.int64)
        for row, example in enumerate(batch.column(0).to_pylist()):
            while example not in window:
                origin = next(origins, None)
                if origin is None:
                    raise ForeignRows(f"merge: example {example!r} of {output.uri} is in none of the shard's conversations: "
                                      "the shard artifacts are from different runs; re-run prepare with a fresh store folder")
                sources = [position[name] for name in origin.column(1).to_pylist()]
                window.update(zip(origin.column(0).to_pylist(),
                                  (np.asarray(sources, dtype=np.int64) << SOURCE_SHIFT) + origin.column(2).to_numpy()))
            found[row] = window.pop(example)
        keys.append(found)
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)


def merge_sequence(keys: list[np.ndarray]) -> np.ndarray | None:
    """Which shard each row of the merge comes from (a stable sort of every shard's keys); None when some shard's keys
    do not ascend (its rows would be drawn out of file order)."""
    if any(len(k) > 1 and bool((np.diff(k) < 0).any()) for k in keys):
        return None
    shard_of = np.concatenate([np.full(len(k), shard, dtype=np.int16) for shard, k in enumerate(keys)]) if keys else np.zeros(0, np.int16)
    return shard_of[np.argsort(np.concatenate(keys) if keys else np.zeros(0), kind="stable")]


def merge_positions(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the position in the merge of every shard row, the shards' rows one after another; the index of each shard's
    first row there): row r of shard s lands at `position[first[s] + r]`, in either merge (stable on the keys)."""
    order = np.argsort(np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64), kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return position, np.concatenate([[0], np.cumsum([len(k) for k in keys], dtype=np.int64)]).astype(np.int64)


class ShardRows:
    """One shard artifact's rows handed out in file order, `take(n)` at a time."""

    def __init__(self, store: ArtifactStore, ref: ArtifactRef, columns: list[str] | None, batch_rows: int = ROW_GROUP_ROWS):
        self.batches = store.read_batches(ref, columns=columns, batch_rows=batch_rows)
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0

    def take(self, count: int) -> pa.Table | None:
        """The next `count` rows (None for none)."""
        while self.pending_rows < count:
            batch = next(self.batches)
            self.pending.append(batch)
            self.pending_rows += batch.num_rows
        if count == 0:
            return None
        table = pa.Table.from_batches(self.pending)
        self.pending = table.slice(count).to_batches()
        self.pending_rows -= count
        return table.slice(0, count)


def merged_frames(store: ArtifactStore, refs: list[ArtifactRef], sequence: np.ndarray, *, columns: list[str] | None = None,
                  batch_rows: int = ROW_GROUP_ROWS):
    """The shards' rows in merge order (`merge_sequence`) as DataFrames of at most `batch_rows` rows, indexed by their
    position in the merge."""
    shards = [ShardRows(store, ref, columns, batch_rows) for ref in refs]
    for start in range(0, len(sequence), batch_rows):
        part = sequence[start:start + batch_rows].astype(np.int64)
        counts = np.bincount(part, minlength=len(refs))
        pieces = [(shard, shards[shard].take(int(count))) for shard, count in enumerate(counts) if count]
        frames = {shard: table.to_pandas() for shard, table in pieces}
        offsets = np.zeros(len(refs), dtype=np.int64)
        offsets[[shard for shard, _ in pieces]] = np.cumsum([0] + [t.num_rows for _, t in pieces])[:-1]
        whole = pd.concat([frames[shard] for shard, _ in pieces], ignore_index=True)
        within = np.empty(len(part), dtype=np.int64)  # each row's rank among this part's rows of its shard
        by_shard = np.argsort(part, kind="stable")
        within[by_shard] = np.arange(len(part)) - np.repeat(np.cumsum(counts) - counts, counts)
        frame = whole.take(offsets[part] + within)
        frame.index = pd.RangeIndex(start, start + len(frame))
        yield frame
