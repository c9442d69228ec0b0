"""Speed settings for a (Q)LoRA model: attention, Liger kernels, dtypes, and checkpointing chosen by memory.

`configure_model_for_speed` is called once on the peft-wrapped model, before training. It returns a
`SpeedPlan` that records every lever it pulled and, for each one it did not, why; the train stage keeps it in the
run's TrainPlan (loraflow.training.plan). How many layers to checkpoint comes from loraflow.training.memory_model.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from loraflow.training.lora_fast import fuse_lora_epilogues
from loraflow.training.masking import _decoder, enable_document_masking
from loraflow.training.memory_model import GIB, plan_checkpointing
from loraflow.training.offload import enable_offloaded_checkpointing
from loraflow.training.varlen import VARLEN, register_varlen_attention, varlen_available

log = logging.getLogger(__name__)


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


def _frozen_params_to(model: nn.Module, compute_dtype: torch.dtype | None, skipped: dict[str, str]) -> str | None:
    """Frozen fp32 parameters cast to a 16-bit `compute_dtype`; the dtype's name when any were, else None."""
    if compute_dtype is None or compute_dtype == torch.float32:
        skipped["frozen_bf16"] = "fp32 compute: frozen parameters keep their dtype"
        return None
    return str(compute_dtype).removeprefix("torch.") if _cast_frozen_float_params(model, compute_dtype) else None


def _checkpointed_layers(model: nn.Module, train_config, tokens_per_micro_batch: int | None, memory_budget_gb: float | None,
                         *, fused_head: bool, offload: bool, skipped: dict[str, str]) -> tuple[int, float | None]:
    """(decoder layers to checkpoint, estimated peak GiB or None): none when train.gradient_checkpointing is off,
    every layer without a token count or budget, else as few as fit the budget (`plan_checkpointing`)."""
    if train_config is not None and not train_config.gradient_checkpointing:
        skipped["gradient_checkpointing"] = "train.gradient_checkpointing is off"
        return 0, None
    if tokens_per_micro_batch is None or memory_budget_gb is None:
        skipped["checkpointing_plan"] = "no tokens_per_micro_batch or memory budget given: all layers checkpointed"
        return len(_decoder(model).layers), None
    return plan_checkpointing(model, tokens_per_micro_batch, memory_budget_gb, fused_head=fused_head, offload=offload)


def _lean_recompute(train_config, wanted: bool, fuse_lora: bool, checkpointed: int, skipped: dict[str, str]) -> bool:
    """Whether checkpointed layers recompute lean: asked for, with the fused LoRA forward, in one process."""
    single_process = train_config is None or getattr(train_config, "distributed", "none") == "none"
    if wanted and not fuse_lora:
        skipped["lean_recompute"] = "needs the fused LoRA forward (fuse_lora)"
    elif wanted and not single_process:
        skipped["lean_recompute"] = "train.distributed: torch's checkpoint, whose recompute DDP's hooks were measured with"
    elif not wanted:
        skipped["lean_recompute"] = "disabled by the caller"
    return wanted and fuse_lora and single_process and checkpointed > 0


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
    cast_to = _frozen_params_to(model, compute_dtype, skipped)

    layers = len(_decoder(model).layers)
    if memory_budget_gb is None and on_cuda:
        memory_budget_gb = torch.cuda.get_device_properties(device).total_memory / GIB
    checkpointed, estimated = _checkpointed_layers(model, train_config, tokens_per_micro_batch, memory_budget_gb,
                                                   fused_head="fused_linear_cross_entropy" in liger,
                                                   offload=offload_checkpointed, skipped=skipped)
    lean = _lean_recompute(train_config, lean_recompute, fuse_lora, checkpointed, skipped)
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
