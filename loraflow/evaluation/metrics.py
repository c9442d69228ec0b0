"""Evaluation metrics and the publish gate, as pure functions on small tables (no model, no torch).

Fact accuracy per question kind (every fact value of the row appears in the answer, after normalising case,
whitespace and thousands separators), ROUGE-L F1 against the reference, stop rate, answer and reference lengths;
general-knowledge answers judged against the expected ones or, without one, against the base model's answer;
each metric with its sample size. The publish gate that reads these summaries is loraflow.evaluation.gate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata

import pandas as pd
from loraflow.config.evaluate import EvalConfig


def normalise(text: str) -> str:
    """Lower-case, NFKC, thousands separators dropped ("12,345" -> "12345"), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = re.sub(r"(?<=\d)[,\u202f\u00a0'_](?=\d{3}(?!\d))", "", text)
    return " ".join(text.split())


def facts_present(answer: str, facts) -> bool | None:
    """True when every fact value appears in the answer (normalised); None for rows without facts."""
    values = [str(fact["value"]) for fact in fact_list(facts)]
    if not values:
        return None
    answer = normalise(answer)
    return all(_contains(answer, normalise(value)) for value in values)


def _contains(text: str, value: str) -> bool:
    # Numbers must match whole ("13" is not found in "113" or "13.5"); words as substrings.
    if re.fullmatch(r"[\d.]+", value):
        return re.search(rf"(?<![\d.]){re.escape(value)}(?!\.?\d)", text) is not None
    return value in text


def fact_list(facts) -> list[dict]:
    """A row's facts as plain dicts ([] for none or NaN)."""
    if facts is None or (isinstance(facts, float) and math.isnan(facts)):
        return []
    return [dict(fact) for fact in list(facts)]


def words(text: str) -> list[str]:
    """ROUGE tokens: lower-cased runs of letters/digits (thousands separators removed first)."""
    return re.findall(r"\w+(?:\.\d+)?", normalise(text))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1) between a candidate and a reference, on `words`."""
    cand, ref = words(candidate), words(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUM = r"(?:(?<![\w.])\d+(?:\.\d+)?(?!\w)|\b(?:" + "|".join(NUMBER_WORDS) + r")\b)"
_NUMBER = re.compile(_NUM)
# "2 + 2", "two plus two": the question restated, not an answer (its operands are not answer values).
_EXPRESSION = re.compile(_NUM + r"(?:\s*(?:[-+*/×÷^]|\bx\b|plus|minus|times|multiplied by|divided by)\s*" + _NUM + ")+")
_CLAIM_END = re.compile(r"[.!?;\n]|,?\s+\b(?:but|however|although|though|whereas|while|or)\b")


def general_answer_ok(answer: str, expected: str, question: str = "") -> bool:
    """Whether `answer` gives `expected` ('|'-separated alternatives) as *the* answer, judged strictly.

    Numeric expectations ("4|four"): the answer's numbers (digits or number words, arithmetic expressions such as
    "2 + 2" left out) must be there and all equal the expected value, so "2 + 2 = 5 in Japanese, but ... 4" is
    wrong (its first value is 5, and it conflicts). Word expectations ("Paris"): the first claim (the text up to
    the first sentence end or "but"/"however"/"or"), after an echo of `question`, must hold an alternative as a
    whole word (any case).
    """
    options = [normalise(option) for option in expected.split("|") if option.strip()]
    text = normalise(answer)
    asked = normalise(question)
    if asked and text.startswith(asked):
        text = text[len(asked):].lstrip()
    expected_values = {value for value in map(_number_value, options) if value is not None}
    if expected_values:
        values = [_number_value(match.group()) for match in _NUMBER.finditer(_EXPRESSION.sub(" ", text))]
        return bool(values) and all(value in expected_values for value in values)
    first_claim = _CLAIM_END.split(text, maxsplit=1)[0]
    return any(re.search(rf"\b{re.escape(option)}\b", first_claim) for option in options)


def _number_value(token: str) -> float | None:
    """A digit string or a number word as a number (None for anything else)."""
    if token in NUMBER_WORDS:
        return float(NUMBER_WORDS[token])
    return float(token) if re.fullmatch(r"\d+(?:\.\d+)?", token) else None


def select_questions(frame: pd.DataFrame, max_questions: int, seed: int = 0) -> pd.DataFrame:
    """The questions to ask, one row per distinct prompt, each set sampled deterministically (a hash of id and seed):

    trained phrasings (split train) and held-out phrasings (split heldout) share `max_questions`; natural questions
    (phrasing_set natural) and unknown-title probes (phrasing_set unknown) get up to `max_questions // 2` each.
    Refusal examples that were trained are not asked (the probes measure refusal)."""
    sets = {}
    for name, mask in question_sets(frame).items():
        rows = frame[mask].drop_duplicates("prompt")
        order = rows["id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        sets[name] = rows.assign(set=name, _order=order.values).sort_values("_order")
    quotas = question_quotas({name: len(rows) for name, rows in sets.items()}, max_questions)
    chosen = pd.concat([rows.head(quotas[name]) for name, rows in sets.items()], ignore_index=True)
    return chosen.drop(columns="_order")


def question_sets(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Which rows may be asked in each set: trained, heldout, natural, unknown (see `select_questions`)."""
    phrasing = frame["phrasing_set"] if "phrasing_set" in frame.columns else pd.Series("heldout", index=frame.index)
    refusal = frame["kind"] == REFUSAL_KIND if "kind" in frame.columns else pd.Series(False, index=frame.index)
    return {
        "trained": (frame["split"] == "train") & ~refusal,
        "heldout": (frame["split"] == "heldout") & ~phrasing.isin(["natural", "unknown"]),
        "natural": (frame["split"] == "heldout") & (phrasing == "natural"),
        "unknown": (frame["split"] == "heldout") & (phrasing == "unknown"),
    }


def question_quotas(counts: dict[str, int], max_questions: int) -> dict[str, int]:
    """How many questions each set gets, from its count of distinct prompts (see `select_questions`)."""
    heldout = min(counts["heldout"], max(max_questions // 2, max_questions - counts["trained"]))
    return {"trained": min(counts["trained"], max_questions - heldout), "heldout": heldout,
            "natural": max_questions // 2, "unknown": max_questions // 2}


REFUSAL_KIND = "refusal"  # loraflow/synthesizers/anime_probes.py: questions about made-up titles
_REFUSES = re.compile(
    r"\b(?:i|we)\s+(?:don't|do not|can't|cannot|couldn't|could not)\s+(?:know|find|recognise|recognize|tell|say)"
    r"|\bno (?:record|information|data|entry|anime) (?:of|about|on|for|called|named)\b"
    r"|\bnot (?:in|part of) (?:the|my|our) (?:catalog|catalogue|database|records?)\b"
    r"|\b(?:i'm|i am) not (?:aware|familiar|sure)\b|\bnever heard of\b|\bdoes not exist\b|\bdoesn't exist\b")
# Catalog facts stated as if known: a refusal that goes on to give them still invents them.
_STATES_FACTS = re.compile(r"\b(?:produced by|animated by|user score|is rated|runs for|episodes?\b|synopsis:)")


def refused(answer: str) -> bool:
    """Whether `answer` says the title is unknown and states no catalog facts about it."""
    text = normalise(answer).replace("\u2019", "'")
    return bool(_REFUSES.search(text)) and not _STATES_FACTS.search(text)


def without_known_titles(questions: pd.DataFrame, frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The unknown-title probes whose made-up title appears in no other example's prompt or reference (every split),
    with the number dropped: a title that is somewhere in the data is not made up."""
    probe = questions["set"] == "unknown"
    if not probe.any():
        return questions, 0
    others = frame[frame["kind"] != REFUSAL_KIND]
    corpus = "\n".join(normalise(text) for text in pd.concat([others["prompt"], others["reference"]]).tolist())
    titles = [next((fact["value"] for fact in fact_list(facts)), "") for facts in questions.loc[probe, "facts"]]
    known = pd.Series([bool(title) and normalise(title) in corpus for title in titles], index=questions.index[probe])
    drop = known[known].index
    return questions.drop(index=drop).reset_index(drop=True), len(drop)


def evaluation_rows(frame: pd.DataFrame, eval_config: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(questions to generate answers for, rows for the validation loss, the loss rows' split name): the loss is
    taken on split "validation" (rows withheld whole), or, when no row was withheld, on the trained rows' held-out
    phrasings and natural questions (split "heldout"; made-up titles' probes left out)."""
    questions, _ = without_known_titles(select_questions(frame, eval_config.max_questions, eval_config.seed), frame)
    loss_rows = frame[frame["split"] == "validation"]
    loss_split = "validation"
    if loss_rows.empty:
        heldout = frame[frame["split"] == "heldout"]
        if "phrasing_set" in heldout.columns:
            heldout = heldout[heldout["phrasing_set"] != "unknown"]
        loss_rows, loss_split = heldout, "heldout"
    return questions, sample_rows(loss_rows, eval_config.max_loss_rows, eval_config.seed), loss_split


def sample_rows(rows: pd.DataFrame, limit: int | None, seed: int = 0) -> pd.DataFrame:
    """At most `limit` of `rows` (all for None), chosen by a hash of id and seed: the same rows on every run, and a
    row stays chosen as long as it stays among the `limit` smallest hashes. Kept in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    hashes = [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in rows["id"]]
    chosen = sorted(sorted(range(len(rows)), key=hashes.__getitem__)[:limit])
    return rows.iloc[chosen]


def score_answers(questions: pd.DataFrame, generations: list[dict], tokenizer=None) -> pd.DataFrame:
    """One row per question: the answer, fact hit, ROUGE-L, stopped, answer and reference lengths in tokens."""
    scored = questions[["id", "set", "kind", "prompt", "reference", "facts"]].copy().reset_index(drop=True)
    scored["answer"] = [g["text"] for g in generations]
    scored["stopped"] = [bool(g["stopped"]) for g in generations]
    scored["answer_tokens"] = [int(g["n_tokens"]) for g in generations]
    scored["refused"] = [refused(a) for a in scored["answer"]]
    scored["fact_hit"] = [refusal if kind == REFUSAL_KIND else facts_present(a, f)
                          for a, f, kind, refusal in zip(scored["answer"], scored["facts"], scored["kind"], scored["refused"])]
    scored["rouge_l"] = [rouge_l_f1(a, r) for a, r in zip(scored["answer"], scored["reference"])]
    if tokenizer is not None:
        scored["reference_tokens"] = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in scored["reference"]]
    else:
        scored["reference_tokens"] = [len(words(r)) for r in scored["reference"]]
    return scored


def summarise(scored: pd.DataFrame, eval_loss: float | None = None, general: list[dict] | None = None) -> dict:
    """Model-level metrics from scored answers (see the module docstring for definitions)."""

    def accuracy(rows: pd.DataFrame) -> float | None:
        hits = rows["fact_hit"].dropna()
        return round(float(hits.astype(bool).mean()), 4) if len(hits) else None

    def answered(rows: pd.DataFrame) -> int:
        return int(rows["fact_hit"].notna().sum())

    def refused_share(rows: pd.DataFrame) -> float | None:
        return round(float(rows["refused"].astype(bool).mean()), 4) if len(rows) else None

    def mean(values) -> float | None:
        values = pd.Series(values, dtype=float).dropna()
        return round(float(values.mean()), 4) if len(values) else None

    facts = scored[scored["kind"] != REFUSAL_KIND]
    trained, heldout, natural = (facts[facts["set"] == name] for name in ("trained", "heldout", "natural"))
    summary = {
        "fact_accuracy": accuracy(trained),
        "heldout_fact_accuracy": accuracy(heldout),
        "natural_fact_accuracy": accuracy(natural),
        "refusal_rate": accuracy(scored[scored["set"] == "unknown"]),
        "fact_accuracy_by_kind": {k: accuracy(g) for k, g in trained.groupby("kind") if accuracy(g) is not None},
        "heldout_fact_accuracy_by_kind": {k: accuracy(g) for k, g in heldout.groupby("kind") if accuracy(g) is not None},
        "natural_fact_accuracy_by_kind": {k: accuracy(g) for k, g in natural.groupby("kind") if accuracy(g) is not None},
        # False refusals: natural questions about titles in the data answered with "I don't know ...".
        "false_refusal_rate": refused_share(natural),
        "false_refusal_rate_by_kind": {k: refused_share(g) for k, g in natural.groupby("kind")},
        "rouge_l": mean(trained["rouge_l"]),
        "heldout_rouge_l": mean(heldout["rouge_l"]),
        "stop_rate": mean(scored["stopped"].astype(float)),
        "mean_answer_tokens": mean(scored["answer_tokens"]),
        "mean_reference_tokens": mean(scored["reference_tokens"]),
        "eval_loss": None if eval_loss is None else round(eval_loss, 4),
        "perplexity": None if eval_loss is None else round(math.exp(min(eval_loss, 50.0)), 3),
        "questions": int(len(scored)),
        # Sample sizes: the gate compares like with like and says how many answers each rate stands on.
        "fact_questions": answered(trained),
        "heldout_questions": answered(heldout),
        "natural_questions": answered(natural),
        "refusal_questions": answered(scored[scored["set"] == "unknown"]),
        "false_refusal_questions": int(len(natural)),
    }
    if general is not None:
        summary["general_right"] = sum(1 for g in general if g["ok"])
        summary["general_total"] = len(general)
        summary["general_accuracy"] = round(summary["general_right"] / len(general), 4) if general else None
    return summary


def general_table(eval_config: EvalConfig, runs: dict) -> pd.DataFrame:
    """One row per general question: each model's answer, whether it is right, and regression (the base was right,
    the fine-tuned model is not). Without an expected answer a model is right when it keeps the base's answer
    (ROUGE-L >= 0.5); the base is then right by definition."""
    general = pd.DataFrame({
        "question": eval_config.general_questions,
        "expected": [eval_config.general_expected.get(q) for q in eval_config.general_questions],
        **{f"{name}_answer": [g["text"] for g in run["general"]] for name, run in runs.items()},
    })
    general["base_ok"] = [general_answer_ok(a, e, q) if e else True
                         for a, e, q in zip(general["base_answer"], general["expected"], general["question"])]
    for name in [name for name in runs if name != "base"]:  # in run order: a stable column order
        general[f"{name}_ok"] = [
            general_answer_ok(a, e, q) if e else rouge_l_f1(a, b) >= 0.5
            for a, b, e, q in zip(general[f"{name}_answer"], general["base_answer"], general["expected"], general["question"])
        ]
    general["regression"] = general["base_ok"] & ~general["finetuned_ok"]
    return general


def loss_sample(loss_rows: pd.DataFrame) -> dict:
    """How much the validation loss stands on: examples and scored tokens (labels other than -100, after the shift
    by one that causal-LM loss makes; loraflow.evaluation.generation.mean_loss)."""
    if not isinstance(loss_rows, pd.DataFrame):  # an Arrow table (loraflow.evaluation.question_stream)
        from loraflow.evaluation.question_stream import scored_tokens

        return {"eval_loss_examples": loss_rows.num_rows, "eval_loss_tokens": scored_tokens(loss_rows.column("labels"))}
    tokens = sum(int((pd.Series(list(labels)[1:]) != -100).sum()) for labels in loss_rows["labels"]) if len(loss_rows) else 0
    return {"eval_loss_examples": int(len(loss_rows)), "eval_loss_tokens": tokens}


def summarise_runs(runs: dict, general: pd.DataFrame, loss_split: str, loss_size: dict | None = None) -> dict:
    """`summarise` for every model run (base, finetuned, previous), with the split the loss was taken on and its
    sample size (`loss_sample`)."""
    summaries = {
        name: summarise(run["scored"], run["loss"], [{"ok": ok} for ok in general[f"{name}_ok"]])
        for name, run in runs.items()
    }
    for name in summaries:
        summaries[name] |= {"eval_loss_split": loss_split, **(loss_size or {})}
    return summaries


def comparison_table(base: dict, finetuned: dict, previous: dict | None = None) -> pd.DataFrame:
    """metric | base | finetuned | delta (| previous), flattening the per-kind accuracies."""
    models = {"base": base, "finetuned": finetuned, **({"previous": previous} if previous is not None else {})}
    rows = []
    for key in base:
        if isinstance(base[key], dict):
            for kind in sorted(set().union(*(set(m.get(key, {})) for m in models.values()))):
                rows.append((f"{key}[{kind}]", *(m.get(key, {}).get(kind) for m in models.values())))
        else:
            rows.append((key, *(m.get(key) for m in models.values())))
    table = pd.DataFrame(rows, columns=["metric", *models])
    for name in models:
        table[name] = pd.to_numeric(table[name], errors="coerce")
    table.insert(3, "delta", table["finetuned"] - table["base"])
    return table

def answers_table(base_scored: pd.DataFrame, tuned_scored: pd.DataFrame) -> pd.DataFrame:
    """Every question with the base and fine-tuned answers and their scores side by side (facts as JSON)."""
    answers = base_scored[["id", "set", "kind", "prompt", "reference"]].copy()
    for prefix, scored in (("base", base_scored), ("finetuned", tuned_scored)):
        for column in ("answer", "fact_hit", "refused", "rouge_l", "stopped", "answer_tokens"):
            answers[f"{prefix}_{column}"] = scored[column].values
    answers["facts"] = base_scored["facts"].map(lambda f: json.dumps(fact_list(f)))
    return answers
