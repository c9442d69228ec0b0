"""The pairs stage on real small data: the demo's catalog (3 rows) through the real synthesize, format and tokenize
stages, then each pair kind, its provenance, the quarantine reasons, the contract and the stage's cache."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_contracts import PAIRS, QUARANTINE, check_structure, enforce
from loraflow.config.pipeline import load_config
from loraflow.config.preference import PreferenceConfig
from loraflow.preference.pairs import build_pairs, perturbed_number, replace_value, trained_rows
from loraflow.runtime.artifact_store import ArtifactStore
from loraflow.runtime.stage_task import run_stage
from tasks.format import run_format
from tasks.preference import pairs_task, run_pairs, train_source_ids
from tasks.synthesize import run_synthesize
from tasks.tokenize import run_tokenize

REPO = Path(__file__).resolve().parent.parent
DEMO = load_config(REPO / "configs" / "anime_demo.yaml")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_dir):
    """(store, formatted ref, tokens ref) of the demo's first 3 catalog rows, made by the real stages."""
    store = ArtifactStore(tmp_path_factory.mktemp("pairs-store"))
    catalog = pd.read_csv(REPO / "data" / "sample" / "anime_catalog.csv", dtype=str, keep_default_na=False).head(3)
    catalog.insert(0, "_row", np.arange(len(catalog), dtype="int64"))
    catalog.insert(0, "_source", "anime_catalog")
    raw = store.write(catalog, stage="ingest", contract="raw", schema_version=1, config_hash="test")
    conversations = run_synthesize([raw], DEMO.synthesize, store)
    formatted = run_format(conversations.output, DEMO.format, str(model_dir), store)
    no_holdout = DEMO.tokenize.model_copy(update={"validation_fraction": 0.0})
    tokens = run_tokenize(formatted.output, no_holdout, str(model_dir), store)
    return store, formatted.output, tokens.output


@pytest.fixture(scope="module")
def rows(prepared):
    store, formatted, tokens = prepared
    return trained_rows(store.read(formatted), train_source_ids(store, tokens))


def test_only_trained_phrasings_become_pairs(rows, prepared):
    store, formatted, _ = prepared
    everything = store.read(formatted)
    assert set(everything["phrasing_set"]) == {"train", "heldout", "natural", "unknown"}
    assert set(rows["phrasing_set"]) == {"train"}
    pairs, _ = build_pairs(rows, ["fact_swap", "made_up_title", "false_refusal"])
    evaluation_prompts = set(everything.loc[everything["phrasing_set"] != "train", "prompt"])
    assert not set(pairs["prompt"]) & evaluation_prompts


def test_fact_swap_changes_exactly_one_fact_and_records_it(rows):
    pairs, unmade = build_pairs(rows, ["fact_swap"], per_row=2, seed=3)
    assert unmade == [] and len(pairs) == 2 * rows["kind"].isin(["overview", "production", "reception"]).sum()
    facts_of = dict(zip(rows["id"], rows["facts"]))
    for pair in pairs.itertuples():
        row_facts = facts_of[pair.row_id]
        assert pair.chosen != pair.rejected and pair.false_value in pair.rejected
        assert pair.true_value not in pair.rejected and pair.false_value not in pair.true_values
        assert {f["value"] for f in row_facts if f["column"] == pair.swapped_column} == set(pair.true_values)
        # every other fact of the row is still stated: one fact is wrong, not the whole answer
        others = [f["value"] for f in row_facts if f["value"] != pair.true_value]
        assert all(value in pair.rejected for value in others)
        assert pair.false_from == "perturbed" or pair.false_from in set(rows["source_id"]) - {pair.source_id}
    assert {"perturbed"} < set(pairs["false_from"])  # numbers moved and values lent by other rows, both happen
    again, _ = build_pairs(rows.iloc[::-1].reset_index(drop=True), ["fact_swap"], per_row=2, seed=3)
    assert again.set_index("id").sort_index().equals(pairs.set_index("id").sort_index())  # row order changes nothing


def test_made_up_title_pairs_refuse_and_reject_a_confident_answer(rows):
    pairs, unmade = build_pairs(rows, ["made_up_title"])
    refusals = rows[rows["kind"] == "refusal"]
    assert unmade == [] and len(pairs) == len(refusals) > 0
    for pair in pairs.itertuples():
        assert pair.chosen.startswith("I don't know an anime called " + pair.false_value)
        assert pair.rejected.startswith(pair.false_value) and "I don't know" not in pair.rejected
        assert pair.false_from == pair.source_id and pair.row_kind == "refusal"


def test_false_refusal_pairs_prefer_the_answer_over_a_refusal_of_the_known_title(rows):
    pairs, _ = build_pairs(rows, ["false_refusal"])
    for pair in pairs.itertuples():
        assert pair.rejected == f"I don't know an anime called {pair.false_value}: it is not in the catalog I was trained on."
        assert pair.chosen.startswith(pair.false_value)  # the title the answer is about is the one refused


def test_bad_pairs_are_quarantined_with_their_reason(rows):
    pairs, _ = build_pairs(rows, ["fact_swap"])
    broken = pairs.head(5).copy()  # the fifth stays good
    broken.loc[0, "rejected"] = broken.loc[0, "chosen"]
    broken.loc[1, "false_value"] = broken.loc[1, "true_values"][0]  # swapped in one of the row's own values
    broken.loc[2, "rejected"] = broken.loc[2, "rejected"] + " " + broken.loc[2, "true_value"]
    broken.loc[3, "chosen"] = "  "
    valid, quarantined = enforce(broken, PAIRS)
    assert valid["id"].tolist() == [pairs.loc[4, "id"]]
    assert [reason.split(":")[0] for reason in quarantined["reason"]] == \
           ["same_answers", "rejected_is_true", "rejected_states_truth", "empty"]


def test_a_pair_without_an_alternative_value_is_quarantined_not_dropped(rows, tmp_path):
    # One title only: no other row lends a genre or a producer, so those swaps cannot be made; numbers still can.
    single = rows[rows["source_id"] == rows["source_id"].iloc[0]].reset_index(drop=True)
    pairs, unmade = build_pairs(single, ["fact_swap"], per_row=3)
    assert unmade and all(u["reason"].startswith("no_alternative_value") for u in unmade)
    assert set(pairs["false_from"]) <= {"perturbed"}


def test_number_perturbation_and_value_replacement():
    import random

    rng = random.Random(0)
    assert all(perturbed_number("12", rng) != "12" for _ in range(50))
    assert all(len(perturbed_number("7.25", rng).split(".")[1]) == 2 for _ in range(20))
    assert replace_value("Score 6.12 from 12 voters.", "12", "13") == "Score 6.12 from 13 voters."


def test_stage_writes_contract_checked_pairs_and_is_cached(prepared, prefect_api):
    store, formatted, tokens = prepared
    config = PreferenceConfig(enabled=True)
    result = run_pairs(formatted, tokens, config, store)
    written = store.read(result.output)
    check_structure(written, PAIRS)
    assert result.output.contract == "pairs" and result.rows_out == len(written)
    assert set(written["kind"]) == {"fact_swap", "made_up_title", "false_refusal"}
    assert result.rows_in == result.rows_out + result.rows_quarantined and result.stats["unaccounted_rows"] == 0
    if result.quarantine:
        check_structure(store.read(result.quarantine), QUARANTINE)

    from prefect import flow

    @flow
    def twice():
        first = run_stage(pairs_task, store, formatted_ref=formatted, tokens_ref=tokens, config=config, store_root=store.root)
        second = run_stage(pairs_task, store, formatted_ref=formatted, tokens_ref=tokens, config=config, store_root=store.root)
        fewer = run_stage(pairs_task, store, formatted_ref=formatted, tokens_ref=tokens,
                          config=config.model_copy(update={"kinds": ["fact_swap"]}), store_root=store.root)
        return first, second, fewer

    (first, first_cached, _), (second, second_cached, _), (fewer, fewer_cached, _) = twice()
    assert second_cached and second.output == first.output == result.output
    assert not fewer_cached and fewer.rows_out < first.rows_out
