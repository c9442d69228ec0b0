"""Tokenize's dataset-level half across shards, hash-partitioned by digest so that no process holds every row's keys.

With prepare.shards > 1 each shard's TOKENS artifact holds its kept examples; duplicates and leaked evaluation prompts
are then found across the shards in three steps, each a task per shard or per partition on the workers:

1. keys (per shard): each row's `RowKeys` and its place in the merge order (source key, shard, row), written into one
   artifact per duplicate partition (its input_ids digest mod `partitions`): every copy of an example meets the
   others in one partition.
2. duplicates (per partition): `find_duplicates` over the partition's rows of every shard, in merge order; the rows
   set aside (shard, row, reason), and the survivors leakage needs (train rows, evaluation rows whose prompt may
   leak) into one artifact per leakage partition (prompt digest mod `partitions`).
3. leaks (per partition): `find_leaks` over its survivors; the rows set aside.

4. merge (once): the shards' rows in single-process order (loraflow/runtime/shard_merge.py), the verdicts applied as
   tokenize_stream's pass 2 writes the one TOKENS artifact (`run_merge_tokens`).

The rules are tasks/tokenize_checks.py's, so the rows set aside are those of the whole table; `run_tokenize_merge`
runs the four steps one after another in one process.
"""

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.cache_keys import TOKENIZER_STAGE_CACHE
from loraflow.runtime.shard_merge import merge_positions, merge_sequence, merged_frames, shard_keys
from loraflow.runtime.stage_task import stage_task
from data_contracts import TOKENS
from loraflow.config.tokenize import TokenizeConfig
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.stage_output import StageResult, read_input
from tasks.format import load_tokenizer_dir
from tasks.tokenize_checks import DUPLICATE, LEAKAGE, SPLIT_RANK, RowKeys, find_duplicates, find_leaks, row_keys
from tasks.tokenize_stream import write_tokens

KEYS = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("source_key", pa.int64()), ("rank", pa.int8()),
                  ("ids_digest", pa.binary(16)), ("prompt_digest", pa.binary(16)), ("may_leak", pa.bool_()),
                  ("id", pa.string())])
SURVIVORS = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("rank", pa.int8()), ("prompt_digest", pa.binary(16)),
                       ("may_leak", pa.bool_())])
VERDICTS = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("reason", pa.string())])


class ShardKeys(BaseModel):
    """One shard's row keys: an artifact per duplicate partition."""

    partitions: list[ArtifactRef]

    def refs(self) -> list[ArtifactRef]:
        return self.partitions


class PartitionVerdicts(BaseModel):
    """A partition's rows set aside (shard, row, reason) and, after the duplicates step, its survivors per leakage
    partition."""

    verdicts: ArtifactRef
    survivors: list[ArtifactRef] = []

    def refs(self) -> list[ArtifactRef]:
        return [self.verdicts, *self.survivors]


# ---- 1. keys, per shard


def run_shard_keys(conversations_ref: ArtifactRef, tokens_ref: ArtifactRef, shard: int, source_names: list[str],
                   partitions: int, tokenizer_dir: str, store: ArtifactStore) -> ShardKeys:
    """A shard's TOKENS rows -> their keys, one artifact per duplicate partition, read a batch at a time."""
    tokenizer = load_tokenizer_dir(str(tokenizer_dir))
    source_keys = shard_keys(store, conversations_ref, tokens_ref, source_names)  # 8 bytes a row
    writers = [store.writer(stage="tokenize-keys", contract="row-keys", schema_version=1,
                            config_hash=f"shard-{shard}-partition-{number}-of-{partitions}") for number in range(partitions)]
    first_row = 0
    try:
        for batch in store.read_batches(tokens_ref, columns=["id", "input_ids", "split", "prompt"]):
            keys = row_keys(batch.to_pandas(), np.full(batch.num_rows, None, dtype=object), tokenizer)
            rows = np.arange(first_row, first_row + batch.num_rows)
            table = pa.table([np.full(batch.num_rows, shard, dtype=np.int32), rows, source_keys[rows], keys.rank,
                              digest_array(keys.ids_digest), digest_array(keys.prompt_digest), keys.may_leak,
                              batch.column("id")], schema=KEYS)
            partition = partition_of(keys.ids_digest, partitions)
            for number, writer in enumerate(writers):
                writer.append(table.filter(pa.array(partition == number)))
            first_row += batch.num_rows
        return ShardKeys(partitions=[writer.commit(KEYS) for writer in writers])
    except BaseException:
        for writer in writers:
            writer.abort()
        raise


@stage_task(name="tokenize-keys", cache_policy=TOKENIZER_STAGE_CACHE)
def shard_keys_task(conversations_ref: ArtifactRef, tokens_ref: ArtifactRef, shard: int, source_names: list[str],
                    partitions: int, tokenizer_dir: str, tokenizer_fingerprint: str, store_root: str) -> ShardKeys:
    """Prefect task around `run_shard_keys`, mapped over the shards."""
    return run_shard_keys(conversations_ref, tokens_ref, shard, source_names, partitions, tokenizer_dir, ArtifactStore(store_root))


# ---- 2. duplicates, per partition of input_ids digests


def run_partition_duplicates(keys_refs: list[ArtifactRef], dedupe: bool, partitions: int, store: ArtifactStore) -> PartitionVerdicts:
    """One duplicate partition's rows of every shard: the duplicates set aside (the evaluation copy first, then the
    first in merge order, as `find_duplicates` over the whole table), the survivors per leakage partition."""
    rows = pa.concat_tables([store.read_arrow(ref) for ref in keys_refs])
    merge_order = np.lexsort((numpy_column(rows, "row"), numpy_column(rows, "shard"), numpy_column(rows, "source_key")))
    rows = rows.take(merge_order)
    keys = RowKeys(rank=numpy_column(rows, "rank"), ids_digest=digests_of(rows.column("ids_digest")),
                   prompt_digest=digests_of(rows.column("prompt_digest")), may_leak=numpy_column(rows, "may_leak"),
                   alive=np.ones(rows.num_rows, dtype=bool))
    duplicates, kept = find_duplicates(keys) if dedupe and rows.num_rows else (np.zeros(0, dtype=np.int64),) * 2
    kept_ids = rows.column("id").take(pa.array(kept)).to_pylist()
    verdicts = pa.table([rows.column("shard").take(pa.array(duplicates)), rows.column("row").take(pa.array(duplicates)),
                         pa.array([DUPLICATE.format(kept=example) for example in kept_ids], pa.string())], schema=VERDICTS)
    keys.alive[duplicates] = False
    needed = keys.alive & ((keys.rank == SPLIT_RANK["train"]) | keys.may_leak)
    survivors = rows.select(SURVIVORS.names).filter(pa.array(needed))
    partition = partition_of(keys.prompt_digest[needed], partitions)
    return PartitionVerdicts(
        verdicts=write_table(store, verdicts, "tokenize-duplicates"),
        survivors=[write_table(store, survivors.filter(pa.array(partition == number)), "tokenize-survivors")
                   for number in range(partitions)],
    )


@stage_task(name="tokenize-duplicates")
def partition_duplicates_task(keys_refs: list[ArtifactRef], dedupe: bool, partitions: int, store_root: str) -> PartitionVerdicts:
    """Prefect task around `run_partition_duplicates`, mapped over the partitions."""
    return run_partition_duplicates(keys_refs, dedupe, partitions, ArtifactStore(store_root))


# ---- 3. leaks, per partition of prompt digests


def run_partition_leaks(survivors_refs: list[ArtifactRef], store: ArtifactStore) -> PartitionVerdicts:
    """One leakage partition's survivors of every duplicate partition: the evaluation rows whose prompt is also a
    surviving train row's (`find_leaks`)."""
    rows = pa.concat_tables([store.read_arrow(ref) for ref in survivors_refs])
    keys = RowKeys(rank=numpy_column(rows, "rank"), ids_digest=np.zeros(rows.num_rows, dtype="S16"),  # not needed here
                   prompt_digest=digests_of(rows.column("prompt_digest")), may_leak=numpy_column(rows, "may_leak"),
                   alive=np.ones(rows.num_rows, dtype=bool))
    leaked = pa.array(find_leaks(keys, keys.alive))
    verdicts = pa.table([rows.column("shard").filter(leaked), rows.column("row").filter(leaked),
                         pa.array([LEAKAGE] * leaked.true_count, pa.string())], schema=VERDICTS)
    return PartitionVerdicts(verdicts=write_table(store, verdicts, "tokenize-leaks"))


@stage_task(name="tokenize-leaks")
def partition_leaks_task(survivors_refs: list[ArtifactRef], store_root: str) -> PartitionVerdicts:
    """Prefect task around `run_partition_leaks`, mapped over the partitions."""
    return run_partition_leaks(survivors_refs, ArtifactStore(store_root))


# ---- 4. the merge: the shards in source order, the verdicts applied


def run_tokenize_merge(conversations_refs: list[ArtifactRef], tokens_refs: list[ArtifactRef], source_names: list[str],
                       config: TokenizeConfig, tokenizer_dir: str, store: ArtifactStore,
                       batch_rows: int = ROW_GROUP_ROWS, partitions: int | None = None) -> StageResult:
    """All shards' tokens in single-process order, duplicates and leaks set aside: the one TOKENS artifact training
    reads (the same bytes as the single-process path's): the module's four steps, which flows/prepare.shards_flow runs
    as tasks on the workers, here one after another in this process; `partitions` defaults to one per shard."""
    partitions = partitions or max(len(tokens_refs), 1)
    keys = [run_shard_keys(conversations, tokens, shard, source_names, partitions, tokenizer_dir, store)
            for shard, (conversations, tokens) in enumerate(zip(conversations_refs, tokens_refs))]
    duplicates = [run_partition_duplicates([shard.partitions[number] for shard in keys], config.dedupe, partitions, store)
                  for number in range(partitions)]
    leaks = [run_partition_leaks([partition.survivors[number] for partition in duplicates], store) for number in range(partitions)]
    return run_merge_tokens(conversations_refs, tokens_refs, [partition.verdicts for partition in duplicates],
                            [partition.verdicts for partition in leaks], source_names, config, store, batch_rows)


def run_merge_tokens(conversations_refs: list[ArtifactRef], tokens_refs: list[ArtifactRef], duplicates_refs: list[ArtifactRef],
                     leaks_refs: list[ArtifactRef], source_names: list[str], config: TokenizeConfig, store: ArtifactStore,
                     batch_rows: int = ROW_GROUP_ROWS) -> StageResult:
    """The shards' tokens merged a batch at a time into single-process order (loraflow/runtime/shard_merge.py), the
    partitions' verdicts (rows set aside as duplicates or leaks) applied on the way, through tokenize_stream's pass 2:
    the process holds the merge order and the verdicts, not the rows or their digests."""
    from loraflow.config.pipeline import config_hash
    from tasks.shard import example_origins, in_source_order

    keys = [shard_keys(store, conversations, tokens, source_names) for conversations, tokens in zip(conversations_refs, tokens_refs)]
    shard, row, reasons = verdicts_of(store, duplicates_refs + leaks_refs)
    position, first_of_shard = merge_positions(keys)
    set_aside = dict(zip(position[first_of_shard[shard] + row].tolist(), reasons))
    sequence = merge_sequence(keys)
    del keys, position
    if sequence is None:  # a shard out of source order (not made by this code): merge it whole, as before
        origin = example_origins(store, conversations_refs)
        frames = [in_source_order([read_input(store, ref, TOKENS) for ref in tokens_refs], origin, source_names)]
    else:
        frames = merged_frames(store, tokens_refs, sequence, batch_rows=batch_rows)
    counts = {"duplicates": sum(ref.rows for ref in duplicates_refs), "leaked": sum(ref.rows for ref in leaks_refs),
              "partitions": len(duplicates_refs)}
    return write_tokens(store, (frame.assign(reason="") for frame in frames), set_aside, counts, config_hash(config), batch_rows)


@stage_task(name="tokenize-merge")
def tokenize_merge_task(conversations_refs: list[ArtifactRef], tokens_refs: list[ArtifactRef], duplicates_refs: list[ArtifactRef],
                        leaks_refs: list[ArtifactRef], source_names: list[str], config: TokenizeConfig, store_root: str) -> StageResult:
    """Prefect task around `run_merge_tokens`; runs once, on a worker when the shards do."""
    return run_merge_tokens(conversations_refs, tokens_refs, duplicates_refs, leaks_refs, source_names, config,
                            ArtifactStore(store_root))


# ---- the verdicts, read back by the merge


def verdicts_of(store: ArtifactStore, refs: list[ArtifactRef]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(shard, row, reason) of every row the partitions set aside."""
    table = pa.concat_tables([store.read_arrow(ref) for ref in refs]) if refs else VERDICTS.empty_table()
    return numpy_column(table, "shard"), numpy_column(table, "row"), table.column("reason").to_pylist()


# ---- Arrow <-> NumPy for 16-byte digests


def partition_of(digests: np.ndarray, partitions: int) -> np.ndarray:
    """Each 16-byte digest's partition: its first 8 bytes (little-endian) mod `partitions`."""
    return (np.frombuffer(digests.tobytes(), dtype="<u8")[::2] % np.uint64(partitions)).astype(np.int64)


def digest_array(digests: np.ndarray) -> pa.Array:
    """NumPy S16 digests as an Arrow fixed_size_binary(16) array (no copy through Python bytes)."""
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(digests), [None, pa.py_buffer(digests.tobytes())])


def digests_of(column: pa.ChunkedArray) -> np.ndarray:
    """An Arrow fixed_size_binary(16) column as NumPy S16 digests."""
    array = column.combine_chunks()
    if len(array) == 0:
        return np.zeros(0, dtype="S16")
    return np.frombuffer(array.buffers()[1], dtype="S16", count=len(array), offset=array.offset * 16).copy()


def numpy_column(table: pa.Table, name: str) -> np.ndarray:
    """A column without nulls as a NumPy array."""
    return table.column(name).to_numpy()


def write_table(store: ArtifactStore, table: pa.Table, stage: str) -> ArtifactRef:
    """An Arrow table as an artifact of `stage` (its schema kept when it has no rows)."""
    writer = store.writer(stage=stage, contract=stage, schema_version=1, config_hash=stage)
    try:
        writer.append(table)
        return writer.commit(table.schema)
    except BaseException:
        writer.abort()
        raise
