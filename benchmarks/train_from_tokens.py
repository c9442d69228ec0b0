"""Host memory of the train stage reading a large TOKENS artifact: memory-mapped Arrow against the DataFrame it replaced.

    python benchmarks/train_from_tokens.py --examples 3000000                              # mapped, padded and packed
    python benchmarks/train_from_tokens.py --examples 100000 --variants mapped,frame --reference-tree /tmp/main

Builds a synthetic TOKENS artifact (60–250 tokens an example, a 20–50 % prompt masked, 5 % validation, random ids of
SmolLM2's vocabulary) with the artifact writer, its first batch checked against the TOKENS contract; saves the tiny
random Llama of the tests; then each variant trains `--steps` CPU steps of it from the artifact in its own process,
while this one samples that process from /proc/PID/status every 50 ms (benchmarks/data_scale.TreeSampler): the peak
`RssAnon` (anonymous memory) and `VmHWM` (peak RSS, counting the memory-mapped file pages the kernel can drop).

  mapped         this checkout: `train_adapter(ref)`, padded batches (train.packing false, the CPU default); the first
                 read streams the artifact into `<store>/mapped/` (counted in its wall time)
  mapped-packed  the same with train.packing true (first-fit decreasing over the length column, rows built when drawn)
  frame          the same call from another checkout (--reference-tree, e.g. `git archive main | tar -x -C /tmp/main`):
                 the artifact read into a DataFrame and every example made into Python lists
Writes benchmarks/results/train_from_tokens_cpu_<examples>.json: command, date, machine, load averages, every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from data_scale import TreeSampler  # noqa: E402  this folder's sibling
from prepare_scale import load, machine_record  # noqa: E402

BATCH_ROWS = 65_536
VOCAB = 49_152


def synthetic_batch(first: int, rows: int, rng):
    """`rows` TOKENS rows numbered from `first`, as an Arrow table (list<int32> token columns)."""
    import numpy as np
    import pyarrow as pa

    lengths = rng.integers(60, 251, size=rows)
    prompts = (lengths * rng.uniform(0.2, 0.5, size=rows)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(3, VOCAB, size=int(offsets[-1]), dtype=np.int32)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    labels = np.where(position < np.repeat(prompts, lengths), -100, ids).astype(np.int32)
    as_lists = lambda values: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))  # noqa: E731
    numbers = np.arange(first, first + rows)
    facts = pa.array([[]] * rows, type=pa.list_(pa.struct([("column", pa.string()), ("value", pa.string())])))
    return pa.table({
        "id": pa.array([f"ex-{n}" for n in numbers]), "input_ids": as_lists(ids),
        "attention_mask": as_lists(np.ones(len(ids), dtype=np.int32)), "labels": as_lists(labels),
        "length": pa.array(lengths, pa.int64()), "n_trained": pa.array(lengths - prompts, pa.int64()),
        "truncated": pa.array(np.zeros(rows, dtype=bool)),
        "split": pa.array(np.where(numbers % 20 == 19, "validation", "train")),
        "kind": pa.array(["qa"] * rows), "source_id": pa.array([str(n // 3) for n in numbers]),
        "prompt": pa.array(["What is it?"] * rows), "reference": pa.array(["It is."] * rows), "facts": facts,
    })


def build_artifact(store_root: Path, examples: int) -> dict:
    """The synthetic TOKENS artifact, written a batch at a time through the store's artifact writer."""
    import numpy as np

    from data_contracts import TOKENS, check_structure
    from loraflow.runtime.artifact_store import ArtifactStore

    store, rng = ArtifactStore(store_root), np.random.default_rng(0)
    writer = store.writer(stage="tokenize", contract=TOKENS.name, schema_version=TOKENS.version, config_hash="bench")
    for first in range(0, examples, BATCH_ROWS):
        batch = synthetic_batch(first, min(BATCH_ROWS, examples - first), rng)
        if first == 0:
            check_structure(batch.slice(0, 2048).to_pandas(), TOKENS, where="synthetic tokens")
        writer.append(batch)
    return writer.commit().model_dump()


def rss_anon_gib() -> float:
    """This process's RssAnon now."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon"))
    return round(int(line.split()[1]) / 2**20, 3)


def child(variant: str, ref: dict, store_root: Path, model_dir: Path, out: Path, steps: int) -> dict:
    """One variant's training run (this process is the one sampled): the train inputs read first (RssAnon after),
    then `train_adapter` (which reads them again: the mapped file is reused)."""
    from loraflow.config.train import TrainConfig
    from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
    from loraflow.training.data import read_train_inputs
    from tasks.train import train_adapter

    # One example per micro-batch, rows of 256 tokens: the tiny model's logits (vocabulary 49,152) stay small, so the
    # peak is the data's, not the step's (8 x 1,024 tokens of fp32 logits alone are 1.6 GB).
    config = TrainConfig(max_steps=steps, micro_batch_size=1, learning_rate=1e-3, warmup_ratio=0.0, lora_r=8,
                         lora_alpha=16, checkpoint_every=10_000, packing=variant == "mapped-packed", pack_max_tokens=256,
                         pack_rows_per_micro_batch=1, cpu_threads=2)
    store, ref, phases = ArtifactStore(store_root), ArtifactRef(**ref), {"imported": rss_anon_gib()}
    started = time.perf_counter()
    inputs = read_train_inputs(ref, store, model_dir, config)
    phases |= {"inputs_read": rss_anon_gib(), "inputs_read_seconds": round(time.perf_counter() - started, 1)}
    del inputs
    result = train_adapter(ref, model_dir, config, out, store=store)
    return {"seconds": round(time.perf_counter() - started, 1), "train_seconds_reported": result.seconds,
            "rss_anon_gib_at": phases, "global_step": result.global_step, "train_rows": result.train_rows,
            "train_tokens": result.train_tokens, "final_loss": result.final_loss, "packing": result.packing}


def run_variant(variant: str, tree: Path, args, ref: dict, work: Path, model_dir: Path) -> dict:
    """Run one variant in its own process from `tree`, sampling its memory."""
    command = [sys.executable, __file__, "--child", variant, "--ref", json.dumps(ref), "--work", str(work),
               "--model", str(model_dir), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before = load()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
    sampler = TreeSampler(process.pid)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": f"stopped after --timeout {args.timeout} s", "memory": sampler.stop()}
    memory = sampler.stop()
    if process.returncode != 0:
        print(stderr[-3000:], flush=True)
        return {"error": f"exit {process.returncode}: {stderr.strip().splitlines()[-1:]}", "memory": memory,
                "load_before_after": [load_before, load()]}
    return {**json.loads(stdout.strip().splitlines()[-1]), "memory": memory, "load_before_after": [load_before, load()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3_000_000)
    parser.add_argument("--variants", default="mapped,mapped-packed", help="Comma-separated: mapped, mapped-packed, frame.")
    parser.add_argument("--reference-tree", help="The checkout the frame variant runs from (main before this change).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--note", default="")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(args.work)
        print(json.dumps(child(args.child, json.loads(args.ref), work / "store", Path(args.model),
                               work / f"train-{args.child}", args.steps)))
        return

    load_at_start = load()
    with tempfile.TemporaryDirectory(prefix="loraflow-train-tokens-", dir=os.environ.get("TMPDIR")) as work:
        work = Path(work)
        sys.path.insert(0, str(ROOT))
        from tests.tiny_llama import build_tiny_llama

        started = time.perf_counter()
        ref = build_artifact(work / "store", args.examples)
        built = round(time.perf_counter() - started, 1)
        print(f"artifact: {args.examples:,} examples, {ref['rows']:,} rows, "
              f"{Path(ref['uri']).stat().st_size / 2**30:.2f} GiB, {built} s", flush=True)
        model_dir = build_tiny_llama(work / "model")
        results = {}
        for variant in args.variants.split(","):
            tree = Path(args.reference_tree).resolve() if variant == "frame" else ROOT
            if variant == "frame" and not args.reference_tree:
                results[variant] = {"error": "needs --reference-tree"}
                continue
            results[variant] = run_variant(variant, tree, args, ref, work, model_dir)
            line = results[variant]
            print(f"{variant}: {line.get('seconds', line.get('error'))} s, peak RssAnon "
                  f"{line['memory']['largest_peak_rss_anon_gib']} GiB, VmHWM {line['memory']['largest_vm_hwm_gib']} GiB",
                  flush=True)
        mapped_bytes = sum(p.stat().st_size for p in (work / "store" / "mapped").glob("*.arrow")) \
            if (work / "store" / "mapped").exists() else 0

    result = {
        "command": "python " + shlex.join([sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(load_at_start, "2 cores shared with other engineers' runs: wall times follow the load; memory does not"),
        "note": args.note, "examples": args.examples, "artifact": {"rows": ref["rows"], "seconds_to_build": built,
                                                                    "mapped_train_file_bytes": mapped_bytes},
        "variants": results,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train_from_tokens_cpu_{args.examples}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
