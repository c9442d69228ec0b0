"""configure_model_for_speed on a tiny peft LoRA Llama (CPU): the plan, per-layer checkpointing by memory
budget, and that a checkpointed packed step computes the same gradients as an uncheckpointed one."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.config.train import TrainConfig
from loraflow.training import PackedCollator, configure_model_for_speed, pack_examples, plan_checkpointing


def _lora_llama(layers=4):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(model, lora)


def _batch(seed=0):
    rng = random.Random(seed)
    examples = []
    for n in (12, 30, 7, 25, 40, 18):
        ids = [rng.randrange(3, 97) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": ids})
    return PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(pack_examples(examples, max_tokens=64))


def _layers(model):
    return model.get_base_model().model.layers


def test_plan_without_budget_checkpoints_every_layer_and_keeps_documents_apart():
    model = _lora_llama()
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"))
    assert plan.document_masking and plan.attn_implementation == "sdpa"
    assert model.config.use_cache is False
    assert plan.checkpointed_layers == plan.total_layers == 4
    assert all(layer.gradient_checkpointing for layer in _layers(model))
    assert "liger" in plan.skipped  # CPU: recorded, not silently ignored


def test_checkpointing_follows_the_memory_budget():
    model = _lora_llama()
    tokens = 200_000
    roomy, _ = plan_checkpointing(model, tokens, 1000.0, fused_head=True)
    assert roomy == 0
    tight, peak = plan_checkpointing(model, tokens, 3.5, fused_head=True)
    assert 0 < tight <= 4
    plan = configure_model_for_speed(
        model, TrainConfig(quantization="none"), memory_budget_gb=3.5, tokens_per_micro_batch=tokens
    )
    assert plan.checkpointed_layers == tight
    assert [layer.gradient_checkpointing for layer in _layers(model)] == [i < tight for i in range(4)]
    off = configure_model_for_speed(model, TrainConfig(quantization="none", gradient_checkpointing=False))
    assert off.checkpointed_layers == 0 and not any(layer.gradient_checkpointing for layer in _layers(model))


def test_checkpointed_packed_step_matches_uncheckpointed():
    batch = _batch()
    grads = {}
    for checkpointing in (False, True):
        model = _lora_llama()
        configure_model_for_speed(model, TrainConfig(quantization="none", gradient_checkpointing=checkpointing))
        model.train()
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_fp32_params_go_back_to_bf16_but_lora_stays_fp32():
    model = _lora_llama(layers=2)
    configure_model_for_speed(model, TrainConfig(quantization="none"), compute_dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name


def test_fused_lora_forward_matches_peft_forward_and_gradients():
    from loraflow.training import fuse_lora_epilogues

    batch = _batch(seed=1)
    results = {}
    for fused in (False, True):
        model = _lora_llama(layers=2)
        configure_model_for_speed(model, TrainConfig(quantization="none"), fuse_lora=False)
        if fused:
            assert fuse_lora_epilogues(model) == 2 * 7
            assert fuse_lora_epilogues(model) == 0  # idempotent
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fused_lora_falls_back_to_peft_when_adapters_are_disabled():
    model = _lora_llama(layers=2)
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"))
    assert plan.lora_fused_layers == 14
    batch = _batch(seed=2)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**batch).logits
        adapted = model(**batch).logits
    reference = _lora_llama(layers=2)  # same seed, so the same base weights
    configure_model_for_speed(reference, TrainConfig(quantization="none"), fuse_lora=False)
    with torch.no_grad(), reference.disable_adapter():
        torch.testing.assert_close(base, reference(**batch).logits)
    assert not torch.allclose(base, adapted)


def test_trainer_trains_lora_on_packed_rows(tmp_path):
    """transformers Trainer takes PackedCollator batches as they are: LoRA weights move, base weights do not."""
    from transformers import Trainer, TrainingArguments

    model = _lora_llama(layers=2)
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"))
    rng = random.Random(3)
    examples = []
    for _ in range(24):
        ids = [rng.randrange(3, 97) for _ in range(rng.randint(5, 40))]
        examples.append({"input_ids": ids, "labels": ids})
    rows = pack_examples(examples, max_tokens=64)
    collator = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", remove_unused_columns=False,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    assert plan.document_masking
    assert collator.tokens_seen > 0 and collator.trained_tokens_seen > 0
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved == param.requires_grad, name
