"""evaluate stage: metrics on known answers (pure), the gate, and real generation with SmolLM2 and a tiny Llama."""

import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from loraflow.config.evaluate import EvalConfig, GateConfig
from loraflow.config.train import TrainConfig
from loraflow.evaluation.generation import chat_prompt, generate_answers, load_for_inference, stop_token_ids
from loraflow.evaluation.metrics import (
    comparison_table,
    facts_present,
    general_answer_ok,
    lcs_length,
    normalise,
    rouge_l_f1,
    score_answers,
    select_questions,
    summarise,
)
from loraflow.evaluation.gate import decide_gate
from tasks.evaluate import evaluate_adapter
from tasks.gate import gate_candidate
from tests.tiny_llama import build_tiny_llama, smollm2_dir, tokens_frame


# ---- pure metrics --------------------------------------------------------------------------------------

def test_normalise_drops_case_whitespace_and_thousands_separators():
    assert normalise("  Scored by 12,345\n USERS ") == "scored by 12345 users"
    assert normalise("1,234,567 and 3.14, 15") == "1234567 and 3.14, 15"


@pytest.mark.parametrize("answer, facts, expected", [
    ("It was made by studio kaze.", [{"column": "Studios", "value": "Studio Kaze"}], True),
    ("Scored 8.12 by 12345 people", [{"column": "Score", "value": "8.12"}, {"column": "Scored By", "value": "12,345"}], True),
    ("Scored 8.12 by many people", [{"column": "Score", "value": "8.12"}, {"column": "Scored By", "value": "12,345"}], False),
    ("It has 113 episodes", [{"column": "Episodes", "value": "13"}], False),
    ("It has 13.5 episodes", [{"column": "Episodes", "value": "13"}], False),
    ("It has 13 episodes.", [{"column": "Episodes", "value": "13"}], True),
    ("Anything", [], None),
])
def test_fact_accuracy_needs_every_fact_value(answer, facts, expected):
    assert facts_present(answer, facts) is expected


def test_rouge_l_on_known_pairs():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    assert rouge_l_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l_f1("", "anything") == 0.0
    # LCS("police killed the gunman", "police kill the gunman") = 3 -> P = R = 3/4
    assert rouge_l_f1("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # candidate 2 words, reference 4, LCS 2: P = 1, R = 0.5, F1 = 2/3
    assert rouge_l_f1("Studio Kaze", "made by Studio Kaze") == pytest.approx(2 / 3)


def test_general_answer_check_matches_whole_words():
    assert general_answer_ok("The capital of France is Paris.", "Paris")
    assert general_answer_ok("2 + 2 equals four", "4|four")
    assert not general_answer_ok("It is 42.", "4|four")


def test_general_answer_check_is_strict():
    """The expected answer must be the answer, not one of several claims (issue 15, item 9)."""
    question = "What is 2 + 2?"
    assert not general_answer_ok("2 + 2 = 5 in Japanese, but in English, it's 2 + 2 = 4.", "4|four", question)
    assert not general_answer_ok("It is 5. Some say 4.", "4|four", question)
    assert not general_answer_ok("4 or 5", "4|four", question)
    assert general_answer_ok("2 + 2 = 4", "4|four", question)
    assert general_answer_ok("What is 2 + 2? The answer is four.", "4|four", question)
    assert general_answer_ok("2 * 1 = 2", "2", "What is 2 * 1?")
    capital = "What is the capital of France?"
    assert general_answer_ok("The capital of France is Paris. It is known for the Eiffel Tower.", "Paris", capital)
    assert not general_answer_ok("The capital of France is Lyon, but many say Paris.", "Paris", capital)
    assert not general_answer_ok("Lyon. Paris is the largest city.", "Paris", capital)


def _questions():
    return pd.DataFrame({
        "id": ["t1", "t2", "t3", "h1"],
        "set": ["trained", "trained", "trained", "heldout"],
        "kind": ["production", "production", "reception", "production"],
        "prompt": ["p1", "p2", "p3", "p4"],
        "reference": ["Made by Studio Kaze.", "It has 13 episodes.", "It scores 8.12.", "Made by Studio Kaze."],
        "facts": [[{"column": "Studios", "value": "Studio Kaze"}], [{"column": "Episodes", "value": "13"}],
                  [{"column": "Score", "value": "8.12"}], [{"column": "Studios", "value": "Studio Kaze"}]],
    })


def test_summary_on_known_answers():
    generations = [
        {"text": "Made by Studio Kaze.", "stopped": True, "n_tokens": 6},
        {"text": "It has 12 episodes.", "stopped": True, "n_tokens": 6},
        {"text": "It scores 8.12 and then it goes on and on", "stopped": False, "n_tokens": 16},
        {"text": "Studio Kaze", "stopped": True, "n_tokens": 3},
    ]
    scored = score_answers(_questions(), generations)
    summary = summarise(scored, eval_loss=0.5)
    assert summary["fact_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["fact_accuracy_by_kind"] == {"production": 0.5, "reception": 1.0}
    assert summary["heldout_fact_accuracy"] == 1.0
    assert summary["stop_rate"] == 0.75
    assert summary["rouge_l"] == pytest.approx((1.0 + 0.75 + rouge_l_f1(generations[2]["text"], "It scores 8.12.")) / 3, abs=1e-4)
    assert summary["perplexity"] == pytest.approx(1.649, abs=1e-3)
    assert summary["mean_answer_tokens"] == pytest.approx(31 / 4)


def test_gate_decisions_with_reasons():
    base = {"fact_accuracy": 0.0, "stop_rate": 0.2, "rouge_l": 0.1}
    good = {"fact_accuracy": 0.95, "stop_rate": 1.0, "rouge_l": 0.8}
    gate = GateConfig(min_fact_accuracy=0.9, min_stop_rate=0.99, must_beat_base=True, max_general_regressions=0)
    decision = decide_gate(base, good, gate)
    assert decision.passed and [r.split(":")[0] for r in decision.reasons] == ["PASS", "PASS", "SKIP", "SKIP", "SKIP", "PASS", "PASS"]

    decision = decide_gate(base, {**good, "stop_rate": 0.9}, gate, general_regressions=1)
    assert not decision.passed
    assert [r for r in decision.reasons if r.startswith("FAIL")] == [
        "FAIL: stop rate 0.900 >= 0.990", "FAIL: 1 general answer(s) went from right to wrong (allowed 0)",
    ]
    decision = decide_gate({"fact_accuracy": 0.95, "stop_rate": 1.0}, good, gate)
    assert not decision.passed and "FAIL: fact_accuracy 0.950 beats base 0.950" in decision.reasons
    no_facts = decide_gate({"fact_accuracy": None, "rouge_l": 0.1}, {"fact_accuracy": None, "rouge_l": 0.3, "stop_rate": 1.0}, gate)
    assert no_facts.passed and no_facts.reasons[0].startswith("SKIP")


def test_gate_compares_like_with_like_against_the_champion():
    base = {"fact_accuracy": 0.0, "stop_rate": 0.2, "eval_loss": 3.0}
    sizes = {"fact_questions": 8, "natural_questions": 8, "eval_loss_examples": 40, "eval_loss_tokens": 900}
    champion = {"fact_accuracy": 0.875, "natural_fact_accuracy": 0.625, "stop_rate": 1.0, "eval_loss": 1.0, **sizes}
    gate = GateConfig(min_fact_accuracy=0.5, min_stop_rate=0.9, min_natural_fact_accuracy=None, previous_tolerance=0.02,
                      previous_loss_tolerance=0.05)
    # One trained fact of 8 lost is within the sample's slack (eval.gate.previous_slack_questions, 1 question).
    better = decide_gate(base, {"fact_accuracy": 0.75, "natural_fact_accuracy": 1.0, "stop_rate": 1.0, "eval_loss": 1.04,
                                **sizes}, gate, previous=champion)
    assert better.passed, better.reasons
    assert ("PASS: fact_accuracy 0.750, n=8 >= champion's 0.875, n=8 - 0.125 (trained phrasings; 1 question(s) of 8: "
            "eval.gate.previous_slack_questions)") in better.reasons
    worse = decide_gate(base, {"fact_accuracy": 0.625, "natural_fact_accuracy": 0.375, "stop_rate": 1.0, "eval_loss": 1.2,
                               **sizes}, gate, previous=champion)
    assert not worse.passed
    assert worse.failures == [
        "FAIL: fact_accuracy 0.625, n=8 >= champion's 0.875, n=8 - 0.125 (trained phrasings; 1 question(s) of 8: "
        "eval.gate.previous_slack_questions)",
        "FAIL: natural_fact_accuracy 0.375, n=8 >= champion's 0.625, n=8 - 0.125 (natural questions; 1 question(s) of 8: "
        "eval.gate.previous_slack_questions)",
        "FAIL: validation loss 1.2000 <= champion's 1.0000 + 5% (40 example(s), 900 token(s))",
    ]
    # Without the slack, the tolerance alone: one fact of 8 lost refuses.
    strict = decide_gate(base, {"fact_accuracy": 0.75, "natural_fact_accuracy": 1.0, "stop_rate": 1.0, "eval_loss": 1.04,
                                **sizes}, gate.model_copy(update={"previous_slack_questions": 0}), previous=champion)
    assert strict.failures == ["FAIL: fact_accuracy 0.750, n=8 >= champion's 0.875, n=8 - 0.020 (trained phrasings)"]
    # The scenario's refused model (retrain_scenario_cpu_2026-12-07.json, run 3): better on every fact metric, one general
    # question of 44 fewer right (12 vs 13) than the champion; 1/44 = 0.023 is more than the 0.02 tolerance. The
    # summaries hold the rates rounded to 4 decimals, as here (unrounded, the first re-run of the scenario's refusal
    # passed this test and was refused again: 0.2727 < 0.2955 - 0.02273).
    general = {"general_total": 44}
    one_question = decide_gate(base, {"fact_accuracy": 1.0, "natural_fact_accuracy": 0.958, "stop_rate": 1.0,
                                      "general_accuracy": round(12 / 44, 4), **sizes, **general}, gate,
                               previous={**champion, "general_accuracy": round(13 / 44, 4), **general})
    assert one_question.passed, one_question.reasons
    two_questions = decide_gate(base, {"fact_accuracy": 1.0, "natural_fact_accuracy": 0.958, "stop_rate": 1.0,
                                       "general_accuracy": round(11 / 44, 4), **sizes, **general}, gate,
                                previous={**champion, "general_accuracy": round(13 / 44, 4), **general})
    assert [line.split(" >=")[0] for line in two_questions.failures] == ["FAIL: general_accuracy 0.250, n=44"]
    # The refused model: better on every question metric, its loss higher but measured on one example.
    one_row = {**sizes, "eval_loss_examples": 1, "eval_loss_tokens": 34}
    tiny_loss = decide_gate(base, {"fact_accuracy": 1.0, "natural_fact_accuracy": 1.0, "stop_rate": 1.0, "eval_loss": 1.6533,
                                   **one_row}, gate, previous={**champion, "eval_loss": 1.4295, **one_row})
    assert tiny_loss.passed, tiny_loss.reasons
    assert ("NOTE: validation loss 1.6533 vs champion's 1.4295 stands on 1 example(s), 34 token(s), fewer than "
            "eval.gate.min_loss_examples 20 / min_loss_tokens 200: reported, not gated") in tiny_loss.reasons
    # Switched off, or no champion yet: the worse model passes.
    off = GateConfig(min_fact_accuracy=0.5, min_stop_rate=0.9, must_not_regress_previous=False)
    assert decide_gate(base, {"fact_accuracy": 0.85, "stop_rate": 1.0, "eval_loss": 1.2}, off, previous=champion).passed
    assert decide_gate(base, {"fact_accuracy": 0.85, "stop_rate": 1.0, "eval_loss": 1.2}, gate).passed

    table = comparison_table({"fact_accuracy": 0.0, "by_kind": {"a": 0.0}}, {"fact_accuracy": 0.85, "by_kind": {"a": 1.0}},
                             {"fact_accuracy": 0.9, "by_kind": {"a": 0.5}})
    assert list(table.columns) == ["metric", "base", "finetuned", "delta", "previous"]
    assert table.set_index("metric").loc["by_kind[a]", "previous"] == 0.5


def test_question_sample_is_deterministic_and_capped():
    frame = pd.DataFrame({
        "id": [f"r{i}" for i in range(30)],
        "split": ["train"] * 20 + ["heldout"] * 6 + ["validation"] * 4,
        "prompt": [f"q{i}" for i in range(30)],
    })
    first = select_questions(frame, max_questions=10, seed=0)
    assert list(first["id"]) == list(select_questions(frame, 10, seed=0)["id"])
    assert first["set"].value_counts().to_dict() == {"trained": 5, "heldout": 5}
    assert set(select_questions(frame, 100)["set"].value_counts().to_dict().values()) == {20, 6}
    assert list(first["id"]) != list(select_questions(frame, 10, seed=1)["id"])


# ---- real models ---------------------------------------------------------------------------------------

def test_smollm2_answers_general_questions_and_stops():
    """Behaviour that matters: left-padded batched greedy answers are right and end with end-of-turn."""
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_for_inference(model_dir)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    assert 2 in stop_ids  # <|im_end|>
    prompts = [chat_prompt(tokenizer, q, None) for q in ("What is the capital of France?", "What is 2 + 2?")]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=48, batch_size=2, stop_ids=stop_ids)
    assert "paris" in answers[0]["text"].lower()
    assert general_answer_ok(answers[1]["text"], "4|four", "What is 2 + 2?")
    assert all(a["stopped"] and a["n_tokens"] < 48 for a in answers)
    cut = generate_answers(model, tokenizer, prompts[:1], max_new_tokens=2, batch_size=1, stop_ids=stop_ids)
    assert cut[0] == {**cut[0], "stopped": False, "n_tokens": 2}


def test_evaluate_adapter_end_to_end_on_tiny_model(tmp_path):
    from tasks.train import train_adapter

    model_dir = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    trained = train_adapter(tokens, model_dir, TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=1e-2), tmp_path / "train")
    config = EvalConfig(max_new_tokens=8, batch_size=4, max_questions=6, general_max_new_tokens=8)
    result = evaluate_adapter(tokens, model_dir, trained.adapter_dir, config, tmp_path / "eval")

    assert result.questions == 6
    for summary in (result.base, result.finetuned):
        assert {"fact_accuracy", "heldout_fact_accuracy", "rouge_l", "stop_rate", "eval_loss", "perplexity"} <= set(summary)
        assert summary["eval_loss_split"] == "validation"
    assert result.finetuned["eval_loss"] != result.base["eval_loss"]
    assert not gate_candidate(result, config.gate).passed  # a random 2-layer model learns no facts in 4 steps
    answers = pd.read_parquet(result.answers_path)
    assert len(answers) == 6 and {"base_answer", "finetuned_answer", "finetuned_fact_hit"} <= set(answers.columns)
    table = pd.read_parquet(result.table_path)
    assert "fact_accuracy_by_kind[production]" in set(table["metric"])
    report = open(result.report_path).read()
    assert "| metric | base | fine-tuned | delta |" in report and "### General questions" in report
    assert "gate" not in json.loads(open(result.metrics_path).read())  # decided by the gate step, on these metrics
    assert result.finetuned["eval_loss_examples"] == int((tokens["split"] == "validation").sum()) > 0
    assert result.finetuned["eval_loss_tokens"] > 0

    # Beside a previously published model (here the base folder itself, so its metrics must equal the base's):
    beside = evaluate_adapter(tokens, model_dir, trained.adapter_dir, config, tmp_path / "eval-previous",
                              previous_model_dir=model_dir)
    assert beside.finetuned == result.finetuned
    assert {k: beside.previous[k] for k in ("fact_accuracy", "rouge_l", "eval_loss")} == \
        {k: result.base[k] for k in ("fact_accuracy", "rouge_l", "eval_loss")}
    assert any("champion's" in reason for reason in gate_candidate(beside, config.gate).reasons)
    assert "champion |" in open(beside.report_path).read()


def test_a_model_asked_the_same_prompts_is_not_asked_again(tmp_path, monkeypatch):
    """With answers_dir, each model's generations are kept by weights + prompts: a new champion re-runs the stage
    but asks only the champion; a second adapter asks only itself; nothing asked before loads a model again."""
    import shutil

    import loraflow.evaluation.generation as generation
    from tasks.train import train_adapter

    model_dir = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    trained = train_adapter(tokens, model_dir, TrainConfig(max_steps=4, micro_batch_size=2, learning_rate=1e-2), tmp_path / "train")
    config = EvalConfig(max_new_tokens=8, batch_size=4, max_questions=6, general_max_new_tokens=8)
    kept = tmp_path / "answers"
    first = evaluate_adapter(tokens, model_dir, trained.adapter_dir, config, tmp_path / "eval-1", answers_dir=kept)
    assert not any(timing.get("reused") for timing in first.timing.values()) and len(list(kept.glob("*.json"))) == 2

    champion = tmp_path / "champion"  # a published model folder: weights + its manifest of file hashes
    shutil.copytree(model_dir, champion)
    (champion / "loraflow-manifest.json").write_text(json.dumps({"files": {"model.safetensors": "beef"}}))
    beside = evaluate_adapter(tokens, model_dir, trained.adapter_dir, config, tmp_path / "eval-2", answers_dir=kept,
                              previous_model_dir=champion)
    assert {name: bool(timing.get("reused")) for name, timing in beside.timing.items()} == \
        {"base": True, "finetuned": True, "previous": False}
    assert (beside.base, beside.finetuned) == (first.base, first.finetuned)
    assert beside.previous["eval_loss"] == first.base["eval_loss"]  # the same weights, loaded from the copy

    loaded = []
    monkeypatch.setattr(generation, "load_for_inference", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    again = evaluate_adapter(tokens, model_dir, trained.adapter_dir, config, tmp_path / "eval-3", answers_dir=kept,
                             previous_model_dir=champion)
    assert loaded == [] and (again.base, again.finetuned, again.previous) == (beside.base, beside.finetuned, beside.previous)
    monkeypatch.undo()

    other = train_adapter(tokens, model_dir, TrainConfig(max_steps=2, micro_batch_size=2, learning_rate=1e-2), tmp_path / "train-2")
    second = evaluate_adapter(tokens, model_dir, other.adapter_dir, config, tmp_path / "eval-4", answers_dir=kept)
    assert (second.timing["base"].get("reused"), second.timing["finetuned"].get("reused")) == (True, None)
    assert second.finetuned["eval_loss"] != first.finetuned["eval_loss"]
    smaller = EvalConfig(max_new_tokens=8, batch_size=4, max_questions=4, general_max_new_tokens=8)  # other prompts
    fewer = evaluate_adapter(tokens, model_dir, trained.adapter_dir, smaller, tmp_path / "eval-5", answers_dir=kept)
    assert not any(timing.get("reused") for timing in fewer.timing.values())
