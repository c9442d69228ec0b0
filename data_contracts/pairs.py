"""Preference pairs: one prompt, a chosen answer and a rejected one, built from the synthesized rows.

`kind` says how the pair was made (loraflow.config.preference.PAIR_KINDS):
- fact_swap: a known title's trained question; chosen = its grounded answer, rejected = the same answer with one fact
  (`swapped_column`: `true_value` -> `false_value`) swapped for another row's value (`false_from` = that row's
  source id) or perturbed (`false_from` = "perturbed": a number moved);
- made_up_title: a trained question about a made-up title; chosen = the refusal, rejected = a confident answer in the
  catalog's style (`false_from` = the source id whose answer lent its shape, `false_value` = the made-up title);
- false_refusal: a known title's trained question; chosen = the answer, rejected = the refusal with the known title
  (`false_value`).
`row_id` is the formatted row the pair comes from (provenance: its source, row, question kind and phrasing);
`true_values` every value the row states for `swapped_column`, so a swap that lands on another true value is caught.
`prompt` is the formatted prompt (template, system prompt and generation prompt included), as inference sees it.
"""

import pandas as pd
import pandera.pandas as pa

from data_contracts.base import Contract, RowRule

PAIR_KINDS = ("fact_swap", "made_up_title", "false_refusal")


def _folded(text) -> str:
    return " ".join(str(text).casefold().split())


def _empty(frame: pd.DataFrame) -> pd.Series:
    return frame[["prompt", "chosen", "rejected"]].apply(lambda column: column.str.strip().eq("")).any(axis=1)


def _same(frame: pd.DataFrame) -> pd.Series:
    return frame["chosen"].map(_folded) == frame["rejected"].map(_folded)


def _rejected_is_true(frame: pd.DataFrame) -> pd.Series:
    """A fact swap whose new value is one of the row's own values for that column (another of its genres)."""
    swap = frame["kind"] == "fact_swap"
    landed_on_truth = [_folded(false) in {_folded(v) for v in (values if values is not None else [])}
                       for false, values in zip(frame["false_value"], frame["true_values"])]
    return swap & pd.Series(landed_on_truth, index=frame.index)


def _rejected_still_states_truth(frame: pd.DataFrame) -> pd.Series:
    """A fact swap whose rejected answer still states the true value (it appeared twice, or inside the new one)."""
    swap = frame["kind"] == "fact_swap"
    still = [_folded(true) in _folded(rejected) for true, rejected in zip(frame["true_value"], frame["rejected"])]
    return swap & pd.Series(still, index=frame.index)


def _false_value_missing(frame: pd.DataFrame) -> pd.Series:
    """The rejected answer does not state the value the pair says it does (the swap or the title did not land)."""
    missing = [_folded(false) not in _folded(rejected) for false, rejected in zip(frame["false_value"], frame["rejected"])]
    return pd.Series(missing, index=frame.index)


PAIRS = Contract(
    name="pairs",
    version=1,
    columns={
        "id": pa.Column(str, nullable=False, description="Unique pair id: <row_id>:<kind>:<n>."),
        "kind": pa.Column(str, pa.Check.isin(list(PAIR_KINDS)), description="How the pair was made."),
        "row_id": pa.Column(str, nullable=False, description="The formatted row the pair comes from."),
        "row_kind": pa.Column(str, nullable=False, description="That row's question kind (overview, refusal, ...)."),
        "source_id": pa.Column(str, nullable=False, description="That row's source id."),
        "prompt": pa.Column(str, nullable=False, description="The formatted prompt, generation prompt included."),
        "chosen": pa.Column(str, nullable=False, description="The answer to prefer."),
        "rejected": pa.Column(str, nullable=False, description="The answer to reject."),
        "swapped_column": pa.Column(str, nullable=False, description="fact_swap: the column whose value was swapped; else ''."),
        "true_value": pa.Column(str, nullable=False, description="fact_swap: the row's value; else ''."),
        "false_value": pa.Column(str, nullable=False, description="The value the rejected answer states instead "
                                                                  "(fact_swap), the made-up or known title (else)."),
        "false_from": pa.Column(str, nullable=False, description="Where the false value came from: a source id, "
                                                                 "'perturbed' or 'refusal'."),
        "true_values": pa.Column(object, nullable=True, description="fact_swap: every value the row states for the column."),
    },
    row_rules=(
        RowRule("empty", "prompt, chosen and rejected must all hold text", _empty),
        RowRule("same_answers", "chosen and rejected are the same text: nothing to prefer", _same),
        RowRule("rejected_is_true", "the swapped-in value is one of the row's own values for that column", _rejected_is_true),
        RowRule("rejected_states_truth", "the rejected answer still states the true value", _rejected_still_states_truth),
        RowRule("false_value_missing", "the rejected answer does not state the false value the pair records",
                _false_value_missing),
    ),
    unique=("id",),
)
