"""GGUF export of a merged model folder, for llama.cpp / Ollama / LM Studio, and its logit check.

    path = export_gguf(model_folder, quantization="f16")     # model_folder/model-f16.gguf, written atomically
    max_diff = gguf_logit_difference(model_folder, path, verify_texts)

Written with the `gguf` package's GGUFWriter and its own tensor-name map (gguf.get_tensor_name_map), the way
llama.cpp's convert_hf_to_gguf.py writes Llama-family models: q/k projections permuted to llama.cpp's rotary
layout (not for Qwen2), 1-D norms kept in float32, tied embeddings written once. The tokenizer (BPE tokens,
token types, merges), the chat template and the EOS / end-of-turn ids come from the saved tokenizer files, so
the file stops where transformers stops. Supported: Llama (SmolLM2 is one), Mistral (written as llama, like
llama.cpp) and Qwen2; any other architecture raises GGUFExportError naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.runtime.atomic_files import atomic_file

# HF model_type -> (gguf architecture, permute q/k, tokenizer pre-tokenizer name llama.cpp uses for it)
SUPPORTED_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


class GGUFExportError(RuntimeError):
    """The model cannot be exported to GGUF (unsupported architecture or tokenizer)."""


def gguf_file_name(quantization: str) -> str:
    """The GGUF file's name inside the model folder."""
    return f"model-{quantization}.gguf"


def pre_tokenizer_name(model_type: str, vocab_size: int) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the known BPE tokenizers of the supported families."""
    if model_type == "qwen2":
        return "qwen2"
    if vocab_size == 49152:
        return "smollm"
    if vocab_size == 128256:
        return "llama-bpe"
    return "default"


def permute_for_rotary(weights, n_head: int, n_head_kv: int):
    """llama.cpp's q/k permutation (HF's half-split rotary -> interleaved), as in convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def payload_layout(shape: tuple[int, ...], quantization: str):
    """(numpy dtype, GGML raw type or None, stored shape, bytes) of one tensor, known before its data is read:
    1-D norms and biases float32, Q8_0 where the row is a whole number of 32-value blocks, else float16."""
    import gguf
    import numpy as np

    if len(shape) == 1:
        return np.float32, None, shape, 4 * int(np.prod(shape))
    if quantization == "q8_0" and shape[-1] % 32 == 0:
        raw = gguf.GGMLQuantizationType.Q8_0
        stored = gguf.quants.quant_shape_to_byte_shape(shape, raw)
        return np.uint8, raw, stored, int(np.prod(stored))
    return np.float16, None, shape, 2 * int(np.prod(shape))


def tensor_payload(tensor, quantization: str):
    """One torch tensor converted as payload_layout says: (payload numpy array, GGML raw type or None). float16
    straight from the stored dtype (bf16 -> f16 rounds the same value float32 would hold, without that copy)."""
    import gguf
    import numpy as np
    import torch

    dtype, raw, _, _ = payload_layout(tuple(tensor.shape), quantization)
    if raw is not None:
        return gguf.quants.quantize(tensor.to(torch.float32).numpy(), raw), raw
    return tensor.to(torch.float16 if dtype == np.float16 else torch.float32).numpy(), None


def _add_tokenizer(writer, folder: Path, model_type: str, eos_ids: list[int]) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "is_fast", False) or json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise GGUFExportError(f"{folder}: GGUF export supports BPE fast tokenizers only")
    vocab = tokenizer.get_vocab()
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for token_id in range(len(by_id)):
        token = by_id.get(token_id, f"[PAD{token_id}]")
        tokens.append(token)
        if token in added:
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if token_id in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(model_type, len(tokens)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    end_of_turn = [i for i in eos_ids if i != tokenizer.eos_token_id]
    if end_of_turn:  # llama.cpp stops on EOT as well as EOS
        writer.add_eot_token_id(end_of_turn[0])


def export_gguf(folder: str | Path, *, quantization: str = "f16", eos_ids: list[int] | None = None,
                buffered: bool = False) -> Path:
    """Write `folder`/model-<quantization>.gguf from the merged safetensors folder (written atomically: runtime.atomic_files).

    Streamed: every tensor's info is written from the safetensors headers first, then the tensors one at a time,
    so the host holds one tensor (in float32) at a time, not the model. `buffered=True` is the gguf package's own
    way (add_tensor, then write_tensors_to_file: every converted tensor held until the end; the same bytes), kept
    to measure against (benchmarks/gpu_flow.py) and as the reference in tests/test_gguf_export.py."""
    import gguf

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    arch_name, _ = supported_architecture(config)
    plan = tensor_plan(folder, config, arch_name)
    target = folder / gguf_file_name(quantization)
    with atomic_file(target) as partial:
        writer = gguf.GGUFWriter(partial, arch_name)
        add_metadata(writer, folder, config, quantization, eos_ids or [])
        write_tensors(writer, plan, planned_tensors(folder, config, plan), quantization, buffered)
        writer.close()
    return target


def write_tensors(writer, plan, tensors, quantization: str, buffered: bool) -> None:
    """Header, metadata and every tensor of `plan` (`tensors` yields them in its order): streamed, or through the
    gguf package's buffered add_tensor."""
    if buffered:
        for (gguf_name, _, _), array in zip(plan, tensors):
            payload, raw_dtype = tensor_payload(array, quantization)
            writer.add_tensor(gguf_name, payload, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        return
    for gguf_name, _, shape in plan:
        dtype, raw_dtype, stored, nbytes = payload_layout(shape, quantization)
        writer.add_tensor_info(gguf_name, stored, dtype, nbytes, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in tensors:
        writer.write_tensor_data(tensor_payload(array, quantization)[0])


def supported_architecture(config: dict) -> tuple[str, bool]:
    """(GGUF architecture name, permute q/k) of a config.json; GGUFExportError naming an unsupported model type."""
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))} models; this one is {model_type!r} "
            f"({', '.join(config.get('architectures') or [])}). Set publish.gguf: null to publish without it."
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def gguf_name_map(config: dict, arch_name: str):
    """The gguf package's HF -> GGUF tensor-name map for this architecture and depth."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    return gguf.get_tensor_name_map(arch, config["num_hidden_layers"])


def tensor_plan(folder: Path, config: dict, arch_name: str) -> list[tuple[str, tuple[str, str], tuple[int, ...]]]:
    """Every tensor to write, in file order: (GGUF name, (shard file, HF name), shape), read from the safetensors
    headers only; a tied lm_head is left out (llama.cpp reuses token_embd for it)."""
    from safetensors import safe_open

    name_map, tied, plan = gguf_name_map(config, arch_name), config.get("tie_word_embeddings", False), []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for hf_name in handle.keys():
                if tied and hf_name == "lm_head.weight":
                    continue
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise GGUFExportError(f"{shard.name}: tensor {hf_name} has no GGUF name for {arch_name}")
                plan.append((gguf_name, (shard.name, hf_name), tuple(handle.get_slice(hf_name).get_shape())))
    return plan


def planned_tensors(folder: Path, config: dict, plan):
    """The planned tensors one at a time (torch, stored dtype), q/k permuted for llama.cpp's rotary layout. One
    shard open at a time: safetensors maps its file, and the pages read stay in the process's RSS until it closes
    (all shards open held the whole model's 16 GB of an 8B in RSS, issue 31's first run)."""
    from itertools import groupby

    from safetensors import safe_open

    _, permute = supported_architecture(config)
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    for shard, items in groupby(plan, key=lambda item: item[1][0]):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for _, (_, hf_name), _ in items:
                tensor = handle.get_tensor(hf_name)
                if permute and hf_name.endswith("q_proj.weight"):
                    tensor = permute_for_rotary(tensor, n_head, n_head)
                elif permute and hf_name.endswith("k_proj.weight"):
                    tensor = permute_for_rotary(tensor, n_head, n_head_kv)
                yield tensor.contiguous()


def add_metadata(writer, folder: Path, config: dict, quantization: str, eos_ids: list[int]) -> None:
    """The hyperparameters llama.cpp reads, the file type and the tokenizer."""
    import gguf

    n_head = config["num_attention_heads"]
    writer.add_name(folder.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantization == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(writer, folder, config.get("model_type", "?"), eos_ids)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_logit_difference(folder: str | Path, gguf_path: str | Path, verify_texts: list[str]) -> float:
    """Max |logit difference| between the merged folder and its GGUF loaded back by transformers, real positions only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.publishing.merge import verification_batch

    folder, gguf_path = Path(folder), Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = verification_batch(tokenizer, verify_texts, "cpu")
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        difference = (merged(**inputs).logits - from_gguf(**inputs).logits).abs()
    return float(difference[inputs["attention_mask"].bool()].max())
