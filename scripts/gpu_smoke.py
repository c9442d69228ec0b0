"""GPU run of tasks/train.py `train_adapter` itself: 4-bit QLoRA on a random-initialised Llama-3-8B-shaped model.

Nothing can be downloaded on the device machine, so the model is built from a LlamaConfig, saved once
and loaded back through the same path the pipeline uses (bitsandbytes NF4, double quant, bf16 compute and
storage, paged 8-bit AdamW, LoRA r=16 on all linear layers). With the defaults that is the packed fast path
(train.packing="auto": rows of 4,096 tokens, configure_model_for_speed, rows per micro-batch from the GPU's
memory); --unpacked runs the padded path with --batch examples per step. Data: synthetic QA documents
(lognormal lengths, median ~190 tokens, like benchmarks/train_throughput.py). Prints and writes
$OUT/gpu_smoke.json: tokens/s (non-padding; whole run and after the first step), peak memory, the SpeedPlan.
Run without Prefect:

    ../shared/gpu/make-carry bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic pydantic-core typing-inspection annotated-types
    export PYTHONPATH=$PWD/.gpu_site:$PWD LORAFLOW_SMOLLM2_FILES=$PWD/.device/smollm2
    python scripts/gpu_smoke.py --layers 32 --seq 4096 --steps 10
"""

import argparse
import datetime
import json
import sys
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


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def qa_tokens(total_tokens: int, vocab: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic QA documents: lognormal lengths (median ~190, 24..2048 tokens), the first third a prompt (-100)."""
    rng = np.random.default_rng(seed)
    records, seen = [], 0
    while seen < total_tokens:
        length = int(np.clip(rng.lognormal(np.log(190), 0.6), 24, 2048))
        ids = rng.integers(3, vocab, size=length).tolist()
        prompt = length // 3
        records.append({"id": f"q{len(records)}", "input_ids": ids, "attention_mask": [1] * length,
                        "labels": [-100] * prompt + ids[prompt:], "length": length, "split": "train"})
        seen += length
    return pd.DataFrame(records)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096, help="packed row length (train.pack_max_tokens)")
    parser.add_argument("--batch", type=int, default=4, help="examples per step with --unpacked")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="train.memory_budget_gb (default: the GPU's)")
    parser.add_argument("--unpacked", action="store_true", help="train.packing=false: padded batches of random lengths")
    parser.add_argument("--work", default="/tmp/gpu-smoke")
    args = parser.parse_args()

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter

    work = Path(args.work)
    tokenizer_dir = Path(os.environ["LORAFLOW_SMOLLM2_FILES"]) if os.environ.get("LORAFLOW_SMOLLM2_FILES") else None
    model_dir = build_model(work / "llama8b-random", args.layers, tokenizer_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise SystemExit("tokenizer files are needed in the model folder: set LORAFLOW_SMOLLM2_FILES")
    if args.unpacked:
        tokens = random_tokens(args.batch * args.steps, args.seq, 128256)
        config = TrainConfig(quantization="4bit", packing=False, lora_r=16, lora_alpha=32, max_steps=args.steps,
                             micro_batch_size=args.batch, learning_rate=1e-4, checkpoint_every=10_000)
    else:
        tokens = qa_tokens(8 * args.seq * args.steps, 128256)  # enough for 8 rows per step: the data never caps the choice
        config = TrainConfig(quantization="4bit", lora_r=16, lora_alpha=32, max_steps=args.steps, learning_rate=1e-4,
                             pack_max_tokens=args.seq, memory_budget_gb=args.memory_budget_gb, checkpoint_every=10_000)
    shutil.rmtree(work / "run", ignore_errors=True)
    result = train_adapter(tokens, model_dir, config, work / "run")
    metrics = json.loads(Path(result.metrics_path).read_text())
    curve = pd.read_parquet(result.loss_curve_path)
    report = {
        "gpu": torch.cuda.get_device_name(0), "model": "llama3-8b" if args.layers == 32 else f"llama3-8b-{args.layers}-layers",
        "layers": args.layers, "seq_len": args.seq, "path": "unpacked" if args.unpacked else "packed fast path (defaults)",
        "steps": result.global_step, "rows_per_micro_batch": result.rows_per_micro_batch,
        "tokens_per_second": result.tokens_per_second,
        "tokens_per_second_after_first_step": result.tokens_per_second_after_first_step,
        "peak_memory_gib": round(result.peak_memory_bytes / 1024**3, 2), "peak_memory_gb": round(result.peak_memory_bytes / 1e9, 2),
        "peak_memory_kind": result.peak_memory_kind, "tokens_seen": metrics["tokens_seen"],
        "trained_tokens_seen": metrics["trained_tokens_seen"], "packing_stats": metrics["packing_stats"],
        "loss_curve": [round(x, 4) for x in curve["loss"]], "step_elapsed_s": [round(x, 2) for x in curve["elapsed_s"]],
        "final_loss": result.final_loss, "seconds": result.seconds, "train_runtime_s": metrics["train_runtime_s"],
        "quantization": result.quantization, "optimizer": result.optimizer, "precision": result.precision,
        "speed_plan": result.speed_plan, "train_config": metrics["train_config"],
        "library_versions": {**metrics["library_versions"], "liger-kernel": _version("liger-kernel")},
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(report, indent=1))
    out = os.environ.get("OUT")
    if out:
        name = "gpu_smoke.json" if args.memory_budget_gb is None else f"gpu_smoke_budget{args.memory_budget_gb:g}.json"
        Path(out, name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
