"""The evaluation report (metric table, general answers and a few answers side by side) and the gate's decision, in
markdown."""

from __future__ import annotations

import math
import re

import pandas as pd

from loraflow.evaluation.gate import GateDecision

SETS = (("trained", "trained phrasings"), ("heldout", "held-out phrasings"), ("natural", "natural questions"),
        ("unknown", "made-up titles: a refusal is right"))


def render_report(table: pd.DataFrame, answers: pd.DataFrame, general: pd.DataFrame, examples: int = 4) -> str:
    """Markdown: metric table (with sample sizes), general answers, a few answers side by side. The gate's decision
    is not here: the gate step decides it on these metrics and reports it (render_gate)."""
    lines = ["## Evaluation", ""]
    previous = "previous" in table.columns
    header = "| metric | base | fine-tuned | delta |" + (" champion |" if previous else "")
    lines += [header, "|---" * header.count(" |") + "|"]
    for row in table.itertuples():
        lines.append(f"| {row.metric} | {_fmt(row.base)} | {_fmt(row.finetuned)} | {_fmt(row.delta, signed=True)} |"
                     + (f" {_fmt(row.previous)} |" if previous else ""))
    if len(general):
        right = {name: int(general[f"{name}_ok"].sum()) for name in ("base", "finetuned")}
        lines += ["", f"### General questions (right: base {right['base']}, fine-tuned {right['finetuned']} of {len(general)})",
                  "", "| question | base | fine-tuned | kept |", "|---|---|---|---|"]
        for row in general.itertuples():
            lines.append(f"| {_cell(row.question)} | {_cell(row.base_answer)} | {_cell(row.finetuned_answer)} | "
                         f"{'yes' if row.finetuned_ok or not row.base_ok else '**no**'} |")
    if "finetuned_refused" in answers.columns:
        falsely = answers[(answers["set"] == "natural") & answers["finetuned_refused"].astype(bool)]
        if len(falsely):
            lines += ["", f"### False refusals (natural questions about titles in the data answered with a refusal: "
                          f"{len(falsely)})", "", "| kind | question | fine-tuned |", "|---|---|---|"]
            lines += [f"| {row.kind} | {_cell(_question_of(row.prompt))} | {_cell(row.finetuned_answer)} |"
                      for row in falsely.itertuples()]
    for name, title in SETS:
        sample = answers[answers["set"] == name].head(examples)
        if len(sample):
            lines += ["", f"### Examples ({title})", "", "| question | reference | base | fine-tuned |", "|---|---|---|---|"]
            for row in sample.itertuples():
                lines.append(f"| {_cell(_question_of(row.prompt))} | {_cell(row.reference)} | {_cell(row.base_answer)} | "
                             f"{_cell(row.finetuned_answer)} |")
    return "\n".join(lines) + "\n"


def render_gate(decision: GateDecision, refused_state: str | None = None) -> str:
    """Markdown: the gate's verdict and one line per check; `refused_state` names the state a refused run ends in."""
    verdict = "passed" if decision.passed else f"REFUSED (the run ends {refused_state})" if refused_state else "REFUSED"
    return "\n".join([f"## Publish gate: {verdict}", "", *(f"- {reason}" for reason in decision.reasons)]) + "\n"


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _cell(text, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _question_of(prompt: str) -> str:
    """The last user turn of a rendered prompt, for display (falls back to the prompt's tail)."""
    for marker in ("<|im_start|>user\n", "[INST]", "### Instruction:\n", "<start_of_turn>user\n", "user\n"):
        if marker in prompt:
            tail = prompt.rsplit(marker, 1)[1]
            return re.split(r"<\|im_end\|>|\[/INST\]|<end_of_turn>|\n###|<\|eot_id\|>", tail)[0].strip()
    return prompt[-160:]
