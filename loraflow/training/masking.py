"""Per-document causal attention masks for packed rows, built on the model's device from position ids.

Why our own mask instead of transformers' packed-sequence detection: transformers (5.17–5.23) infers documents
from restarting position ids only when no attention_mask is passed AND no KV cache exists. In training,
`use_cache` defaults to the config's True, so `LlamaModel.forward` creates a DynamicCache first and the
detection is silently skipped: documents attend to each other (the issue on training speed saw exactly this).
A 4-D mask (or a flex-attention BlockMask) passed as `attention_mask` is used as-is by every attention
implementation, so building it here keeps documents apart whatever the cache setting or version.
"""

from __future__ import annotations

import torch
from torch import nn

from loraflow.training.varlen import VARLEN, sequence_lengths

FLEX_BLOCK_SIZE = 128


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token: a new document starts wherever the position id is 0. Shape [B, T]."""
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    return (position_ids == 0).cumsum(dim=-1)


def document_causal_mask(position_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """The mask that lets each token see only earlier tokens of its own document.

    Returns what `attn_implementation` takes as a prepared mask:
      - "flex_attention": a `BlockMask` (block-sparse: blocks with no shared document are skipped entirely);
      - "sdpa": a boolean [B, 1, T, T] tensor (True = may attend);
      - "eager": an additive [B, 1, T, T] tensor in `dtype` (0 or the dtype's minimum).
    """
    docs = document_ids(position_ids)
    batch, length = docs.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

        return create_block_mask(
            same_document_causal, batch, None, length, length, device=docs.device, BLOCK_SIZE=FLEX_BLOCK_SIZE
        )
    positions = torch.arange(length, device=docs.device)
    allowed = (docs[:, :, None] == docs[:, None, :]) & (positions[:, None] >= positions[None, :])
    allowed = allowed[:, None, :, :]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=dtype, device=docs.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"document_causal_mask: attention implementation {attn_implementation!r} is not supported; "
        "use flex_attention (GPU), sdpa or eager"
    )


def _decoder(model: nn.Module) -> nn.Module:
    """The module that embeds tokens and runs the decoder layers (LlamaModel inside LlamaForCausalLM/peft)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    raise ValueError(
        f"enable_document_masking: found no decoder (a module with embed_tokens and layers) in {type(model).__name__}"
    )


def _document_mask_hook(module: nn.Module, args, kwargs):
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("attention_mask") is not None:
        return args, kwargs
    cache = kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        return args, kwargs  # decoding with a cache: not a packed training batch
    if position_ids.shape[-1] < 2:
        return args, kwargs
    implementation = module.config._attn_implementation
    if implementation.startswith("flash_attention") or implementation.startswith("paged"):
        return args, kwargs  # varlen kernels read the documents from the restarting position ids themselves
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    if implementation == VARLEN:  # no mask: every layer gets the documents' lengths (varlen.py)
        cu_seq_lens, longest = sequence_lengths(position_ids)
        kwargs.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)
        return args, kwargs
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if inputs is None and args:
        inputs = args[0]
    if inputs is not None and position_ids.shape[0] != inputs.shape[0]:
        position_ids = position_ids.expand(inputs.shape[0], -1)
    dtype = module.embed_tokens.weight.dtype
    if torch.is_autocast_enabled(position_ids.device.type):
        dtype = torch.get_autocast_dtype(position_ids.device.type)
    kwargs["attention_mask"] = document_causal_mask(position_ids, implementation, dtype=dtype)
    return args, kwargs


def enable_document_masking(model: nn.Module) -> nn.Module:
    """Make `model` build the per-document causal mask whenever it gets position_ids and no attention_mask.

    Idempotent. Calls with an attention_mask (ordinary padded batches, generation) are left untouched.
    """
    decoder = _decoder(model)
    if not getattr(decoder, "_loraflow_document_masking", False):
        decoder.register_forward_pre_hook(_document_mask_hook, with_kwargs=True)
        decoder._loraflow_document_masking = True
    return model
