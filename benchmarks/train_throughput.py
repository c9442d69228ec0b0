"""QLoRA training throughput: the recipes' way vs loraflow's path (vs Unsloth), same GPU, data and model shape.

    python benchmarks/train_throughput.py --model llama3-8b --out $OUT          # on the GPU machine
    python benchmarks/train_throughput.py --model tiny --device cpu --steps 2   # CPU smoke test

One command, one GPU session. Each recipe runs in its own child process, one after another: Liger and Unsloth
patch transformers' modules globally on import, so recipes sharing a process would measure each other's
kernels. The parent does no CUDA work; it builds the data, collects each child's JSON line, prints the table
and writes `train_throughput_<gpu>_<model>.json` under --out.

The model is a random-init Llama of the named shape, saved once in bf16 and reloaded in 4-bit (NF4, double
quantization, bf16 compute) by each recipe. Data: synthetic QA-like examples, log-normal lengths with median
≈ 190 tokens, the first ~40 % of each a prompt (label -100). Throughput counts non-padding tokens per second
of training steps (forward, backward, paged AdamW 8-bit step), after warm-up steps that absorb compilation.

Recipes:
  baseline  micro-batch 1, prepare_model_for_kbit_training (fp32 norms/embeddings/head, reentrant
            checkpointing), LoRA r=16 on q,k,v,o, SDPA, padded to a multiple of 8.
  loraflow  loraflow.training: FFD-packed rows of --seq-len tokens with per-document masks (flex attention),
            LoRA r=16 on all linear layers, configure_model_for_speed (Liger, bf16 frozen params,
            checkpointing only as many layers as the memory budget needs).
  unsloth   FastLanguageModel + its gradient checkpointing, LoRA r=16 on all linear layers, the same packed
            rows with restarting position ids (whether it keeps documents apart is measured, not assumed).
Every recipe also reports `isolation_max_rel_diff`: how far a packed second document's logits are from the
same document run alone (≈ bf16 noise when documents are kept apart; large when they attend to each other).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # name: LlamaConfig fields (random init; shapes of the public models)
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama3-8b-49k": dict(
        vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, head_dim=64,
    ),
    "tiny": dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    ),
}
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- data ----------------------------------------------------------------------------------------


def synthetic_examples(count: int, seq_len: int, vocab: int, seed: int = 0, median: int = 190) -> list[dict]:
    """QA-like examples: log-normal lengths (median `median`, sigma 0.6), prompt ≈ 40 % (label -100)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        n = int(min(seq_len, max(16, round(rng.lognormvariate(math.log(median), 0.6)))))
        prompt = max(1, int(n * rng.uniform(0.3, 0.5)))
        ids = [rng.randrange(3, min(vocab, 32000)) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


# ---- child: one recipe ---------------------------------------------------------------------------


def _peak_gb(torch) -> float:
    return torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else float("nan")


def _bnb_config(torch):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _isolation(torch, model, device, vocab: int) -> dict:
    """How far a packed second document's logits are from the document run alone (max |diff| / max |logit|).

    `noise_floor` is the same measure between the document alone and the document followed by padding (which
    causal attention never lets it see): the difference bf16 kernels of other shapes make by themselves.
    """
    rng = random.Random(123)
    first = [rng.randrange(3, min(vocab, 32000)) for _ in range(300)]
    second = [rng.randrange(3, min(vocab, 32000)) for _ in range(200)]
    pad = (-(len(first) + len(second))) % 128
    ids = torch.tensor([first + second + [0] * pad], device=device)
    pos = torch.tensor([list(range(300)) + list(range(200)) + list(range(pad))], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        packed = model(input_ids=ids, position_ids=pos).logits[0, 300:500].float()
        alone_ids = torch.tensor([second], device=device)
        alone = model(input_ids=alone_ids, position_ids=torch.arange(200, device=device)[None]).logits[0].float()
        padded_ids = torch.tensor([second + [0] * 56], device=device)
        padded_pos = torch.tensor([list(range(200)) + list(range(56))], device=device)
        padded = model(input_ids=padded_ids, position_ids=padded_pos).logits[0, :200].float()
    model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    return {"packed": float((packed - alone).abs().max() / scale), "noise_floor": float((padded - alone).abs().max() / scale)}


def run_baseline(args, examples, log) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    kwargs = {"dtype": torch.bfloat16}
    if device.type == "cuda":
        kwargs.update(quantization_config=_bnb_config(torch), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    steps = args.steps * 8  # micro-batch 1: short steps, so more of them for a stable number
    batches = []
    for example in examples[: steps + args.warmup]:
        n = len(example["input_ids"])
        width = -(-n // 8) * 8
        ids = torch.zeros((1, width), dtype=torch.long)
        mask = torch.zeros((1, width), dtype=torch.long)
        labels = torch.full((1, width), -100, dtype=torch.long)
        ids[0, :n] = torch.tensor(example["input_ids"])
        mask[0, :n] = 1
        labels[0, :n] = torch.tensor(example["labels"])
        batches.append(({"input_ids": ids, "attention_mask": mask, "labels": labels}, n))
    isolation = _isolation(torch, model, device, args.vocab)
    result = _train_loop_counted(torch, model, batches, steps, args.warmup, device, log)
    return {**result, "isolation_max_rel_diff": isolation, "document_masking": False, "micro_batch": "1 example"}


def loraflow_optimizer_class(args):
    """The product's optimizer for loraflow's recipes: bitsandbytes' paged 8-bit AdamW with loraflow's step
    (one device sync per step), or bitsandbytes' own step with --bnb-stock-step (the lever's A/B)."""
    import bitsandbytes as bnb

    from loraflow.training.optimizer import synchronising_once

    stock = bnb.optim.PagedAdamW8bit
    return stock if getattr(args, "bnb_stock_step", False) else synchronising_once(stock)


def _train_loop_counted(torch, model, batches, steps, warmup, device, log, optimizer_class=None) -> dict:
    """Timed steps with paged 8-bit AdamW (bitsandbytes' class unless `optimizer_class` is given) on CUDA."""
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = optimizer_class or bnb.optim.PagedAdamW8bit
    optimizer = optimizer_class(params, lr=2e-4) if device.type == "cuda" else torch.optim.AdamW(params, lr=2e-4)
    model.train()
    losses, times, tokens, label_tokens = [], [], 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        cpu_batch, real_tokens = batches[step % len(batches)]
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        loss_value = float(loss.detach())  # a sync point, outside the timed region
        if not math.isfinite(loss_value):
            raise RuntimeError(f"non-finite loss at step {step}")
        if step >= warmup:
            times.append(elapsed)
            tokens += real_tokens
            label_tokens += int(cpu_batch["labels"].ne(-100).sum())
            losses.append(loss_value)
        if step < warmup + 3 or step == warmup + steps - 1:
            log(f"  step {step}: {elapsed:.3f}s loss {loss_value:.4f}")
    total = sum(times)
    return {
        "tokens_per_s": tokens / total,
        "label_tokens_per_s": label_tokens / total,
        "step_s_median": statistics.median(times),
        "tokens_per_step": tokens / len(times),
        "steps": steps,
        "warmup_steps": warmup,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_gb": _peak_gb(torch),
        "reserved_gb": torch.cuda.max_memory_reserved() / 1024**3 if device.type == "cuda" else float("nan"),
    }


def _packed_batches(torch, examples, args, pad_id=0):
    from loraflow.training import PackedCollator, pack_examples

    rows = pack_examples(examples, max_tokens=args.seq_len)
    collator = PackedCollator(pad_token_id=pad_id, pad_to_multiple_of=128)
    batches = []
    for start in range(0, len(rows) - args.rows_per_step + 1, args.rows_per_step):
        group = rows[start : start + args.rows_per_step]
        batches.append((collator(group), sum(len(r["input_ids"]) for r in group)))
        if len(batches) >= args.steps + args.warmup:
            break
    return batches


def run_loraflow(args, examples, log) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if args.no_lora_autograd:  # the lever's A/B: LoRA layers keep the fused forward, autograd does their backward
        import loraflow.training.lora_fast as lora_fast

        lora_fast.handled_base = lambda base: False

    from loraflow.config.train import TrainConfig
    from loraflow.training import configure_model_for_speed

    device = torch.device(args.device)
    kwargs = {"dtype": torch.bfloat16}
    if device.type == "cuda":
        kwargs.update(quantization_config=_bnb_config(torch), device_map={"": 0})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    train_config = TrainConfig(gradient_checkpointing=args.checkpointing != "none")
    tokens_per_micro_batch = args.rows_per_step * args.seq_len
    plan = configure_model_for_speed(
        model, train_config, memory_budget_gb=args.memory_budget_gb,
        tokens_per_micro_batch=None if args.checkpointing == "all" else tokens_per_micro_batch,
        attn_implementation=args.attn, use_liger=not args.no_liger, fuse_lora=not args.no_fuse_lora,
    )
    log(f"  plan: {plan.as_dict()}")
    batches = _packed_batches(torch, examples, args)
    isolation = _isolation(torch, model, device, args.vocab)
    optimizer_class = loraflow_optimizer_class(args) if device.type == "cuda" else None
    result = _train_loop_counted(torch, model, batches, args.steps, args.warmup, device, log, optimizer_class=optimizer_class)
    if args.profile and device.type == "cuda":
        result["profile"] = _profile_step(torch, model, batches[0][0], device, log, optimizer_class)
    return {**result, "isolation_max_rel_diff": isolation, "document_masking": True, "plan": plan.as_dict(),
            "micro_batch": f"{args.rows_per_step} packed rows of {args.seq_len}"}


def _profile_step(torch, model, cpu_batch, device, log, optimizer_class) -> dict:
    """One whole step (forward, backward, optimizer) under torch.profiler, after one unprofiled step.

    Reports the step's wall time against the GPU's busy time (the union of kernel intervals: the rest is the GPU
    waiting on the host), the optimizer's share, CUDA time per kernel family and the host ops with the most self time.
    """
    from torch.profiler import ProfilerActivity, profile

    batch = {k: v.to(device) for k, v in cpu_batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, lr=2e-4)

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward_backward(), optimizer_step()  # the optimizer's state exists from here on
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        forward_backward()
        torch.cuda.synchronize()
        middle = time.perf_counter()
        optimizer_step()
        torch.cuda.synchronize()
        end = time.perf_counter()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, reach = 0.0, float("-inf")
    for begin, finish in kernels:  # union of intervals: overlapping streams count once
        if finish > reach:
            busy_us += finish - max(begin, reach)
            reach = finish
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) or 1
    by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    summary = {
        "wall_ms": round((end - start) * 1000, 2),
        "forward_backward_wall_ms": round((middle - start) * 1000, 2),
        "optimizer_wall_ms": round((end - middle) * 1000, 2),
        "gpu_busy_ms": round(busy_us / 1000, 2),
        "kernel_launches": len(kernels),
        "top_kernels": [{"kernel": e.key[:120], "ms": round(e.self_device_time_total / 1000, 2),
                         "share": round(e.self_device_time_total / device_total, 4), "calls": e.count}
                        for e in by_device],
        "top_host_ops": [{"op": e.key[:120], "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count}
                         for e in by_host],
    }
    log(f"  profile: step {summary['wall_ms']} ms wall (forward+backward {summary['forward_backward_wall_ms']}, "
        f"optimizer {summary['optimizer_wall_ms']}), GPU busy {summary['gpu_busy_ms']} ms, "
        f"{len(kernels)} kernels")
    for row in summary["top_kernels"]:
        log(f"    {row['share']:6.1%} {row['ms']:9.2f} ms {row['calls']:6d}x  {row['kernel']}")
    log("  host ops with the most self time:")
    for row in summary["top_host_ops"]:
        log(f"    {row['self_cpu_ms']:9.2f} ms {row['calls']:6d}x  {row['op']}")
    return summary


def run_unsloth(args, examples, log) -> dict:
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must come before transformers: it patches it on import)
    import torch
    from unsloth import FastLanguageModel

    device = torch.device("cuda")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=args.seq_len, dtype=torch.bfloat16, load_in_4bit=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=LORA_ALL, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0, max_seq_length=args.seq_len,
    )
    FastLanguageModel.for_training(model)
    batches = _packed_batches(torch, examples, args)
    try:
        isolation = _isolation(torch, model, device, args.vocab)
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the throughput still counts
        isolation = {"packed": f"failed: {type(error).__name__}: {error}"[:300]}
    FastLanguageModel.for_training(model)
    result = _train_loop_counted(torch, model, batches, args.steps, args.warmup, device, log)
    return {**result, "isolation_max_rel_diff": isolation, "document_masking": "see isolation_max_rel_diff",
            "micro_batch": f"{args.rows_per_step} packed rows of {args.seq_len}",
            "unsloth_version": getattr(unsloth, "__version__", "?")}


def make_model(args, log) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = Path(args.model_dir)
    if (target / "config.json").exists():
        return
    config = LlamaConfig(**SHAPES[args.model], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    if args.tokenizer_dir:
        AutoTokenizer.from_pretrained(args.tokenizer_dir).save_pretrained(target)
    log(f"  built and saved {args.model} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) "
        f"in {time.perf_counter() - start:.1f}s")


def child_main(args) -> None:
    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.child == "make":
        make_model(args, log)
        return
    import json as _json

    examples = synthetic_examples(args.examples, args.seq_len, args.vocab, seed=args.seed)
    runner = {"baseline": run_baseline, "loraflow": run_loraflow, "unsloth": run_unsloth}[args.child]
    result = runner(args, examples, log)
    print("RESULT " + _json.dumps(result), flush=True)


# ---- parent --------------------------------------------------------------------------------------


def gpu_name() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "cpu"
    return name.replace("NVIDIA ", "").split()[0].lower()  # "H100 80GB HBM3" -> "h100"


def run_command(command: list[str], timeout: float) -> tuple[str, str, int | str]:
    """Run a child process; its stdout, stderr and exit code ("timeout" when it ran past `timeout` seconds)."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        return proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
        return stdout, stderr, "timeout"


def run_child(args, recipe: str, extra: list[str], log_file) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", recipe, "--model", args.model,
               "--model-dir", args.model_dir, "--device", args.device, "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
               "--seed", str(args.seed), "--vocab", str(args.vocab)]
    if args.tokenizer_dir:
        command += ["--tokenizer-dir", args.tokenizer_dir]
    command += extra
    if recipe == "make":
        command[command.index("--child") + 1] = "make"
    start = time.perf_counter()
    print(f"[{recipe} {' '.join(extra)}] starting", flush=True)
    stdout, stderr, code = run_command(command, args.child_timeout)
    log_file.write(f"==== {recipe} {extra} (rc {code}, {time.perf_counter() - start:.0f}s)\n{stderr}\n{stdout}\n")
    log_file.flush()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = round(time.perf_counter() - start, 1)
            print(f"[{recipe}] {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_gb']:.1f} GB, "
                  f"isolation {result['isolation_max_rel_diff']}", flush=True)
            return result
    if recipe == "make" and code == 0:
        print(stderr.strip().splitlines()[-1] if stderr.strip() else "[make] model folder exists", flush=True)
        return None
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    print(f"[{recipe}] FAILED (rc {code}):\n{tail}", flush=True)
    return None


def parent_main(args, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model_dir = args.model_dir or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"loraflow-bench-{args.model}")
    args.vocab = SHAPES[args.model]["vocab_size"]
    gpu = gpu_name() if args.device == "cuda" else "cpu"
    with open(out / f"train_throughput_{gpu}_{args.model}.log", "a") as log_file:
        run_child(args, "make", [], log_file)
        results: dict[str, dict | None] = {}
        for recipe in args.recipes.split(","):
            if recipe == "loraflow":
                for variant in args.loraflow_variants.split(";"):
                    extra = shlex.split(variant)
                    results[f"loraflow {variant}".strip()] = run_child(args, "loraflow", extra, log_file)
            elif recipe == "unsloth":
                for variant in args.unsloth_variants.split(";"):
                    extra = shlex.split(variant)
                    results[f"unsloth {variant}".strip()] = run_child(args, "unsloth", extra, log_file)
            else:
                results[recipe] = run_child(args, recipe, [], log_file)

    baseline = results.get("baseline")
    loraflow_runs = {k: v for k, v in results.items() if k.startswith("loraflow") and v}
    best_key = max(loraflow_runs, key=lambda k: loraflow_runs[k]["tokens_per_s"]) if loraflow_runs else None
    best = loraflow_runs.get(best_key) if best_key else None
    unsloth_runs = {k: v for k, v in results.items() if k.startswith("unsloth") and v}
    unsloth_key = max(unsloth_runs, key=lambda k: unsloth_runs[k]["tokens_per_s"]) if unsloth_runs else None
    unsloth = unsloth_runs.get(unsloth_key) if unsloth_key else None
    record = {
        "gpu": gpu,
        "model": args.model,
        "seq_len": args.seq_len,
        "baseline_tokens_per_s": baseline and round(baseline["tokens_per_s"], 1),
        "loraflow_tokens_per_s": best and round(best["tokens_per_s"], 1),
        "unsloth_tokens_per_s": unsloth and round(unsloth["tokens_per_s"], 1),
        "ratio": (best and baseline) and round(best["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "ratio_vs_unsloth": (best and unsloth) and round(best["tokens_per_s"] / unsloth["tokens_per_s"], 3),
        "baseline_peak_gb": baseline and round(baseline["peak_gb"], 2),
        "loraflow_peak_gb": best and round(best["peak_gb"], 2),
        "unsloth_peak_gb": unsloth and round(unsloth["peak_gb"], 2),
        "document_masking": bool(best and best["document_masking"]),
        "loraflow_best_variant": best_key,
        "unsloth_best_variant": unsloth_key,
        "runs": results,
        "command": "python benchmarks/train_throughput.py " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / f"train_throughput_{gpu}_{args.model}{args.tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{args.model} on {gpu}, {args.seq_len} context (non-padding tokens/s; peak = max allocated)")
    print(f"{'recipe':58} {'tokens/s':>10} {'peak GB':>8} {'x base':>7} {'isolation/floor':>16} {'tok/s/GB':>9}")
    for name, result in results.items():
        if not result:
            print(f"{name:58} {'failed':>10}")
            continue
        ratio = result["tokens_per_s"] / baseline["tokens_per_s"] if baseline else float("nan")
        iso = result["isolation_max_rel_diff"]
        iso = f"{iso['packed']:.3g}/{iso['noise_floor']:.3g}" if isinstance(iso.get("packed"), float) else "err"
        print(f"{name[:58]:58} {result['tokens_per_s']:10.0f} {result['peak_gb']:8.2f} {ratio:7.2f} {iso:>16} {result['tokens_per_s'] / result['peak_gb']:9.0f}")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--model-dir", default=None, help="where the random-init model is saved (default: $TMPDIR)")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer files copied into the model folder (Unsloth needs them)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per recipe (baseline: x8)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default="baseline,loraflow,unsloth")
    parser.add_argument("--rows-per-step", type=int, default=2, help="packed rows per micro-batch (loraflow, unsloth)")
    parser.add_argument("--loraflow-variants", default="--rows-per-step 2",
                        help="';'-separated extra argument sets, one loraflow run each")
    parser.add_argument("--unsloth-variants", default="--rows-per-step 2",
                        help="';'-separated extra argument sets, one Unsloth run each")
    parser.add_argument("--memory-budget-gb", type=float, default=None)
    parser.add_argument("--checkpointing", choices=["auto", "all", "none"], default="auto")
    parser.add_argument("--attn", default=None, help="attention implementation (default: flex on CUDA)")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--no-fuse-lora", action="store_true", help="loraflow: keep peft's own LoRA forward")
    parser.add_argument("--no-lora-autograd", action="store_true",
                        help="loraflow: LoRA layers without their own autograd function (the epilogue fusion only)")
    parser.add_argument("--bnb-stock-step", action="store_true",
                        help="loraflow: bitsandbytes' own optimizer step (a device sync per parameter)")
    parser.add_argument("--tag", default="", help="suffix of the result file name (e.g. -levers)")
    parser.add_argument("--profile", action="store_true", help="loraflow: print the top CUDA kernels of one step")
    parser.add_argument("--child-timeout", type=int, default=420)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    return parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
