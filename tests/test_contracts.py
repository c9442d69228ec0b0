"""Contracts: structure errors list everything at once; bad rows are quarantined with a reason."""

import json

import numpy as np
import pandas as pd
import pytest

from data_contracts import CONVERSATIONS, TOKENS, ContractViolation, enforce


def conversation(id_, messages, **extra):
    row = {"id": id_, "messages": messages, "kind": "overview", "source": "s", "source_row": 0,
           "source_id": "1", "phrasing_set": "train", "facts": []}
    return {**row, **extra}


def test_structure_errors_are_all_listed():
    frame = pd.DataFrame({"id": ["a", None], "kind": ["x", "y"]})
    with pytest.raises(ContractViolation) as error:
        enforce(frame, CONVERSATIONS)
    message = str(error.value)
    for column in ("messages", "source", "source_row", "facts"):
        assert f"'{column}'" in message
    assert "column 'id' row 1" in message and "fill or remove" in message
    assert len(error.value.failures) >= 6


def test_bad_rows_are_quarantined_with_reason():
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    frame = pd.DataFrame([
        conversation("a", good),
        conversation("b", [{"role": "user", "content": "q"}]),  # no answer
        conversation("c", [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]),
        conversation("a", good),  # duplicate id
    ])
    valid, quarantined = enforce(frame, CONVERSATIONS)
    assert valid["id"].tolist() == ["a"]
    assert len(valid) + len(quarantined) == len(frame)
    reasons = quarantined["reason"].tolist()
    assert reasons[0].startswith("bad_messages") and reasons[1].startswith("bad_messages")
    assert reasons[2].startswith("duplicate_id")
    assert json.loads(quarantined["row_json"][0])["id"] == "b"


def test_all_masked_tokens_quarantined_and_empty_result_refused():
    row = {"id": "a", "input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, -100, -100],
           "length": 3, "n_trained": 0, "truncated": False, "split": "train", "kind": "k", "source_id": "1",
           "prompt": "p", "reference": "r", "facts": []}
    with pytest.raises(ContractViolation, match="all 1 rows were quarantined"):
        enforce(pd.DataFrame([row]), TOKENS)
    trained = {**row, "id": "b", "labels": [-100, 2, 3], "n_trained": 2}
    valid, quarantined = enforce(pd.DataFrame([row, trained]), TOKENS)
    assert valid["id"].tolist() == ["b"] and quarantined["reason"][0].startswith("all_masked")
    assert np.asarray(valid["labels"][0]).tolist() == [-100, 2, 3]


def test_empty_input_refused():
    with pytest.raises(ContractViolation, match="the input had no rows"):
        enforce(pd.DataFrame(columns=list(conversation("a", []).keys())).astype({"source_row": int}), CONVERSATIONS)
