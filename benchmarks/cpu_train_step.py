"""CPU training step cost on the demo's own rows: where a 2-core CPU spends the demo's training time.

    loraflow prepare configs/anime_demo.yaml                      # once: the demo's tokenized rows
    python benchmarks/cpu_train_step.py --out benchmarks/results  # all variants, one process, one run
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/cpu_train_step.py

Each variant trains the demo's LoRA (SmolLM2-135M, r=16 on every linear layer, the product's load_lora_model)
for --steps optimizer steps on the demo's train rows batched as the Trainer batches them (length-grouped,
padded to the longest in the batch), after --warmup steps. It reports seconds per step, per epoch of the demo
(59 rows) and trained tokens per second, each against the baseline measured in the same run:

  baseline     micro-batch 4, logits and cross-entropy on every position (what transformers' loss does)
  answer_only  micro-batch 4, logits only where a label is trained (gathered hidden states, then lm_head;
               measured 0.69x on emulated AVX2 fp32 with 21 steps, so the product keeps transformers' loss)
  mb8 / mb16   answer-only with micro-batches of 8 / 16 rows: fewer, larger steps per epoch

The precision is the one loraflow chooses on this CPU (fp32 on AVX2-only CPUs).

--threads-study measures answer_only at 1 and at all cores' torch threads, on a quiet machine and beside one
busy process (a Python busy loop: another job on the machine), to see what loraflow/modeling/cpu_threads.py should pick.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from loraflow.config.pipeline import load_config
from loraflow.modeling.base_model import resolve_model_dir
from loraflow.modeling.precision import choose_precision
from loraflow.training.model_loading import load_lora_model
from loraflow.training.plan import plan_training

# ---- the answer_only variant: logits only where a label is trained (measured slower on CPU: not in the product)
IGNORE_INDEX = -100


def _causal_lm(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_only_loss(model, inputs: dict, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over trained positions of `inputs` (a batch with `labels`)."""
    causal_lm = _causal_lm(model)
    labels = inputs["labels"]
    features = {key: value for key, value in inputs.items() if key != "labels"}
    hidden = causal_lm.get_decoder()(**features).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][trained]).float()
    total = F.cross_entropy(logits, targets[trained], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


VARIANTS = {"baseline": (4, False), "answer_only": (4, True), "mb8": (8, True), "mb16": (16, True)}


def demo_train_rows(store: Path) -> pd.DataFrame:
    """The newest tokenize artifact's train split (the demo's rows after `loraflow prepare`)."""
    artifacts = sorted((store / "artifacts" / "tokenize").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if not artifacts:
        raise SystemExit(f"no tokenize artifact under {store}: run `loraflow prepare configs/anime_demo.yaml` first")
    frame = pd.read_parquet(artifacts[-1])
    return frame[frame["split"] == "train"].reset_index(drop=True)


def length_grouped_batches(rows: pd.DataFrame, batch_size: int, pad_id: int) -> list[dict]:
    """Batches of similar length, padded to their longest row (labels -100 on padding)."""
    order = rows["length"].sort_values(kind="stable").index.tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = rows.loc[order[start:start + batch_size]]
        width = int(chunk["length"].max())
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row_ids, row_labels) in enumerate(zip(chunk["input_ids"], chunk["labels"])):
            ids[i, :len(row_ids)] = torch.tensor(list(row_ids))
            labels[i, :len(row_labels)] = torch.tensor(list(row_labels))
            mask[i, :len(row_ids)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def measure(model, batches: list[dict], answer_only: bool, steps: int, warmup: int, autocast: bool) -> dict:
    """Median seconds per optimizer step of forward + backward + AdamW over cycling `batches`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, tokens = [], 0
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if answer_only:
                loss = answer_only_loss(model, batch)
            else:
                loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - began)
            tokens += int((batch["labels"] != -100).sum())
    return {"s_per_step": statistics.median(times), "trained_tokens_per_s": tokens / sum(times)}


def _busy_loop() -> None:
    while True:
        pass


def thread_study(model_dir, config, plan, rows, steps: int, warmup: int) -> dict:
    """answer_only seconds per step at 1 and at every core's thread, with 0 and 1 busy processes beside it."""
    cores = torch.get_num_threads()
    study = {}
    for busy in (0, 1):
        others = [multiprocessing.Process(target=_busy_loop, daemon=True) for _ in range(busy)]
        for other in others:
            other.start()
        try:
            for threads in sorted({1, cores}):
                torch.set_num_threads(threads)
                torch.manual_seed(0)
                model = load_lora_model(model_dir, config.train, plan).train()
                batches = length_grouped_batches(rows, 4, 0)
                result = measure(model, batches, True, steps, warmup, plan.precision == "bf16")
                study[f"busy{busy}_threads{threads}"] = result
                print(f"busy processes {busy}, torch threads {threads}: {result['s_per_step']:.2f} s/step")
                del model
        finally:
            for other in others:
                other.terminate()
    torch.set_num_threads(cores)
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/anime_demo.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads-study", action="store_true", help="1 vs all threads, quiet and beside a busy process")
    parser.add_argument("--out", default=None, help="folder for cpu_train_step_<capability>.json")
    args = parser.parse_args()


    config = load_config(args.config)
    model_dir = resolve_model_dir(config.model, config.base_dir)
    rows = demo_train_rows(Path(config.store_root()))
    plan = plan_training(config.train, model_dir, int(rows["length"].max()), logging.getLogger("cpu_train_step"))
    pad_id = 0
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU capability {capability}, threads {torch.get_num_threads()}, precision {plan.precision} "
          f"({choose_precision('auto', 'cpu').reason}); {len(rows)} train rows")
    results = {}
    names = args.variants.split(",")
    # The first variant of a process pays one-time costs (allocator, kernel selection: measured 7.4 s/step first
    # vs 1.8 s/step second for the same variant); a discarded run of it comes first.
    for position, name in enumerate([names[0], *names]):
        batch_size, answer_only = VARIANTS[name]
        torch.manual_seed(0)
        model = load_lora_model(model_dir, config.train, plan)
        model.train()
        batches = length_grouped_batches(rows, batch_size, pad_id)
        result = measure(model, batches, answer_only, args.steps, args.warmup, plan.precision == "bf16")
        result["s_per_epoch"] = result["s_per_step"] * len(batches)
        del model
        if position == 0:
            continue
        results[name] = {"micro_batch": batch_size, "answer_only": answer_only, **result}
        print(f"{name:12s} mb={batch_size:2d} {result['s_per_step']:.2f} s/step  {result['s_per_epoch']:.1f} s/epoch  "
              f"{result['trained_tokens_per_s']:.0f} trained tok/s")
    study = thread_study(model_dir, config, plan, rows, args.steps, args.warmup) if args.threads_study else None
    base = results.get("baseline")
    if base:
        for name, result in results.items():
            result["epoch_speedup_vs_baseline"] = base["s_per_epoch"] / result["s_per_epoch"]
            print(f"{name:12s} epoch speed-up vs baseline: {result['epoch_speedup_vs_baseline']:.2f}x")
    if args.out:
        record = {"date": dt.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
                  "capability": capability, "threads": torch.get_num_threads(), "precision": plan.precision,
                  "train_rows": len(rows), "steps": args.steps, "warmup": args.warmup, "results": results,
                  "threads_study": study, "command": " ".join(["python", *__import__("sys").argv])}
        path = Path(args.out) / f"cpu_train_step_{capability.lower()}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
