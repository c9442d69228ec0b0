"""Model work of the evaluation: greedy batched answers, stop ids, validation loss, loading for inference.

    runs = evaluate_models(model_dir, adapter_dir, tokenizer, questions, loss_rows, general_prompts, eval_config, ...)
    # {"base": {"loss", "scored", "general"}, "finetuned": {...}, ("previous": {...})}

Generation is greedy with left padding, prompts sorted by budget and length; a question's budget is its reference's
length plus eval.answer_margin_tokens, so a model still talking by then counts as not stopping. A question is asked
with the prompt tokens training saw (TOKENS' input_ids[:answer_start]), so control-token text from the data stays
plain characters here too; general questions are encoded the same way (loraflow.modeling.prompt_encoding).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loraflow.config.evaluate import EvalConfig
from loraflow.evaluation.batching import generation_batch_size, loss_batch_size
from loraflow.evaluation.metrics import score_answers
from loraflow.modeling.precision import choose_precision

# = data_contracts.tokens.IGNORE_INDEX; not imported so the GPU machine needs no pandera.
IGNORE_INDEX = -100
# End-of-turn markers of common chat templates; those present in a tokenizer's vocab also stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def evaluate_models(model_dir: str | Path, adapter_dir: str | Path, tokenizer, questions: pd.DataFrame,
                    loss_rows: pd.DataFrame, general_prompts: list[str], eval_config: EvalConfig, *, stop_ids: list[int],
                    pad_id: int, precision: str, previous_model_dir: str | Path | None = None,
                    trust_remote_code: bool = False, reuse: dict[str, dict] | None = None, log) -> dict:
    """Loss, answers, scored answers and general answers for the base, base + adapter and (if given) the previous
    model. `reuse`: runs of some of them generated before (loraflow.evaluation.answer_cache: loss, answers, general,
    timing), scored again here and not generated.

    One load: the base answers first, then the adapter is merged into the same weights (faster generation); the
    previous model is loaded after the others are dropped (one model in memory at a time). Nothing is loaded for a
    model whose run is reused."""
    from peft import PeftModel

    reuse = reuse or {}
    generation = dict(max_new_tokens=eval_config.max_new_tokens, batch_size=eval_config.batch_size, stop_ids=stop_ids)
    budgets = answer_budgets(questions, tokenizer, eval_config)
    runs, model = {}, None
    for name in ("base", "finetuned", "previous") if previous_model_dir else ("base", "finetuned"):
        if name in reuse:
            kept = reuse[name]
            runs[name] = {**kept, "scored": score_answers(questions, kept["answers"], tokenizer),
                          "timing": {**kept["timing"], "reused": True}}
            log.info("evaluate: %s reused (the same weights were asked the same prompts before)", name)
            continue
        if name in ("base", "finetuned") and model is None:
            model = load_for_inference(model_dir, trust_remote_code=trust_remote_code, precision=precision)
        if name == "finetuned":
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            model.eval()
        if name == "previous":
            del model  # one model in memory at a time
            model = load_for_inference(previous_model_dir, trust_remote_code=trust_remote_code, precision=precision)
        clock = [time.perf_counter()]
        loss = mean_loss(model, loss_rows, batch_size=eval_config.batch_size, pad_id=pad_id)
        clock.append(time.perf_counter())
        answers = generate_answers(model, tokenizer, question_prompts(questions), progress=f"evaluate {name}",
                                   **{**generation, "max_new_tokens": budgets})
        clock.append(time.perf_counter())
        general = generate_answers(model, tokenizer, general_prompts, **{**generation, "max_new_tokens": eval_config.general_max_new_tokens})
        clock.append(time.perf_counter())
        timing = generation_timing(clock, answers, general)
        runs[name] = {"loss": loss, "answers": answers, "scored": score_answers(questions, answers, tokenizer),
                      "general": general, "timing": timing}
        log.info("evaluate: %s done (loss %s); %d questions in %.1f s (%.1f/s), batch %s", name,
                 f"{loss:.4f}" if loss is not None else "n/a", len(answers), timing["answers_s"],
                 timing["questions_per_s"], timing["batch_size"])
    return runs


def generation_timing(clock: list[float], answers: list[dict], general: list[dict]) -> dict:
    """Seconds of the loss, the scored answers and the general answers (`clock`: their four boundaries), questions
    and generated tokens per second of the scored answers, and the batch size they ran with."""
    loss_s, answers_s, general_s = (round(b - a, 3) for a, b in zip(clock, clock[1:]))
    tokens = sum(a["n_tokens"] for a in answers)
    return {"loss_s": loss_s, "answers_s": answers_s, "general_s": general_s, "questions": len(answers),
            "questions_per_s": round(len(answers) / answers_s, 2) if answers_s else None,
            "generated_tokens_per_s": round(tokens / answers_s, 1) if answers_s else None,
            "batch_size": answers[0].get("batch_size") if answers else None}


def question_prompts(questions: pd.DataFrame) -> list[list[int] | str]:
    """Each question's prompt as the tokens training saw (input_ids[:answer_start]: tokenize kept the data's
    control-token text plain); the prompt text where those tokens are not all there (no answer_start, truncated)."""
    if "answer_start" not in questions:
        return list(questions["prompt"])
    return [[int(i) for i in ids[:start]] if 0 < start <= len(ids) else prompt
            for ids, start, prompt in zip(questions["input_ids"], questions["answer_start"], questions["prompt"])]


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


def answer_budgets(questions: pd.DataFrame, tokenizer, eval_config: EvalConfig) -> list[int]:
    """Each question's generation budget: its reference's tokens plus eval.answer_margin_tokens (capped by
    eval.max_new_tokens); a model still talking by then is rambling, and base models that never stop no longer cost
    the full max_new_tokens on every question. A made-up title (set "unknown") gets the longest budget of the
    others: its reference is a short refusal, and a model that answers in the catalog's format instead is already
    counted in refusal_rate; cut at the refusal's length, that answer would count again as one that never stops."""
    budgets = [min(eval_config.max_new_tokens, len(tokenizer(r, add_special_tokens=False)["input_ids"]) + eval_config.answer_margin_tokens)
               for r in questions["reference"]]
    made_up = (questions["set"] == "unknown").tolist() if "set" in questions.columns else [False] * len(budgets)
    answered = [budget for budget, unknown in zip(budgets, made_up) if not unknown]
    longest = max(answered, default=eval_config.max_new_tokens)
    return [max(budget, longest) if unknown else budget for budget, unknown in zip(budgets, made_up)]


def generate_answers(model, tokenizer, prompts: list[str | list[int]], *, max_new_tokens: int | list[int],
                     batch_size: int | str, stop_ids: list[int], progress: str | None = None) -> list[dict]:
    """Greedy answers to fully rendered prompts (text, or token ids as question_prompts and
    loraflow.modeling.prompt_encoding give them), batched with left padding (prompts sorted by budget, then length).
    batch_size "auto": as many as the GPU's free memory holds for the longest prompt and budget
    (loraflow.evaluation.batching); 1: one at a time.

    `max_new_tokens` is one budget for all prompts or one per prompt (a batch generates up to its largest).
    Each answer: text (up to the first stop token, special tokens removed), stopped (a stop token was
    produced within the prompt's own budget), n_tokens (generated tokens, the stop token included), batch_size.
    """
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # Rendered prompt text already holds the template's special tokens: add none.
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    lengths = [len(ids) for ids in prompt_ids]
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], lengths[i]))
    batch_size = generation_batch_size(batch_size, model, prompt_tokens=max(lengths, default=1),
                                       new_tokens=max(budgets, default=1))
    answers: list[dict | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    stop = torch.tensor(stop_ids, device=device)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress or "generate", disable=progress is None):
        encoded = tokenizer.pad({"input_ids": [prompt_ids[i] for i in batch]}, padding=True, return_tensors="pt").to(device)
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
                "batch_size": batch_size,
            }
    return answers


def mean_loss(model, rows, *, batch_size: int | str, pad_id: int) -> float | None:
    """Token-weighted mean cross-entropy over the trained (label != -100) tokens of `rows` (a DataFrame or an Arrow
    table with input_ids and labels; batch_size "auto": from the GPU's free memory for the longest row). Rows go in
    order of length (little padding), made into lists a batch at a time, and only the labelled positions' logits are
    taken to float32 and scored (answer-only labels leave most positions unscored)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import torch

    if isinstance(rows, pd.DataFrame):
        rows = pa.Table.from_pandas(rows[["input_ids", "labels"]], preserve_index=False)
    if rows.num_rows == 0:
        return None
    lengths = pc.list_value_length(rows.column("input_ids")).to_numpy(zero_copy_only=False)
    batch_size = loss_batch_size(batch_size, model, row_tokens=int(lengths.max()))
    order = np.argsort(lengths, kind="stable")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, rows.num_rows, batch_size):
        part = rows.take(order[start:start + batch_size])
        chunk = list(zip(part.column("input_ids").to_pylist(), part.column("labels").to_pylist()))
        input_ids, labels, attention = padded_batch(chunk, pad_id)
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            shifted = labels[:, 1:].to(device)
            scored = shifted != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), shifted[scored], reduction="sum"))
        count += int(scored.sum())
    return total / count if count else None


def padded_batch(chunk: list, pad_id: int):
    """(input_ids, labels, attention_mask) of (ids, labels) pairs, right-padded to the longest (labels with -100)."""
    import torch

    longest = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(chunk), longest), dtype=torch.long)
    for row, (ids, label) in enumerate(chunk):
        input_ids[row, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[row, :len(ids)] = torch.as_tensor(np.asarray(label, dtype=np.int64))
        attention[row, :len(ids)] = 1
    return input_ids, labels, attention


def chat_prompt(tokenizer, question: str, system_prompt: str | None) -> str:
    """A user question (after the system prompt, if any) rendered with the tokenizer's chat template, ready to answer."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_for_inference(model_dir: str | Path, *, trust_remote_code: bool = False, precision: str | None = None):
    """The model on the GPU if there is one, in eval mode, in `precision` (bf16 | fp32; default: what this
    device computes fast, loraflow.modeling.precision)."""
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
