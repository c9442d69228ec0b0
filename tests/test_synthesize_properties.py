"""Property: whatever unicode a catalog holds, missing markers never reach a text and every answer states its facts."""

import re

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_contracts import CONVERSATIONS, enforce
from loraflow.config.synthesize import SynthesizeConfig
from tasks.synthesize import synthesize_frame, synthesize_stats

MARKER_WORDS = re.compile(r"\b(nan|none|unknown|n/a)\b", re.IGNORECASE)
MARKERS = ["UNKNOWN", "unknown", "Unknown", "", "  ", "nan", "NaN", "None", "N/A", "n/a", "-", " \n\t", None, np.nan]
COLUMNS = {
    "anime_id": "plain", "Name": "plain", "English name": "plain", "Other name": "plain", "Genres": "list",
    "Synopsis": "plain", "Episodes": "count", "Producers": "list", "Studios": "list", "Rating": "plain",
    "Score": "count", "Scored By": "count",
}

free_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=25).filter(lambda t: not MARKER_WORDS.search(t))
counts = st.one_of(st.integers(0, 10**7).map(str), st.integers(0, 10**4).map(lambda n: f"{n}.0"), st.just("7.21"))


def cell(shape: str):
    items = st.lists(st.one_of(free_text, st.sampled_from(MARKERS[:-2])), min_size=1, max_size=4)  # markers as list items too
    value = {"plain": free_text, "count": counts, "list": items.map(", ".join)}[shape]
    return st.one_of(value, value, value, value, st.sampled_from(MARKERS))  # a fifth missing: most rows still ask something


rows_strategy = st.lists(st.fixed_dictionaries({column: cell(shape) for column, shape in COLUMNS.items()}), min_size=1, max_size=5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(records=rows_strategy, seed=st.integers(0, 3))
def test_random_rows_never_leak_missing_markers_and_answers_state_their_facts(records, seed):
    rows = pd.DataFrame(records, columns=list(COLUMNS)).astype(object)
    rows.insert(0, "_row", np.arange(len(rows), dtype="int64"))
    rows.insert(0, "_source", "random")
    config = SynthesizeConfig(anime_qa={"seed": seed})
    conversations, quarantine = synthesize_frame([rows], config)

    for messages, facts in zip(conversations["messages"], conversations["facts"]):
        for message in messages:
            assert not MARKER_WORDS.search(message["content"]), message["content"]
        answer = messages[-1]["content"]
        assert facts, answer
        for fact in facts:
            assert fact["value"] and fact["value"] in answer, (fact, answer)
            assert fact["value"].strip().casefold() not in {"unknown", "nan", "none", "n/a", "-", ""}, fact
    stats = synthesize_stats(conversations, quarantine, len(rows), config)
    assert len(rows) + stats["rows_expanded"] == len(conversations) + len(quarantine)
    if len(conversations):
        valid, broken = enforce(conversations, CONVERSATIONS)
        assert len(broken) == 0, broken["reason"].tolist()


# table_qa on the tea catalog's config: its columns, types and list fields, with values that look like templates.
TEA_COLUMNS = {
    "tea_id": "plain", "Name": "plain", "Also called": "plain", "Type": "plain", "Estate": "plain", "Region": "plain",
    "Tasting notes": "list", "Caffeine (mg per cup)": "count", "Water (°C)": "count", "Steep (minutes)": "count",
}
template_like = st.sampled_from(["{name}", "{{x}}", "{", "}", "{0}"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(records=st.lists(st.fixed_dictionaries({column: st.one_of(cell(shape), template_like) if shape == "plain"
                                               else cell(shape) for column, shape in TEA_COLUMNS.items()}),
                        min_size=1, max_size=5))
def test_table_qa_random_rows_never_leak_markers_render_values_as_text_and_account_for_rows(records):
    from pathlib import Path

    from loraflow.config.pipeline import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tea_catalog.yaml").synthesize
    rows = pd.DataFrame(records, columns=list(TEA_COLUMNS)).astype(object)
    rows.insert(0, "_row", np.arange(len(rows), dtype="int64"))
    rows.insert(0, "_source", "random")
    conversations, quarantine = synthesize_frame([rows], config)

    for messages, facts, row in zip(conversations["messages"], conversations["facts"], conversations["source_row"]):
        for message in messages:
            assert not MARKER_WORDS.search(message["content"]), message["content"]
        answer = messages[-1]["content"]
        name = " ".join(str(records[row]["Name"]).split())
        assert name in messages[0]["content"] and name in answer  # a value with braces stays that text
        assert facts and all(fact["value"] and fact["value"] in answer for fact in facts), (facts, answer)
    stats = synthesize_stats(conversations, quarantine, len(rows), config)
    assert len(rows) + stats["rows_expanded"] == len(conversations) + len(quarantine)
    if len(conversations):
        valid, broken = enforce(conversations, CONVERSATIONS)
        assert len(broken) == 0, broken["reason"].tolist()
