"""The budget promise: a train.memory_budget_gb no plan can keep is refused before the model loads."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.config.train import TrainConfig
from loraflow.training import plan_checkpointing
from loraflow.training.memory_model import (
    GIB,
    TRANSIENT_GIB_PER_32K_TOKENS,
    MemoryBudgetError,
    _param_bytes,
    check_memory_budget,
    fixed_bytes_from_config,
    minimum_budget_gb,
)
from loraflow.training.plan import check_budget_before_loading

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
# Llama-3-8B's shape (benchmarks/train_throughput.py SHAPES["llama3-8b"])
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)


def _lora_model(config: dict, targets="all-linear"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_config_estimate_matches_the_loaded_model(tied, targets):
    config = {**TINY, "tie_word_embeddings": tied}
    model = _lora_model(config, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaded = _param_bytes(model) + 12 * trainable  # what plan_checkpointing counts as fixed, less its reserve
    estimate = fixed_bytes_from_config(config, lora_r=16, target_modules=targets, quantization="none")
    assert estimate == pytest.approx(loaded, rel=0.01)


def test_minimum_budget_is_the_all_checkpointed_plan_without_reserve():
    model = _lora_model(TINY)
    tokens = 4096
    layers, peak = plan_checkpointing(model, tokens, 0.0, fused_head=True, reserve_gb=0.0)
    assert layers == TINY["num_hidden_layers"]
    expected = peak + TRANSIENT_GIB_PER_32K_TOKENS * tokens / 32768
    assert minimum_budget_gb(TINY, tokens, quantization="none") == pytest.approx(expected, rel=0.01)


def test_8b_minimum_brackets_the_measured_peaks():
    # Max allocated on an H200 with every layer checkpointed, 1 row (train_frontier_h200_llama3-8b-32k*.json):
    # 7.33 GiB at 4,096 tokens (8 GiB budget), 19.60 GiB at 32,768 tokens (24 GiB budget).
    assert 5.7 < fixed_bytes_from_config(LLAMA3_8B) / GIB < 6.0
    assert 7.33 <= minimum_budget_gb(LLAMA3_8B, 4096) <= 8.0
    assert 19.60 <= minimum_budget_gb(LLAMA3_8B, 32768) <= 24.0


def test_a_budget_that_cannot_be_kept_is_refused_naming_the_smallest():
    with pytest.raises(MemoryBudgetError, match=r"at least 19\.7") as refused:
        check_memory_budget(LLAMA3_8B, 32768, 12.0)
    assert "train.memory_budget_gb=12" in str(refused.value) and "pack_max_tokens" in str(refused.value)
    assert check_memory_budget(LLAMA3_8B, 32768, 24.0) == pytest.approx(19.68, abs=0.05)
    assert check_memory_budget(LLAMA3_8B, 4096, 8.0) < 8.0  # the 8 GiB row of the frontier ran at 7.33
    assert check_memory_budget(LLAMA3_8B, 32768, None) > 0  # no budget: nothing to refuse


def test_the_train_stage_refuses_before_loading(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # as on the GPU machine: Liger installed, so the head is fused
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "model_type": "llama"}))  # no weights at all
    with pytest.raises(MemoryBudgetError, match="at least"):
        check_budget_before_loading(tmp_path, TrainConfig(memory_budget_gb=12, pack_max_tokens=32768), "4bit", 100)
    with pytest.raises(MemoryBudgetError):  # the longest example sets the row length too
        check_budget_before_loading(tmp_path, TrainConfig(memory_budget_gb=12), "4bit", 32768)
    check_budget_before_loading(tmp_path, TrainConfig(memory_budget_gb=24, pack_max_tokens=32768), "4bit", 100)
    check_budget_before_loading(tmp_path, TrainConfig(pack_max_tokens=32768), "4bit", 100)  # no budget set
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "other"}))
    check_budget_before_loading(tmp_path, TrainConfig(memory_budget_gb=1), "4bit", 100)  # unknown shape: no refusal


def test_the_micro_batch_is_the_fastest_predicted_candidate_that_fits():
    from loraflow.training.memory_model import PLAN_MARGIN_GIB
    from loraflow.training.micro_batch import best_choice, choose_micro_batch, step_candidates

    model = _lora_model(TINY)
    config = TrainConfig(quantization="none")
    for budget in (minimum_budget_gb(TINY, 2 * 4096, quantization="none", fused_head=False) + PLAN_MARGIN_GIB, 1.5, 3.5):
        best = best_choice(step_candidates(model, 4096, 100, budget, fused_head=False))
        rows, offload, reason = choose_micro_batch(model, config, 4096, 100, budget)
        assert best.fits and (rows, offload) == (best.rows, best.offload)
        assert f"{best.rows} rows, {best.checkpointed}/2 layers checkpointed" in reason and "next:" in reason


def test_offload_lowers_the_refused_minimum_on_cuda(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # as on the GPU machine: Liger installed, so the head is fused
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "model_type": "llama"}))
    config = TrainConfig(memory_budget_gb=12, pack_max_tokens=32768)
    # 32k tokens: 32 bf16 layer inputs of 256 MiB each stay on the GPU without offload, 2 with it.
    saved = minimum_budget_gb(LLAMA3_8B, 32768) - minimum_budget_gb(LLAMA3_8B, 32768, offload=True)
    assert saved == pytest.approx(30 * 32768 * 4096 * 2 / GIB)
    with pytest.raises(MemoryBudgetError, match=r"at least 12\.2"):
        check_budget_before_loading(tmp_path, config, "4bit", 100, offload=True)
    check_budget_before_loading(tmp_path, TrainConfig(memory_budget_gb=12.5, pack_max_tokens=32768), "4bit", 100,
                                offload=True)
