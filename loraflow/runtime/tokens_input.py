"""The TOKENS artifact as the model stages (train, evaluate) read it: memory-mapped Arrow, and the hash that names it.

    table, data_sha = open_tokens(tokens, store, split="train", columns=TRAIN_COLUMNS)   # pyarrow.Table on disk pages
    frame, data_sha = load_tokens(tokens, store)                                          # the whole frame (small data)

An artifact is verified against its manifest, then its rows (of one split, in some columns) are streamed a record batch
at a time, each batch checked against the TOKENS contract's structure, into an uncompressed Arrow IPC file beside the
store (`<store>/mapped/<sha256>-<split>-<columns>.arrow`, written once, then reused); the table read back from it is
memory-mapped, so its token ids are the kernel's file pages, not this process's memory. A DataFrame (tests, scripts,
the launcher's Parquet copy) is converted in memory and named by the sha256 of its id, input_ids, labels and split
columns; an artifact by its manifest's sha256.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore, table_bytes
from loraflow.runtime.cache_folder import cache_dir

TRAIN_COLUMNS = ["input_ids", "attention_mask", "labels", "length"]  # what a train example is made of


def open_tokens(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None, *, split: str | None = None,
                columns: list[str] | None = None) -> tuple[pa.Table, str]:
    """The rows of `split` (None: every row) in `columns` (None: all) as an Arrow table, memory-mapped for an
    artifact, and the hash that identifies the tokens (the artifact's sha256, or that of the frame)."""
    if isinstance(tokens, pd.DataFrame):
        rows = tokens if split is None else tokens[tokens["split"] == split]
        table = pa.Table.from_pandas(rows[columns] if columns else rows, preserve_index=False)
        return table, frame_sha256(tokens)
    store = store or store_for(tokens)
    path = mapped_path(store, tokens, split, columns)
    if not path.exists():
        write_mapped(store, tokens, path, split, columns)
    return read_mapped(path), tokens.sha256


def load_tokens(tokens: ArtifactRef | pd.DataFrame, store: ArtifactStore | None) -> tuple[pd.DataFrame, str]:
    """The tokens frame and the hash that identifies it (the artifact's sha256, or that of the frame)."""
    if isinstance(tokens, pd.DataFrame):
        return tokens, frame_sha256(tokens)
    from data_contracts import TOKENS
    from loraflow.runtime.stage_output import read_input

    store = store or store_for(tokens)
    return read_input(store, tokens, TOKENS), tokens.sha256


def frame_sha256(frame: pd.DataFrame) -> str:
    """The name of a tokens DataFrame: the sha256 of its id, input_ids, labels and split columns."""
    return hashlib.sha256(table_bytes(frame[["id", "input_ids", "labels", "split"]])).hexdigest()


def store_for(ref: ArtifactRef) -> ArtifactStore:
    """The store an artifact lives in, from its uri (`<root>/artifacts/<stage>/<sha>.parquet`)."""
    marker = "/artifacts/"
    if marker not in ref.uri:
        raise ValueError(f"{ref.uri}: not inside an artifact store (no /artifacts/ in the path); pass store=")
    return ArtifactStore(ref.uri.rsplit(marker, 1)[0])


def mapped_path(store: ArtifactStore, ref: ArtifactRef, split: str | None, columns: list[str] | None) -> Path:
    """Where the memory-mappable copy of these rows lives: beside a local store, else in loraflow's cache folder."""
    folder = Path(store.base) / "mapped" if store.is_local else cache_dir() / "mapped"
    selection = hashlib.sha256(",".join(columns or ["*"]).encode()).hexdigest()[:12]
    return folder / f"{ref.sha256}-{split or 'all'}-{selection}.arrow"


def write_mapped(store: ArtifactStore, ref: ArtifactRef, path: Path, split: str | None, columns: list[str] | None) -> None:
    """Stream the artifact's rows of `split` into an uncompressed Arrow IPC file at `path` (atomically), checking
    every batch against the TOKENS contract's structure."""
    from data_contracts import TOKENS, check_structure
    from loraflow.runtime.stage_output import give_back_freed_memory

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    writer = None
    try:
        with pa.OSFile(str(temp), "wb") as sink:
            for batch in store.read_batches(ref):
                check_structure(batch.to_pandas(), TOKENS, where=ref.uri)
                kept = batch if split is None else batch.filter(pc.equal(batch.column("split"), split))
                kept = kept.select(columns) if columns else kept
                writer = writer or pa.ipc.new_file(sink, kept.schema)
                writer.write_batch(kept)
            if writer is None:  # an empty artifact: its columns, no rows
                schema = store.schema(ref)
                writer = pa.ipc.new_file(sink, pa.schema([schema.field(c) for c in columns]) if columns else schema)
            writer.close()
        os.replace(temp, path)
    finally:
        give_back_freed_memory()  # the batches' pandas copies (for the contract check) are gone: return their pages
        temp.unlink(missing_ok=True)


def read_mapped(path: Path) -> pa.Table:
    """The table in an Arrow IPC file, its buffers pointing into the memory-mapped file (no copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
