"""`loraflow run configs/gpu_8b.yaml` on one GPU, measured stage by stage (issue 31).

    python benchmarks/gpu_flow.py --out $OUT                               # on the GPU machine (docs/gpu_flow.md)
    python benchmarks/gpu_flow.py --layers 2 --hidden 256 --max-steps 2 --catalog 40 --questions 8 --out /tmp/o   # CPU

Makes the catalog (scripts/make_sample_data.py) and the 8B stand-in (scripts/make_8b_model.py), then runs the CLI's
own `loraflow run` in this process, so it can wrap the stage functions (tasks.train.train_adapter,
tasks.evaluate.evaluate_adapter, tasks.publish.publish_model and publish's steps) without changing them: each
wrapper records the stage's wall time, the allocator's peak allocated and reserved GPU memory (peaks reset at the
stage's start) and the host's peak RSS while it ran (/proc/self/status, sampled every 0.2 s). Train's `on_step`
gives the time to the first optimizer step. Prepare stages' times come from the run summary.

--ab N first asks N catalog questions of the base model one at a time and batched (eval.batch_size auto) and
records both rates and whether the answers are the same. --deadline writes what was measured so far and exits
before the device tool's 10-minute limit. Writes gpu_flow.json (and gpu_flow_timeline.json: every sample).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRAPPED = {  # module -> functions measured as stages (publish's steps nest inside publish)
    "tasks.train": ["train_adapter"],
    "tasks.evaluate": ["evaluate_adapter"],
    "tasks.publish": ["publish_model", "merge_adapter", "save_merged", "export_verified_gguf", "export_gguf",
                      "gguf_logit_difference", "gguf_logit_difference_in_place"],
}


# ---- sampling ------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident set size (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Samples host RSS and the GPU allocator every `period` s; `peak_rss(since)` is the peak since a time."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self.stopped = period, [], threading.Event()
        self.started = time.perf_counter()

    def run(self):
        import torch

        cuda = torch.cuda.is_available()
        while not self.stopped.is_set():
            allocated = torch.cuda.memory_allocated() if cuda else 0
            reserved = torch.cuda.memory_reserved() if cuda else 0
            self.samples.append((round(time.perf_counter() - self.started, 2), rss_bytes(), allocated, reserved))
            self.stopped.wait(self.period)

    def peak_rss(self, since: float) -> int:
        """Peak RSS among samples taken at or after `since` (seconds from the sampler's start), and now."""
        return max([rss for t, rss, _, _ in self.samples if t >= since] + [rss_bytes()])


def gib(value: float | None) -> float | None:
    """Bytes as GiB, 2 decimals."""
    return None if value is None else round(value / 2**30, 2)


def wrap_stage(module, name: str, sampler: Sampler, stages: list[dict]):
    """Replace module.name by a wrapper that appends {stage, start_s, seconds, GPU peaks, RSS peak} to `stages`."""
    import torch

    original = getattr(module, name)

    def measured(*args, **kwargs):
        record = {"stage": name, "start_s": round(time.perf_counter() - sampler.started, 2)}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if "on_step" in kwargs and kwargs["on_step"] is not None:
            kwargs["on_step"] = first_step_timer(kwargs["on_step"], record, sampler)
        stages.append(record)
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)
            record["rss_peak_gib"] = gib(sampler.peak_rss(record["start_s"]))
            if torch.cuda.is_available():
                record["gpu_peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
                record["gpu_peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())

    setattr(module, name, measured)


def first_step_timer(on_step, record: dict, sampler: Sampler):
    """`on_step` that also notes, once, the seconds from the stage's start to the first optimizer step."""
    def timed(step, max_steps, loss):
        record.setdefault("first_step_s", round(time.perf_counter() - sampler.started - record["start_s"], 2))
        return on_step(step, max_steps, loss)

    return timed


# ---- the one-at-a-time vs batched sample -----------------------------------------------------------------

def catalog_questions(catalog_csv: Path, count: int) -> list[str]:
    """`count` questions about the first titles of the catalog, of the three kinds the demo trains."""
    import pandas as pd

    titles = pd.read_csv(catalog_csv)["Name"].head(count).tolist()
    forms = ["Who made {}?", "What is {} about?", "How was {} received?"]
    return [forms[i % 3].format(title) for i, title in enumerate(titles)]


def one_at_a_time_vs_batched(model_dir: Path, catalog_csv: Path, count: int, budget: int) -> dict:
    """The base model answers `count` questions with batch_size 1 and "auto": rates and answer agreement."""
    import torch
    from transformers import AutoTokenizer

    from loraflow.evaluation.generation import generate_answers, load_for_inference, stop_token_ids
    from loraflow.modeling.prompt_encoding import question_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    model = load_for_inference(model_dir)
    load_s = time.perf_counter() - started
    prompts = [question_prompt_ids(tokenizer, q, "You are an anime catalog assistant.")
               for q in catalog_questions(catalog_csv, count)]
    stop_ids, runs = stop_token_ids(tokenizer, model_dir), {}
    for label, batch in (("one_at_a_time", 1), ("batched", "auto")):
        generate_answers(model, tokenizer, prompts[:2], max_new_tokens=4, batch_size=batch, stop_ids=stop_ids)  # warm-up
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=budget, batch_size=batch, stop_ids=stop_ids)
        seconds = time.perf_counter() - started
        runs[label] = {"seconds": round(seconds, 2), "questions_per_s": round(len(prompts) / seconds, 2),
                       "generated_tokens": sum(a["n_tokens"] for a in answers), "batch_size": answers[0]["batch_size"],
                       "texts": [a["text"] for a in answers]}
    same = [a == b for a, b in zip(runs["one_at_a_time"].pop("texts"), runs["batched"].pop("texts"))]
    del model
    torch.cuda.empty_cache()
    return {"questions": count, "budget_tokens": budget, "load_s": round(load_s, 2), **runs,
            "same_answers": sum(same), "speedup": round(runs["one_at_a_time"]["seconds"] / runs["batched"]["seconds"], 2)}


# ---- publish's old ways, on the published folder ---------------------------------------------------------

def measured_step(name: str, sampler: Sampler, steps: list[dict], work) -> None:
    """Run `work()`, appending {step, seconds, RSS before and peak, GPU peak allocated} to `steps` (also on failure)."""
    import torch

    record = {"step": name, "start_s": round(time.perf_counter() - sampler.started, 2), "rss_before_gib": gib(rss_bytes())}
    steps.append(record)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        record["result"] = work()
    finally:
        record["seconds"] = round(time.perf_counter() - started, 2)
        record["rss_peak_gib"] = gib(sampler.peak_rss(record["start_s"]))
        if torch.cuda.is_available():
            record["gpu_peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())


def publish_before_after(folder: Path, texts: list[str], sampler: Sampler, steps: list[dict], saves: bool = True) -> None:
    """On a merged (or stand-in) folder: save with transformers' default 50 GB shards vs publish's 2 GB (`saves`),
    the streamed GGUF writer and the in-place logit check, then the gguf package's buffered writer and the reload
    check (merged + GGUF in float32 on the host), the old ways last."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.publishing.gguf import export_gguf, gguf_logit_difference
    from loraflow.publishing.gguf_check import gguf_logit_difference_in_place
    from loraflow.publishing.merge import verification_batch

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": 0} if torch.cuda.is_available() else None)
    scratch = folder.parent / "scratch"
    for shard in ("2GB", "50GB") if saves else ():
        measured_step(f"save_pretrained_{shard}_shards", sampler, steps,
                      lambda: model.save_pretrained(scratch / shard, max_shard_size=shard) and None)
        shutil.rmtree(scratch / shard, ignore_errors=True)
    measured_step("export_gguf_streamed", sampler, steps, lambda: str(export_gguf(folder, quantization="f16", eos_ids=[2])))
    path = folder / "model-f16.gguf"
    inputs = verification_batch(AutoTokenizer.from_pretrained(folder), texts, next(model.parameters()).device)
    measured_step("gguf_check_in_place", sampler, steps, lambda: gguf_logit_difference_in_place(model, path, inputs))
    del model
    torch.cuda.empty_cache()
    measured_step("export_gguf_buffered", sampler, steps,
                  lambda: str(export_gguf(folder, quantization="f16", eos_ids=[2], buffered=True)))
    measured_step("gguf_check_reload_float32_cpu", sampler, steps, lambda: gguf_logit_difference(folder, path, texts))


# ---- the run ---------------------------------------------------------------------------------------------

def run_config(data_dir: Path, *, max_steps: int | None = None, questions: int | None = None,
               eval_batch: str | None = None, general_questions: int | None = None) -> Path:
    """configs/gpu_8b.yaml with this run's paths (model, catalog, store and runs under `data_dir`) and, where given,
    train.max_steps, eval.max_questions, eval.batch_size and the first `general_questions` of the general suite;
    written to `data_dir`/gpu_8b.yaml."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "gpu_8b.yaml").read_text())
    config["base_dir"] = str(ROOT / "configs")
    config["model"]["base"] = str(data_dir / "model")
    config["sources"][0]["path"] = str(data_dir / "anime_catalog.csv")
    config["store"] = str(data_dir / "store")
    config["runs_dir"] = str(data_dir / "runs")
    if max_steps is not None:
        config["train"]["max_steps"] = max_steps
    if questions is not None:
        config["eval"]["max_questions"] = questions
    if eval_batch is not None:
        config["eval"]["batch_size"] = eval_batch if eval_batch == "auto" else int(eval_batch)
    if general_questions is not None:
        from loraflow.config.general_suite import GENERAL_SUITE

        config["eval"]["general_questions"] = list(GENERAL_SUITE)[:general_questions]
    path = data_dir / "gpu_8b.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def versions() -> dict:
    """Versions of what the run used, and the GPU."""
    import importlib.metadata as md

    import torch

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "prefect", "gguf",
                 "safetensors", "pandas", "pyarrow"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    found["python"] = sys.version.split()[0]
    return found


def write_result(out: Path, result: dict, sampler: Sampler) -> None:
    """gpu_flow.json (the result) and gpu_flow_timeline.json (t, RSS, allocated, reserved in GiB per sample)."""
    out.mkdir(parents=True, exist_ok=True)
    result["wall_s"] = round(time.perf_counter() - sampler.started, 1)
    result["rss_peak_gib"] = gib(sampler.peak_rss(0))
    (out / f"gpu_flow{result['tag']}.json").write_text(json.dumps(result, indent=1, default=str))
    timeline = [(t, gib(r), gib(a), gib(v)) for t, r, a, v in sampler.samples]
    (out / f"gpu_flow{result['tag']}_timeline.json").write_text(json.dumps(timeline))


def summarise_flow(summary: dict) -> dict:
    """What the run summary says per stage: prepare stages' seconds, train's rate and plan, eval's timing."""
    train = summary.get("train") or {}
    return {
        "prepare_stages_s": {name: stage["seconds"] for name, stage in summary.get("stages", {}).items()},
        "flow_seconds": summary.get("seconds"),
        "train": {k: train.get(k) for k in ("global_step", "train_rows", "train_tokens", "tokens_per_second",
                                            "tokens_per_second_after_first_step", "first_step_seconds", "rows_per_micro_batch", "seconds",
                                            "peak_memory_bytes", "device_name", "speed_plan")},
        "eval": {k: (summary.get("eval") or {}).get(k) for k in ("seconds", "timing")},
        "publish": {k: (summary.get("publish") or {}).get(k) for k in ("seconds", "gguf_file", "max_logit_diff",
                                                                      "gguf_max_logit_diff", "saved_dtype", "timing")},
    }


def main() -> int:
    """Command line: prepare inputs, optionally the A/B sample, then `loraflow run`; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=str(ROOT / ".loraflow" / "gpu_8b"))
    parser.add_argument("--tokenizer-dir", default=None, help="SmolLM2's tokenizer files (scripts/gpu_carry.sh's smollm2/)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--catalog", type=int, default=5000, help="titles in the generated catalog")
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps (default: the config's)")
    parser.add_argument("--questions", type=int, default=None, help="eval.max_questions (default: the config's)")
    parser.add_argument("--eval-batch", default=None, help="eval.batch_size (default: the config's)")
    parser.add_argument("--ab", type=int, default=0, help="questions in the one-at-a-time vs batched sample (0: none)")
    parser.add_argument("--ab-budget", type=int, default=48)
    parser.add_argument("--publish-before", action="store_true",
                        help="after the run, time publish's old ways (50 GB shards, buffered GGUF, reload check) on its folder")
    parser.add_argument("--publish-only", action="store_true",
                        help="no run: the GGUF writers and checks, new then old, on the stand-in model's own folder")
    parser.add_argument("--deadline", type=float, default=570, help="seconds after which the JSON is written and we exit")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    out, data_dir = Path(args.out), Path(args.data_dir)
    os.chdir(ROOT)
    sampler = Sampler()
    sampler.start()
    result = {"command": "python benchmarks/gpu_flow.py " + " ".join(sys.argv[1:]), "tag": args.tag,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
              "stages": [], "status": "started"}
    deadline = threading.Timer(args.deadline, lambda: (result.update(status="deadline"), write_result(out, result, sampler),
                                                       os._exit(3)))
    deadline.daemon = True
    deadline.start()
    try:
        run(args, data_dir, sampler, result)
        result["status"] = "done"
    except BaseException as error:  # noqa: BLE001 - a failed run is still a measurement; the JSON says how it ended
        result["status"] = f"failed: {type(error).__name__}: {str(error)[:2000]}"
        raise
    finally:
        write_result(out, result, sampler)
    return 0


def run(args, data_dir: Path, sampler: Sampler, result: dict) -> None:
    """The measured steps in order: inputs, A/B sample, the flow through the CLI."""
    import importlib

    from scripts.make_8b_model import build, default_tokenizer_dir
    from scripts.make_sample_data import write_catalog

    started = time.perf_counter()
    catalog = write_catalog(data_dir, args.catalog)
    tokenizer_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    build(data_dir / "model", tokenizer_dir, args.layers, args.hidden)
    result["inputs_s"] = round(time.perf_counter() - started, 1)
    if args.publish_only:
        result["publish_before_after"] = []
        publish_before_after(data_dir / "model", catalog_questions(catalog, 4), sampler, result["publish_before_after"],
                             saves=False)
        return
    if args.ab:
        result["one_at_a_time_vs_batched"] = one_at_a_time_vs_batched(data_dir / "model", catalog, args.ab, args.ab_budget)
        print(json.dumps(result["one_at_a_time_vs_batched"]), flush=True)
    config_path = run_config(data_dir, max_steps=args.max_steps, questions=args.questions, eval_batch=args.eval_batch)
    for module_name, names in WRAPPED.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                wrap_stage(module, name, sampler, result["stages"])
    from loraflow.cli.commands import main as loraflow_main

    started = time.perf_counter()
    result["flow_start_s"] = round(started - sampler.started, 2)
    result["exit_code"] = loraflow_main(["run", str(config_path)])
    result["loraflow_run_s"] = round(time.perf_counter() - started, 1)
    summaries = sorted((data_dir / "runs").glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    if summaries:
        result["flow"] = summarise_flow(json.loads(summaries[-1].read_text()))
    if args.publish_before and result.get("flow", {}).get("publish", {}).get("gguf_file"):
        result["publish_before_after"] = []
        publish_before_after(Path(result["flow"]["publish"]["gguf_file"]).parent, catalog_questions(catalog, 4),
                             sampler, result["publish_before_after"])


if __name__ == "__main__":
    raise SystemExit(main())
