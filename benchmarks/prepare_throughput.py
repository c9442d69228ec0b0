"""The data half's throughput (after ingest): synthesize -> format -> tokenize -> contracts -> pre-flight.

    python benchmarks/prepare_throughput.py                 # 25,000 catalog rows -> 75,000 examples
    python benchmarks/prepare_throughput.py --rows 2000 --no-flow   # quick look

Compared in one run, on the same catalog and tokenizer (SmolLM2-135M-Instruct, the default):
  (a) recipe   the recipes' way (recipe 003): a pandas row loop builds three question/answer texts per row
               with an f-string template, then one tokenizer call per example (no masks, no split, no checks);
  (b) bare     one batched call of the same fast tokenizer on loraflow's final texts: the floor for any
               tokenizing pipeline;
  (c) loraflow run_synthesize + run_format + run_tokenize (contracts enforced on write, artifacts hashed and
               written) + run_preflight, without Prefect;
  (d) cached   the prepare flow (flows/prepare.py) run twice on the same CSV: the second run is all Prefect
               cache hits (its time includes the ephemeral API's per-flow overhead, not its start-up).
anime_qa is set to 3 questions per row (one trained phrasing per kind, no heldout phrasing) so that 25k rows
give 75k examples, and max_synopsis_words=160 so answers carry the whole 40-160-word synopsis.
Writes benchmarks/results/prepare_throughput_cpu.json (with the command and date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy shared machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from loraflow.config.format import FormatConfig  # noqa: E402
from loraflow.config.synthesize import SynthesizeConfig  # noqa: E402
from loraflow.synthesizers import anime_qa  # noqa: E402
from loraflow.config.tokenize import TokenizeConfig  # noqa: E402
from loraflow.modeling.base_model import resolve_model_dir  # noqa: E402
from loraflow.config.model import ModelConfig  # noqa: E402
from loraflow.runtime.artifact_store import ArtifactStore  # noqa: E402

SYSTEM_PROMPT = "You are an anime catalog assistant."


def make_rows(n_rows: int) -> pd.DataFrame:
    """The catalog: scripts/make_sample_data.make_catalog, every row complete, synopses of 40-160 words."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_sample_data import make_catalog

    return make_catalog(n_rows, complete_rows=n_rows, complete_synopsis_words=(40, 160))


def synth_config() -> SynthesizeConfig:
    return SynthesizeConfig(kind="anime_qa", anime_qa=anime_qa.Options(trained_phrasings=1, heldout_phrasings=0, max_synopsis_words=160,
                                                                     natural_questions=0, unknown_titles=0))


# ---- (a) the recipes' way
def recipe_way(catalog: pd.DataFrame, tokenizer) -> tuple[float, int]:
    started = time.perf_counter()
    texts = []
    for _, row in catalog.iterrows():  # recipe 003: one generic-information question per column group
        pairs = [
            (f"Tell me about the anime {row['Name']}.", f"{row['Name']} ({row['English name']}) is a {row['Type']} "
             f"with {row['Episodes']} episodes in the genres {row['Genres']}. {row['Synopsis']}"),
            (f"Who produced {row['Name']}?", f"{row['Name']} was produced by {row['Producers']} and animated by {row['Studios']}."),
            (f"How was {row['Name']} received?", f"{row['Name']} is rated {row['Rating']} and scored {row['Score']} "
             f"by {row['Scored By']} users."),
        ]
        for question, answer in pairs:
            texts.append(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                         f"<|im_start|>assistant\n{answer}<|im_end|>\n")
    examples = [tokenizer(text, truncation=True, max_length=512) for text in texts]
    return time.perf_counter() - started, len(examples)


# ---- (c) loraflow's stages, no Prefect
def loraflow_way(catalog: pd.DataFrame, tokenizer_dir: str, store_root: str) -> dict:
    from tasks.format import run_format
    from tasks.preflight import run_preflight
    from tasks.synthesize import run_synthesize
    from tasks.tokenize import run_tokenize

    store = ArtifactStore(store_root)
    raw = catalog.assign(_source="anime_catalog", _row=range(len(catalog)))
    raw_ref = store.write(raw, stage="ingest", contract="raw", schema_version=1, config_hash="benchmark")
    format_config, tokenize_config = FormatConfig(system_prompt=SYSTEM_PROMPT), TokenizeConfig(max_length=512)
    seconds, started = {}, time.perf_counter()
    conversations = run_synthesize([raw_ref], synth_config(), store)
    seconds["synthesize"] = time.perf_counter() - started
    mark = time.perf_counter()
    formatted = run_format(conversations.output, format_config, tokenizer_dir, store)
    seconds["format"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tokens = run_tokenize(formatted.output, tokenize_config, tokenizer_dir, store)
    seconds["tokenize"] = time.perf_counter() - mark
    mark = time.perf_counter()
    report = run_preflight(tokens.output, formatted.output, format_config, tokenizer_dir, store)
    seconds["preflight"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started
    texts = ["".join(s["text"] for s in segments) for segments in store.read(formatted.output)["segments"]]
    return {"seconds": seconds, "examples": formatted.rows_out, "tokens_rows": tokens.rows_out,
            "tokenize_stats": tokens.stats, "format_stats": formatted.stats, "preflight_passed": report["passed"],
            "texts": texts}


# ---- (d) the prepare flow, cold then cached
def flow_way(catalog: pd.DataFrame, work: Path) -> dict:
    from flows.prepare import prepare_flow
    from loraflow.config.pipeline import PipelineConfig

    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "catalog.csv"
    catalog.to_csv(csv_path, index=False)
    config = PipelineConfig(
        name="bench", base_dir=str(work), store=str(work / "store"), runs_dir=str(work / "runs"),
        sources=[{"kind": "csv", "name": "anime_catalog", "path": str(csv_path)}],
        synthesize=synth_config(), format=FormatConfig(system_prompt=SYSTEM_PROMPT), tokenize=TokenizeConfig(max_length=512),
    )
    runs = []
    for _ in range(2):
        started = time.perf_counter()
        summary = prepare_flow(config)
        runs.append({"wall_seconds": time.perf_counter() - started, "flow_seconds": summary.get("prepare_seconds", summary.get("seconds")),
                     "all_cached": summary["all_cached"],
                     "stage_seconds": {k: v["seconds"] for k, v in summary["stages"].items()}})
    return {"cold": runs[0], "cached": runs[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=25_000, help="Catalog rows (3 examples each).")
    parser.add_argument("--no-flow", action="store_true", help="Skip (d), the Prefect flow runs.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare_throughput_cpu.json"))
    args = parser.parse_args()

    from tasks.format import load_tokenizer_dir

    load_before = os.getloadavg()
    tokenizer_dir = str(resolve_model_dir(ModelConfig()))
    tokenizer = load_tokenizer_dir(tokenizer_dir)
    catalog = make_rows(args.rows)

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as work:
        work = Path(work)
        loraflow = loraflow_way(catalog, tokenizer_dir, str(work / "store-direct"))
        texts = loraflow.pop("texts")
        started = time.perf_counter()
        bare = tokenizer(texts, add_special_tokens=False)
        bare_seconds = time.perf_counter() - started
        del bare
        recipe_seconds, recipe_examples = recipe_way(catalog, tokenizer)
        flow = None if args.no_flow else flow_way(catalog, work / "flow")

    n = loraflow["examples"]
    ours = loraflow["seconds"]["total"]
    result = {
        "command": "python " + " ".join([sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other engineers' work: a load average above 2 means every timing here "
                            "is inflated; compare the ratios, which were measured in the same run"},
        "catalog_rows": args.rows, "examples": n, "tokens_total": loraflow["tokenize_stats"]["tokens_total"],
        "recipe": {"seconds": round(recipe_seconds, 3), "examples": recipe_examples},
        "bare_tokenizer": {"seconds": round(bare_seconds, 3)},
        "loraflow": {"seconds": {k: round(v, 3) for k, v in loraflow["seconds"].items()},
                     "preflight_passed": loraflow["preflight_passed"],
                     "chat_template_render": loraflow["format_stats"].get("chat_template_render"),
                     "tokenize_stats": loraflow["tokenize_stats"]},
        "flow": flow if flow is not None else "skipped (--no-flow)",
        "ratios": {
            "loraflow_over_bare": round(ours / bare_seconds, 2),
            "format_tokenize_over_bare": round((loraflow["seconds"]["format"] + loraflow["seconds"]["tokenize"]) / bare_seconds, 2),
            "recipe_over_loraflow": round(recipe_seconds / ours, 2),
            **({"cached_over_loraflow": round(flow["cached"]["wall_seconds"] / ours, 3)} if flow else {}),
        },
    }
    print(f"{'way':<28}{'seconds':>10}{'examples/s':>14}")
    rows = [("(a) recipe: row loop + 1 call/ex", recipe_seconds), ("(b) bare batched tokenizer", bare_seconds),
            ("(c) loraflow data half", ours)]
    rows += [(f"    {k}", v) for k, v in loraflow["seconds"].items() if k != "total"]
    if flow:
        rows += [("(d) flow, cold (incl. ingest)", flow["cold"]["wall_seconds"]), ("(d) flow, cached re-run", flow["cached"]["wall_seconds"])]
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>8.2f}{n / seconds:>14,.0f}")
    print("ratios:", json.dumps(result["ratios"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
