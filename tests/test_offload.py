"""Offloaded checkpointing (loraflow.training.offload) computes the loss and LoRA gradients of plain checkpointing,
and the step planner's choice logic (loraflow.training.micro_batch). CPU; the GPU copy path is tests/gpu/test_offload_gpu.py."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.config.train import TrainConfig
from loraflow.training import configure_model_for_speed, plan_checkpointing
from loraflow.training.offload import _LayerCheckpoint
from loraflow.training.micro_batch import StepChoice, best_choice, predicted_tokens_per_s, step_candidates
from tests.test_packing_speed import _batch, _layers


def _lora_llama(dropout: float = 0.0, layers: int = 3):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM",
                      init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)


def _loss_and_grads(offload: bool, dropout: float, tokens: int = 10**7, lean: bool = False, budget: float = 1e-3):
    model = _lora_llama(dropout)
    # A budget no layer fits whole: every layer checkpointed, plain or offloaded.
    plan = configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=budget,
                                     tokens_per_micro_batch=tokens, offload_checkpointed=offload, lean_recompute=lean)
    if budget < 1:
        assert plan.checkpointed_layers == 3 and plan.offloaded_layers == (3 if offload else 0)
        assert plan.lean_recompute is lean
        funcs = [type(layer._gradient_checkpointing_func) for layer in _layers(model)]
        assert all((f is _LayerCheckpoint) == (offload or lean) for f in funcs)
    model.train()
    torch.manual_seed(1)  # the dropout masks of both runs start from the same state
    loss = model(**_batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpointing_matches_plain_checkpointing(dropout):
    plain_loss, plain = _loss_and_grads(False, dropout)
    offloaded_loss, offloaded = _loss_and_grads(True, dropout)
    torch.testing.assert_close(offloaded_loss, plain_loss, atol=0, rtol=0)
    assert offloaded.keys() == plain.keys() and len(plain) == 3 * 7 * 2
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


class _DownProjForwardGemms(TorchDispatchMode):
    """Counts, per layer, the GEMMs that compute down_proj's base output (x·Wᵀ: W's storage, transposed)."""

    def __init__(self, model):
        super().__init__()
        weights = [layer.mlp.down_proj.base_layer.weight for layer in _layers(model)]
        self.by_storage = {w.data_ptr(): (index, tuple(w.t().shape)) for index, w in enumerate(weights)}
        self.calls = [0] * len(weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.dim() == 2 and arg.data_ptr() in self.by_storage:
                    index, transposed_shape = self.by_storage[arg.data_ptr()]
                    self.calls[index] += tuple(arg.shape) == transposed_shape
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "offloaded"])
def test_lean_recompute_gives_the_gradients_of_no_checkpointing_and_skips_down_proj(offload):
    whole_loss, whole = _loss_and_grads(False, 0.0, budget=1e3)  # every layer kept whole: nothing recomputed
    lean_loss, lean = _loss_and_grads(offload, 0.0, lean=True)
    torch.testing.assert_close(lean_loss, whole_loss, atol=0, rtol=0)
    assert lean.keys() == whole.keys() and len(whole) == 3 * 7 * 2
    for name in whole:
        torch.testing.assert_close(lean[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lean_recompute_runs_no_down_proj_gemm_in_backward():
    for lean, expected in ((True, [1, 1, 1]), (False, [2, 2, 2])):
        model = _lora_llama()
        configure_model_for_speed(model, TrainConfig(quantization="none"), memory_budget_gb=1e-3,
                                  tokens_per_micro_batch=10**7, offload_checkpointed=True, lean_recompute=lean)
        model.train()
        with _DownProjForwardGemms(model) as counter:
            model(**_batch()).loss.backward()
        assert counter.calls == expected, (lean, counter.calls)  # forward once; the plain recompute runs it again


def _meta_lora_llama(hidden=1024, layers=16):
    """A 1B-like LoRA Llama on the meta device: the planner reads shapes and sizes only."""
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))


def test_offload_lowers_the_planned_peak_of_checkpointed_layers_only():
    model = _meta_lora_llama()
    tokens = 8192
    plain = plan_checkpointing(model, tokens, 1e-3, fused_head=True, reserve_gb=0.0)
    offloaded = plan_checkpointing(model, tokens, 1e-3, fused_head=True, reserve_gb=0.0, offload=True)
    hidden_bytes = 2 * 1024 * tokens  # bf16 input of one layer
    assert plain[0] == offloaded[0] == 16
    assert plain[1] - offloaded[1] == pytest.approx(14 * hidden_bytes / 1024**3)  # 16 inputs kept -> 2 in flight
    roomy = plan_checkpointing(model, tokens, 1e3, fused_head=True, offload=True)
    assert roomy == plan_checkpointing(model, tokens, 1e3, fused_head=True)  # nothing checkpointed: no difference


def test_step_model_ranks_the_measured_settings_like_the_frontier():
    # 8B on the H200 (docs/speed.md): 4 rows whole 14,777 > 1 row whole 10,901 > 2 rows all checkpointed 9,824
    # > 1 row all checkpointed 7,025 tokens/s.
    speeds = [predicted_tokens_per_s(4 * 4096, 0, 32), predicted_tokens_per_s(4096, 0, 32),
              predicted_tokens_per_s(2 * 4096, 32, 32), predicted_tokens_per_s(4096, 32, 32)]
    assert speeds == sorted(speeds, reverse=True)
    assert predicted_tokens_per_s(8192, 32, 32, offload=True) < predicted_tokens_per_s(8192, 32, 32)


def test_best_choice_takes_the_fastest_that_fits_else_the_smallest():
    fast_too_big = StepChoice(8, 0, False, 30.0, 15000.0, fits=False)
    slow = StepChoice(1, 32, False, 7.0, 7000.0, fits=True)
    offloaded = StepChoice(2, 32, True, 7.5, 9500.0, fits=True)
    assert best_choice([fast_too_big, slow, offloaded]) == offloaded
    assert best_choice([fast_too_big, StepChoice(1, 32, False, 9.0, 7000.0, fits=False)]).rows == 1


def test_offload_is_chosen_where_it_alone_lets_more_rows_fit():
    model = _meta_lora_llama()
    row = 4096
    offload_peak = plan_checkpointing(model, 4 * row, 0.0, fused_head=True, offload=True)[1]
    plain_peak = plan_checkpointing(model, 4 * row, 0.0, fused_head=True)[1]
    assert offload_peak < plain_peak  # with its larger measured transient included
    budget = (offload_peak + plain_peak) / 2
    by_setting = {(c.rows, c.offload): c for c in step_candidates(model, row, 100, budget, fused_head=True)}
    assert by_setting[(4, True)].fits and not by_setting[(4, False)].fits
    assert not any(c.fits for c in by_setting.values() if c.rows > 4)
    chosen = best_choice(list(by_setting.values()))
    assert chosen.fits and chosen.predicted_tokens_per_s == max(c.predicted_tokens_per_s for c in by_setting.values() if c.fits)
    assert (chosen.rows, chosen.offload) == (4, True)
    no_checkpointing = step_candidates(model, row, 100, budget, fused_head=True, checkpointing=False)
    assert all(c.checkpointed == 0 and not c.offload for c in no_checkpointing)
    assert not any(c.offload for c in step_candidates(model, row, 100, budget, fused_head=True, offload=False))


def test_offload_is_not_chosen_under_ddp(monkeypatch):
    from loraflow.training import micro_batch
    from loraflow.training.micro_batch import choose_micro_batch

    monkeypatch.setattr(micro_batch, "_liger_available_for", lambda model: True)  # the head fused, as on the GPU
    model = _meta_lora_llama()
    # Between the 4-row peaks with and without offload: the setting of the test above, where offload wins
    budget = (plan_checkpointing(model, 4 * 4096, 0.0, fused_head=True, offload=True)[1]
              + plan_checkpointing(model, 4 * 4096, 0.0, fused_head=True)[1]) / 2
    assert choose_micro_batch(model, TrainConfig(), 4096, 100, budget)[1]
    assert not choose_micro_batch(model, TrainConfig(distributed="ddp"), 4096, 100, budget)[1]
