"""The publish gate: a pure decision on evaluation summaries (loraflow.evaluation.metrics.summarise), no model.

Thresholds first (fact accuracy, stop rate, held-out / natural accuracy, refusal rate, false refusals of known
titles, beat the base, general regressions), then, when the model name has a champion evaluated on the same questions, the candidate against it on
every question metric both were asked, each line with its sample size. The validation loss is compared only when it
stands on enough examples and tokens (eval.gate.min_loss_examples / min_loss_tokens); below that it is reported with
its size, never gated: a loss on one example says nothing about a model. Every check adds one PASS / FAIL / SKIP /
NOTE line, and any FAIL refuses the candidate.
"""

from __future__ import annotations

from pydantic import BaseModel

from loraflow.config.evaluate import GateConfig

# Question metrics compared with the champion: metric -> (its sample-size key in the summary, what was asked).
CHAMPION_METRICS = {
    "fact_accuracy": ("fact_questions", "trained phrasings"),
    "heldout_fact_accuracy": ("heldout_questions", "held-out phrasings"),
    "natural_fact_accuracy": ("natural_questions", "natural questions"),
    "refusal_rate": ("refusal_questions", "made-up titles refused"),
    "general_accuracy": ("general_total", "general questions"),
}


class GateDecision(BaseModel):
    """Whether the candidate may be published, and why (one line per check)."""

    passed: bool
    reasons: list[str]

    @property
    def failures(self) -> list[str]:
        """The FAIL lines: why the candidate was refused (empty when it passed)."""
        return [reason for reason in self.reasons if reason.startswith("FAIL")]


def decide_gate(base: dict, finetuned: dict, gate: GateConfig, general_regressions: int = 0,
                previous: dict | None = None) -> GateDecision:
    """Apply the gate's thresholds, then compare with the champion (`previous`: its summary on the same questions;
    None when the name has no champion yet)."""
    lines: list[tuple[bool | None, str]] = thresholds(base, finetuned, gate, general_regressions)
    if previous is not None and gate.must_not_regress_previous:
        lines += against_champion(finetuned, previous, gate)
    reasons = [f"{'PASS' if ok else 'FAIL'}: {text}" if ok is not None else text for ok, text in lines]
    return GateDecision(passed=all(ok is not False for ok, _ in lines), reasons=reasons)


def thresholds(base: dict, finetuned: dict, gate: GateConfig, general_regressions: int) -> list[tuple[bool | None, str]]:
    """(ok, text) per absolute check; ok None for a SKIP / NOTE line that decides nothing."""
    lines = []
    accuracy = finetuned.get("fact_accuracy")
    if accuracy is None:
        lines.append((None, "SKIP: no questions with facts, so fact accuracy is not gated"))
    else:
        lines.append((accuracy >= gate.min_fact_accuracy,
                      f"fact accuracy {accuracy:.3f} >= {gate.min_fact_accuracy:.3f} (trained phrasings{_n(finetuned, 'fact_questions')})"))
    stop_rate = finetuned.get("stop_rate")
    if stop_rate is not None:
        lines.append((stop_rate >= gate.min_stop_rate, f"stop rate {stop_rate:.3f} >= {gate.min_stop_rate:.3f}"))
    for metric, minimum in (("heldout_fact_accuracy", gate.min_heldout_fact_accuracy),
                            ("natural_fact_accuracy", gate.min_natural_fact_accuracy),
                            ("refusal_rate", gate.min_refusal_rate)):
        size_key, what = CHAMPION_METRICS[metric]
        value = finetuned.get(metric)
        if minimum is None:
            continue
        if value is None:
            lines.append((None, f"SKIP: no {what} in the data, so {metric} is not gated"))
        else:
            lines.append((value >= minimum, f"{metric} {value:.3f} >= {minimum:.3f} ({what}{_n(finetuned, size_key)})"))
    lines += false_refusals(finetuned, gate)
    if gate.must_beat_base:
        metric = "fact_accuracy" if accuracy is not None else "rouge_l"
        ours, theirs = finetuned.get(metric), base.get(metric)
        if ours is None or theirs is None:
            lines.append((None, f"SKIP: {metric} missing, so must_beat_base is not checked"))
        else:
            lines.append((ours > theirs, f"{metric} {ours:.3f} beats base {theirs:.3f}"))
    if gate.max_general_regressions is not None:
        lines.append((general_regressions <= gate.max_general_regressions,
                      f"{general_regressions} general answer(s) went from right to wrong (allowed {gate.max_general_regressions})"))
    elif general_regressions:
        lines.append((None, f"NOTE: {general_regressions} general answer(s) went from right to wrong (not gated)"))
    return lines


def false_refusals(finetuned: dict, gate: GateConfig) -> list[tuple[bool | None, str]]:
    """(ok, text) for natural questions about known titles answered with a refusal, per kind in the text."""
    rate, limit = finetuned.get("false_refusal_rate"), gate.max_false_refusal_rate
    if limit is None:
        return [] if rate is None else [(None, f"NOTE: false_refusal_rate {rate:.3f} (not gated)")]
    if rate is None:
        return [(None, "SKIP: no natural questions in the data, so false_refusal_rate is not gated")]
    by_kind = ", ".join(f"{kind} {value:.3f}" for kind, value in sorted(finetuned.get("false_refusal_rate_by_kind", {}).items()))
    return [(rate <= limit, f"false_refusal_rate {rate:.3f} <= {limit:.3f} (known titles refused, natural questions"
                            f"{_n(finetuned, 'false_refusal_questions')}{'; ' + by_kind if by_kind else ''})")]


# Summaries hold rates rounded to 4 decimals (loraflow.evaluation.metrics), so two of them compared against a drop
# of exactly k questions may miss it by up to 1e-4 (13/44 - 1/44 = 0.27273 > 0.2727 = 12/44 rounded); a real
# difference of one question is larger than that for any sample under 10,000 questions.
ROUNDING = 1e-4


def against_champion(finetuned: dict, champion: dict, gate: GateConfig) -> list[tuple[bool | None, str]]:
    """(ok, text) per metric both models were asked, each with its sample size; the loss only where it is big enough."""
    lines = []
    compared = dict(CHAMPION_METRICS) if finetuned.get("fact_accuracy") is not None else {
        "rouge_l": ("questions", "answers' ROUGE-L"), **{k: v for k, v in CHAMPION_METRICS.items() if k != "fact_accuracy"}}
    for metric, (size_key, what) in compared.items():
        ours, theirs = finetuned.get(metric), champion.get(metric)
        if ours is None or theirs is None:
            continue
        allowed, why = allowed_drop(gate, finetuned.get(size_key), champion.get(size_key))
        lines.append((ours >= theirs - allowed - ROUNDING,
                      f"{metric} {ours:.3f}{_n(finetuned, size_key)} >= champion's {theirs:.3f}{_n(champion, size_key)} "
                      f"- {allowed:.3f} ({what}{why})"))
    ours, theirs = finetuned.get("eval_loss"), champion.get("eval_loss")
    if ours is None or theirs is None:
        return lines
    examples, tokens = finetuned.get("eval_loss_examples"), finetuned.get("eval_loss_tokens")
    sized = f"{examples} example(s), {tokens} token(s)" if examples is not None else "an unknown number of examples"
    if examples is None or tokens is None or examples < gate.min_loss_examples or tokens < gate.min_loss_tokens:
        lines.append((None, f"NOTE: validation loss {ours:.4f} vs champion's {theirs:.4f} stands on {sized}, fewer than "
                            f"eval.gate.min_loss_examples {gate.min_loss_examples} / min_loss_tokens {gate.min_loss_tokens}: "
                            "reported, not gated"))
        return lines
    limit = theirs * (1 + gate.previous_loss_tolerance)
    lines.append((ours <= limit, f"validation loss {ours:.4f} <= champion's {theirs:.4f} + {gate.previous_loss_tolerance:.0%} "
                                 f"({sized})"))
    return lines


def allowed_drop(gate: GateConfig, candidate_size: int | None, champion_size: int | None) -> tuple[float, str]:
    """The drop a question metric may show against the champion, and a note when the sample's slack sets it: the larger
    of previous_tolerance and previous_slack_questions of the smaller sample (a one-question difference in 44 general
    questions is noise, not a regression)."""
    sizes = [size for size in (candidate_size, champion_size) if size]
    if not sizes or not gate.previous_slack_questions:
        return gate.previous_tolerance, ""
    slack = gate.previous_slack_questions / min(sizes)
    if slack <= gate.previous_tolerance:
        return gate.previous_tolerance, ""
    return slack, f"; {gate.previous_slack_questions} question(s) of {min(sizes)}: eval.gate.previous_slack_questions"


def _n(summary: dict, size_key: str) -> str:
    size = summary.get(size_key)
    return f", n={size}" if size is not None else ""
