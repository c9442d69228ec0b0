"""Tokenized examples with labels and the train/validation/heldout split: what training reads."""

import numpy as np
import pandas as pd
import pandera.pandas as pa

from data_contracts.base import Contract, RowRule

IGNORE_INDEX = -100


def _lengths(column: pd.Series) -> np.ndarray:
    return np.fromiter(map(len, column), dtype=np.int64, count=len(column))


def _length_mismatch(frame: pd.DataFrame) -> pd.Series:
    lengths = _lengths(frame["input_ids"])
    mismatch = (lengths != _lengths(frame["labels"])) | (lengths != _lengths(frame["attention_mask"])) | (lengths != frame["length"].to_numpy())
    return pd.Series(mismatch, index=frame.index)


def _all_masked(frame: pd.DataFrame) -> pd.Series:
    """Rows with no label other than IGNORE_INDEX: trained labels counted over all rows' labels joined (one NumPy pass,
    not one per row)."""
    labels = frame["labels"].tolist()
    ends = np.cumsum(_lengths(frame["labels"]))
    joined = np.concatenate([np.asarray(row).ravel() for row in labels]) if labels else np.zeros(0)
    trained_so_far = np.concatenate([[0], np.cumsum(joined != IGNORE_INDEX)])
    trained = trained_so_far[ends] - trained_so_far[np.concatenate([[0], ends[:-1]])]
    return pd.Series(trained == 0, index=frame.index)


# answer_start / answer_ends / phrasing_set / template are written by tokenize and read by pre-flight; they are
# optional so that hand-made frames (tests of training code) need only what training reads.
TOKENS = Contract(
    name="tokens",
    version=2,
    columns={
        "id": pa.Column(str, nullable=False),
        "input_ids": pa.Column(object, nullable=False, description="Token ids."),
        "attention_mask": pa.Column(object, nullable=False, description="1 per real token."),
        "labels": pa.Column(object, nullable=False, description="Token id where trained, -100 elsewhere."),
        "length": pa.Column(int, pa.Check.ge(1), nullable=False),
        "n_trained": pa.Column(int, nullable=False, description="Tokens with a label."),
        "truncated": pa.Column(bool, nullable=False),
        "split": pa.Column(str, pa.Check.isin(["train", "validation", "heldout"]), nullable=False),
        "answer_start": pa.Column(int, nullable=False, required=False, description="Token index where the final answer starts (prompt = input_ids[:answer_start])."),
        "answer_ends": pa.Column(object, nullable=False, required=False, description="Token index of the last trained token (end marker/EOS) of each answer kept."),
        "phrasing_set": pa.Column(str, nullable=False, required=False, description="train or heldout phrasing (passthrough)."),
        "template": pa.Column(str, nullable=False, required=False, description="Template the text was rendered with."),
        "kind": pa.Column(str, nullable=False),
        "source_id": pa.Column(str, nullable=False),
        "prompt": pa.Column(str, nullable=False),
        "reference": pa.Column(str, nullable=False),
        "facts": pa.Column(object, nullable=False),
    },
    row_rules=(
        RowRule("length_mismatch", "input_ids, labels, attention_mask and length disagree", _length_mismatch),
        RowRule("all_masked", "every label is -100: nothing would be trained", _all_masked),
    ),
    unique=("id",),
)
