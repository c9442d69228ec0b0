"""Evaluation that matches use: natural questions, made-up titles refused, the general suite, and their gates."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from loraflow.config.evaluate import EvalConfig, GateConfig
from loraflow.config.general_suite import GENERAL_SUITE
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.evaluation.gate import decide_gate
from loraflow.evaluation.metrics import (general_answer_ok, refused, score_answers, select_questions, summarise,
                                         without_known_titles)
from tasks.synthesize import synthesize_frame
from loraflow.synthesizers import anime_probes, anime_qa
from tasks.tokenize import split_of
from tests.test_synthesize import catalog

REPO = Path(__file__).resolve().parents[1]
TITLE_COLUMNS = ("Name", "English name", "Other name")


def probe_config(**options) -> SynthesizeConfig:
    return SynthesizeConfig(anime_qa={"trained_phrasings": 2, "heldout_phrasings": 1, **options})


def known_titles(rows: pd.DataFrame) -> list[str]:
    return [str(v).casefold() for column in TITLE_COLUMNS for v in rows[column] if str(v).strip() and str(v) != "UNKNOWN"]


# ---- synthesis of the probes


def test_natural_questions_ask_a_subset_of_the_rows_facts_in_wordings_never_trained():
    conversations, _ = synthesize_frame([catalog()], probe_config(natural_questions=3, unknown_titles=0))
    natural = conversations[conversations["phrasing_set"] == "natural"]
    assert len(natural) > 0
    templates = {t for kind in anime_qa.QUESTIONS.values() for t in kind}
    answers = {(r.source_id, r.kind): r for r in conversations[conversations["phrasing_set"] == "train"].itertuples()}
    asked_by_other_title = 0
    for row in natural.itertuples():
        trained = answers[(row.source_id, row.kind)]
        # the reference is the kind's own answer; the facts are some of its facts, all stated in it
        assert row.messages[-1]["content"] == trained.messages[-1]["content"]
        trained_facts = {(f["column"], f["value"]) for f in trained.facts}
        assert 0 < len(row.facts) and {(f["column"], f["value"]) for f in row.facts} <= trained_facts
        question = row.messages[0]["content"]
        names = catalog().set_index("anime_id").loc[row.source_id]
        titles = [names[c] for c in TITLE_COLUMNS if names[c]]
        assert not {t.replace("{name}", title) for t in templates for title in titles} & {question}
        asked_by_other_title += names["Name"] not in question
    assert asked_by_other_title > 0  # some ask by the English title or the alias
    assert set(natural["kind"]) == {"overview", "production", "reception"}


def test_made_up_titles_are_in_no_row_and_their_answer_is_a_refusal():
    rows = catalog()
    conversations, _ = synthesize_frame([rows], probe_config(natural_questions=0, unknown_titles=3, refusal_examples=2))
    unknown = conversations[conversations["phrasing_set"] == "unknown"]
    trained_refusals = conversations[(conversations["phrasing_set"] == "train") & (conversations["kind"] == "refusal")]
    emitted_rows = conversations.loc[conversations["kind"] != "refusal", "source_row"].nunique()
    assert len(unknown) == 3 * emitted_rows and len(trained_refusals) == 2 * emitted_rows
    known = known_titles(rows)
    titles = [r.facts[0]["value"] for r in pd.concat([unknown, trained_refusals]).itertuples()]
    assert len(set(titles)) == len(titles)  # probes and training refusals never share a title
    for row in pd.concat([unknown, trained_refusals]).itertuples():
        title = row.facts[0]["value"]
        assert row.facts[0]["column"] == anime_probes.UNKNOWN_TITLE
        assert not any(title.casefold() in name or name in title.casefold() for name in known), title
        assert title in row.messages[0]["content"] and title in row.messages[-1]["content"]
        assert refused(row.messages[-1]["content"])
    # evaluation only: the tokenize stage never trains them
    assert {split_of(r.source_id, r.phrasing_set, "salt", 0.5) for r in unknown.itertuples()} == {"heldout"}


def test_more_refusal_examples_leave_the_evaluation_probes_as_they_were():
    def synthesized(refusal_examples):
        config = probe_config(natural_questions=2, unknown_titles=2, refusal_examples=refusal_examples)
        conversations, _ = synthesize_frame([catalog()], config)
        refusals = conversations[(conversations["phrasing_set"] == "train") & (conversations["kind"] == "refusal")]
        probes = conversations[conversations["phrasing_set"].isin(["natural", "unknown"])]
        return len(refusals), sorted((r.id, r.messages[0]["content"], r.messages[-1]["content"]) for r in probes.itertuples())

    (two, probes_two), (four, probes_four) = synthesized(2), synthesized(4)
    assert four == 2 * two > 0
    # the evaluation's questions are drawn before the refusal examples: training more of them cannot change them
    assert probes_two == probes_four


def test_some_trained_phrasings_ask_one_fact():
    """Users ask "how many episodes" or "which genres" alone; a kind whose trained wordings all ask several facts
    (or none by name) sent those questions to the wrong kind's answer (docs/results.md, "Natural questions")."""
    production, overview = anime_qa.QUESTIONS["production"], anime_qa.QUESTIONS["overview"]
    assert any("episode" in t and not re.search(r"produc|studio|made|companies", t) for t in production)
    assert any("genre" in t and not re.search(r"story|about|summary|overview", t) for t in overview)
    natural = {wording for wording, *_ in anime_probes.NATURAL}
    assert not natural & {t.replace("{name}", "{title}") for kind in anime_qa.QUESTIONS.values() for t in kind}


def test_probes_do_not_depend_on_row_order_and_are_accounted_for():
    config = probe_config(natural_questions=2, unknown_titles=2, refusal_examples=1)
    first, skipped = synthesize_frame([catalog()], config)
    shuffled, _ = synthesize_frame([catalog().iloc[::-1].reset_index(drop=True)], config)

    def probes(frame):
        return {(r.source_id, r.phrasing_set, r.messages[0]["content"]) for r in frame.itertuples()}

    assert probes(shuffled) == probes(first) and first["id"].is_unique
    stats = first.attrs["stats"]
    assert len(catalog()) + stats["rows_expanded"] == len(first) + len(skipped)


def test_trained_title_variants_ask_by_the_english_title_or_alias_with_the_same_answer():
    config = probe_config(trained_phrasings=3, trained_title_variants=2, natural_questions=0, unknown_titles=0)
    conversations, _ = synthesize_frame([catalog()], config)
    rows = catalog().set_index("anime_id")
    by_other_title = 0
    for (source_id, kind), group in conversations[conversations["phrasing_set"] == "train"].groupby(["source_id", "kind"]):
        assert group["messages"].map(lambda m: m[-1]["content"]).nunique() == 1
        others = [rows.loc[source_id, c] for c in ("English name", "Other name")]
        by_other_title += sum(any(o and o != "UNKNOWN" and o in m[0]["content"] for o in others) for m in group["messages"])
    assert by_other_title > 0
    with pytest.raises(ValueError, match="trained_title_variants"):
        probe_config(trained_phrasings=1, trained_title_variants=2)


# ---- scoring


@pytest.mark.parametrize("answer, expected", [
    ("I don't know an anime called Kotaru Mimeki: it is not in the catalog I was trained on.", True),
    ("I'm not familiar with that title.", True),
    ("Sorry, I have no information about Kotaru Mimeki.", True),
    ("Kotaru Mimeki was produced by Hikaridou, animated by Furubi Works, and runs for 12 episodes.", False),
    ("I don't know much, but Kotaru Mimeki is rated PG-13 and has a user score of 7.1.", False),
    ("Kotaru Mimeki is a great anime about friendship.", False),
])
def test_refusal_is_a_refusal_that_states_no_facts(answer, expected):
    assert refused(answer) is expected


def tokens_frame() -> pd.DataFrame:
    """A TOKENS-like frame with every evaluation set (the columns evaluation reads)."""
    rows = [
        ("t1", "train", "train", "production", "Who made Alpha?", "Alpha was animated by Bee.", [{"column": "Studios", "value": "Bee"}]),
        ("t2", "train", "train", "refusal", "Who made Zeta?", "I don't know an anime called Zeta.", [{"column": "unknown_title", "value": "Zeta"}]),
        ("h1", "heldout", "heldout", "production", "Alpha's makers?", "Alpha was animated by Bee.", [{"column": "Studios", "value": "Bee"}]),
        ("n1", "heldout", "natural", "production", "which studio did alpha?", "Alpha was animated by Bee.", [{"column": "Studios", "value": "Bee"}]),
        ("u1", "heldout", "unknown", "refusal", "who made Gamma?", "I don't know an anime called Gamma.", [{"column": "unknown_title", "value": "Gamma"}]),
        ("u2", "heldout", "unknown", "refusal", "who made Alpha Two?", "I don't know an anime called Alpha.", [{"column": "unknown_title", "value": "Alpha"}]),
    ]
    return pd.DataFrame(rows, columns=["id", "split", "phrasing_set", "kind", "prompt", "reference", "facts"])


def test_sets_are_selected_apart_and_a_made_up_title_found_in_the_data_is_dropped():
    frame = tokens_frame()
    questions = select_questions(frame, max_questions=10)
    assert dict(zip(questions["id"], questions["set"])) == {"t1": "trained", "h1": "heldout", "n1": "natural",
                                                          "u1": "unknown", "u2": "unknown"}
    kept, dropped = without_known_titles(questions, frame)
    assert dropped == 1 and "u2" not in set(kept["id"])  # "Alpha" is a real title of the data


def test_natural_accuracy_and_refusal_rate_are_scored_and_gated():
    questions, _ = without_known_titles(select_questions(tokens_frame(), 10), tokens_frame())
    answers = {"t1": "Alpha was animated by Bee.", "h1": "Alpha was animated by Bee.",
               "n1": "Alpha was animated by Wasp.", "u1": "Gamma was produced by Bee and runs for 3 episodes."}
    generations = [{"text": answers[i], "stopped": True, "n_tokens": 5} for i in questions["id"]]
    summary = summarise(score_answers(questions, generations))
    assert summary["fact_accuracy"] == 1.0 and summary["heldout_fact_accuracy"] == 1.0
    assert summary["natural_fact_accuracy"] == 0.0 and summary["refusal_rate"] == 0.0

    gate = GateConfig(min_fact_accuracy=0.5, min_natural_fact_accuracy=0.5, min_refusal_rate=0.5)
    decision = decide_gate({"fact_accuracy": 0.0}, summary, gate)
    assert not decision.passed
    failed = [r for r in decision.reasons if r.startswith("FAIL")]
    assert any("natural_fact_accuracy" in r for r in failed) and any("refusal_rate" in r for r in failed)
    # without such questions in the data the checks are skipped, not failed
    plain = {**summary, "natural_fact_accuracy": None, "refusal_rate": None}
    assert decide_gate({"fact_accuracy": 0.0}, plain, gate).passed


def test_general_regressions_are_gated_by_default_with_a_tolerance_of_one():
    gate = GateConfig()
    assert gate.max_general_regressions == 1
    tuned = {"fact_accuracy": 0.9, "stop_rate": 1.0}
    assert decide_gate({"fact_accuracy": 0.0}, tuned, gate, general_regressions=1).passed
    assert not decide_gate({"fact_accuracy": 0.0}, tuned, gate, general_regressions=2).passed


# ---- the general suite


def test_the_general_suite_has_forty_strictly_judged_prompts_none_of_them_replayed():
    config = EvalConfig()
    assert len(config.general_questions) >= 40 and set(config.general_questions) == set(config.general_expected)
    replay = {json.loads(line)["instruction"] for line in (REPO / "data/sample/general_replay.jsonl").read_text().splitlines()}
    script = (REPO / "scripts/make_replay.py").read_text()
    assert not replay & set(GENERAL_SUITE)
    assert not [q for q in GENERAL_SUITE if json.dumps(q) in script or repr(q) in script]
    for question, expected in GENERAL_SUITE.items():
        first = expected.split("|")[0]
        assert general_answer_ok(f"The answer is {first}.", expected, question), question
        wrong = "13" if re.fullmatch(r"[\d.]+", first) else "purple"
        assert not general_answer_ok(f"The answer is {wrong}.", expected, question), question


def test_neftune_noise_reaches_the_trainer_arguments(tmp_path):
    from loraflow.config.train import TrainConfig
    from loraflow.training.trainer import training_arguments

    from tests.test_train import cpu_plan

    plan = cpu_plan(TrainConfig(precision="fp32"))
    assert training_arguments(TrainConfig(neftune_noise_alpha=5.0), plan, tmp_path).neftune_noise_alpha == 5.0
    assert training_arguments(TrainConfig(), plan, tmp_path).neftune_noise_alpha is None


def test_a_made_up_title_gets_the_longest_answer_budget_so_a_wrong_answer_is_not_also_counted_as_not_stopping(tokenizer):
    from loraflow.evaluation.generation import answer_budgets

    refusal = "I don't know an anime called Nirito; it is not in the catalog."
    overview = "Nirito is a 12-episode action and fantasy anime about a swordsman who returns to the ruined city " * 2
    questions = pd.DataFrame({"reference": [overview, "24", refusal], "set": ["trained", "heldout", "unknown"]})
    config = EvalConfig(max_new_tokens=160, answer_margin_tokens=24)
    length = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    budgets = answer_budgets(questions, tokenizer, config)
    assert budgets[:2] == [length(overview) + 24, length("24") + 24]
    assert budgets[2] == budgets[0] > length(refusal) + 24
    assert answer_budgets(questions, tokenizer, EvalConfig(max_new_tokens=40, answer_margin_tokens=24))[2] == 40
    without_sets = answer_budgets(questions.drop(columns="set"), tokenizer, config)
    assert without_sets[2] == length(refusal) + 24
