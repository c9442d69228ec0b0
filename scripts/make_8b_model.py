"""An 8B-shaped stand-in base model: Llama-3-8B's body, random weights, SmolLM2's tokenizer (issue 31).

    python scripts/make_8b_model.py --out /tmp/llama3-8b-smollm2 --tokenizer-dir .gpu_flow/pack/smollm2   # GPU machine
    python scripts/make_8b_model.py --out /tmp/tiny --layers 2 --hidden 256                               # CPU dry run

Nothing can be downloaded on the GPU machine, so the model is built from a LlamaConfig with Llama-3-8B's shape
(hidden 4096, MLP 14336, 32 heads, 8 key-value heads, RoPE base 500,000, untied embeddings) and the vocabulary of
SmolLM2's tokenizer (49,152 tokens: the data is tokenized with it, so ids and embedding rows agree), saved in
bfloat16 with the tokenizer, chat template and generation config beside it, so `model.base` can name the folder.
Random weights are fine for timing and memory: every stage does the same work on them, though a random model
never stops generating (evaluation runs every answer to its budget, the slow case) and learns little.
--layers / --hidden shrink it for the CPU dry run (heads of 64, MLP 3.5 x hidden, GQA 4:1 as in Llama-3).
Built once: an existing folder with a config.json is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)


def default_tokenizer_dir() -> Path:
    """SmolLM2's converted folder (loraflow.modeling.base_model.ensure_embedded_model), where the CPU machine keeps it."""
    from loraflow.modeling.base_model import ensure_embedded_model

    return Path(ensure_embedded_model())


def stand_in_config(tokenizer_dir: Path, layers: int = 32, hidden: int | None = None) -> dict:
    """LlamaConfig keyword arguments: Llama-3-8B's shape (or a narrower one), SmolLM2's vocabulary and special ids."""
    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text()) if (tokenizer_dir / "config.json").exists() else {}
    shape = dict(LLAMA3_8B, num_hidden_layers=layers)
    if hidden is not None and hidden != LLAMA3_8B["hidden_size"]:
        heads = max(1, hidden // 64)
        shape.update(hidden_size=hidden, intermediate_size=int(hidden * 3.5), num_attention_heads=heads,
                     num_key_value_heads=max(1, heads // 4))
    special = {key: tokenizer_config.get(key, default) for key, default in
               (("vocab_size", 49152), ("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 2))}
    return {**shape, **special}


def build(out: Path, tokenizer_dir: Path, layers: int = 32, hidden: int | None = None, seed: int = 0) -> Path:
    """Build, save (bfloat16 safetensors) and complete the folder with the tokenizer files; returns `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    config = LlamaConfig(**stand_in_config(tokenizer_dir, layers, hidden), dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    staging = out.with_name(f".{out.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="2GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, staging / name)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(staging)
    staging.rename(out)
    return out


def main() -> int:
    """Command line: build the stand-in once and print its folder, parameter count and time."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (left as it is if it already holds a model)")
    parser.add_argument("--tokenizer-dir", default=None, help="SmolLM2's tokenizer files (default: the embedded model's folder)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B; 2 for the CPU dry run)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 4096; e.g. 256 for the CPU dry run)")
    args = parser.parse_args()
    started = time.perf_counter()
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    out = build(Path(args.out), tokenizer_dir, args.layers, args.hidden)
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(json.dumps({"model_dir": str(out), "weights_bytes": weights, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
