"""The memory model behind the fast path's plan: activation bytes per token, parameter bytes, the layers to
checkpoint for a budget, and the smallest budget a model can train in (refused before the model loads).

Calibrated against peaks measured on an H100/H200 (docs/speed.md has the numbers). Used by the step planner
(loraflow.training.micro_batch), configure_model_for_speed (loraflow.training.speed), the pre-load budget check
(loraflow.training.plan) and FSDP's per-GPU estimate (loraflow.training.fsdp_memory).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from torch import nn

from loraflow.training.masking import _decoder

GIB = 1024**3


def _llama_like_config(model: nn.Module):
    config = getattr(model, "config", None)
    inner = getattr(config, "text_config", None) or config
    return inner


def activation_bytes_per_token(model: nn.Module) -> dict[str, float]:
    """Estimated bf16 activation memory per token: per layer kept whole, per checkpointed layer, and the head.

    Counted from the tensors a Llama-style decoder layer saves for backward with flex attention and Liger's
    RMSNorm/SwiGLU (bf16): the layer input and the two norm outputs, q after RoPE, k/v, the attention output,
    the o_proj input, gate/up/SiLU products. A checkpointed layer keeps only its input. Calibrated against
    peaks measured on an H100 (docs/speed.md has the numbers).
    """
    config = _llama_like_config(model)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    elements = 5 * hidden + 2 * kv + heads * head_dim + 3 * intermediate
    return {
        "full_layer": 2.0 * elements,
        "checkpointed_layer": 2.0 * hidden,
        # Liger's fused linear cross-entropy never materialises the logits; without it, bf16 logits plus
        # their fp32 upcast and gradient: ~10 bytes per vocabulary entry.
        "head_fused": 4.0 * hidden,
        "head_unfused": 10.0 * config.vocab_size,
    }


def _param_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
    for b in model.buffers():
        total += b.numel() * b.element_size()
    return total


# Max allocated above the reserve-free estimate on the H200 frontier (docs/speed.md): transients that grow with the
# tokens (flex attention's backward, Liger's chunked cross-entropy, layer-input gradients) up to 1.0 GiB at 32k
# tokens per micro-batch with inputs kept on the GPU; with them offloaded 0.33 / 1.67 / 3.45 GiB at 8k / 32k / 64k
# tokens (layer outputs wait for their copy to the host before their memory is reused). The plan adds these
# transients and PLAN_MARGIN_GIB on top.
TRANSIENT_GIB_PER_32K_TOKENS = 1.1
OFFLOAD_TRANSIENT_GIB_PER_32K_TOKENS = 1.8
OFFLOAD_TRANSIENT_OFFSET_GIB = -0.1
PLAN_MARGIN_GIB = 0.5


def calibrated_reserve_gb(tokens_per_micro_batch: int, offload: bool = False) -> float:
    """The plan's reserve above its activation and parameter estimate: the measured transients plus a margin."""
    if offload:
        transient = OFFLOAD_TRANSIENT_OFFSET_GIB + OFFLOAD_TRANSIENT_GIB_PER_32K_TOKENS * tokens_per_micro_batch / 32768
    else:
        transient = TRANSIENT_GIB_PER_32K_TOKENS * tokens_per_micro_batch / 32768
    return PLAN_MARGIN_GIB + max(transient, 0.0)


def plan_checkpointing(
    model: nn.Module,
    tokens_per_micro_batch: int,
    memory_budget_gb: float,
    *,
    fused_head: bool,
    reserve_gb: float | None = None,
    offload: bool = False,
) -> tuple[int, float]:
    """How many decoder layers to checkpoint so the step fits `memory_budget_gb`; and the estimated peak (GiB).

    Keeping a layer's activations saves its forward recomputation (a QLoRA step costs ~4·N FLOP per token
    without checkpointing against ~6·N with it), so we checkpoint as few layers as fit. Fixed memory: the
    parameters (4-bit packed weights count at their storage size), LoRA gradients and 8-bit Adam states
    (~12 bytes per trainable parameter), plus `reserve_gb` (default `calibrated_reserve_gb`). With `offload`
    a checkpointed layer's input lives in CPU memory (`loraflow.training.offload`): two are on the GPU at a time.
    """
    layers = len(_decoder(model).layers)
    per_token = activation_bytes_per_token(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fixed = _param_bytes(model) + 12 * trainable
    head = per_token["head_fused" if fused_head else "head_unfused"] * tokens_per_micro_batch
    # One checkpointed layer is recomputed whole during backward: its full activations exist transiently.
    transient = per_token["full_layer"] * tokens_per_micro_batch
    budget = memory_budget_gb * GIB

    def peak(checkpointed: int) -> float:
        offloading = offload and checkpointed > 0
        kept_inputs = min(checkpointed, 2) if offloading else checkpointed
        kept = (layers - checkpointed) * per_token["full_layer"] + kept_inputs * per_token["checkpointed_layer"]
        reserve = calibrated_reserve_gb(tokens_per_micro_batch, offloading) if reserve_gb is None else reserve_gb
        return fixed + reserve * GIB + head + kept * tokens_per_micro_batch + (transient if checkpointed else 0)

    for checkpointed in range(0, layers + 1):
        if peak(checkpointed) <= budget:
            return checkpointed, peak(checkpointed) / GIB
    return layers, peak(layers) / GIB


# ---- the budget promise: refuse, before the model loads, a budget no plan can meet ----------------------

# Measured max allocated minus the reserve-free estimate of the same plan, one H200, Llama-3-8B shape
# (benchmarks/results/train_frontier_h200_llama3-8b-32k*.json): ≤ +0.1 GiB at 4k tokens per micro-batch with
# every layer checkpointed, +1.0 GiB at 32k: the minimum budget adds TRANSIENT_GIB_PER_32K_TOKENS for them.
_WEIGHT_BYTES = {"4bit": 0.5, "8bit": 1.0, "none": 2.0}  # bitsandbytes packed storage; bf16 when unquantized
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MemoryBudgetError(ValueError):
    """train.memory_budget_gb is below what the smallest plan (1 row, every layer checkpointed) needs."""


def fixed_bytes_from_config(model_config: dict, *, lora_r: int = 16, target_modules="all-linear",
                            quantization: str = "4bit") -> float:
    """Parameter memory of a Llama-style model with LoRA, from its config.json alone (no weights loaded).

    Decoder linear weights at their storage size (NF4: half a byte each; bitsandbytes keeps its quantization
    constants outside the parameters, and `_param_bytes` does not count them either), bf16 embeddings, head and
    norms, and per LoRA parameter 4 bytes (fp32) + 12 (gradient and 8-bit Adam states, as `plan_checkpointing`).
    """
    config = _config_namespace(model_config)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, getattr(config, "num_key_value_heads", heads) * head_dim
    inter = getattr(config, "intermediate_size", 4 * hidden)
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    targets = _LINEARS if target_modules == "all-linear" else [n for n in _LINEARS if n in set(target_modules)]
    weights = layers * sum(i * o for i, o in shapes.values())
    lora = layers * sum(lora_r * (shapes[n][0] + shapes[n][1]) for n in targets)
    vocab = config.vocab_size
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    norms = (2 * layers + 1) * hidden
    return weights * _WEIGHT_BYTES[quantization] + 2.0 * (embeddings + norms) + 16.0 * lora


def minimum_budget_gb(model_config: dict, tokens_per_micro_batch: int, *, lora_r: int = 16,
                      target_modules="all-linear", quantization: str = "4bit", fused_head: bool = True,
                      offload: bool = False) -> float:
    """The smallest memory budget (GiB, max allocated) the packed fast path can keep at these tokens per micro-batch:
    the plan with every layer checkpointed (1 row; with `offload`, two layer inputs on the GPU), with no reserve
    beyond the measured transients."""
    per_token = activation_bytes_per_token(_ModelView(model_config))
    layers = _config_namespace(model_config).num_hidden_layers
    kept_inputs = min(layers, 2) if offload else layers
    activations = tokens_per_micro_batch * (
        per_token["head_fused" if fused_head else "head_unfused"]
        + kept_inputs * per_token["checkpointed_layer"]
        + per_token["full_layer"]  # the layer being recomputed in backward
    )
    fixed = fixed_bytes_from_config(model_config, lora_r=lora_r, target_modules=target_modules, quantization=quantization)
    transient = TRANSIENT_GIB_PER_32K_TOKENS * tokens_per_micro_batch / 32768
    return (fixed + activations) / GIB + transient


def check_memory_budget(model_config: dict, tokens_per_micro_batch: int, memory_budget_gb: float | None,
                        **kwargs) -> float:
    """Raise MemoryBudgetError when `memory_budget_gb` is below `minimum_budget_gb`; return the minimum.

    The train stage calls this before loading the model, so a budget that cannot be kept costs nothing."""
    needed = minimum_budget_gb(model_config, tokens_per_micro_batch, **kwargs)
    if memory_budget_gb is not None and memory_budget_gb < needed:
        smallest = math.ceil(needed * 10) / 10
        raise MemoryBudgetError(
            f"train.memory_budget_gb={memory_budget_gb:g} GiB cannot be kept: one packed row of "
            f"{tokens_per_micro_batch:,} tokens with every layer checkpointed needs about {needed:.1f} GiB on this "
            f"model. Set train.memory_budget_gb to at least {smallest:g}, or lower train.pack_max_tokens "
            f"(the longest example sets the row length too)."
        )
    return needed


class _ModelView:
    """Lets `activation_bytes_per_token` read a config.json dict as if it were a model."""

    def __init__(self, model_config: dict):
        self.config = _config_namespace(model_config)


def _config_namespace(model_config):
    if isinstance(model_config, dict):
        inner = model_config.get("text_config") or model_config
        return SimpleNamespace(**inner)
    return _llama_like_config(SimpleNamespace(config=model_config))
