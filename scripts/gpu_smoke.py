"""GPU smoke run of tasks/train.py: 4-bit QLoRA on a random-initialised Llama-3-8B-shaped model.

Nothing can be downloaded on the device machine, so the model is built from a LlamaConfig, saved once
and loaded back through the same path the pipeline uses (bitsandbytes NF4, double quant, bf16 compute and
storage, paged 8-bit AdamW, gradient checkpointing, LoRA r=16 on all linear layers). Prints tokens/s and
peak memory. Run without Prefect:

    export PYTHONPATH=$PWD/.gpu_site:$PWD LORAFLOW_SMOLLM2_FILES=$PWD/.device/smollm2
    python scripts/gpu_smoke.py --layers 32 --seq 2048 --batch 4 --steps 12
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def build_model(folder: Path, layers: int, tokenizer_dir: Path | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    started = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    if tokenizer_dir is not None:  # only for completeness: training reads token ids, not text
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, folder / name)
    print(f"built and saved {layers}-layer model in {time.perf_counter() - started:.0f} s")
    return folder


def random_tokens(rows: int, seq: int, vocab: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        length = int(rng.integers(seq // 2, seq + 1))
        ids = rng.integers(3, vocab, size=length).tolist()
        prompt = length // 3
        records.append({"id": f"r{i}", "input_ids": ids, "attention_mask": [1] * length,
                        "labels": [-100] * prompt + ids[prompt:], "length": length, "split": "train"})
    return pd.DataFrame(records)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", default="/tmp/gpu-smoke")
    args = parser.parse_args()

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter

    work = Path(args.work)
    tokenizer_dir = Path(os.environ["LORAFLOW_SMOLLM2_FILES"]) if os.environ.get("LORAFLOW_SMOLLM2_FILES") else None
    model_dir = build_model(work / "llama8b-random", args.layers, tokenizer_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise SystemExit("tokenizer files are needed in the model folder: set LORAFLOW_SMOLLM2_FILES")
    tokens = random_tokens(args.batch * args.steps, args.seq, 128256)
    config = TrainConfig(quantization="4bit", lora_r=16, lora_alpha=32, max_steps=args.steps, micro_batch_size=args.batch,
                         learning_rate=1e-4, checkpoint_every=10_000)
    shutil.rmtree(work / "run", ignore_errors=True)
    result = train_adapter(tokens, model_dir, config, work / "run")
    report = {
        "gpu": torch.cuda.get_device_name(0), "layers": args.layers, "seq": args.seq, "micro_batch": args.batch,
        "steps": result.global_step, "tokens_per_second": result.tokens_per_second,
        "peak_memory_gb": round(result.peak_memory_bytes / 1e9, 2), "final_loss": result.final_loss,
        "seconds": result.seconds, "quantization": result.quantization, "optimizer": result.optimizer,
    }
    print(json.dumps(report, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_smoke.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
