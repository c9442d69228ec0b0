"""Per-GPU peak memory of FSDP-QLoRA, from config.json alone, before anything loads.

    estimate = fsdp_peak_per_gpu(model_config, processes=2, tokens_per_micro_batch=8192)
    estimate["total_gib"], estimate["parts"]       # what one GPU holds at its peak, and of what

Under FSDP (FULL_SHARD, one unit per decoder layer, peft's recipe; docs/scaling.md) each GPU holds 1/N of the
stored weights (NF4 packed as bf16: half a byte per decoder weight; bf16 embeddings, head and norms), 1/N of the
LoRA weights with their gradients and AdamW states (fp32: 16 bytes per parameter), the quantization constants of
every weight it computes with (bitsandbytes keeps them beside the flat parameters, unsharded: with double
quantization about a byte per 64 weights), up to two decoder layers gathered whole (the one computing and the
one prefetched; none with one process, where FSDP runs NO_SHARD), one linear layer's weight dequantized to bf16,
and its own activations, which sharding does not split: Trainer's gradient checkpointing keeps every layer's input
plus one layer whole while it is recomputed, and the head's logits are materialised (no fused head under FSDP).
"""

from __future__ import annotations

import math

from loraflow.training.memory_model import GIB, _config_namespace, _ModelView, activation_bytes_per_token, fixed_bytes_from_config

# bitsandbytes NF4 with double quantization: an 8-bit absmax per 64 weights, plus fp32 constants per 256 blocks.
QUANT_CONSTANT_BYTES_PER_WEIGHT = {"4bit": 1 / 64 + 4 / (64 * 256), "8bit": 4 / 64, "none": 0.0}
WEIGHT_BYTES = {"4bit": 0.5, "8bit": 1.0, "none": 2.0}
LORA_BYTES_PER_PARAM = 16.0  # fp32 weight + fp32 gradient + two fp32 AdamW states (adamw_torch under FSDP)
# Beyond the parts above: the loss's temporaries, the allocator's rounding, NCCL buffers. Measured on one H200
# (Llama-3-8B shape, 1 process, 2 packed rows of 4,096 tokens; benchmarks/results/train_multigpu_h200_llama3-8b.json):
# max allocated 19.74 GiB, the parts 18.89: with the reserve the estimate is 19.89.
RESERVE_GIB = 1.0


def _shapes(config) -> dict[str, tuple[int, int]]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, getattr(config, "num_key_value_heads", heads) * head_dim
    inter = getattr(config, "intermediate_size", 4 * hidden)
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def fsdp_peak_per_gpu(model_config: dict, processes: int, tokens_per_micro_batch: int, *, lora_r: int = 16,
                      target_modules="all-linear", quantization: str = "4bit", checkpointing: bool = True) -> dict:
    """Estimated peak GPU memory (GiB, max allocated) of one FSDP-QLoRA process, with its parts."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    config = _config_namespace(model_config)
    layers = config.num_hidden_layers
    shapes = _shapes(config)
    layer_weights = sum(i * o for i, o in shapes.values())
    # Every parameter: NF4 storage, bf16 embeddings/head/norms, and 16 bytes per LoRA parameter.
    everything = fixed_bytes_from_config(model_config, lora_r=lora_r, target_modules=target_modules,
                                         quantization=quantization)
    lora_params = (everything - fixed_bytes_from_config(model_config, lora_r=0, quantization=quantization)) / 16.0
    frozen = everything - LORA_BYTES_PER_PARAM * lora_params
    per_token = activation_bytes_per_token(_ModelView(model_config))
    kept_layers = layers * per_token["checkpointed_layer"] + per_token["full_layer"] if checkpointing \
        else layers * per_token["full_layer"]
    parts = {
        "sharded_weights": frozen / processes,
        "sharded_adapter_and_optimizer": LORA_BYTES_PER_PARAM * lora_params / processes,
        "quantization_constants": layers * layer_weights * QUANT_CONSTANT_BYTES_PER_WEIGHT[quantization],
        "gathered_layers": 0.0 if processes == 1 else 2 * layer_weights * WEIGHT_BYTES[quantization],
        "dequantized_weight": 0.0 if quantization == "none" else 2.0 * max(i * o for i, o in shapes.values()),
        "activations": tokens_per_micro_batch * kept_layers,
        "logits": tokens_per_micro_batch * per_token["head_unfused"],
    }
    parts = {name: value / GIB for name, value in parts.items()}
    total = sum(parts.values()) + RESERVE_GIB
    return {"processes": processes, "tokens_per_micro_batch": tokens_per_micro_batch,
            "total_gib": round(total, 2), "parts": {name: round(value, 3) for name, value in parts.items()},
            "reserve_gib": RESERVE_GIB}


def fewest_processes_within(model_config: dict, budget_gb: float, tokens_per_micro_batch: int, *,
                            most: int = 8, **kwargs) -> int | None:
    """The fewest processes (1..`most`) whose per-GPU estimate fits `budget_gb`, or None when none does."""
    for processes in range(1, most + 1):
        if fsdp_peak_per_gpu(model_config, processes, tokens_per_micro_batch, **kwargs)["total_gib"] <= budget_gb:
            return processes
    return None


def describe(estimate: dict) -> str:
    """One log line: the total and its three largest parts."""
    largest = sorted(estimate["parts"].items(), key=lambda item: -item[1])[:3]
    return (f"FSDP with {estimate['processes']} process(es), {estimate['tokens_per_micro_batch']:,} tokens per "
            f"micro-batch: estimated peak {estimate['total_gib']:.1f} GiB per GPU ("
            + ", ".join(f"{name} {value:.1f}" for name, value in largest) + ")")


def smallest_budget_message(model_config: dict, budget_gb: float, processes: int, tokens_per_micro_batch: int,
                            **kwargs) -> str | None:
    """Why `budget_gb` cannot be kept with `processes` FSDP processes, with the fix; None when it can."""
    estimate = fsdp_peak_per_gpu(model_config, processes, tokens_per_micro_batch, **kwargs)
    if estimate["total_gib"] <= budget_gb:
        return None
    fewest = fewest_processes_within(model_config, budget_gb, tokens_per_micro_batch, **kwargs)
    fix = (f"use {fewest} GPUs (train.num_processes={fewest})" if fewest is not None
           else f"set train.memory_budget_gb to at least {math.ceil(estimate['total_gib'] * 10) / 10:g}")
    return (f"train.memory_budget_gb={budget_gb:g} GiB cannot be kept: {describe(estimate)}. To fit, {fix}, or "
            "train on fewer tokens per micro-batch (train.micro_batch_size, train.pack_max_tokens).")

