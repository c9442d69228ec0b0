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


def _tensor_payload(name: str, array, quantization: str):
    """(array, raw dtype or None) for one tensor: norms/biases float32, Q8_0 where the row fits, else float16."""
    import gguf
    import numpy as np

    if array.ndim == 1:
        return array.astype(np.float32), None
    if quantization == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


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


def export_gguf(folder: str | Path, *, quantization: str = "f16", eos_ids: list[int] | None = None) -> Path:
    """Write `folder`/model-<quantization>.gguf from the merged safetensors folder (temp file, fsync, rename)."""
    import gguf
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "?")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))} models; this one is {model_type!r} "
            f"({', '.join(config.get('architectures') or [])}). Set publish.gguf: null to publish without it."
        )
    arch_name, permute = SUPPORTED_ARCHITECTURES[model_type]
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch_name)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    target = folder / gguf_file_name(quantization)
    with atomic_file(target) as partial:
        writer = gguf.GGUFWriter(partial, arch_name)
        writer.add_name(folder.name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(n_layers)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        writer.add_rope_freq_base(float(rope_theta))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantization == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        _add_tokenizer(writer, folder, model_type, eos_ids or [])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tied = config.get("tie_word_embeddings", False)
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for hf_name in handle.keys():
                    if tied and hf_name == "lm_head.weight":
                        continue  # llama.cpp reuses token_embd for a tied output
                    gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                    if gguf_name is None:
                        raise GGUFExportError(f"{shard.name}: tensor {hf_name} has no GGUF name for {arch_name}")
                    array = handle.get_tensor(hf_name).to(torch.float32).numpy()
                    if permute and hf_name.endswith("q_proj.weight"):
                        array = permute_for_rotary(array, n_head, n_head)
                    elif permute and hf_name.endswith("k_proj.weight"):
                        array = permute_for_rotary(array, n_head, n_head_kv)
                    payload, raw_dtype = _tensor_payload(gguf_name, array, quantization)
                    writer.add_tensor(gguf_name, payload, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target


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
