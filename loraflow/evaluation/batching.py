"""How many prompts (or loss rows) evaluation puts in one batch: eval.batch_size, or "auto" from free GPU memory.

    generation_batch_size("auto", model, prompt_tokens=180, new_tokens=160)   # 256 on an 8B in an H100's free memory
    loss_batch_size("auto", model, row_tokens=512)

A generated prompt costs its key-value cache for prompt + budget tokens (the cache of every layer lives until the
batch ends), the prefill's largest activations for its prompt tokens (one layer at a time) and the last position's
logits; a loss row costs its full-length logits in float32 (the logits, their float copy and cross-entropy's
softmax) beside one layer's activations. "auto" fills half of the GPU's free memory (the rest is headroom for the
allocator and kernels' workspaces), capped where bigger batches stop paying; on CPU, where speed and not memory
bounds the batch, it is CPU_BATCH.
"""

from __future__ import annotations

MAX_GENERATION_BATCH = 256  # an 8B decodes ~memory-bound up to here; past it, padding and the slowest row cost more
MAX_LOSS_BATCH = 64
CPU_BATCH = 16
FREE_MEMORY_SHARE = 0.5


def kv_bytes_per_token(config, element_bytes: int) -> int:
    """Key-value cache bytes one token takes across all layers."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_bytes


def activation_bytes_per_token(config, element_bytes: int) -> int:
    """One layer's largest live activations per token (the MLP's gate, up and product, the residual and norms)."""
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    return (3 * intermediate + 4 * config.hidden_size) * element_bytes


def generation_prompt_bytes(config, element_bytes: int, prompt_tokens: int, new_tokens: int) -> int:
    """GPU bytes one prompt adds to a generation batch: its cache, its prefill activations, its last logits."""
    return ((prompt_tokens + new_tokens) * kv_bytes_per_token(config, element_bytes)
            + prompt_tokens * activation_bytes_per_token(config, element_bytes) + 2 * 4 * config.vocab_size)


def loss_row_bytes(config, element_bytes: int, row_tokens: int) -> int:
    """GPU bytes one validation row adds to a loss batch: float32 logits three times over, activations, cache."""
    return row_tokens * (3 * 4 * config.vocab_size + activation_bytes_per_token(config, element_bytes)
                         + kv_bytes_per_token(config, element_bytes))


def fitting_batch(requested, per_item_bytes: int, free_bytes: int | None, cap: int) -> int:
    """`requested` when it is a number; for "auto", how many items of `per_item_bytes` fill FREE_MEMORY_SHARE of
    `free_bytes` (at least 1, at most `cap`), or CPU_BATCH without a GPU (`free_bytes` None)."""
    if requested != "auto":
        return int(requested)
    if free_bytes is None:
        return CPU_BATCH
    return max(1, min(cap, int(free_bytes * FREE_MEMORY_SHARE) // max(1, per_item_bytes)))


def free_gpu_bytes(model) -> int | None:
    """Free memory of the model's GPU, counting what torch's allocator holds unused; None on CPU."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def generation_batch_size(requested, model, *, prompt_tokens: int, new_tokens: int) -> int:
    """Prompts per generation batch for eval.batch_size `requested` (a number, or "auto")."""
    element_bytes = next(model.parameters()).element_size()
    per_prompt = generation_prompt_bytes(model.config, element_bytes, prompt_tokens, new_tokens)
    return fitting_batch(requested, per_prompt, free_gpu_bytes(model) if requested == "auto" else None, MAX_GENERATION_BATCH)


def loss_batch_size(requested, model, *, row_tokens: int) -> int:
    """Rows per validation-loss batch for eval.batch_size `requested` (a number, or "auto")."""
    element_bytes = next(model.parameters()).element_size()
    per_row = loss_row_bytes(model.config, element_bytes, row_tokens)
    return fitting_batch(requested, per_row, free_gpu_bytes(model) if requested == "auto" else None, MAX_LOSS_BATCH)
