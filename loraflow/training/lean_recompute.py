"""A checkpointed layer's recompute skips the GEMM whose result its backward never reads.

In backward, a checkpointed decoder layer runs forward again to rebuild its autograd graph, then backpropagates
the output gradient through it (`loraflow.training.offload`). The output of the layer's last linear layer
(`mlp.down_proj`, the MLP branch of the residual add) is not read by that backward: the add passes the gradient
through, the frozen base weight's input gradient is `grad @ W` whatever the output was, and LoRA's gradients need
its input and the rank-r projection only. So while recomputing, down_proj returns a placeholder and computes the
rank-r `x·Aᵀ` alone; its backward (`_UnreadLoraLinear`) gives exactly the gradients of the real layer. On a Llama
layer that leaves out 2·hidden·intermediate FLOP per token of the recompute (a quarter of the layer's GEMMs: on
Llama-3-8B 117 M of 436 M per token).

Only peft LoRA linears over a plain or bitsandbytes 4-bit base take this path (`output_unread`), and only inside
`recomputing()`, which the checkpoint function enters around its recompute.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_state = threading.local()
SKIP_ATTRIBUTE = "_loraflow_output_unread_in_recompute"


@contextmanager
def recomputing():
    """Mark the code inside as a checkpointed layer's recompute (outputs of marked linears are not read)."""
    previous = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = previous


def mark_unread_outputs(layer) -> bool:
    """Mark a decoder layer's last linear (mlp.down_proj) as unread in recompute; False if the layer has none."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if down is None or not hasattr(down, "lora_A"):
        return False
    setattr(down, SKIP_ATTRIBUTE, True)
    return True


def dense_weight(base_layer, dtype: torch.dtype) -> torch.Tensor | None:
    """The base layer's weight as a dense [out, in] tensor in `dtype` (NF4/FP4 dequantized), or None if unknown."""
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        return None
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state).to(dtype)
    if type(base_layer) is torch.nn.Linear:
        return weight.to(dtype)
    return None


def handled_base(base) -> bool:
    """Whether `base` (a LoRA layer's base_layer) is one whose dense weight `dense_weight` gives, with no trained bias."""
    if getattr(base, "bias", None) is not None and base.bias.requires_grad:
        return False
    return getattr(getattr(base, "weight", None), "quant_state", None) is not None or type(base) is torch.nn.Linear


def output_unread(layer) -> bool:
    """Whether a recompute is running and `layer` (a peft LoRA linear) is marked, over a base this module handles."""
    if not (getattr(_state, "on", False) and getattr(layer, SKIP_ATTRIBUTE, False)):
        return False
    return handled_base(layer.base_layer)


def unread_lora_linear(layer, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """A placeholder for `layer`'s output (zeros) whose backward gives the real gradients of x, A and B."""
    return _UnreadLoraLinear.apply(x, lora_a, lora_b, scaling, layer.base_layer)


def lora_linear_backward(ctx, grad):
    """Gradients of y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (W frozen) for x, A and B, from the saved x, x·Aᵀ, A and B.

    The input gradient is one buffer: s·(g·B)·A, then g·W added into it by the GEMM's epilogue (beta=1)."""
    x, projected, lora_a, lora_b = ctx.saved_tensors
    grad_2d = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
    x_2d, projected_2d = x.reshape(-1, x.shape[-1]), projected.reshape(-1, projected.shape[-1])
    grad_projected = (grad_2d @ lora_b).mul_(ctx.scaling)  # [tokens, r]
    grad_b = (grad_2d.t() @ projected_2d).mul_(ctx.scaling)  # [out, r]
    grad_a = grad_projected.t() @ x_2d  # [r, in]
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad_projected @ lora_a).addmm_(grad_2d, dense_weight(ctx.base, x.dtype)).view(x.shape)
    return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None


class _UnreadLoraLinear(torch.autograd.Function):
    """y = base(x) + s·(x·Aᵀ)·Bᵀ, whose value is not read: forward computes x·Aᵀ only and returns zeros of y's
    shape; backward returns the real gradients for x, A and B (the base weight is frozen)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, base):
        projected = torch.nn.functional.linear(x, lora_a)
        ctx.save_for_backward(x, projected, lora_a, lora_b)
        ctx.scaling, ctx.base = scaling, base
        return x.new_zeros(()).expand(*x.shape[:-1], lora_b.shape[0])

    backward = staticmethod(lora_linear_backward)
