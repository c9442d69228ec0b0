"""Packed documents through torch's variable-length flash attention (`torch.nn.attention.varlen`), on CUDA.

A packed micro-batch is flattened to one stream of tokens and every document is its own sequence of the flash
kernel (cumulative lengths from the restarting position ids), so no work is spent between documents and no mask
is built or read: for ~200-token documents flex attention's 128-token blocks compute and mask a block pair for
every partial overlap. The decoder's pre-hook (`masking.py`) computes the lengths once per forward and passes
them to every layer as `cu_seq_lens_q` / `max_length_q` (the keyword names transformers uses for flash
attention); the attention function registered here reads them. Without them (generation, unpacked batches) it
falls back to transformers' SDPA attention; on a CPU it runs each document through SDPA (for tests).
"""

from __future__ import annotations

import inspect

import torch

VARLEN = "loraflow_varlen"


def varlen_available() -> bool:
    """Whether torch has `torch.nn.attention.varlen.varlen_attn` and a CUDA device to run it on."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def sequence_lengths(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative document starts as int32 [documents + 1], longest document) of a [B, T] batch flattened to B·T
    tokens; a document starts wherever the position id is 0 (and at every row's start)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    ends = torch.cat([starts, starts.new_full((1,), flat.numel())])
    longest = int((ends[1:] - ends[:-1]).max())
    return ends.to(torch.int32), longest


def _call_options() -> dict:
    """Keyword arguments for a causal call of this torch's varlen_attn (its signature changed across releases)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


_OPTIONS: dict | None = None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] -> ([B, T, H, D], None)."""
    global _OPTIONS
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError(f"{VARLEN}: attention dropout is not supported (got {dropout}); use flex_attention")
    batch, heads, length, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    if not query.is_cuda:
        return per_document_attention(q, k, v, cu_seq_lens, scaling).view(batch, length, heads, head_dim), None
    from torch.nn.attention.varlen import varlen_attn

    if _OPTIONS is None:
        _OPTIONS = _call_options()
    longest = kwargs["max_length_q"]
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, scale=scaling, **_OPTIONS)
    return out.view(batch, length, heads, head_dim), None


def per_document_attention(q, k, v, cu_seq_lens, scaling=None) -> torch.Tensor:
    """The same computation one document at a time through SDPA (CPU, and the reference in tests):
    q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd = q[start:end].transpose(0, 1)
        kd = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vd = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, scale=scaling).transpose(0, 1)
    return out


def register_varlen_attention() -> str:
    """Register the attention function with transformers (idempotent); returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN
