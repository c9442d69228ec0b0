"""The GGUF's logit check on the merged model already in memory: its weights swapped for the file's, one at a time.

    max_diff = gguf_logit_difference_in_place(merged_model, gguf_path, inputs)   # publish, after saving

The reload check (loraflow.publishing.gguf.gguf_logit_difference) loads the merged folder and the GGUF through
transformers, both in float32 on the CPU: for an 8B that is two 32 GB copies on the host and minutes of
dequantizing (issue 31). Here publish's merged model, wherever it lives, gives the reference logits; then each GGUF
tensor is read from the file (plain reads, not a memory map, so the host holds one tensor at a time), dequantized,
its q/k rotary permutation undone, and copied over the parameter it came from; the logits are taken again. Every
parameter must be covered by a tensor of the file, and the file's hyperparameters must be the config's. The
merged model holds the GGUF's weights afterwards: call this last.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.publishing.gguf import GGUFExportError, gguf_name_map, supported_architecture

# config.json key -> GGUF key suffix (after "<arch>.") that must hold the same value.
CHECKED_HYPERPARAMETERS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
                           "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count"}


def unpermute_for_rotary(weights, n_head: int, n_head_kv: int):
    """The inverse of loraflow.publishing.gguf.permute_for_rotary (llama.cpp's interleaved rotary -> HF's halves)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def read_tensor(handle, tensor):
    """One GGUF tensor as a torch tensor in HF's (rows, columns) order, read with plain file reads: float32 and
    float16 as stored (converted where they are copied to), quantized types dequantized to float32."""
    import gguf
    import numpy as np
    import torch

    handle.seek(tensor.data_offset)
    raw = np.fromfile(handle, dtype=np.uint8, count=tensor.n_bytes)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(raw.view(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16).reshape(shape))
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    rows = raw.reshape(-1, shape[-1] // block_size * type_size)
    return torch.from_numpy(gguf.quants.dequantize(rows, kind).reshape(shape).astype(np.float32))


def hyperparameter_problems(reader, config: dict, arch_name: str) -> list[str]:
    """Where the GGUF's header disagrees with config.json (empty when it agrees)."""
    problems = []
    for config_key, suffix in CHECKED_HYPERPARAMETERS.items():
        field = reader.fields.get(f"{arch_name}.{suffix}")
        found = field.contents() if field is not None else None
        if found != config[config_key]:
            problems.append(f"{arch_name}.{suffix} = {found}, config.json {config_key} = {config[config_key]}")
    kv_field = reader.fields.get(f"{arch_name}.attention.head_count_kv")
    expected_kv = config.get("num_key_value_heads", config["num_attention_heads"])
    if kv_field is None or kv_field.contents() != expected_kv:
        problems.append(f"{arch_name}.attention.head_count_kv != config.json num_key_value_heads = {expected_kv}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) > config["vocab_size"]:
        problems.append(f"tokenizer.ggml.tokens: {len(tokens.data) if tokens else 'none'} for a vocabulary of {config['vocab_size']}")
    return problems


def load_gguf_weights(model, gguf_path: Path, config: dict) -> int:
    """Copy every tensor of the GGUF over the model parameter it was written from; returns how many were copied.
    GGUFExportError when a tensor has no parameter, or a parameter no tensor (a tied lm_head shares token_embd)."""
    import gguf
    import torch

    arch_name, permute = supported_architecture(config)
    name_map = gguf_name_map(config, arch_name)
    parameters = dict(model.named_parameters())
    by_gguf_name = {name_map.get_name(name, try_suffixes=(".weight", ".bias")): name for name in parameters}
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    reader = gguf.GGUFReader(gguf_path)
    problems = hyperparameter_problems(reader, config, arch_name)
    if problems:
        raise GGUFExportError(f"{gguf_path.name}: header differs from config.json: {'; '.join(problems)}")
    copied = set()
    with open(gguf_path, "rb") as handle:
        for tensor in reader.tensors:
            hf_name = by_gguf_name.get(tensor.name)
            if hf_name is None:
                raise GGUFExportError(f"{gguf_path.name}: tensor {tensor.name} matches no parameter of the merged model")
            array = read_tensor(handle, tensor)
            if permute and hf_name.endswith("q_proj.weight"):
                array = unpermute_for_rotary(array, n_head, n_head)
            elif permute and hf_name.endswith("k_proj.weight"):
                array = unpermute_for_rotary(array, n_head, n_head_kv)
            with torch.no_grad():
                parameter = parameters[hf_name]  # to the device in the file's dtype, then converted there
                parameter.copy_(array.to(parameter.device, non_blocking=False).to(parameter.dtype))
            copied.add(hf_name)
    missing = [name for name, p in parameters.items() if name not in copied
               and not (config.get("tie_word_embeddings") and name == "lm_head.weight")]
    if missing:
        raise GGUFExportError(f"{gguf_path.name}: no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return len(copied)


def gguf_logit_difference_in_place(model, gguf_path: str | Path, inputs: dict) -> float:
    """Max |logit difference| over real positions between `model` (the merged model, as saved) and the same model
    with the GGUF's weights; the model keeps the GGUF's weights afterwards."""
    import torch

    gguf_path = Path(gguf_path)
    config = json.loads((gguf_path.parent / "config.json").read_text())
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        model.float()  # bf16 matmuls crawl on CPUs without bf16 units; float32 holds bf16 and f16 values exactly
    with torch.inference_mode():
        reference = model(**inputs).logits.float()
    load_gguf_weights(model, gguf_path, config)
    with torch.inference_mode():
        difference = (model(**inputs).logits.float() - reference).abs()
    return float(difference[inputs["attention_mask"].bool()].max())
