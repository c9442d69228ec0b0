"""evaluate: the base model against base + adapter, and the gate that decides whether publish runs.

Measured for both models:
- validation loss and perplexity (split "validation"; "heldout" when there is no validation split);
- greedy, batched generation (left padding) on trained phrasings (split "train") and held-out phrasings
  (split "heldout") of the same facts, capped at eval.max_questions by a deterministic sample:
  fact accuracy per question kind (every fact value of the row appears in the answer, after normalising
  case, whitespace and thousands separators), ROUGE-L F1 against the reference, stop rate (the answer
  ended with EOS / end-of-turn before max_new_tokens) and answer length vs. reference length;
- general-knowledge questions: both answers are kept; a right base answer that turns wrong is a regression;
- with `previous_model_dir` (the model published last under this run name), the same for that model, and
  the gate refuses a new model that is worse than it (a retraining regression is never published).

Writes eval_table.parquet (metric, base, finetuned), eval_answers.parquet (every answer side by side),
eval_report.md and eval_metrics.json; returns an EvalResult with the gate decision and its reasons.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from loraflow.config.evaluate import EvalConfig, GateConfig
from loraflow.precision import choose_precision
from loraflow.store import ArtifactRef, ArtifactStore

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100
log_default = logging.getLogger("loraflow.evaluate")
# End-of-turn markers of common chat templates; those present in a tokenizer's vocab also stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class GateDecision(BaseModel):
    """Whether the fine-tuned model may be published, and why (one line per check)."""

    passed: bool
    reasons: list[str]


class EvalResult(BaseModel):
    """Evaluation outputs: metrics per model, the gate decision and where the tables are."""

    base: dict = Field(..., description="Metrics of the base model.")
    finetuned: dict = Field(..., description="Metrics of base + adapter.")
    previous: dict | None = Field(None, description="Metrics of the previously published model, when there is one.")
    gate: GateDecision
    table_path: str = Field(..., description="eval_table.parquet: metric, base, finetuned, delta.")
    answers_path: str = Field(..., description="eval_answers.parquet: every question with both answers.")
    report_path: str = Field(..., description="eval_report.md: table, general answers, examples.")
    metrics_path: str = Field(..., description="eval_metrics.json.")
    questions: int
    seconds: float
    precision: str | None = Field(None, description="bf16 or fp32, as loraflow.precision chose for this device.")
    precision_reason: str | None = None


# ---- metrics: pure functions ---------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower-case, NFKC, thousands separators dropped ("12,345" -> "12345"), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = re.sub(r"(?<=\d)[,\u202f\u00a0'_](?=\d{3}(?!\d))", "", text)
    return " ".join(text.split())


def facts_present(answer: str, facts) -> bool | None:
    """True when every fact value appears in the answer (normalised); None for rows without facts."""
    values = [str(fact["value"]) for fact in _fact_list(facts)]
    if not values:
        return None
    answer = normalise(answer)
    return all(_contains(answer, normalise(value)) for value in values)


def _contains(text: str, value: str) -> bool:
    # Numbers must match whole ("13" is not found in "113" or "13.5"); words as substrings.
    if re.fullmatch(r"[\d.]+", value):
        return re.search(rf"(?<![\d.]){re.escape(value)}(?!\.?\d)", text) is not None
    return value in text


def _fact_list(facts) -> list[dict]:
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


def general_answer_ok(answer: str, expected: str) -> bool:
    """Any '|'-separated alternative of `expected` appears in the answer as a whole word (any case)."""
    text = normalise(answer)
    return any(re.search(rf"\b{re.escape(normalise(option))}\b", text) for option in expected.split("|") if option.strip())


def select_questions(frame: pd.DataFrame, max_questions: int, seed: int = 0) -> pd.DataFrame:
    """Trained phrasings (split train) and held-out phrasings (split heldout), one row per distinct prompt,
    sampled deterministically (by a hash of id and seed) to at most `max_questions`, shared between the two sets."""
    sets = []
    for split, name in (("train", "trained"), ("heldout", "heldout")):
        rows = frame[frame["split"] == split].drop_duplicates("prompt")
        order = rows["id"].map(lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        sets.append(rows.assign(set=name, _order=order.values).sort_values("_order"))
    trained, heldout = sets
    heldout_quota = min(len(heldout), max(max_questions // 2, max_questions - len(trained)))
    trained_quota = min(len(trained), max_questions - heldout_quota)
    chosen = pd.concat([trained.head(trained_quota), heldout.head(heldout_quota)], ignore_index=True)
    return chosen.drop(columns="_order")


def score_answers(questions: pd.DataFrame, generations: list[dict], tokenizer=None) -> pd.DataFrame:
    """One row per question: the answer, fact hit, ROUGE-L, stopped, answer and reference lengths in tokens."""
    scored = questions[["id", "set", "kind", "prompt", "reference", "facts"]].copy().reset_index(drop=True)
    scored["answer"] = [g["text"] for g in generations]
    scored["stopped"] = [bool(g["stopped"]) for g in generations]
    scored["answer_tokens"] = [int(g["n_tokens"]) for g in generations]
    scored["fact_hit"] = [facts_present(a, f) for a, f in zip(scored["answer"], scored["facts"])]
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

    def mean(values) -> float | None:
        values = pd.Series(values, dtype=float).dropna()
        return round(float(values.mean()), 4) if len(values) else None

    trained, heldout = scored[scored["set"] == "trained"], scored[scored["set"] == "heldout"]
    summary = {
        "fact_accuracy": accuracy(trained),
        "heldout_fact_accuracy": accuracy(heldout),
        "fact_accuracy_by_kind": {k: accuracy(g) for k, g in trained.groupby("kind") if accuracy(g) is not None},
        "heldout_fact_accuracy_by_kind": {k: accuracy(g) for k, g in heldout.groupby("kind") if accuracy(g) is not None},
        "rouge_l": mean(trained["rouge_l"]),
        "heldout_rouge_l": mean(heldout["rouge_l"]),
        "stop_rate": mean(scored["stopped"].astype(float)),
        "mean_answer_tokens": mean(scored["answer_tokens"]),
        "mean_reference_tokens": mean(scored["reference_tokens"]),
        "eval_loss": None if eval_loss is None else round(eval_loss, 4),
        "perplexity": None if eval_loss is None else round(math.exp(min(eval_loss, 50.0)), 3),
        "questions": int(len(scored)),
    }
    if general is not None:
        summary["general_right"] = sum(1 for g in general if g["ok"])
        summary["general_total"] = len(general)
    return summary


def decide_gate(base: dict, finetuned: dict, gate: GateConfig, general_regressions: int = 0,
                previous: dict | None = None) -> GateDecision:
    """Apply the gate's thresholds; every check adds a PASS/FAIL line, and any FAIL blocks publish.

    `previous`: metrics of the previously published model on the same questions (None: first publish)."""
    reasons, passed = [], True

    def check(ok: bool, text: str):
        nonlocal passed
        passed &= ok
        reasons.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    accuracy = finetuned.get("fact_accuracy")
    if accuracy is None:
        reasons.append("SKIP: no questions with facts, so fact accuracy is not gated")
    else:
        check(accuracy >= gate.min_fact_accuracy, f"fact accuracy {accuracy:.3f} >= {gate.min_fact_accuracy:.3f} (trained phrasings)")
    stop_rate = finetuned.get("stop_rate")
    if stop_rate is not None:
        check(stop_rate >= gate.min_stop_rate, f"stop rate {stop_rate:.3f} >= {gate.min_stop_rate:.3f}")
    if gate.must_beat_base:
        metric = "fact_accuracy" if accuracy is not None else "rouge_l"
        ours, theirs = finetuned.get(metric), base.get(metric)
        if ours is None or theirs is None:
            reasons.append(f"SKIP: {metric} missing, so must_beat_base is not checked")
        else:
            check(ours > theirs, f"{metric} {ours:.3f} beats base {theirs:.3f}")
    if previous is not None and gate.must_not_regress_previous:
        metric = "fact_accuracy" if accuracy is not None else "rouge_l"
        ours, theirs = finetuned.get(metric), previous.get(metric)
        if ours is not None and theirs is not None:
            check(ours >= theirs - gate.previous_tolerance,
                  f"{metric} {ours:.3f} >= previous model's {theirs:.3f} - {gate.previous_tolerance:.3f}")
        ours, theirs = finetuned.get("eval_loss"), previous.get("eval_loss")
        if ours is not None and theirs is not None:
            limit = theirs * (1 + gate.previous_loss_tolerance)
            check(ours <= limit, f"validation loss {ours:.4f} <= previous model's {theirs:.4f} + {gate.previous_loss_tolerance:.0%}")
    if gate.max_general_regressions is not None:
        check(general_regressions <= gate.max_general_regressions,
              f"{general_regressions} general answer(s) went from right to wrong (allowed {gate.max_general_regressions})")
    elif general_regressions:
        reasons.append(f"NOTE: {general_regressions} general answer(s) went from right to wrong (not gated)")
    return GateDecision(passed=passed, reasons=reasons)


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


def render_report(table: pd.DataFrame, answers: pd.DataFrame, general: pd.DataFrame, decision: GateDecision,
                  examples: int = 4) -> str:
    """Markdown: gate decision, metric table, general answers, a few answers side by side."""
    lines = [f"## Evaluation: gate {'passed' if decision.passed else 'FAILED'}", ""]
    previous = "previous" in table.columns
    header = "| metric | base | fine-tuned | delta |" + (" previously published |" if previous else "")
    lines += [f"- {reason}" for reason in decision.reasons] + ["", header, "|---" * header.count(" |") + "|"]
    for row in table.itertuples():
        lines.append(f"| {row.metric} | {_fmt(row.base)} | {_fmt(row.finetuned)} | {_fmt(row.delta, signed=True)} |"
                     + (f" {_fmt(row.previous)} |" if previous else ""))
    if len(general):
        lines += ["", "### General questions", "", "| question | base | fine-tuned | kept |", "|---|---|---|---|"]
        for row in general.itertuples():
            lines.append(f"| {_cell(row.question)} | {_cell(row.base_answer)} | {_cell(row.finetuned_answer)} | "
                         f"{'yes' if row.finetuned_ok or not row.base_ok else '**no**'} |")
    for name in ("trained", "heldout"):
        sample = answers[answers["set"] == name].head(examples)
        if len(sample):
            lines += ["", f"### Examples ({name} phrasings)", "", "| question | reference | base | fine-tuned |", "|---|---|---|---|"]
            for row in sample.itertuples():
                lines.append(f"| {_cell(_question_of(row.prompt))} | {_cell(row.reference)} | {_cell(row.base_answer)} | "
                             f"{_cell(row.finetuned_answer)} |")
    return "\n".join(lines) + "\n"


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


# ---- model work ----------------------------------------------------------------------------------------

def stop_token_ids(tokenizer, model_dir: str | Path | None = None) -> list[int]:
    """EOS ids: the tokenizer's EOS, generation_config's, and end-of-turn tokens the chat template uses."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab and (token in template or token == tokenizer.eos_token):
            ids.add(int(vocab[token]))
    if model_dir is not None and (Path(model_dir) / "generation_config.json").exists():
        eos = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int | list[int], batch_size: int,
                     stop_ids: list[int], progress: str | None = None) -> list[dict]:
    """Greedy answers to fully rendered prompts, batched with left padding (prompts sorted by budget, then length).

    `max_new_tokens` is one budget for all prompts or one per prompt (a batch generates up to its largest).
    Each answer: text (up to the first stop token, special tokens removed), stopped (a stop token was
    produced within the prompt's own budget), n_tokens (generated tokens, the stop token included).
    """
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], lengths[i]))
    answers: list[dict | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    stop = torch.tensor(stop_ids, device=device)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress or "generate", disable=progress is None):
        # Rendered prompts already hold the template's special tokens: add none.
        encoded = tokenizer([prompts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            output = model.generate(
                **encoded, do_sample=False, max_new_tokens=max(budgets[i] for i in batch), eos_token_id=stop_ids,
                pad_token_id=pad_id,
                temperature=None, top_p=None, top_k=None,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        for row, index in enumerate(batch):
            tokens = new_tokens[row][: budgets[index]]
            hits = torch.isin(tokens, stop).nonzero()
            end = int(hits[0]) if len(hits) else len(tokens)
            answers[index] = {
                "text": tokenizer.decode(tokens[:end], skip_special_tokens=True).strip(),
                "stopped": bool(len(hits)),
                "n_tokens": end + 1 if len(hits) else end,
            }
    return answers


def mean_loss(model, rows: pd.DataFrame, *, batch_size: int, pad_id: int) -> float | None:
    """Token-weighted mean cross-entropy over the trained (label != -100) tokens of `rows`."""
    import torch

    if rows.empty:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    items = list(zip(rows["input_ids"], rows["labels"]))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        longest = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, (ids, label) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            labels[row, :len(ids)] = torch.as_tensor(np.asarray(label, dtype=np.int64))
            attention[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(losses)
        count += int((shifted != IGNORE_INDEX).sum())
    return total / count if count else None


def chat_prompt(tokenizer, question: str, system_prompt: str | None) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_for_inference(model_dir: str | Path, *, trust_remote_code: bool = False, precision: str | None = None):
    """The model on the GPU if there is one, in eval mode, in `precision` (bf16 | fp32; default: what this
    device computes fast, loraflow.precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    precision = precision or choose_precision("auto", "cuda" if cuda else "cpu").precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, device_map={"": 0} if cuda else None,
    )
    model.eval()
    return model


# ---- the stage -----------------------------------------------------------------------------------------

def evaluate_adapter(
    tokens: ArtifactRef | pd.DataFrame,
    model_dir: str | Path,
    adapter_dir: str | Path,
    eval_config: EvalConfig,
    output_dir: str | Path,
    *,
    store: ArtifactStore | None = None,
    system_prompt: str | None = None,
    previous_model_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> EvalResult:
    """Evaluate the base model and base + adapter on the TOKENS artifact's questions; decide the gate.

    `system_prompt` must be the one the format stage used (None = the template's default), so general
    questions are asked the way the trained questions were. `previous_model_dir`: the merged model published
    last for this run, evaluated on the same questions so the gate can refuse a regression.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tasks.train import _load_tokens

    import torch

    log = log or log_default
    started = time.perf_counter()
    if eval_config.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(eval_config.cpu_threads)
    frame, _ = _load_tokens(tokens, store)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    questions = select_questions(frame, eval_config.max_questions, eval_config.seed)
    loss_rows = frame[frame["split"] == "validation"]
    loss_split = "validation"
    if loss_rows.empty:
        loss_rows, loss_split = frame[frame["split"] == "heldout"], "heldout"
    log.info("evaluate: %d questions (%d trained, %d held-out phrasings); loss on %d %s rows", len(questions),
             int((questions["set"] == "trained").sum()), int((questions["set"] == "heldout").sum()), len(loss_rows), loss_split)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    general_prompts = [chat_prompt(tokenizer, q, system_prompt) for q in eval_config.general_questions]
    generation = dict(max_new_tokens=eval_config.max_new_tokens, batch_size=eval_config.batch_size, stop_ids=stop_ids)
    # A question's budget is its reference's length plus a margin: a model still talking by then is rambling,
    # and base models that never stop no longer cost the full max_new_tokens on every question.
    budgets = [min(eval_config.max_new_tokens, len(tokenizer(r, add_special_tokens=False)["input_ids"]) + eval_config.answer_margin_tokens)
               for r in questions["reference"]]

    choice = choose_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    log.info("evaluate: precision %s (%s)", choice.precision, choice.reason)
    # One load: the base answers first, then the adapter is merged into the same weights (faster generation).
    model = load_for_inference(model_dir, trust_remote_code=trust_remote_code, precision=choice.precision)
    runs = {}
    for name in ("base", "finetuned", "previous") if previous_model_dir else ("base", "finetuned"):
        if name == "finetuned":
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            model.eval()
        if name == "previous":
            del model  # one model in memory at a time
            model = load_for_inference(previous_model_dir, trust_remote_code=trust_remote_code, precision=choice.precision)
        loss = mean_loss(model, loss_rows, batch_size=eval_config.batch_size, pad_id=pad_id)
        answers = generate_answers(model, tokenizer, list(questions["prompt"]), progress=f"evaluate {name}",
                                   **{**generation, "max_new_tokens": budgets})
        general = generate_answers(model, tokenizer, general_prompts, **generation)
        runs[name] = {"loss": loss, "scored": score_answers(questions, answers, tokenizer), "general": general}
        log.info("evaluate: %s done (loss %s)", name, f"{loss:.4f}" if loss is not None else "n/a")

    general = pd.DataFrame({
        "question": eval_config.general_questions,
        "expected": [eval_config.general_expected.get(q) for q in eval_config.general_questions],
        **{f"{name}_answer": [g["text"] for g in run["general"]] for name, run in runs.items()},
    })
    general["base_ok"] = [general_answer_ok(a, e) if e else True for a, e in zip(general["base_answer"], general["expected"])]
    for name in [name for name in runs if name != "base"]:  # in run order: a stable column order
        general[f"{name}_ok"] = [
            general_answer_ok(a, e) if e else rouge_l_f1(a, b) >= 0.5
            for a, b, e in zip(general[f"{name}_answer"], general["base_answer"], general["expected"])
        ]
    general["regression"] = general["base_ok"] & ~general["finetuned_ok"]
    summaries = {
        name: summarise(run["scored"], run["loss"], [{"ok": ok} for ok in general[f"{name}_ok"]])
        for name, run in runs.items()
    }
    for name in summaries:
        summaries[name]["eval_loss_split"] = loss_split
    decision = decide_gate(summaries["base"], summaries["finetuned"], eval_config.gate, int(general["regression"].sum()),
                           previous=summaries.get("previous"))

    base_scored, tuned_scored = runs["base"]["scored"], runs["finetuned"]["scored"]
    answers = base_scored[["id", "set", "kind", "prompt", "reference"]].copy()
    for prefix, scored in (("base", base_scored), ("finetuned", tuned_scored)):
        for column in ("answer", "fact_hit", "rouge_l", "stopped", "answer_tokens"):
            answers[f"{prefix}_{column}"] = scored[column].values
    answers["facts"] = base_scored["facts"].map(lambda f: json.dumps(_fact_list(f)))
    table = comparison_table(*({k: v for k, v in summaries[name].items() if k != "eval_loss_split"}
                               for name in ("base", "finetuned", "previous") if name in summaries))
    report = render_report(table, answers, general, decision)

    paths = {name: output_dir / name for name in ("eval_table.parquet", "eval_answers.parquet", "eval_report.md", "eval_metrics.json")}
    table.to_parquet(paths["eval_table.parquet"], index=False)
    answers.to_parquet(paths["eval_answers.parquet"], index=False)
    general.to_parquet(output_dir / "eval_general.parquet", index=False)
    paths["eval_report.md"].write_text(report)
    result = EvalResult(
        base=summaries["base"], finetuned=summaries["finetuned"], previous=summaries.get("previous"), gate=decision,
        table_path=str(paths["eval_table.parquet"]), answers_path=str(paths["eval_answers.parquet"]),
        report_path=str(paths["eval_report.md"]), metrics_path=str(paths["eval_metrics.json"]),
        questions=len(questions), seconds=round(time.perf_counter() - started, 2),
        precision=choice.precision, precision_reason=choice.reason,
    )
    paths["eval_metrics.json"].write_text(json.dumps({**result.model_dump(), "general": general.to_dict("records")}, indent=1, default=str))
    log.info("evaluate: gate %s in %.0f s — %s", "passed" if decision.passed else "FAILED", result.seconds, "; ".join(decision.reasons))
    return result


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect
    task = None

if task is not None:

    @task(name="evaluate")  # cached and locked by the flow (loraflow.tasking.run_locked)
    def evaluate_task(
        tokens: ArtifactRef, model_dir: str, adapter_dir: str, eval_config: EvalConfig, output_dir: str, store_root: str,
        adapter_fingerprint: str, system_prompt: str | None = None, previous_model_dir: str | None = None,
        trust_remote_code: bool = False,
    ) -> EvalResult:
        """Prefect task around `evaluate_adapter`; also publishes the report as a markdown artifact.

        adapter_fingerprint (TrainResult.fingerprint) only feeds the cache key: a new adapter re-evaluates.
        """
        from prefect import get_run_logger
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        result = evaluate_adapter(
            tokens, model_dir, adapter_dir, eval_config, output_dir, store=ArtifactStore(store_root),
            system_prompt=system_prompt, previous_model_dir=previous_model_dir, trust_remote_code=trust_remote_code,
            log=get_run_logger(),
        )
        create_markdown_artifact(Path(result.report_path).read_text(), key="evaluation", description="base vs fine-tuned")
        table = pd.read_parquet(result.table_path)
        create_table_artifact(json.loads(table.to_json(orient="records")), key="evaluation-table")
        return result
