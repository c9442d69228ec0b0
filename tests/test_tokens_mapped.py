"""Train reads the TOKENS artifact as memory-mapped Arrow: the same rows, packed rows and losses as from its DataFrame,
across record batches, without copying the token ids into this process's memory."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from data_contracts import TOKENS
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.train import TrainConfig
from loraflow.runtime.artifact_store import ArtifactStore, CorruptArtifact
from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.runtime.tokens_input import TRAIN_COLUMNS, mapped_path, open_tokens, read_mapped
from loraflow.training import pack_examples, packing_stats
from loraflow.training.data import PackedRows, TokenizedExamples
from tasks.train import train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame


def synthetic_tokens(rows: int, seed: int = 0) -> pd.DataFrame:
    """A TOKENS-contract frame of `rows` examples of 3–40 tokens, a prompt masked, every tenth one validation."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(rows):
        length = int(rng.integers(3, 41))
        prompt = int(rng.integers(1, length))
        ids = rng.integers(3, 90, size=length).tolist()
        records.append({"id": f"ex-{index}", "input_ids": ids, "attention_mask": [1] * length,
                        "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": length, "n_trained": length - prompt,
                        "truncated": False, "split": "validation" if index % 10 == 9 else "train", "kind": "qa",
                        "source_id": str(index), "prompt": "p", "reference": "r", "facts": []})
    return pd.DataFrame(records)


def write_tokens(store: ArtifactStore, frame: pd.DataFrame):
    return store.write(frame, stage="tokenize", contract=TOKENS.name, schema_version=TOKENS.version, config_hash="test")


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """20,000 examples: the train split spans three record batches of the artifact."""
    frame = synthetic_tokens(20_000)
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    return frame, store, write_tokens(store, frame)


def test_the_train_split_is_memory_mapped_not_copied(large):
    frame, store, ref = large
    table, sha = open_tokens(ref, store, split="train", columns=TRAIN_COLUMNS)
    assert sha == ref.sha256 and table.column_names == TRAIN_COLUMNS
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    assert table.num_rows == len(train) and table.column("input_ids").num_chunks > 1
    assert table.column("input_ids").to_pylist() == train["input_ids"].tolist()
    assert table.column("labels").to_pylist() == train["labels"].tolist()
    path = mapped_path(store, ref, "train", TRAIN_COLUMNS)
    written = path.stat().st_mtime_ns
    allocated = pa.total_allocated_bytes()
    again, _ = open_tokens(ref, store, split="train", columns=TRAIN_COLUMNS)
    assert path.stat().st_mtime_ns == written  # the mapped file is reused
    assert pa.total_allocated_bytes() - allocated < 64 * 1024  # its buffers are the file's pages, not Arrow's heap
    assert again.equals(table)


def test_examples_and_packed_rows_equal_those_from_the_frame_across_batches(large):
    frame, store, ref = large
    table, _ = open_tokens(ref, store, split="train", columns=TRAIN_COLUMNS)
    mapped, whole = TokenizedExamples(table), TokenizedExamples(frame[frame["split"] == "train"])
    boundary = ROW_GROUP_ROWS - ROW_GROUP_ROWS // 10  # train rows per artifact batch: the 8,192nd row's neighbours
    for index in (0, boundary - 1, boundary, boundary + 1, len(mapped) - 1):
        assert mapped[index] == whole[index]
    items = [whole[i] for i in range(len(whole))]
    packed, reference = PackedRows(mapped, max_tokens=128), pack_examples(items, max_tokens=128)
    assert len(packed) == len(reference)
    for index in (0, 1, len(packed) // 2, len(packed) - 1):
        assert packed[index] == reference[index]
    assert packed.stats() == packing_stats(reference, 128)


def test_a_changed_artifact_is_refused_before_anything_is_mapped(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = write_tokens(store, synthetic_tokens(30))
    Path(ref.uri).write_bytes(Path(ref.uri).read_bytes()[:-10])
    with pytest.raises(CorruptArtifact):
        open_tokens(ref, store, split="train", columns=TRAIN_COLUMNS)
    assert not mapped_path(store, ref, "train", TRAIN_COLUMNS).exists()


def test_an_artifact_without_the_split_maps_to_an_empty_table(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    frame = synthetic_tokens(30).assign(split="validation")
    table, _ = open_tokens(write_tokens(store, frame), store, split="train", columns=TRAIN_COLUMNS)
    assert table.num_rows == 0 and table.column_names == TRAIN_COLUMNS
    assert read_mapped(next((tmp_path / "store" / "mapped").glob("*.arrow"))).num_rows == 0


@pytest.mark.parametrize("packing", [False, True])
def test_training_from_the_artifact_equals_training_from_its_frame(tmp_path, packing):
    model = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model))
    store = ArtifactStore(tmp_path / "store")
    config = TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                         checkpoint_every=100, lora_r=8, lora_alpha=16, packing=packing, pack_max_tokens=128)
    curves = []
    for name, given in (("frame", tokens), ("artifact", write_tokens(store, tokens))):
        result = train_adapter(given, model, config, tmp_path / name, store=store)
        curves.append(pd.read_parquet(result.loss_curve_path)["loss"].tolist())
        assert result.train_rows == int((tokens["split"] == "train").sum())
        assert json.loads(Path(result.metrics_path).read_text()).get("packing_stats") is not None or not packing
    assert curves[0] == curves[1] and len(curves[0]) == 4
