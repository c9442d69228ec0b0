"""The shards' artifacts merged a batch at a time equal the whole-table merge: three examples a source row, two
sources, rows a later stage set aside, an empty shard, batches of 1, 2 and 5 rows."""

import numpy as np
import pandas as pd
import pytest

from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.shard_merge import ForeignRows, merge_sequence, merged_frames, shard_keys
from tasks.shard import in_source_order

SOURCES = ["catalog", "extra"]


def shard_conversations(shards: int = 3, rows: int = 12) -> list[pd.DataFrame]:
    """Per shard, its conversations in source order: source rows dealt by a hash-like rule, 3 examples each."""
    per_shard = [[] for _ in range(shards)]
    for source in SOURCES:
        for row in range(rows):
            shard = (row * 7 + len(source)) % shards if row % 5 else 0
            per_shard[shard] += [{"id": f"{source}-{row}-q{q}", "source": source, "source_row": row} for q in range(3)]
    return [pd.DataFrame(rows or {"id": [], "source": [], "source_row": []}).astype({"source_row": "int64"}) for rows in per_shard]


def write(store: ArtifactStore, frame: pd.DataFrame, stage: str):
    return store.write(frame, stage=stage, contract=stage, schema_version=1, config_hash="t")


@pytest.fixture
def shards(tmp_path):
    store, rng = ArtifactStore(tmp_path / "store"), np.random.default_rng(0)
    conversations = shard_conversations()
    outputs = []
    for number, frame in enumerate(conversations):
        kept = frame[rng.random(len(frame)) > 0.2] if number != 2 else frame.iloc[:0]  # set aside; shard 2 emptied
        outputs.append(kept.assign(value=[f"v-{i}" for i in kept["id"]], number=np.arange(len(kept))).drop(columns=["source", "source_row"]))
    return store, conversations, [write(store, c, "conversations") for c in conversations], outputs, [write(store, o, "out") for o in outputs]


@pytest.mark.parametrize("batch_rows", [1, 2, 5, 8192])
def test_the_streamed_merge_equals_the_whole_merge(shards, batch_rows):
    store, conversations, conversation_refs, outputs, output_refs = shards
    keys = [shard_keys(store, c, o, SOURCES) for c, o in zip(conversation_refs, output_refs)]
    assert [len(k) for k in keys] == [len(o) for o in outputs] and len(keys[2]) == 0
    sequence = merge_sequence(keys)
    frames = list(merged_frames(store, output_refs, sequence, batch_rows=batch_rows))
    assert all(len(f) <= batch_rows for f in frames) and len(frames) == -(-len(sequence) // batch_rows)
    whole = in_source_order([store.read(ref) for ref in output_refs], pd.concat(conversations, ignore_index=True), SOURCES)
    pd.testing.assert_frame_equal(pd.concat(frames).reset_index(drop=True), whole, check_dtype=False)


def test_rows_of_another_run_and_shards_out_of_order_are_told_apart(shards):
    store, conversations, conversation_refs, outputs, output_refs = shards
    foreign = write(store, outputs[0].assign(id="nowhere"), "out")
    with pytest.raises(ForeignRows, match="in none of the shard's conversations"):
        shard_keys(store, conversation_refs[0], foreign, SOURCES)
    assert merge_sequence([np.array([1, 5, 9]), np.array([4, 2])]) is None
    assert merge_sequence([np.array([1, 5, 9]), np.array([2, 4])]).tolist() == [0, 1, 1, 0, 0]


def shard_tokens(conversations: pd.DataFrame, number: int) -> pd.DataFrame:
    """TOKENS rows for a shard's conversations: every 4th example repeats one token sequence (a duplicate across
    shards and batches), validation examples of row 3 ask a train prompt (leakage)."""
    records = []
    for index, (example, source, row) in enumerate(zip(conversations["id"], conversations["source"], conversations["source_row"])):
        question = int(example[-1])
        split = "validation" if question == 2 else "train"
        ids = [5, 6, 7, 8] if (row + question) % 4 == 0 else [5, 9, row + 10, question + 40, len(source)]
        prompt = "shared prompt" if row == 3 else f"{example} prompt"
        records.append({"id": example, "input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] + ids[1:],
                        "length": len(ids), "n_trained": len(ids) - 1, "truncated": False, "split": split, "kind": "qa",
                        "source_id": f"{source}-{row}", "prompt": prompt, "reference": "r", "facts": []})
    return pd.DataFrame(records)


@pytest.mark.parametrize("batch_rows", [2, 8192])
def test_tokenize_merge_sets_aside_duplicates_and_leaks_as_the_whole_merge(tmp_path, batch_rows):
    from data_contracts import TOKENS
    from loraflow.config.tokenize import TokenizeConfig
    from tasks.format import load_tokenizer_dir
    from tasks.tokenize import run_tokenize_merge
    from tasks.tokenize_checks import set_aside_duplicates_and_leaks, split_off_quarantine
    from tests.tiny_llama import smollm2_dir

    store, conversations = ArtifactStore(tmp_path / "store"), shard_conversations()
    tokens = [shard_tokens(frame, number) for number, frame in enumerate(conversations)]
    conversation_refs = [write(store, frame, "conversations") for frame in conversations]
    token_refs = [store.write(frame, stage="tokenize-shard", contract=TOKENS.name, schema_version=TOKENS.version,
                              config_hash=f"s{n}") for n, frame in enumerate(tokens)]
    config = TokenizeConfig()
    result = run_tokenize_merge(conversation_refs, token_refs, SOURCES, config, str(smollm2_dir()), store, batch_rows=batch_rows)

    whole = in_source_order([store.read(ref) for ref in token_refs], pd.concat(conversations, ignore_index=True), SOURCES)
    reasons = np.full(len(whole), None, dtype=object)
    counts = set_aside_duplicates_and_leaks(whole, reasons, config, load_tokenizer_dir(str(smollm2_dir())))
    kept, quarantined = split_off_quarantine(whole, reasons)
    assert counts["duplicates"] > 3 and counts["leaked"] > 0
    assert result.stats["duplicates"] == counts["duplicates"] and result.stats["leaked"] == counts["leaked"]
    pd.testing.assert_frame_equal(store.read(result.output), kept, check_dtype=False)
    assert sorted(store.read(result.quarantine)["reason"]) == sorted(quarantined["reason"])


def test_duplicates_and_leaks_are_the_same_whatever_the_partitions(tmp_path):
    """Copies of one token sequence in every shard and prompts asked in several shards meet in one partition whatever
    the partition count: the tokens artifact, its quarantine and the counts do not change with it."""
    from data_contracts import TOKENS
    from loraflow.config.tokenize import TokenizeConfig
    from tasks.tokenize import run_tokenize_merge
    from tests.tiny_llama import smollm2_dir

    store, conversations = ArtifactStore(tmp_path / "store"), shard_conversations()
    conversation_refs = [write(store, frame, "conversations") for frame in conversations]
    token_refs = [store.write(shard_tokens(frame, number), stage="tokenize-shard", contract=TOKENS.name,
                              schema_version=TOKENS.version, config_hash=f"s{number}") for number, frame in enumerate(conversations)]
    results = {partitions: run_tokenize_merge(conversation_refs, token_refs, SOURCES, TokenizeConfig(), str(smollm2_dir()),
                                              store, batch_rows=4, partitions=partitions) for partitions in (1, 2, 7)}
    assert len({result.output.sha256 for result in results.values()}) == 1
    assert len({result.quarantine.sha256 for result in results.values()}) == 1
    assert {(result.stats["duplicates"], result.stats["leaked"]) for result in results.values()} == {(results[1].stats["duplicates"], results[1].stats["leaked"])}
    assert results[7].stats["partitions"] == 7 and results[1].stats["duplicates"] > 3 and results[1].stats["leaked"] > 0
