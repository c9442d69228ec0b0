"""Evaluate reads the TOKENS artifact a batch at a time: the same questions, loss rows, loss and loss sample as from the
whole frame, with duplicate prompts and made-up titles across batch boundaries."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts import TOKENS
from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.evaluate import EvalConfig
from loraflow.evaluation.generation import mean_loss
from loraflow.evaluation.metrics import evaluation_rows, loss_sample, select_questions
from loraflow.evaluation.question_stream import evaluation_inputs
from loraflow.runtime.artifact_store import ArtifactStore
from tests.tiny_llama import build_tiny_llama

TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Omega"]


def evaluation_frame(rows: int = 240, seed: int = 0) -> pd.DataFrame:
    """TOKENS rows of every evaluation set: prompts repeating across the table, refusals, probes whose made-up title
    is (Alpha, Beta) or is not (Omega) in another row, a validation split."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(rows):
        split = ["train", "train", "train", "heldout", "validation"][index % 5]
        phrasing = "train" if split == "train" else ["heldout", "natural", "unknown"][index % 3]
        probe = phrasing == "unknown"
        title = TITLES[int(rng.integers(0, 5 if probe else 4))]
        kind = "refusal" if probe or index % 17 == 0 else "production"
        length = int(rng.integers(4, 30))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(3, 400, size=length).tolist()
        records.append({
            "id": f"row-{index}", "input_ids": ids, "attention_mask": [1] * length,
            "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": length, "n_trained": length - prompt,
            "truncated": False, "split": split, "phrasing_set": phrasing, "kind": kind, "source_id": title,
            "prompt": f"Who made {title}? ({int(rng.integers(0, 40))})",  # a prompt recurs across batches
            "reference": f"I don't know {title}." if kind == "refusal" else f"{title} was made by Bee.",
            "facts": [{"column": "unknown_title" if probe else "Studios", "value": title if probe else "Bee"}],
        })
    return pd.DataFrame(records)


@pytest.mark.parametrize("max_questions, max_loss_rows", [(6, None), (40, 10), (500, 1000)])
@pytest.mark.parametrize("batch_rows", [1, 7, 64])
def test_questions_and_loss_rows_equal_those_of_the_whole_frame(max_questions, max_loss_rows, batch_rows):
    frame, config = evaluation_frame(), EvalConfig(max_questions=max_questions, max_loss_rows=max_loss_rows, seed=3)
    questions, loss_rows, split = evaluation_inputs(frame, None, config, batch_rows=batch_rows)
    expected, expected_loss_rows, expected_split = evaluation_rows(frame, config)
    if max_questions > 6:  # every set is asked, and a probe whose title is in the data was dropped
        assert set(questions["set"]) == {"trained", "heldout", "natural", "unknown"}
        assert len(select_questions(frame, max_questions, 3)) > len(questions)
    pd.testing.assert_frame_equal(questions, expected.reset_index(drop=True), check_dtype=False)
    assert split == expected_split == "validation"
    assert loss_rows.column("labels").to_pylist() == [list(v) for v in expected_loss_rows["labels"]]
    assert loss_sample(loss_rows) == loss_sample(expected_loss_rows)
    assert loss_rows.num_rows == min(max_loss_rows or 10**9, int((frame["split"] == "validation").sum()))


def test_an_artifact_read_a_batch_at_a_time_gives_the_same_inputs(tmp_path):
    frame, config = evaluation_frame(400, seed=1), EvalConfig(max_questions=30, seed=0)
    store = ArtifactStore(tmp_path / "store")
    ref = store.write(frame, stage="tokenize", contract=TOKENS.name, schema_version=TOKENS.version, config_hash="t")
    questions, loss_rows, split = evaluation_inputs(ref, store, config, batch_rows=50)
    expected, expected_loss_rows, expected_split = evaluation_rows(store.read(ref), config)
    assert (questions["set"] == "unknown").any() and split == expected_split
    dropped = ~expected["id"].isin(questions["id"])  # the probes of a title that is in the data are gone either way
    assert not dropped.any()
    pd.testing.assert_frame_equal(questions[["id", "set", "prompt", "reference"]],
                                  expected[["id", "set", "prompt", "reference"]].reset_index(drop=True))
    assert [list(v) for v in questions["input_ids"]] == [list(v) for v in expected["input_ids"]]
    assert loss_rows.num_rows == len(expected_loss_rows) and loss_sample(loss_rows) == loss_sample(expected_loss_rows)


def test_without_a_validation_split_the_loss_is_taken_on_heldout(tmp_path):
    frame = evaluation_frame(60)
    frame = frame[frame["split"] != "validation"].reset_index(drop=True)
    heldout = frame[frame["split"] == "heldout"]
    assert set(heldout["phrasing_set"]) == {"heldout", "natural", "unknown"}  # the made-up titles' probes are left out
    store = ArtifactStore(tmp_path)
    ref = store.write(frame, stage="tokenize", contract="tokens", schema_version=2, config_hash="test")
    for tokens in (frame, ref):
        _, loss_rows, split = evaluation_inputs(tokens, store, EvalConfig(max_questions=10), batch_rows=9)
        assert split == "heldout" and loss_rows.num_rows == int((heldout["phrasing_set"] != "unknown").sum())


def test_loss_on_the_arrow_table_equals_loss_on_the_frame(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "model"), dtype=torch.float32)
    _, loss_rows, _ = evaluation_inputs(evaluation_frame(), None, EvalConfig(max_questions=10), batch_rows=32)
    frame = loss_rows.to_pandas()
    assert mean_loss(model, loss_rows, batch_size=5, pad_id=2) == pytest.approx(mean_loss(model, frame, batch_size=5, pad_id=2), abs=0)
