"""Gradient checkpointing that keeps each checkpointed layer's input in pinned CPU memory, not on the GPU.

A checkpointed decoder layer keeps only its input hidden state for backward (2·hidden bytes per token); over
32 layers of an 8B model at 8k tokens that is 2 GiB, at 32k tokens 8 GiB. `enable_offloaded_checkpointing`
sends that input to pinned host memory on a side CUDA stream during the forward pass (non-blocking, overlapped
with the next layers' compute) and brings it back in backward one layer ahead of its recompute, so the GPU holds
at most two of them. The idea is Unsloth's "unsloth" gradient checkpointing (unsloth_zoo); this is our own
implementation on transformers' per-layer hook (`GradientCheckpointingLayer._gradient_checkpointing_func`).

The layer runs under `torch.no_grad()` in forward and is recomputed with grad in backward, where
`torch.autograd.backward` accumulates the LoRA gradients directly (the reentrant pattern: one process, no
DDP/FSDP hooks inside the layer). Autocast and RNG state of the forward pass are restored for the recompute,
so dropout draws the same mask. The recompute runs inside `lean_recompute.recomputing()`, so the layer's last
linear skips the GEMM whose result backward does not read. With `to_host=False` the inputs stay on the GPU
(the same function, for budgets where offload does not pay): the recompute is lean either way.
"""

from __future__ import annotations

import torch

from loraflow.training.lean_recompute import mark_unread_outputs, recomputing
from loraflow.training.version_guard import require_verified


class _HostCopies:
    """One model's offloaded layer inputs: a side stream for the copies and the prefetch of the next one needed."""

    def __init__(self, device: torch.device, to_host: bool = True):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and to_host else None
        # key -> (the host tensor, its device copy, the event that says the copy is done)
        self.prefetched: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]] = {}

    def to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        """Start copying `hidden` to pinned host memory on the side stream; on CPU (or not to_host), keep it as is."""
        if self.stream is None:
            return hidden.detach()
        host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # hidden is written by the compute stream
        with torch.cuda.stream(self.stream):
            host.copy_(hidden.detach(), non_blocking=True)
        hidden.record_stream(self.stream)  # its memory is not reused until the copy has read it
        return host

    def prefetch(self, key: int, host: torch.Tensor) -> None:
        """Start bringing `host` back to the GPU on the side stream (once per host tensor)."""
        if self.stream is None or (key in self.prefetched and self.prefetched[key][0] is host):
            return
        compute = torch.cuda.current_stream(self.device)
        device_copy = torch.empty(host.shape, dtype=host.dtype, device=self.device)  # allocated on the compute stream
        self.stream.wait_stream(compute)  # the block may still be read by compute work queued before this point
        with torch.cuda.stream(self.stream):
            device_copy.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.prefetched[key] = (host, device_copy, ready)

    def to_device(self, key: int, host: torch.Tensor) -> torch.Tensor:
        """The layer input back on the GPU, ready for the compute stream."""
        if self.stream is None:
            return host
        self.prefetch(key, host)
        _, device_copy, ready = self.prefetched.pop(key)
        torch.cuda.current_stream(self.device).wait_event(ready)
        return device_copy


class _OffloadedCheckpoint(torch.autograd.Function):
    """forward: run the layer keeping no activations (its input already on its way to the host); backward: fetch
    the input, start fetching the one below, recompute, backpropagate through the recompute."""

    @staticmethod
    def forward(ctx, run_layer, copies: _HostCopies, key: int, host: torch.Tensor, prefetch_below, hidden, *args):
        ctx.run_layer, ctx.copies, ctx.key, ctx.host, ctx.prefetch_below, ctx.args = (
            run_layer, copies, key, host, prefetch_below, args)
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng = _rng_state(hidden.device)
        with torch.no_grad():
            outputs = run_layer(hidden, *args)
        return outputs if isinstance(outputs, torch.Tensor) else tuple(outputs)

    @staticmethod
    def backward(ctx, *output_grads):
        hidden = ctx.copies.to_device(ctx.key, ctx.host).detach().requires_grad_(True)
        ctx.host = None
        ctx.prefetch_below()  # the layer below is backpropagated next: its input comes back during this recompute
        device_type = hidden.device.type
        with torch.enable_grad(), _restored_rng(hidden.device, ctx.rng), torch.autocast(device_type, **ctx.autocast), \
                recomputing():
            outputs = ctx.run_layer(hidden, *ctx.args)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(out, grad) for out, grad in zip(outputs, output_grads)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, None, None, None, None, hidden.grad) + (None,) * len(ctx.args)


class _LayerCheckpoint:
    """The `_gradient_checkpointing_func` of one decoder layer: offloaded checkpointing, keyed by its index."""

    def __init__(self, copies: _HostCopies, index: int, registry: dict):
        self.copies, self.index, self.registry = copies, index, registry
        self.host: torch.Tensor | None = None  # this layer's input on the host, from the latest forward

    def __call__(self, run_layer, hidden, *args, **kwargs):
        if kwargs:  # transformers binds keyword arguments with partial(); anything else is unexpected
            raise TypeError(f"offloaded checkpointing got keyword arguments {sorted(kwargs)}")
        if not isinstance(hidden, torch.Tensor) or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise TypeError("offloaded checkpointing needs the hidden state first and no other input that needs grad")
        if not hidden.requires_grad:  # e.g. frozen embeddings: a leaf that needs grad still runs this backward
            hidden = hidden.detach().requires_grad_(True)
        self.host = self.copies.to_host(hidden)
        return _OffloadedCheckpoint.apply(run_layer, self.copies, self.index, self.host, self._prefetch_below,
                                          hidden, *args)

    def _prefetch_below(self) -> None:
        below = self.registry.get(self.index - 1)
        if below is not None and below.host is not None:
            self.copies.prefetch(below.index, below.host)


def enable_offloaded_checkpointing(layers, to_host: bool = True, lean: bool = True) -> int:
    """Make every layer of `layers` whose `gradient_checkpointing` is on checkpoint with this module's function
    (call after the per-layer checkpointing is set): its input offloaded to pinned CPU memory, or with
    `to_host=False` kept on the GPU; with `lean`, the recompute skips what backward does not read. Returns how
    many layers it took. Refuses a transformers newer than the release its per-layer hook was verified with."""
    require_verified("transformers", "Offloaded / lean checkpointing (loraflow.training.offload sets transformers' "
                     "GradientCheckpointingLayer._gradient_checkpointing_func)",
                     "train.gradient_checkpointing=false or train.packing=false (no fast path)")
    checkpointed = [(index, layer) for index, layer in enumerate(layers) if getattr(layer, "gradient_checkpointing", False)]
    if not checkpointed:
        return 0
    copies = _HostCopies(next(layers[0].parameters()).device, to_host=to_host)
    registry: dict[int, _LayerCheckpoint] = {}
    for index, layer in checkpointed:
        registry[index] = _LayerCheckpoint(copies, index, registry)
        layer._gradient_checkpointing_func = registry[index]
        if lean:
            mark_unread_outputs(layer)
    return len(checkpointed)


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    return {"enabled": enabled, "dtype": torch.get_autocast_dtype(device_type)}


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    return cpu, (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _restored_rng:
    """Run the recompute with the forward pass's RNG state, then put the current state back."""

    def __init__(self, device: torch.device, state):
        self.device, self.state = device, state

    def __enter__(self):
        self.saved = _rng_state(self.device)
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc):
        cpu, cuda = self.saved
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        return False
