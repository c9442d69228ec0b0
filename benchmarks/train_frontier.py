"""Speed at every memory budget: loraflow's train-stage path vs Unsloth, tokens/s and peak per budget (issue 13).

    python benchmarks/train_frontier.py --out $OUT                                  # on the GPU machine
    python benchmarks/train_frontier.py --model tiny --device cpu --steps 1 --warmup 1 \
        --budgets 8,unlimited --unsloth-rows 1 --tables frontier --recipes loraflow  # CPU dry run

One command, one GPU. Built on `train_throughput.py` (same random-init model, synthetic data, 4-bit NF4 loading,
paged AdamW 8-bit at lr 2e-4, timing loop and isolation check); every recipe runs in its own child process.

- loraflow, one child per budget: the train stage's own setup, its TrainPlan (`loraflow.training.plan`), then
  `load_lora_model` and `configure_fast_path` (rows per micro-batch from `train.memory_budget_gb`, then
  `configure_model_for_speed`), with the budget set and nothing else; "unlimited" = no budget (the GPU's memory).
- Unsloth, one child per setting (1, 2, 4, 8, 16 rows per step, or one document length), each with its own
  `--child-timeout`: a setting that runs slow or fails loses only its own row, and its rows land in the same JSON
  as loraflow's (`unsloth_sweep.runs`, failures included). Each child pays Unsloth's import and the model load.
  Unsloth has no budget setting, so at each budget its row is the fastest setting whose peak fits. A setting
  that runs out of memory skips the larger ones.
- A peak (max allocated, GiB) above the budget is a failure of that row, not a result.
- Table column rows/ckpt: loraflow's rows per micro-batch / checkpointed layers, "o" = inputs offloaded to CPU.
- `--tables long`: single documents of 8k/16k/32k tokens (one per row, nothing packed beside them) at
  `--long-budget-gb` (24): loraflow's stage path vs Unsloth.

Timed steps scale with the tokens per step (about `--steps` × 16k tokens per measurement, at least 3 steps), so
every setting is timed over a similar number of tokens. Budgets are GiB, like `train.memory_budget_gb`.
Prints the tables and writes `train_frontier_<gpu>_<model>.json` under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import train_throughput as tt  # noqa: E402  (the shared machinery: shapes, data, loop, isolation)

# The long-document table needs 32k positions; RoPE has no limit, but Unsloth reads max_position_embeddings.
tt.SHAPES.setdefault("llama3-8b-32k", {**tt.SHAPES["llama3-8b"], "max_position_embeddings": 32768})
tt.SHAPES.setdefault("tiny-32k", {**tt.SHAPES["tiny"], "max_position_embeddings": 32768})


# ---- data ----------------------------------------------------------------------------------------


def long_documents(count: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """`count` single documents of exactly `length` tokens, the first 10 % a prompt (label -100)."""
    rng = random.Random(seed)
    prompt = length // 10
    docs = []
    for _ in range(count):
        ids = [rng.randrange(3, min(vocab, 32000)) for _ in range(length)]
        docs.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return docs


def timed_steps(args, tokens_per_step: int) -> int:
    """About args.steps × 16k tokens per measurement, at least 3 steps."""
    return max(3, math.ceil(args.steps * 16384 / tokens_per_step))


def _examples(args) -> list[dict]:
    if args.doc_len:
        return long_documents(args.warmup + 3 * args.steps + 4, args.doc_len, args.vocab, seed=args.seed)
    return tt.synthetic_examples(args.examples, args.seq_len, args.vocab, seed=args.seed)


# ---- child: loraflow through the train stage -------------------------------------------------------


def _stage_functions():
    """The train stage's own setup functions (loraflow.training)."""
    from loraflow.training.micro_batch import configure_fast_path
    from loraflow.training.model_loading import load_lora_model
    from loraflow.training.plan import plan_training

    return load_lora_model, configure_fast_path, plan_training


def run_loraflow_stage(args, log) -> dict:
    import torch

    from loraflow.config.train import TrainConfig

    load_lora_model, configure_fast_path, plan_training = _stage_functions()
    examples = _examples(args)
    config = TrainConfig(quantization="4bit", lora_r=16, lora_alpha=32, learning_rate=2e-4,
                         pack_max_tokens=args.seq_len, memory_budget_gb=args.memory_budget_gb)
    longest = max(len(e["input_ids"]) for e in examples)
    train_plan = plan_training(config, Path(args.model_dir), longest, _Log(log))
    device = torch.device(train_plan.device)
    model = load_lora_model(Path(args.model_dir), config, train_plan)
    from loraflow.training import pack_examples

    max_tokens = max(config.pack_max_tokens, max(len(e["input_ids"]) for e in examples))
    packed_rows = len(pack_examples(examples, max_tokens=max_tokens))
    if train_plan.device == "cuda":
        train_plan = configure_fast_path(model, config, train_plan, max_tokens, packed_rows, log=_Log(log),
                                         attn_implementation=args.attn, lean_recompute=args.lean_recompute == "on")
        rows, plan = train_plan.rows_per_micro_batch, train_plan.speed
    else:  # CPU dry run: the stage keeps CPU settings there; plan what the GPU would, on the CPU model
        from loraflow.training import configure_model_for_speed

        rows = config.pack_rows_per_micro_batch or 1
        plan = configure_model_for_speed(model, config, memory_budget_gb=args.memory_budget_gb or 80.0,
                                         tokens_per_micro_batch=rows * max_tokens, attn_implementation=args.attn).as_dict()
        plan.update(rows_per_micro_batch=rows, rows_choice="CPU dry run: 1 row", row_tokens=max_tokens)
    log(f"  stage plan: {plan}")
    args.rows_per_step, args.seq_len = rows, max_tokens
    steps = timed_steps(args, rows * max_tokens)
    batches = tt._packed_batches(torch, examples, _with(args, steps=steps))
    isolation = tt._isolation(torch, model, device, args.vocab)
    optimizer_class = tt.loraflow_optimizer_class(args) if device.type == "cuda" else None
    result = tt._train_loop_counted(torch, model, batches, steps, args.warmup, device, log, optimizer_class=optimizer_class)
    if (args.profile or args.doc_len in _lengths(args.profile_lens)) and device.type == "cuda":
        result["profile"] = tt._profile_step(torch, model, batches[0][0], device, log, optimizer_class)
    return {**result, "isolation_max_rel_diff": isolation, "plan": plan, "rows_per_step": rows,
            "micro_batch": f"{rows} packed rows of {max_tokens}"}


class _Log:
    """configure_fast_path logs through a logger's .info; send it to the child's stderr."""

    def __init__(self, log):
        self._log = log

    def info(self, message, *args):
        self._log("  " + (message % args if args else message))

    warning = info


def _with(args, **changes):
    copy = argparse.Namespace(**vars(args))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


# ---- child: Unsloth at several rows per step --------------------------------------------------------


def run_unsloth_sweep(args, log) -> dict:
    """One Unsloth model, trained at each rows-per-step (frontier) or document length (long) in turn."""
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (must come before transformers: it patches it on import)
    import torch
    from unsloth import FastLanguageModel

    device = torch.device("cuda")
    lengths = [int(x) for x in args.doc_lens.split(",")] if args.doc_lens else []
    max_seq = max(lengths) if lengths else args.seq_len
    model, _ = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=max_seq, dtype=torch.bfloat16, load_in_4bit=True,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=tt.LORA_ALL, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0, max_seq_length=max_seq,
    )
    isolation = None
    try:
        if not args.no_isolation:
            isolation = tt._isolation(torch, model, device, args.vocab)
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the throughput still counts
        isolation = {"packed": f"failed: {type(error).__name__}: {error}"[:300]}
    FastLanguageModel.for_training(model)
    settings = [("doc_len", n) for n in lengths] or [("rows", int(r)) for r in args.unsloth_rows.split(",")]
    runs = {}
    for kind, value in settings:
        if kind == "doc_len":
            variant = _with(args, doc_len=value, seq_len=value, rows_per_step=1)
        else:
            variant = _with(args, rows_per_step=value)
        steps = timed_steps(variant, variant.rows_per_step * variant.seq_len)
        key = f"{kind} {value}"
        log(f"  unsloth {key}: {steps} timed steps")
        try:
            batches = tt._packed_batches(torch, _examples(variant), _with(variant, steps=steps))
            result = tt._train_loop_counted(torch, model, batches, steps, args.warmup, device, log)
            if args.profile or (kind == "doc_len" and value in _lengths(args.profile_lens)):
                import bitsandbytes as bnb

                result["profile"] = tt._profile_step(torch, model, batches[0][0], device, log, bnb.optim.PagedAdamW8bit)
            runs[key] = {**result, "rows_per_step": variant.rows_per_step,
                         "micro_batch": f"{variant.rows_per_step} packed rows of {variant.seq_len}"}
        except torch.cuda.OutOfMemoryError as error:
            runs[key] = {"failed": f"OutOfMemoryError: {str(error)[:200]}"}
            log(f"  unsloth {key}: out of memory; larger settings skipped")
            break
        finally:
            batches = None
            torch.cuda.empty_cache()
    return {"runs": runs, "isolation_max_rel_diff": isolation, "unsloth_version": getattr(unsloth, "__version__", "?"),
            "note": "one process, settings in turn, peak memory reset before each"}


def _lengths(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def unsloth_in_children(args, flag: str, values: list[int], log_file) -> dict:
    """Unsloth's sweep, one child process per setting (`flag` value: --unsloth-rows N or --doc-lens N), each with
    its own timeout; the children's runs merged (`merge_sweep`)."""
    children = {}
    for value in values:
        extra = [flag, str(value)] + (["--no-isolation"] if children else [])
        children[value] = run_child(args, "unsloth-sweep", extra, log_file)
        if "OutOfMemoryError" in json.dumps(children[value])[:100000] and flag == "--unsloth-rows":
            break  # more rows per step need more memory still
    kind = "doc_len" if flag == "--doc-lens" else "rows"
    return merge_sweep(kind, children)


def merge_sweep(kind: str, children: dict) -> dict:
    """One sweep record from per-setting child results: `runs` keyed "<kind> <value>" (a failed or timed-out child
    is that setting's {"failed": ...}), the first isolation check, Unsloth's version, and each child's wall time."""
    runs, isolation, version = {}, None, None
    for value, child in children.items():
        key = f"{kind} {value}"
        if child and "runs" in child:
            runs[key] = child["runs"].get(key) or {"failed": "the child returned no run for this setting"}
            isolation = isolation if isolation is not None else child.get("isolation_max_rel_diff")
            version = version or child.get("unsloth_version")
        else:
            runs[key] = {"failed": (child or {}).get("failed", "no result")}
        runs[key]["child_wall_s"] = (child or {}).get("wall_s")
    return {"runs": runs, "isolation_max_rel_diff": isolation, "unsloth_version": version,
            "note": "one child process per setting, each with its own timeout"}


def child_main(args) -> None:
    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.child == "make":
        tt.make_model(args, log)
        return
    runner = {"loraflow-stage": run_loraflow_stage, "unsloth-sweep": run_unsloth_sweep}[args.child]
    print("RESULT " + json.dumps(runner(args, log)), flush=True)


# ---- parent --------------------------------------------------------------------------------------


def run_child(args, recipe: str, extra: list[str], log_file) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", recipe, "--model", args.model,
               "--model-dir", args.model_dir, "--device", args.device, "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--examples", str(args.examples),
               "--seed", str(args.seed), "--vocab", str(args.vocab)]
    if args.tokenizer_dir:
        command += ["--tokenizer-dir", args.tokenizer_dir]
    command += ["--profile"] * args.profile + ["--bnb-stock-step"] * args.bnb_stock_step
    command += ["--profile-lens", args.profile_lens] if args.profile_lens else []
    command += extra
    start = time.perf_counter()
    print(f"[{recipe} {' '.join(extra)}] starting", flush=True)
    stdout, stderr, code = tt.run_command(command, args.child_timeout)
    wall = round(time.perf_counter() - start, 1)
    log_file.write(f"==== {recipe} {extra} (rc {code}, {wall:.0f}s)\n{stderr}\n{stdout}\n")
    log_file.flush()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = wall
            # Each result also lands in a JSON-lines file at once: a call cut short still keeps what ran.
            with open(Path(args.out) / "train_frontier_runs.jsonl", "a") as partial:
                partial.write(json.dumps({"recipe": recipe, "extra": extra, **result}) + "\n")
            print(f"[{recipe} {' '.join(extra)}] done in {wall:.0f}s", flush=True)
            return result
    if recipe == "make" and code == 0:
        return None
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    print(f"[{recipe}] FAILED (rc {code}, {wall:.0f}s):\n{tail}", flush=True)
    return {"failed": f"rc {code}: {tail[-600:]}", "wall_s": wall}


def _budget(text: str) -> float | None:
    return None if text in ("unlimited", "none", "") else float(text)


def _fits(run: dict | None, budget: float | None) -> tuple[bool, str]:
    """Whether a measured run is a result at `budget`: it ran, and its peak stayed within the budget."""
    if not run or "failed" in run:
        return False, (run or {}).get("failed", "no result")[:200]
    if budget is not None and run["peak_gb"] > budget:
        return False, f"peak {run['peak_gb']:.2f} GiB > budget {budget:g} GiB"
    return True, ""


def _best_unsloth(sweep: dict | None, budget: float | None) -> tuple[str | None, dict | None]:
    if not sweep or "runs" not in sweep:
        return None, None
    fitting = {k: v for k, v in sweep["runs"].items() if _fits(v, budget)[0]}
    if not fitting:
        return None, None
    key = max(fitting, key=lambda k: fitting[k]["tokens_per_s"])
    return key, fitting[key]


def _row(label: str, budget: float | None, loraflow: dict | None, unsloth_key, unsloth: dict | None,
         unsloth_isolation) -> dict:
    ok, why = _fits(loraflow, budget)
    row = {"budget_gb": budget, "label": label, "loraflow_ok": ok, "loraflow_failure": why or None}
    if loraflow and "failed" not in loraflow:
        plan = loraflow.get("plan", {})
        row.update(loraflow_tokens_per_s=round(loraflow["tokens_per_s"], 1), loraflow_peak_gb=round(loraflow["peak_gb"], 2),
                   loraflow_reserved_gb=round(loraflow["reserved_gb"], 2),
                   loraflow_rows=loraflow.get("rows_per_step"), loraflow_checkpointed=plan.get("checkpointed_layers"),
                   loraflow_offloaded=plan.get("offloaded_layers", 0),
                   loraflow_estimated_peak_gb=plan.get("estimated_peak_gb") and round(plan["estimated_peak_gb"], 2),
                   loraflow_isolation=loraflow.get("isolation_max_rel_diff"))
    row.update(unsloth_setting=unsloth_key, unsloth_isolation=unsloth_isolation)
    if unsloth:
        row.update(unsloth_tokens_per_s=round(unsloth["tokens_per_s"], 1), unsloth_peak_gb=round(unsloth["peak_gb"], 2))
    if ok and unsloth:
        row["ratio"] = round(loraflow["tokens_per_s"] / unsloth["tokens_per_s"], 3)
    return row


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'budget':>9} | {'loraflow tok/s':>14} {'peak':>6} {'est':>6} {'rows/ckpt':>9} | "
          f"{'Unsloth tok/s':>13} {'peak':>6} {'setting':>12} | {'ratio':>6}")
    for row in rows:
        budget = row["label"]
        if row.get("loraflow_tokens_per_s") is not None:
            lf = f"{row['loraflow_tokens_per_s']:14.0f} {row['loraflow_peak_gb']:6.1f} " \
                 f"{(row['loraflow_estimated_peak_gb'] or float('nan')):6.1f} " \
                 f"{str(row['loraflow_rows']) + '/' + str(row['loraflow_checkpointed']) + ('o' if row.get('loraflow_offloaded') else ''):>9}"
            if not row["loraflow_ok"]:
                lf += " FAIL"
        else:
            lf = f"{'failed':>14} {'':6} {'':6} {'':9}"
        if row.get("unsloth_tokens_per_s") is not None:
            us = f"{row['unsloth_tokens_per_s']:13.0f} {row['unsloth_peak_gb']:6.1f} {row['unsloth_setting']:>12}"
        else:
            us = f"{'none fits':>13} {'':6} {'':12}"
        ratio = f"{row['ratio']:6.2f}" if row.get("ratio") else f"{'-':>6}"
        print(f"{budget:>9} | {lf} | {us} | {ratio}")
        if row.get("loraflow_failure"):
            print(f"{'':>9}   loraflow row failed: {row['loraflow_failure'][:150]}")


def _print_lean_ab(label: str, lean: dict | None, full: dict | None) -> None:
    """One line: tokens/s of the plan with lean recompute and with the full recompute, and their ratio."""
    speeds = [(run or {}).get("tokens_per_s") for run in (lean, full)]
    ratio = f"{speeds[0] / speeds[1]:.3f}" if all(speeds) else "-"
    print(f"lean recompute A/B {label}: lean {speeds[0]} vs full {speeds[1]} tokens/s, ratio {ratio}", flush=True)


def parent_main(args, argv: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import os

    args.model_dir = args.model_dir or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"loraflow-bench-{args.model}")
    args.vocab = tt.SHAPES[args.model]["vocab_size"]
    gpu = tt.gpu_name() if args.device == "cuda" else "cpu"
    tables = args.tables.split(",")
    recipes = args.recipes.split(",")
    record: dict = {"gpu": gpu, "model": args.model, "seq_len": args.seq_len}
    attn = ["--attn", args.attn] if args.attn else []
    record["attn"] = args.attn or "the train stage's default"
    started = time.perf_counter()
    with open(out / f"train_frontier_{gpu}_{args.model}{args.tag}.log", "a") as log_file:
        run_child(args, "make", [], log_file)
        if "frontier" in tables:
            budgets = [_budget(b) for b in args.budgets.split(",")]
            loraflow_runs = {}
            if "loraflow" in recipes:
                for budget in budgets:
                    extra = [] if budget is None else ["--memory-budget-gb", f"{budget:g}"]
                    loraflow_runs[budget] = run_child(args, "loraflow-stage", extra + attn, log_file)
                    if args.also_full_recompute:  # the same plan with the recompute not lean, for the lever's A/B
                        full = run_child(args, "loraflow-stage", extra + attn + ["--lean-recompute", "off"], log_file)
                        record.setdefault("full_recompute_runs", {})[str(budget)] = full
                        _print_lean_ab(f"{budget} GiB", loraflow_runs[budget], full)
            sweep = unsloth_in_children(args, "--unsloth-rows", _lengths(args.unsloth_rows), log_file) \
                if "unsloth" in recipes else None
            iso = sweep.get("isolation_max_rel_diff") if sweep else None
            rows = []
            for budget in budgets:
                key, best = _best_unsloth(sweep, budget)
                rows.append(_row("unlimited" if budget is None else f"{budget:g} GB", budget,
                                 loraflow_runs.get(budget), key, best, iso))
            record["frontier"] = {"rows": rows, "loraflow_runs": {str(k): v for k, v in loraflow_runs.items()},
                                  "unsloth_sweep": sweep}
        if "long" in tables:
            lengths = [int(x) for x in args.long_lens.split(",")]
            budget = args.long_budget_gb
            loraflow_runs = {}
            if "loraflow" in recipes:
                for length in lengths:
                    extra = ["--memory-budget-gb", f"{budget:g}", "--doc-len", str(length)]
                    loraflow_runs[length] = run_child(_with(args, seq_len=length), "loraflow-stage", extra + attn, log_file)
                    if args.also_full_recompute:
                        full = run_child(_with(args, seq_len=length), "loraflow-stage",
                                         extra + attn + ["--lean-recompute", "off"], log_file)
                        record.setdefault("full_recompute_runs", {})[f"doc_len {length}"] = full
                        _print_lean_ab(f"{length} doc", loraflow_runs[length], full)
            sweep = unsloth_in_children(args, "--doc-lens", lengths, log_file) if "unsloth" in recipes else None
            iso = sweep.get("isolation_max_rel_diff") if sweep else None
            rows = []
            for length in lengths:
                run = (sweep or {}).get("runs", {}).get(f"doc_len {length}")
                ok = _fits(run, budget)[0]
                rows.append(_row(f"{length // 1024}k", budget, loraflow_runs.get(length),
                                 f"1 doc" if ok else None, run if ok else None, iso))
                if run and not ok:
                    rows[-1]["unsloth_failure"] = _fits(run, budget)[1]
            record["long_documents"] = {"budget_gb": budget, "rows": rows,
                                        "loraflow_runs": {str(k): v for k, v in loraflow_runs.items()},
                                        "unsloth_sweep": sweep}
    record.update(
        command="python benchmarks/train_frontier.py " + " ".join(shlex.quote(a) for a in argv),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(time.perf_counter() - started, 1),
        versions=_versions(),
    )
    path = out / f"train_frontier_{gpu}_{args.model}{args.tag}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if "frontier" in record:
        _print_table(f"{args.model} on {gpu}: packed {args.seq_len}-token rows, tokens/s (non-padding) and peak GiB "
                     f"(max allocated) by memory budget", record["frontier"]["rows"])
    if "long_documents" in record:
        _print_table(f"{args.model} on {gpu}: single long documents at a {args.long_budget_gb:g} GiB budget",
                     record["long_documents"]["rows"])
    print(f"wrote {path} ({record['wall_s']:.0f}s)")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth", "unsloth-zoo"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(tt.SHAPES), default="llama3-8b-32k")
    parser.add_argument("--model-dir", default=None, help="where the random-init model is saved (default: $TMPDIR)")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer files copied into the model folder (Unsloth needs them)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tables", default="frontier,long", help="frontier, long or both")
    parser.add_argument("--recipes", default="loraflow,unsloth")
    parser.add_argument("--budgets", default="8,12,16,24,40,unlimited", help="GiB; 'unlimited' = no budget set")
    parser.add_argument("--unsloth-rows", default="1,2,4,8,16", help="Unsloth's rows per step, tried in turn")
    parser.add_argument("--long-lens", default="8192,16384,32768")
    parser.add_argument("--long-budget-gb", type=float, default=24.0)
    parser.add_argument("--seq-len", type=int, default=4096, help="packed row length (train.pack_max_tokens)")
    parser.add_argument("--steps", type=int, default=5, help="timed tokens per measurement ≈ steps × 16k")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--attn", default=None, help="loraflow's attention (flex_attention, loraflow_varlen); default: the stage's")
    parser.add_argument("--also-full-recompute", action="store_true",
                        help="also run each loraflow row with lean recompute off (the lever's A/B, same run)")
    parser.add_argument("--lean-recompute", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="after timing, profile one step of each run (CUDA)")
    parser.add_argument("--profile-lens", default=None,
                        help="long table: profile one step of both recipes at these document lengths only (e.g. 32768)")
    parser.add_argument("--bnb-stock-step", action="store_true",
                        help="loraflow: bitsandbytes' own optimizer step (a device sync per parameter; the lever's A/B)")
    parser.add_argument("--child-timeout", type=int, default=240)
    parser.add_argument("--out", default=str(HERE / "results"))
    # child-only
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-budget-gb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--doc-len", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--doc-lens", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows-per-step", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-isolation", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    return parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
