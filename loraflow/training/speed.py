"""Speed settings for a (Q)LoRA model: attention, Liger kernels, dtypes, and checkpointing chosen by memory.

`configure_model_for_speed` is called once on the peft-wrapped model, before training. It returns a
`SpeedPlan` that records every lever it pulled and, for each one it did not, why — log it with the run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from loraflow.training.lora_fast import fuse_lora_epilogues
from loraflow.training.masking import _decoder, enable_document_masking
from loraflow.training.offload import enable_offloaded_checkpointing
from loraflow.training.varlen import VARLEN, register_varlen_attention, varlen_available

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class SpeedPlan:
    """What `configure_model_for_speed` did (and did not do, with reasons). `asdict()` for logs and reports."""

    attn_implementation: str
    document_masking: bool
    liger: list[str] = field(default_factory=list)
    lora_fused_layers: int = 0
    frozen_params_cast_to: str | None = None
    checkpointed_layers: int = 0
    offloaded_layers: int = 0
    lean_recompute: bool = False
    total_layers: int = 0
    memory_budget_gb: float | None = None
    estimated_peak_gb: float | None = None
    tokens_per_micro_batch: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


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


def _apply_checkpointing(model: nn.Module, checkpointed: int, offload: bool = False, lean: bool = False) -> int:
    """Checkpoint the first `checkpointed` decoder layers (torch's non-reentrant checkpoint; with `offload` or
    `lean`, `offload.py`'s function: inputs offloaded to CPU memory or kept on the GPU, lean recompute), keep the
    rest whole. Returns how many layers offload."""
    layers = _decoder(model).layers
    # transformers 5.23 renamed gradient_* to activation_checkpointing_* (the old names warn); 5.17 has only the old.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if checkpointed == 0:
        disable()
        for layer in layers:
            layer.gradient_checkpointing = False
        return 0
    if hasattr(model, "activation_checkpointing_enable"):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < checkpointed
    if offload or lean:
        taken = enable_offloaded_checkpointing(layers, to_host=offload, lean=lean)
        return taken if offload else 0
    return 0


def _apply_liger(model: nn.Module, skipped: dict[str, str]) -> list[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        skipped["liger"] = "liger-kernel is not installed (pip install loraflow[gpu])"
        return []
    device = next(model.parameters()).device
    if device.type != "cuda":
        skipped["liger"] = f"Liger kernels are Triton GPU kernels; the model is on {device.type}"
        return []
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    # Patch the *ForCausalLM itself: PeftModel forwards attribute lookups, so hasattr() can't tell them apart.
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = causal_lm.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        skipped["liger"] = f"Liger has no kernels for model type {model_type!r}"
        return []
    kernels = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True, "cross_entropy": False}
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=causal_lm, **kernels)
    return [name for name, on in kernels.items() if on]


def _cast_frozen_float_params(model: nn.Module, dtype: torch.dtype) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast of frozen norms/embeddings/head: bf16 is enough for
    frozen tensors (the LoRA weights, which train, keep their fp32 master copy)."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype == torch.float32:
            param.data = param.data.to(dtype)
            count += 1
    return count


def default_attention(model: nn.Module, on_cuda: bool) -> str:
    """The attention the fast path uses: varlen flash attention on CUDA (measured 1-6 % more tokens/s than flex
    end to end on the 8B shape at every budget, docs/speed.md), flex attention where torch has no varlen kernel
    or the model trains with attention dropout (varlen has none), SDPA off CUDA."""
    if not on_cuda:
        return "sdpa"
    if varlen_available() and not getattr(model.config, "attention_dropout", 0.0):
        return VARLEN
    return "flex_attention"


def configure_model_for_speed(
    model: nn.Module,
    train_config=None,
    memory_budget_gb: float | None = None,
    *,
    tokens_per_micro_batch: int | None = None,
    attn_implementation: str | None = None,
    use_liger: bool = True,
    fuse_lora: bool = True,
    compute_dtype: torch.dtype | None = None,
    offload_checkpointed: bool = False,
    lean_recompute: bool = True,
) -> SpeedPlan:
    """Set up a (peft-wrapped) causal LM for fast packed training. Call after `get_peft_model`, before Trainer.

    - Attention (`default_attention`): torch's varlen flash attention on CUDA (each packed document its own
      sequence), flex attention where torch lacks it, SDPA elsewhere; documents are kept apart by
      `enable_document_masking` whatever the implementation.
    - KV cache off (useless in training).
    - Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) on CUDA when installed.
    - LoRA's scaling and residual add folded into the up-projection GEMM (`fuse_lora_epilogues`).
    - Frozen fp32 parameters (norms, embeddings, head upcast by prepare_model_for_kbit_training) back to
      `compute_dtype` (default bf16 on CUDA).
    - Gradient checkpointing per layer: if `train_config.gradient_checkpointing` is on and
      `tokens_per_micro_batch` is known, checkpoint only as many layers as the memory budget requires
      (`memory_budget_gb`, default the GPU's total memory); without a token count, all layers. With
      `offload_checkpointed` the checkpointed layers keep their inputs in pinned CPU memory (`offload.py`).
    - Lean recompute (`lean_recompute`, one process only): a checkpointed layer's recompute skips its last
      linear's GEMM, whose result backward never reads (`lean_recompute.py`). Under DDP checkpointing stays torch's.

    Use the batches of `PackedCollator`, under autocast or Trainer's bf16=True.
    """
    skipped: dict[str, str] = {}
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    if attn_implementation is None:
        attn_implementation = default_attention(model, on_cuda)
    if attn_implementation == VARLEN:
        register_varlen_attention()
    model.set_attn_implementation(attn_implementation)
    model.config.use_cache = False
    enable_document_masking(model)

    liger = _apply_liger(model, skipped) if use_liger else []
    if not use_liger:
        skipped["liger"] = "disabled by the caller"

    fused = fuse_lora_epilogues(model) if fuse_lora else 0
    if not fuse_lora:
        skipped["fuse_lora"] = "disabled by the caller"

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if on_cuda else None
    cast_to = None
    if compute_dtype is not None and compute_dtype != torch.float32:
        if _cast_frozen_float_params(model, compute_dtype):
            cast_to = str(compute_dtype).removeprefix("torch.")
    else:
        skipped["frozen_bf16"] = "fp32 compute: frozen parameters keep their dtype"

    layers = len(_decoder(model).layers)
    want_checkpointing = True if train_config is None else bool(train_config.gradient_checkpointing)
    if memory_budget_gb is None and on_cuda:
        memory_budget_gb = torch.cuda.get_device_properties(device).total_memory / GIB
    estimated = None
    if not want_checkpointing:
        checkpointed = 0
        skipped["gradient_checkpointing"] = "train.gradient_checkpointing is off"
    elif tokens_per_micro_batch is None or memory_budget_gb is None:
        checkpointed = layers
        skipped["checkpointing_plan"] = "no tokens_per_micro_batch or memory budget given: all layers checkpointed"
    else:
        checkpointed, estimated = plan_checkpointing(
            model, tokens_per_micro_batch, memory_budget_gb, fused_head="fused_linear_cross_entropy" in liger,
            offload=offload_checkpointed,
        )
    single_process = train_config is None or getattr(train_config, "distributed", "none") == "none"
    lean = lean_recompute and fuse_lora and single_process and checkpointed > 0
    if lean_recompute and not fuse_lora:
        skipped["lean_recompute"] = "needs the fused LoRA forward (fuse_lora)"
    elif lean_recompute and not single_process:
        skipped["lean_recompute"] = "train.distributed: torch's checkpoint, whose recompute DDP's hooks were measured with"
    elif not lean_recompute:
        skipped["lean_recompute"] = "disabled by the caller"
    offloaded = _apply_checkpointing(model, checkpointed, offload=offload_checkpointed, lean=lean)
    plan = SpeedPlan(
        attn_implementation=attn_implementation,
        document_masking=True,
        liger=liger,
        lora_fused_layers=fused,
        frozen_params_cast_to=cast_to,
        checkpointed_layers=checkpointed,
        offloaded_layers=offloaded,
        lean_recompute=lean,
        total_layers=layers,
        memory_budget_gb=memory_budget_gb,
        estimated_peak_gb=estimated,
        tokens_per_micro_batch=tokens_per_micro_batch,
        skipped=skipped,
    )
    log.info("speed plan: %s", plan.as_dict())
    return plan


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
