"""A leaner forward for peft LoRA linear layers: the adapter's up-projection, scaling and residual add in one GEMM.

peft computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`: on top of the
two small GEMMs that is a copy, a multiply and an add over the full [tokens, out_features] output, three
memory-bound passes per adapted layer in the forward and more in the backward. On an H100 (Llama-3-8B shape,
8k-token micro-batches) those passes were ~16 % of the step's CUDA time (docs/speed.md).

Here `torch.addmm(result, h, B.T, alpha=scaling)` folds them into the up-projection GEMM's epilogue (beta=1
reads the base output once and writes the sum). The math is the same; only the rounding order differs.

While training (grad enabled, a plain or NF4 base without a trained bias) the whole layer is one autograd function,
`_LoraLinear`: the same forward, and a backward that builds the input gradient in one buffer (the LoRA term, then
`g·W` added by the base GEMM's epilogue) instead of autograd's two [tokens, in_features] gradients and their sum,
and hands A and B their gradients as fresh contiguous tensors.

Layers with dropout, DoRA or other variants, several active adapters, merged or disabled adapters, or
per-request `adapter_names` keep peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.training.lean_recompute import (
    dense_weight,
    handled_base,
    lora_linear_backward,
    output_unread,
    unread_lora_linear,
)
from loraflow.training.version_guard import require_verified


def _eligible(layer, args, kwargs) -> str | None:
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    if getattr(layer, "lora_bias", {}).get(name):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _eligible(self, args, kwargs)
    if name is None:
        return self._loraflow_peft_forward(x, *args, **kwargs)
    if output_unread(self):  # a checkpointed layer's recompute: this output is not read (lean_recompute.py)
        dtype = _compute_dtype(self.base_layer, x)
        return unread_lora_linear(self, x.to(dtype), self.lora_A[name].weight.to(dtype),
                                  self.lora_B[name].weight.to(dtype), self.scaling[name])
    lora_a = self.lora_A[name].weight
    if torch.is_grad_enabled() and lora_a.requires_grad and handled_base(self.base_layer):
        dtype = _compute_dtype(self.base_layer, x)
        return _LoraLinear.apply(x.to(dtype), lora_a.to(dtype), self.lora_B[name].weight.to(dtype),
                                 self.scaling[name], self.base_layer)
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    lora_b = self.lora_B[name].weight
    # Explicit casts: under autocast they match what autocast would do; without it (fp32 CPU) they are no-ops.
    h = F.linear(x.to(dtype), lora_a.to(dtype))
    out_features = result.shape[-1]
    fused = torch.addmm(
        result.reshape(-1, out_features), h.reshape(-1, h.shape[-1]), lora_b.to(dtype).t(), alpha=self.scaling[name]
    )
    return fused.view(result.shape)


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ a frozen bias) with W frozen (dense or NF4, dequantized for each GEMM)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, base):
        x_2d = x.reshape(-1, x.shape[-1])
        projected = x_2d @ lora_a.t()
        out = (x_2d @ dense_weight(base, x.dtype).t()).addmm_(projected, lora_b.t(), alpha=scaling)
        if base.bias is not None:
            out.add_(base.bias.to(out.dtype))
        ctx.save_for_backward(x, projected, lora_a, lora_b)
        ctx.scaling, ctx.base = scaling, base
        return out.view(*x.shape[:-1], out.shape[-1])

    backward = staticmethod(lora_linear_backward)


def _compute_dtype(base_layer, x: torch.Tensor) -> torch.dtype:
    """The dtype the base layer's output has: bitsandbytes' compute_dtype, else autocast's, else the input's."""
    dtype = getattr(base_layer, "compute_dtype", None)
    if dtype is not None:
        return dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fuse_lora_epilogues(model: nn.Module) -> int:
    """Give every plain peft LoRA linear layer (bf16/fp32 or bitsandbytes 4-bit base) the fused forward.

    Returns how many layers were patched. Idempotent; other layer types are left alone. Refuses a peft newer than
    the release it was verified with (loraflow.training.version_guard).
    """
    from peft.tuners.lora import Linear as LoraLinear

    require_verified("peft", "The fused LoRA forward (loraflow.training.lora_fast, the fast path's)",
                     "train.packing=false (no fast path; or configure_model_for_speed(fuse_lora=False))")

    types_to_patch: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        types_to_patch += (Linear4bit,)
    except ImportError:  # bitsandbytes not installed
        pass
    patched = 0
    for module in model.modules():
        if type(module) in types_to_patch and not hasattr(module, "_loraflow_peft_forward"):
            module._loraflow_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    return patched
