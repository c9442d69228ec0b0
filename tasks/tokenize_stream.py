"""The tokenize stage over a formatted artifact of any size, in two passes with memory bounded by a batch.

1. Each batch of formatted rows goes through the per-row half (`tokenize_rows`: ids, labels, length policy, split)
   and into a scratch Arrow IPC file next to the store (uncompressed: written and read back at disk-cache speed),
   token ids as Arrow list<int32>; of each row only its `RowKeys` (a few 16-byte digests) stay in memory. The next
   slice is encoded in a background thread meanwhile (tasks/tokenize_encode.encoded_ahead).
2. The duplicate and leakage rules run once over all rows' keys (tasks/tokenize_checks.py), then the scratch file
   is read back a batch at a time into the TOKENS artifact, the rows set aside going to the quarantine.
The artifact holds the same rows and values as tokenizing the whole table at once (tokenize_formatted).

A shard of the sharded path (prepare.shards > 1) runs pass 1 alone, straight into its artifact (`tokenize_shard_stream`):
its duplicates and leaks are looked for across the shards afterwards (tasks/tokenize_partitions.py), and the merge
writes the one TOKENS artifact through the same pass 2 (`write_tokens`).
"""

import itertools
import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts import TOKENS
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_output import StageResult, StageWriter, give_back_freed_memory
from tasks.tokenize_checks import (DUPLICATE, LEAKAGE, RowKeys, TruncationError, find_duplicates, find_leaks, row_keys,
                                   split_off_quarantine, withheld_stats)


def tokenize_stream(store: ArtifactStore, formatted_batches, tokenize_batch, config: TokenizeConfig, tokenizer, config_hash: str,
                    batch_rows: int) -> StageResult:
    """Tokenize formatted batches ((DataFrame, its encoded texts) pairs: tasks/tokenize_encode.encoded_ahead) with
    `tokenize_batch` (tasks/tokenize.tokenize_rows: (frame, encoded) -> (tokens, reasons, stats)) and write TOKENS plus
    its quarantine (module docstring)."""
    scratch_dir = tempfile.mkdtemp(prefix="tokenize-", dir=scratch_root(store))
    try:
        scratch_path = os.path.join(scratch_dir, "rows.arrow")
        keys, stats = tokenize_to_scratch(formatted_batches, tokenize_batch, tokenizer, scratch_path, batch_rows)
        set_aside, counts = dataset_reasons(keys, config, scratch_path)
        return write_tokens(store, scratch_batches(scratch_path, batch_rows), set_aside, {**stats, **counts}, config_hash,
                            batch_rows)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def tokenize_shard_stream(store: ArtifactStore, formatted_batches, tokenize_batch, config_hash: str, batch_rows: int) -> StageResult:
    """Pass 1 without the dataset-level checks, each batch's kept rows straight into a shard's TOKENS artifact and its
    per-row set-asides into the quarantine: memory is a batch."""
    output = StageWriter(store, stage="tokenize-shard", contract=TOKENS, config_hash=config_hash, row_group_rows=batch_rows)
    stats: dict = {}
    try:
        for tokens, reasons, batch_stats in tokenized_batches(formatted_batches, tokenize_batch):
            output.add(*split_off_quarantine(tokens, reasons))
            stats = summed(stats, batch_stats)
    except BaseException:
        output.abort()
        raise
    return output.finish(rows_in=stats.get("rows_in", 0), stats=stats)


def scratch_root(store: ArtifactStore) -> str:
    """Where a stage's scratch files go: the store's own disk when local (not /tmp, which may be RAM)."""
    root = os.path.join(store.base, "scratch") if store.is_local else tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return root


def tokenize_to_scratch(formatted_batches, tokenize_batch, tokenizer, scratch_path: str, batch_rows: int) -> tuple[RowKeys, dict]:
    """Pass 1: every row tokenized into the scratch file (with its per-row reason, "" when kept); (keys, summed stats)."""
    keys, stats, rows_since_trim = [], {}, 0
    with ScratchRows(scratch_path) as scratch:
        for tokens, reasons, batch_stats in tokenized_batches(formatted_batches, tokenize_batch):
            keys.append(row_keys(tokens, reasons, tokenizer))
            tokens["reason"] = [reason or "" for reason in reasons]
            scratch.append(scratch_table(tokens))
            stats, rows_since_trim = summed(stats, batch_stats), rows_since_trim + len(tokens)
            if rows_since_trim >= batch_rows:  # a trim costs ~20 ms: once a row group's worth of rows, not every slice
                give_back_freed_memory()
                rows_since_trim = 0
    return RowKeys.concat(keys), stats


TOKEN_LISTS = {"input_ids": np.int32, "attention_mask": np.int8, "labels": np.int32}  # per row a NumPy array


def scratch_table(tokens: pd.DataFrame) -> pa.Table:
    """A batch of tokens rows as Arrow; the token lists are joined into one array each (the same list<int32>/<int8>
    values as pyarrow's conversion of the DataFrame, without converting row by row)."""
    table = pa.Table.from_pandas(tokens.drop(columns=list(TOKEN_LISTS)), preserve_index=False)
    for name, dtype in TOKEN_LISTS.items():
        arrays = tokens[name].tolist()
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
        np.cumsum(np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays)), out=offsets[1:])
        values = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)
        table = table.add_column(list(tokens.columns).index(name), name, pa.ListArray.from_arrays(offsets, values))
    return table


class ScratchRows:
    """Pass 1's rows in uncompressed Arrow IPC files (`path`, then `path.1`, ... when a batch widens the schema: an
    all-null column gets a type): no Parquet encoding and decoding for rows that are read back once."""

    def __init__(self, path: str):
        self.base, self.paths, self._sink, self._writer, self.schema = path, [], None, None, None

    def __enter__(self):
        return self

    def append(self, table: pa.Table) -> None:
        if self._writer is not None and not table.schema.equals(self.schema):
            widened = pa.unify_schemas([self.schema, table.schema], promote_options="permissive")
            if widened.equals(self.schema):
                table = table.cast(widened)
            else:
                self._close()
        if self._writer is None:
            self.paths.append(self.base if not self.paths else f"{self.base}.{len(self.paths)}")
            self._sink = pa.OSFile(self.paths[-1], "wb")
            self._writer, self.schema = pa.ipc.new_file(self._sink, table.schema), table.schema
        self._writer.write_table(table)

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        self._writer = self._sink = None


def scratch_record_batches(scratch_path: str):
    """The scratch rows' record batches in order (none when pass 1 wrote no row), each read when asked for: not
    memory-mapped, whose pages would count in the process's resident memory as the file is read (VmHWM)."""
    for index in itertools.count():
        path = scratch_path if index == 0 else f"{scratch_path}.{index}"
        if not os.path.exists(path):
            return
        with pa.OSFile(path, "rb") as source:
            scratch = pa.ipc.open_file(source)
            for batch in range(scratch.num_record_batches):
                yield scratch.get_batch(batch)


def tokenized_batches(formatted_batches, tokenize_batch):
    """Pass 1's loop: (tokens indexed like their formatted rows, reasons, stats) of each (formatted, encoded) batch; the
    over-long examples of every batch are counted and raised once, with the totals, at the end."""
    too_long = []
    for formatted, encoded in formatted_batches:
        try:
            tokens, reasons, batch_stats = tokenize_batch(formatted, encoded)
        except TruncationError as error:
            too_long.append(error)
            continue
        tokens.index = formatted.index
        yield tokens, reasons, batch_stats
    if too_long:
        raise TruncationError.combined(too_long)


def summed(stats: dict, batch_stats: dict) -> dict:
    """A batch's counts added to the stage's."""
    return {**stats, **{key: stats.get(key, 0) + value for key, value in batch_stats.items()}}


def dataset_reasons(keys: RowKeys, config: TokenizeConfig, scratch_path: str) -> tuple[dict[int, str], dict]:
    """Pass between: row -> reason for every duplicate and leaked row, and their counts."""
    duplicates, kept = find_duplicates(keys) if config.dedupe and len(keys.alive) else (np.zeros(0, dtype=np.int64),) * 2
    keys.alive[duplicates] = False
    leaked = find_leaks(keys, keys.alive) if len(keys.alive) else np.zeros(0, dtype=bool)
    kept_ids = ids_at(scratch_path, set(kept.tolist()))
    set_aside = {row: DUPLICATE.format(kept=kept_ids[kept_row]) for row, kept_row in zip(duplicates.tolist(), kept.tolist())}
    set_aside.update(dict.fromkeys(np.flatnonzero(leaked).tolist(), LEAKAGE))
    return set_aside, {"duplicates": int(len(duplicates)), "leaked": int(leaked.sum())}


def ids_at(scratch_path: str, rows: set[int]) -> dict[int, str]:
    """The `id` of each of `rows`, read from the scratch file's id column alone."""
    found, first_row, wanted = {}, 0, np.array(sorted(rows), dtype=np.int64)
    if not rows:
        return found
    for batch in scratch_record_batches(scratch_path):
        ids = batch.column("id")
        for row in in_range(wanted, first_row, len(ids)):
            found[row] = ids[row - first_row].as_py()
        first_row += len(ids)
    return found


def in_range(sorted_rows: np.ndarray, first_row: int, count: int) -> list[int]:
    """The rows of `sorted_rows` in [first_row, first_row + count)."""
    low, high = np.searchsorted(sorted_rows, [first_row, first_row + count])
    return sorted_rows[low:high].tolist()


def scratch_batches(scratch_path: str, batch_rows: int):
    """The scratch file's rows (with their `reason` column) as DataFrames of `batch_rows` rows (the last fewer)."""
    pending, pending_rows = [], 0
    for batch in scratch_record_batches(scratch_path):
        pending.append(batch)
        pending_rows += batch.num_rows
        while pending_rows >= batch_rows:
            whole = pa.concat_tables([pa.Table.from_batches([part]) for part in pending], promote_options="permissive")
            yield whole.slice(0, batch_rows).to_pandas()
            rest = whole.slice(batch_rows)
            pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.concat_tables([pa.Table.from_batches([part]) for part in pending], promote_options="permissive").to_pandas()


def write_tokens(store: ArtifactStore, token_batches, set_aside: dict[int, str], stats: dict, config_hash: str,
                 batch_rows: int) -> StageResult:
    """Pass 2: consecutive batches of tokens rows (each with its per-row `reason`, "" when kept) into TOKENS (kept) and
    the quarantine (set aside, `set_aside` adding row -> reason), with the kept rows' token stats."""
    output = StageWriter(store, stage="tokenize", contract=TOKENS, config_hash=config_hash, row_group_rows=batch_rows)
    lengths, trained, splits, first_row = [], 0, {"train": 0, "validation": 0, "heldout": 0}, 0
    withheld: set[str] = set()
    set_aside_rows = np.array(sorted(set_aside), dtype=np.int64)
    try:
        for tokens in token_batches:
            tokens.index = pd.RangeIndex(first_row, first_row + len(tokens))
            reasons = np.array([reason or None for reason in tokens.pop("reason")], dtype=object)
            for row in in_range(set_aside_rows, first_row, len(tokens)):
                reasons[row - first_row] = set_aside[row]
            kept, quarantined = split_off_quarantine(tokens, reasons)
            output.add(kept, quarantined)
            lengths.append(kept["length"].to_numpy())
            trained += int(kept["n_trained"].sum())
            for split, count in kept["split"].value_counts().items():
                splits[split] += int(count)
            withheld.update(kept.loc[kept["split"] == "validation", "source_id"])
            first_row += len(tokens)
    except BaseException:
        output.abort()
        raise
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    percentiles = np.percentile(lengths, [50, 90, 99]).round(1).tolist() if len(lengths) else [0, 0, 0]
    stats.update({"tokens_total": int(lengths.sum()), "trained_tokens": trained, "splits": splits,
                  "length": {"p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2],
                             "max": int(lengths.max()) if len(lengths) else 0}, **withheld_stats(withheld)})
    return output.finish(rows_in=stats["rows_in"] if "rows_in" in stats else first_row, stats=stats)
