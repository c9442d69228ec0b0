"""Training on several GPUs: tokens/s of train_adapter with train.distributed none / ddp / fsdp on 1 and 2 GPUs.

    python benchmarks/train_multigpu.py --tokenizer-dir .device/smollm2 --out $OUT     # on a 2-GPU machine
    python benchmarks/train_multigpu.py --dry-run                                       # the plan, on any machine

One command, one GPU session. The model is a random-init Llama of the named shape (benchmarks/train_throughput.py's
SHAPES, default Llama-3-8B), built on GPU 0 and saved once in bf16; every run loads it through train_adapter in
4-bit (NF4, stored as bf16), LoRA r=16 on all linear layers. The build and each run are child processes
(`--build-model`, `--run-one`), so the parent never holds a CUDA context (memory on GPU 0) while others train. Data: synthetic QA documents (lognormal lengths,
median ~190 tokens, a third prompt), packed into rows of --seq tokens.

Runs: none on 1 GPU (the in-process baseline), then ddp and fsdp on 1 and 2 GPUs. Every run uses the same
per-GPU work: --rows packed rows per micro-batch, accumulation 1, so the global batch is rows x GPUs (weak
scaling, the usual way to state data-parallel speedup). tokens/s counts non-padding tokens over all processes
from the end of the first step to the last (leaves out compilation and warm-up). `speedup_vs_1gpu` divides by the
same strategy on 1 GPU; `speedup_vs_none` by the in-process baseline. FSDP runs without the fast path's model
surgery (loraflow/training/plan.py, fast_path_choice), so fsdp vs ddp on 1 GPU shows that cost.

Time: not measured yet; estimated 6-9 minutes on 2 H200s (8B build and save ~50 s, then 5 runs of ~1 min: launch,
4-bit load, 8 steps). `--strategies ddp --gpus 2` and the like split it over several calls (the model is kept in
--work between calls on the same machine).

NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): set here and again by loraflow.training.launch for the launched processes.
Writes train_multigpu_<gpu>_<model>.json under --out: one row per run with gpus, strategy, model, tokens_per_s,
speedup_vs_1gpu, command, date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

from benchmarks.train_throughput import SHAPES  # noqa: E402 - after the repo is on sys.path


def plan_runs(strategies: list[str], gpu_counts: list[int]) -> list[dict]:
    """(strategy, gpus) pairs in run order: the 1-GPU baselines before the runs they are divided by."""
    runs = [{"strategy": "none", "gpus": 1}] if "none" in strategies else []
    for strategy in (s for s in strategies if s != "none"):
        runs += [{"strategy": strategy, "gpus": gpus} for gpus in sorted(gpu_counts)]
    return runs


def train_config(strategy: str, gpus: int, args):
    from loraflow.config.train import TrainConfig

    distributed = {} if strategy == "none" else {"distributed": strategy, "num_processes": gpus}
    return TrainConfig(quantization="4bit", lora_r=16, lora_alpha=32, max_steps=args.steps, learning_rate=1e-4,
                       packing=True, pack_max_tokens=args.seq, pack_rows_per_micro_batch=args.rows,
                       gradient_accumulation=1, checkpoint_every=10_000, **distributed)


def model_config_dir(model: str, folder: Path) -> Path:
    """config.json of the random-init shape (all the launcher needs to plan FSDP wrapping)."""
    from transformers import LlamaConfig

    LlamaConfig(**SHAPES[model], bos_token_id=1, eos_token_id=2, pad_token_id=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


def build_model(model: str, folder: Path, tokenizer_dir: Path | None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").exists():
        raise SystemExit("train_adapter needs tokenizer files in the model folder: pass --tokenizer-dir (SmolLM2's)")
    config = LlamaConfig(**SHAPES[model], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device("cuda:0"):
        weights = LlamaForCausalLM(config).to(torch.bfloat16)
    weights.save_pretrained(folder)
    del weights
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():  # training reads token ids; the tokenizer only gives the pad id
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def qa_tokens(total_tokens: int, vocab: int, seed: int = 0):
    """Synthetic QA documents: lognormal lengths (median ~190, 24..2048 tokens), the first third a prompt (-100)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    records, seen = [], 0
    while seen < total_tokens:
        length = int(np.clip(rng.lognormal(np.log(190), 0.6), 24, 2048))
        ids = rng.integers(3, vocab, size=length).tolist()
        records.append({"id": f"q{len(records)}", "input_ids": ids, "attention_mask": [1] * length,
                        "labels": [-100] * (length // 3) + ids[length // 3:], "length": length, "split": "train"})
        seen += length
    return pd.DataFrame(records)


def run_one(args) -> dict:
    """Child: one (strategy, gpus) run through train_adapter; prints its row as the last line."""
    from tasks.train import train_adapter

    config = train_config(args.strategy, args.gpus, args)
    # Enough rows for every process at every step (plus slack for packing), so data never caps the work.
    tokens = qa_tokens(int(1.2 * args.rows * args.seq * args.gpus * (args.steps + 1)), SHAPES[args.model]["vocab_size"])
    out = Path(args.work) / f"run-{args.strategy}-{args.gpus}gpu"
    shutil.rmtree(out, ignore_errors=True)
    result = train_adapter(tokens, args.model_dir, config, out)
    metrics = json.loads(Path(result.metrics_path).read_text())
    import torch

    return {
        "gpu": torch.cuda.get_device_name(0),  # after training: a CUDA context here would sit on GPU 0 meanwhile
        "strategy": args.strategy, "gpus": args.gpus, "model": args.model,
        "tokens_per_s": result.tokens_per_second_after_first_step, "tokens_per_s_whole_run": result.tokens_per_second,
        "steps": result.global_step, "rows_per_micro_batch": result.rows_per_micro_batch, "row_tokens": args.seq,
        "global_batch_rows": args.rows * args.gpus, "final_loss": result.final_loss,
        "peak_memory_gib_rank0": round(result.peak_memory_bytes / 1024**3, 2), "seconds": result.seconds,
        "fsdp_memory_estimate": result.fsdp_memory,
        "optimizer": result.optimizer, "fast_path": result.speed_plan is not None,
        "distributed": metrics["distributed"], "library_versions": metrics["library_versions"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--strategies", default="none,ddp,fsdp")
    parser.add_argument("--gpus", default="1,2", help="GPU counts for ddp and fsdp (none always runs on 1)")
    parser.add_argument("--seq", type=int, default=4096, help="packed row length (train.pack_max_tokens)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch per GPU")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokenizer-dir", type=Path, default=os.environ.get("LORAFLOW_SMOLLM2_FILES"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "train-multigpu"))
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"))
    parser.add_argument("--dry-run", action="store_true", help="print the runs, configs and launch files; train nothing")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        args.gpus = int(args.gpus)
        print("ROW " + json.dumps(run_one(args)), flush=True)
        return
    if args.build_model:
        build_model(args.model, Path(args.model_dir), args.tokenizer_dir)
        return

    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - {"none", "ddp", "fsdp"}
    if unknown:
        raise SystemExit(f"--strategies: unknown {sorted(unknown)}; choose from none, ddp, fsdp")
    runs = plan_runs(strategies, [int(g) for g in args.gpus.split(",")])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(json.dumps(dry_run_plan(runs, args, work), indent=1))
        return

    import torch

    visible = torch.cuda.device_count()  # no CUDA context (NVML)
    if max(run["gpus"] for run in runs) > visible:
        raise SystemExit(f"the plan needs {max(run['gpus'] for run in runs)} GPUs, {visible} visible")
    model_dir = work / f"{args.model}-random"
    build = [sys.executable, __file__, "--build-model", "--model", args.model, "--model-dir", str(model_dir)]
    if args.tokenizer_dir:
        build += ["--tokenizer-dir", str(args.tokenizer_dir)]
    subprocess.run(build, cwd=REPO, check=True)
    rows = []
    for run in runs:
        command = [sys.executable, __file__, "--run-one", "--strategy", run["strategy"], "--gpus", str(run["gpus"]),
                   "--model", args.model, "--model-dir", str(model_dir), "--seq", str(args.seq), "--rows", str(args.rows),
                   "--steps", str(args.steps), "--work", str(work)]
        print(f"== {run['strategy']} on {run['gpus']} GPU(s)", flush=True)
        child = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        row_lines = [line for line in child.stdout.splitlines() if line.startswith("ROW ")]
        if child.returncode != 0 or not row_lines:
            rows.append({**run, "model": args.model, "error": f"exit {child.returncode}", "tokens_per_s": None})
            print(f"   failed (exit {child.returncode}); the child's log is above", flush=True)
            continue
        rows.append(json.loads(row_lines[-1][4:]))
        print(f"   {rows[-1]['tokens_per_s']} tokens/s", flush=True)

    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    command_line = " ".join(["python", "benchmarks/train_multigpu.py", *sys.argv[1:]])
    by_key = {(row["strategy"], row["gpus"]): row.get("tokens_per_s") for row in rows}
    for row in rows:
        one_gpu, baseline = by_key.get((row["strategy"], 1)), by_key.get(("none", 1))
        mine = row.get("tokens_per_s")
        row["speedup_vs_1gpu"] = round(mine / one_gpu, 3) if mine and one_gpu else None
        row["speedup_vs_none"] = round(mine / baseline, 3) if mine and baseline else None
        row.update(command=command_line, date=date)
    gpu = next((row["gpu"] for row in rows if row.get("gpu")), None)
    report = {"benchmark": "train_multigpu", "gpu": gpu, "gpus_visible": visible, "model": args.model,
              "seq": args.seq, "rows_per_gpu": args.rows, "steps": args.steps, "runs": rows,
              "command": command_line, "date": date}
    print(json.dumps(report, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_tag = (gpu or "unknown-gpu").lower().replace("nvidia ", "").split()[0]
    (out / f"train_multigpu_{gpu_tag}_{args.model}.json").write_text(json.dumps(report, indent=1))


def dry_run_plan(runs: list[dict], args, work: Path) -> dict:
    """What each run would be: its TrainConfig, and for ddp/fsdp the accelerate config and launch command."""
    from loraflow.training.launch import accelerate_config, child_environment, decoder_layer_classes, launch_command

    config_dir = model_config_dir(args.model, work / f"{args.model}-config")
    planned = []
    for run in runs:
        config = train_config(run["strategy"], run["gpus"], args)
        entry = {**run, "model": args.model, "global_batch_rows": args.rows * run["gpus"],
                 "train_config": config.model_dump(mode="json", include={
                     "distributed", "num_processes", "quantization", "pack_max_tokens", "pack_rows_per_micro_batch",
                     "gradient_accumulation", "max_steps"})}
        if run["strategy"] != "none":
            layers = decoder_layer_classes(config_dir) if run["strategy"] == "fsdp" else None
            entry["accelerate_config"] = accelerate_config(config, run["gpus"], precision="bf16", layer_classes=layers)
            entry["launch_command"] = launch_command(Path("<run>/launch/accelerate_config.yaml"),
                                                     Path("<run>/launch/job.json"), port=0)
        planned.append(entry)
    nvlink = {key: child_environment({})[key] for key in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}
    return {"model": args.model, "shape": SHAPES[args.model], "runs": planned, "launched_environment": nvlink}


if __name__ == "__main__":
    main()
