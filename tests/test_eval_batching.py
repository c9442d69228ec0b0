"""Evaluation's batch sizes (pure arithmetic on known shapes) and batched greedy answers = one-at-a-time answers."""

from types import SimpleNamespace

import pandas as pd
import pytest
from transformers import AutoTokenizer

from loraflow.evaluation.batching import (CPU_BATCH, MAX_GENERATION_BATCH, fitting_batch, generation_batch_size,
                                          generation_prompt_bytes, kv_bytes_per_token, loss_row_bytes)
from loraflow.config.evaluate import EvalConfig
from loraflow.evaluation.generation import IGNORE_INDEX, generate_answers, load_for_inference, mean_loss, stop_token_ids
from loraflow.evaluation.metrics import evaluation_rows, sample_rows
from loraflow.modeling.prompt_encoding import question_prompt_ids
from tests.tiny_llama import smollm2_dir, tokens_frame

# Llama-3-8B's shape with SmolLM2's vocabulary (scripts/make_8b_model.py).
LLAMA3_8B = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                            intermediate_size=14336, vocab_size=49152)


def test_llama3_8b_cache_is_128_kib_per_token_in_bf16():
    assert kv_bytes_per_token(LLAMA3_8B, 2) == 2 * 32 * 8 * 128 * 2 == 131072


def test_prompt_and_loss_row_costs_add_up():
    per_prompt = generation_prompt_bytes(LLAMA3_8B, 2, prompt_tokens=200, new_tokens=100)
    assert per_prompt == 300 * 131072 + 200 * (3 * 14336 + 4 * 4096) * 2 + 8 * 49152
    assert loss_row_bytes(LLAMA3_8B, 2, 512) == 512 * (12 * 49152 + (3 * 14336 + 4 * 4096) * 2 + 131072)


@pytest.mark.parametrize("requested, free, expected", [
    (8, 10**12, 8),                        # a number is taken as it is
    ("auto", None, CPU_BATCH),             # no GPU
    ("auto", 40 * 2**30, 256),             # an H100's free memory after an 8B: capped
    ("auto", 2 * 2**30, 15),               # 1 GiB usable / 68 MiB per prompt
    ("auto", 10 * 2**20, 1),               # never below one
])
def test_fitting_batch(requested, free, expected):
    per_prompt = generation_prompt_bytes(LLAMA3_8B, 2, prompt_tokens=200, new_tokens=160)
    assert fitting_batch(requested, per_prompt, free, MAX_GENERATION_BATCH) == expected


@pytest.fixture(scope="module")
def smollm2():
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_for_inference(model_dir, precision="fp32"), tokenizer, stop_token_ids(tokenizer, model_dir)


def test_auto_batch_on_cpu_is_the_cpu_default(smollm2):
    model, _, _ = smollm2
    assert generation_batch_size("auto", model, prompt_tokens=100, new_tokens=50) == CPU_BATCH


def test_batched_answers_equal_one_at_a_time_greedy(smollm2):
    """A fixed sample of prompts of different lengths (so left padding differs per row) and budgets: the batched,
    left-padded answers are token for token those of one prompt at a time without padding."""
    model, tokenizer, stop_ids = smollm2
    questions = ["What is 3 + 5?", "What is the capital of Italy?", "Name a primary colour.",
                 "In one sentence, why is the sky blue?", "Which planet is known as the red planet?",
                 "Who wrote Romeo and Juliet? Answer with the name only."]
    prompts = [question_prompt_ids(tokenizer, q, "Answer briefly.") for q in questions]
    budgets = [12, 16, 8, 20, 12, 10]
    assert len({len(p) for p in prompts}) > 3  # the padding really differs
    single = generate_answers(model, tokenizer, prompts, max_new_tokens=budgets, batch_size=1, stop_ids=stop_ids)
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=budgets, batch_size=6, stop_ids=stop_ids)
    assert [a["batch_size"] for a in single + batched] == [1] * 6 + [6] * 6
    strip = [{k: v for k, v in a.items() if k != "batch_size"} for a in single + batched]
    assert strip[:6] == strip[6:]
    assert any(a["stopped"] for a in single) and any(not a["stopped"] for a in single)


def test_loss_on_labelled_positions_in_length_order_equals_the_models_own_loss(smollm2):
    """mean_loss (rows sorted by length, padded in batches of 3, float32 only at labelled positions) equals the
    token-weighted mean of the model's own per-row loss (transformers' `labels=` path, no padding)."""
    import torch

    model, tokenizer, _ = smollm2
    rows = tokens_frame(tokenizer)
    assert rows["length"].nunique() > 3 and len(rows) > 3  # batches with real padding
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            scored = sum(1 for label in list(labels)[1:] if label != IGNORE_INDEX)
            loss = model(input_ids=torch.tensor([list(ids)]), labels=torch.tensor([list(labels)])).loss
            total, count = total + float(loss) * scored, count + scored
    assert mean_loss(model, rows, batch_size=3, pad_id=tokenizer.pad_token_id) == pytest.approx(total / count, rel=1e-4)


def test_loss_rows_are_a_deterministic_capped_sample():
    frame = pd.DataFrame({"id": [f"v{i}" for i in range(50)], "split": "validation", "prompt": "q"})
    first = sample_rows(frame, 10, seed=0)
    assert len(first) == 10 and list(first["id"]) == list(sample_rows(frame, 10, seed=0)["id"])
    assert first.index.is_monotonic_increasing  # original order kept
    assert set(first["id"]) <= set(sample_rows(frame, 20, seed=0)["id"])  # a bigger cap keeps the smaller's rows
    assert list(first["id"]) != list(sample_rows(frame, 10, seed=1)["id"])
    assert sample_rows(frame, None) is frame and sample_rows(frame, 50) is frame
    _, loss_rows, split = evaluation_rows(frame, EvalConfig(max_loss_rows=7))
    assert split == "validation" and len(loss_rows) == 7
