"""The data half's memory and wall time per table size, against a Hugging Face `datasets` pipeline in the same run.

    python benchmarks/data_scale.py --rows 25000                          # loraflow + datasets, 25k catalog rows
    python benchmarks/data_scale.py --rows 25000 --reference-tree /tmp/main   # + an older checkout, compared by value
    python benchmarks/data_scale.py --rows 1000000 --variants loraflow    # the million-row run alone

Each variant runs in its own Python process on the same catalog CSV (benchmarks/prepare_throughput.make_rows, anime_qa
with 3 questions per row), while this process samples every process of the variant's tree (the flow and any child it
starts) from /proc/PID/status every 50 ms: the peak `RssAnon` (anonymous memory: what the process itself allocated)
and `VmHWM` (peak RSS, which also counts memory-mapped file pages the kernel can drop), per process.

  loraflow    the prepare flow (flows/prepare.py), single process, cold, in its own store: ingest -> synthesize ->
              format -> tokenize -> pre-flight, then the same flow again (all cached; its wall time after the flow starts);
  dask        the same flow sharded (prepare.shards 4, task_runner dask, 2 local workers): the workers synthesize,
              format and tokenize each shard, decide duplicates and leakage per digest partition and run both merges;
              the flow process passes references and runs the pre-flight;
  reference   the same flow from another checkout (--reference-tree, e.g. `git archive main | tar -x -C /tmp/main`),
              whose tokens artifact is then compared with loraflow's row by row and value by value;
  bare        one batched call of the same fast tokenizer on the same rendered texts (rendering not timed): the floor;
  datasets    what axolotl / LLaMA-Factory do (one process, num_proc=None): `load_dataset("csv")` -> Arrow cache files,
              a batched `map` making the same 3 conversations per row (loraflow's anime_qa synthesizer on the batch),
              a batched `map` rendering each with `apply_chat_template` and tokenizing prompt and whole text to mask
              the prompt's labels (answer-only labels).
Writes benchmarks/results/data_scale_cpu_<rows>.json: command, date, machine, load averages, and every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from prepare_scale import SYSTEM_PROMPT, load, machine_record, scale_config_fields, start_ephemeral_api, write_catalog  # this folder's sibling

ROOT = Path(__file__).resolve().parent.parent
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "HF_DATASETS_OFFLINE": "1"}


# ---- memory of a process tree, sampled from /proc


def status_kib(pid: int) -> dict[str, int]:
    """RssAnon and VmHWM (KiB) of one process, {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.startswith(("RssAnon", "VmHWM"))}


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


class TreeSampler(threading.Thread):
    """Peak RssAnon and VmHWM of every process under `pid`, sampled until stop()."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peaks, self._stopping = pid, interval, {}, threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            for pid in descendants(self.pid):
                status = status_kib(pid)
                if status:
                    peak = self.peaks.setdefault(pid, {"RssAnon": 0, "VmHWM": 0, "name": _name(pid)})
                    peak["RssAnon"] = max(peak["RssAnon"], status.get("RssAnon", 0))
                    peak["VmHWM"] = max(peak["VmHWM"], status.get("VmHWM", 0))
            self._stopping.wait(self.interval)

    def stop(self) -> dict:
        self._stopping.set()
        self.join()
        processes = sorted(({"pid": pid, "name": p["name"], "peak_rss_anon_gib": round(p["RssAnon"] / 2**20, 3),
                             "vm_hwm_gib": round(p["VmHWM"] / 2**20, 3)} for pid, p in self.peaks.items()),
                           key=lambda p: -p["peak_rss_anon_gib"])
        return {"largest_peak_rss_anon_gib": processes[0]["peak_rss_anon_gib"] if processes else None,
                "largest_vm_hwm_gib": max((p["vm_hwm_gib"] for p in processes), default=None), "processes": processes[:6]}


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return "?"


# ---- the variants, each in a child process


def run_loraflow(csv_path: Path, work: Path, tree: Path, name: str) -> dict:
    """The prepare flow from `tree`, cold and then all cached."""
    os.environ["PREFECT_HOME"] = str(work / f"prefect-home-{name}")
    sys.path.insert(0, str(tree))
    from flows.prepare import prepare_flow
    from loraflow.config.pipeline import PipelineConfig

    start_ephemeral_api()
    sharded = {"prepare": {"shards": 4, "task_runner": "dask", "workers": 2}} if name == "dask" else {}
    if sharded:  # the Dask workers report to this process's API instead of each starting one (slow under load)
        from prefect.server.api.server import SubprocessASGIServer

        os.environ["PREFECT_API_URL"] = SubprocessASGIServer().api_url
    config = PipelineConfig(**scale_config_fields(name, csv_path, work), **sharded)
    load_before, started = load(), time.perf_counter()
    summary = prepare_flow(config)
    seconds = time.perf_counter() - started
    cached_started = time.perf_counter()
    cached = prepare_flow(config)
    return {
        "seconds": round(seconds, 2), "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load(),
        "examples": summary["tokens"]["rows"], "tokens_uri": summary["tokens"]["uri"],
        "tokens_total": summary["stages"]["tokenize" if not sharded else "tokenize:merge"]["stats"]["tokens_total"],
        "stage_seconds": {stage: line["seconds"] for stage, line in summary["stages"].items()},
        "preflight_passed": summary["preflight"]["passed"],
        "cached_rerun": {"wall_seconds": round(time.perf_counter() - cached_started, 2),
                         "after_flow_start_seconds": cached["prepare_seconds"], "all_cached": cached["all_cached"]},
    }


def run_datasets(csv_path: Path, work: Path) -> dict:
    """CSV -> Arrow -> 3 conversations per row -> chat template + tokens + answer-only labels, all `datasets.map`."""
    sys.path.insert(0, str(ROOT))
    import datasets
    import pandas as pd

    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import load_tokenizer, resolve_model_dir
    from loraflow.synthesizers import anime_qa

    tokenizer = load_tokenizer(ModelConfig(base=str(resolve_model_dir(ModelConfig(), ROOT))))
    options = anime_qa.Options(trained_phrasings=1, heldout_phrasings=0, max_synopsis_words=160, natural_questions=0, unknown_titles=0)

    def conversations(batch: dict, indices: list[int]) -> dict:
        rows = pd.DataFrame({name: batch[name] for name in batch.keys()}).assign(_source="anime_catalog", _row=indices)
        made, _ = anime_qa.synthesize(rows, options)
        return {"messages": [[{"role": "system", "content": SYSTEM_PROMPT}, *m] for m in made["messages"]]}

    def tokens(batch: dict) -> dict:
        prompts = tokenizer.apply_chat_template([m[:-1] for m in batch["messages"]], tokenize=False, add_generation_prompt=True)
        texts = tokenizer.apply_chat_template(batch["messages"], tokenize=False)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=512)
        labels = [[-100] * len(p) + ids[len(p):] for p, ids in zip(prompt_ids, encoded["input_ids"])]
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}

    load_before, started = load(), time.perf_counter()
    header = csv_path.open(encoding="utf-8").readline().strip().split(",")  # every value as text, as loraflow reads it
    raw = datasets.load_dataset("csv", data_files=str(csv_path), split="train", cache_dir=str(work / "hf-cache"),
                                keep_default_na=False, features=datasets.Features({n: datasets.Value("string") for n in header}))
    made = raw.map(conversations, batched=True, with_indices=True, remove_columns=raw.column_names)
    tokenized = made.map(tokens, batched=True, remove_columns=["messages"])
    return {"seconds": round(time.perf_counter() - started, 2), "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": load(), "examples": len(tokenized),
            "tokens_total": int(sum(len(ids) for ids in tokenized.with_format("arrow")["input_ids"].to_pylist()))}


def run_bare(csv_path: Path) -> dict:
    """One batched call of the same fast tokenizer on the same rendered texts: the floor for any tokenizing pipeline.

    The texts (3 conversations a row, rendered with the chat template) are made first and not timed.
    """
    sys.path.insert(0, str(ROOT))
    import pandas as pd

    from loraflow.config.model import ModelConfig
    from loraflow.modeling.base_model import load_tokenizer, resolve_model_dir
    from loraflow.synthesizers import anime_qa

    tokenizer = load_tokenizer(ModelConfig(base=str(resolve_model_dir(ModelConfig(), ROOT))))
    options = anime_qa.Options(trained_phrasings=1, heldout_phrasings=0, max_synopsis_words=160, natural_questions=0, unknown_titles=0)
    texts = []
    for rows in pd.read_csv(csv_path, dtype=str, keep_default_na=False, chunksize=20_000):
        rows = rows.assign(_source="anime_catalog", _row=range(len(texts) // 3, len(texts) // 3 + len(rows)))
        made, _ = anime_qa.synthesize(rows, options)
        texts += tokenizer.apply_chat_template([[{"role": "system", "content": SYSTEM_PROMPT}, *m] for m in made["messages"]],
                                               tokenize=False)
    load_before, started = load(), time.perf_counter()
    tokens_total = 0
    for first in range(0, len(texts), 20_000):  # one call per 20,000 texts: the same work, bounded output lists
        encoded = tokenizer(texts[first:first + 20_000], add_special_tokens=False, truncation=True, max_length=512)
        tokens_total += sum(len(ids) for ids in encoded["input_ids"])
    return {"seconds": round(time.perf_counter() - started, 2), "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": load(), "examples": len(texts), "tokens_total": tokens_total}


def child(variant: str, csv_path: Path, work: Path, tree: Path) -> dict:
    os.environ.update({key: os.environ.get(key, value) for key, value in QUIET_ENV.items()})
    if variant == "datasets":
        return run_datasets(csv_path, work)
    if variant == "bare":
        return run_bare(csv_path)
    return run_loraflow(csv_path, work, tree, variant)


# ---- equality of two tokens artifacts, row by row, batch by batch


def same_values(first_uri: str, second_uri: str, batch_rows: int = 8192) -> dict:
    """Whether two Parquet files hold the same rows and values (column names, order and values; not bytes)."""
    import pyarrow.parquet as pq

    first, second = pq.ParquetFile(first_uri, pre_buffer=False), pq.ParquetFile(second_uri, pre_buffer=False)
    if first.metadata.num_rows != second.metadata.num_rows or first.schema_arrow.names != second.schema_arrow.names:
        return {"equal": False, "why": f"rows {first.metadata.num_rows} vs {second.metadata.num_rows}, "
                                       f"columns {first.schema_arrow.names} vs {second.schema_arrow.names}"}
    for position, (a, b) in enumerate(zip(first.iter_batches(batch_rows), second.iter_batches(batch_rows))):
        for name in a.schema.names:
            if a.column(name).to_pylist() != b.column(name).to_pylist():
                return {"equal": False, "why": f"column {name!r} differs in rows {position * batch_rows}-{(position + 1) * batch_rows}"}
    return {"equal": True, "rows": first.metadata.num_rows, "columns": first.schema_arrow.names}


# ---- the benchmark


def run_variant(variant: str, csv_path: Path, work: Path, tree: Path, timeout: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--csv", str(csv_path), "--work", str(work), "--tree", str(tree)]
    # Its own session, so a stopped variant is stopped with every process it started (Prefect's API server too).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        return {"error": f"did not finish within --timeout {timeout} s (stopped)", "memory": sampler.stop(),
                "log_tail": [line for line in stderr.splitlines() if "prepare" in line or "Finished" in line][-12:]}
    memory = sampler.stop()
    if process.returncode != 0:
        print(stderr[-3000:], flush=True)
        return {"error": f"exit {process.returncode}: {stderr.strip().splitlines()[-1:]}", "memory": memory}
    return {**json.loads(stdout.strip().splitlines()[-1]), "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=25_000, help="Catalog rows (3 examples each).")
    parser.add_argument("--variants", default="loraflow,datasets", help="Comma-separated: loraflow, dask, datasets, bare (reference is "
                                                                        "added by --reference-tree).")
    parser.add_argument("--reference-tree", help="Another checkout to run the same flow from and compare tokens with.")
    parser.add_argument("--timeout", type=int, default=7200, help="Seconds a variant may take before it is stopped.")
    parser.add_argument("--note", default="", help="A sentence for the result file.")
    parser.add_argument("--out", help="Result file (default benchmarks/results/data_scale_cpu_<rows>.json).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.csv), Path(args.work), Path(args.tree))))
        return

    load_at_start = load()
    variants = {name: ROOT for name in args.variants.split(",")}
    if args.reference_tree:
        variants = {"reference": Path(args.reference_tree).resolve(), **variants}
    with tempfile.TemporaryDirectory(prefix="loraflow-data-scale-") as work:
        work = Path(work)
        csv_path, _ = write_catalog(args.rows, work)
        results = {}
        for variant, tree in variants.items():
            results[variant] = run_variant(variant, csv_path, work, tree, args.timeout)
            line = results[variant]
            print(f"{variant}: {line.get('seconds', line.get('error'))} s, peak RssAnon "
                  f"{line['memory']['largest_peak_rss_anon_gib']} GiB, VmHWM {line['memory']['largest_vm_hwm_gib']} GiB", flush=True)
        if "reference" in results and "tokens_uri" in results.get("loraflow", {}) and "tokens_uri" in results["reference"]:
            results["tokens_equal_to_reference"] = same_values(results["reference"]["tokens_uri"], results["loraflow"]["tokens_uri"])
            print("tokens equal to the reference:", results["tokens_equal_to_reference"], flush=True)

    datasets_seconds = results.get("datasets", {}).get("seconds")
    bare_seconds = results.get("bare", {}).get("seconds")
    result = {
        "command": "python " + shlex.join([sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(load_at_start, "2 cores shared with up to 6 other engineers' tests: a load average above 2 inflates every "
                            "timing (memory figures are not disturbed); each variant's load averages are recorded with it"),
        "note": args.note, "catalog_rows": args.rows, "variants": results,
        "wall_ratio_vs_datasets": {name: round(r["seconds"] / datasets_seconds, 2) for name, r in results.items()
                                   if isinstance(r, dict) and "seconds" in r} if datasets_seconds else None,
        "wall_ratio_vs_bare_tokenizer": {name: round(r["seconds"] / bare_seconds, 2) for name, r in results.items()
                                         if isinstance(r, dict) and "seconds" in r} if bare_seconds else None,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"data_scale_cpu_{args.rows}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
