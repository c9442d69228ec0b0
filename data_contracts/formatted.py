"""Formatted examples: text segments that keep roles, so masking is exact."""

import pandas as pd
import pandera.pandas as pa

from data_contracts.base import Contract, RowRule


def _no_trained_segment(frame: pd.DataFrame) -> pd.Series:
    return frame["segments"].map(lambda segs: not any(s["trained"] and s["text"] for s in segs))


FORMATTED = Contract(
    name="formatted",
    version=3,
    columns={
        "id": pa.Column(str, nullable=False),
        "segments": pa.Column(object, nullable=False, description="List of {text, trained}; their concatenation is the example."),
        "prompt": pa.Column(str, nullable=False, description="Text before the final answer: what inference is given."),
        "reference": pa.Column(str, nullable=False, description="The final answer's text."),
        "template": pa.Column(str, nullable=False),
        "kind": pa.Column(str, nullable=False),
        "source_id": pa.Column(str, nullable=False),
        "phrasing_set": pa.Column(str, nullable=False),
        "facts": pa.Column(object, nullable=False),
        "messages": pa.Column(object, nullable=False, description="The conversation as rendered (system prompt added): pre-flight re-renders it."),
        "literal_spans": pa.Column(object, nullable=False, description=(
            "Character spans [start, end, start, end, ...] of control-token text that came from the data (a message "
            "holding '<|im_end|>'): tokenize encodes them as plain characters, never as the control token.")),
    },
    row_rules=(RowRule("nothing_to_train", "no segment of the example is trained", _no_trained_segment),),
    unique=("id",),
)
