"""Data preparation at scale: the prepare flow single-process vs. sharded on 1 and on 2 local Dask workers.

    python benchmarks/prepare_scale.py                      # 1,000,000 catalog rows -> 3,000,000 examples
    python benchmarks/prepare_scale.py --rows 250000        # what fits in ~10 minutes per variant on 2 cores
    python benchmarks/prepare_scale.py --rows 5000 --out /tmp/x.json   # a quick look

The catalog is benchmarks/prepare_throughput.py's (scripts/make_sample_data.make_catalog, every row complete,
synopses of 40-160 words, anime_qa with 3 questions per row), written once as a CSV. Each variant runs the whole
prepare flow (flows/prepare.py: ingest -> ... -> pre-flight) cold, in its own store, in its own Python process
(so peak memory is its own), after a warm-up flow has started Prefect's ephemeral API:
  single      prepare.shards: 1, today's single-process path: the baseline;
  dask-1      prepare.shards: --shards, task_runner: dask, workers: 1;
  dask-2      prepare.shards: --shards, task_runner: dask, workers: 2.
The sharded times include starting the local Dask cluster. All three must give the same tokens artifact (sha256).
Writes benchmarks/results/prepare_scale_cpu.json with the command, date, load averages and the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "single": {},
    "dask-1": {"task_runner": "dask", "workers": 1},
    "dask-2": {"task_runner": "dask", "workers": 2},
}
SYSTEM_PROMPT = "You are an anime catalog assistant."


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_record(load_at_start: list[float], note: str) -> dict:
    """A result file's "machine": cores, platform, Python, memory, and the load averages at the start and now."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_1_5_15_at_start": load_at_start, "load_average_1_5_15_at_end": load(), "note": note}


def write_catalog(rows: int, folder: Path) -> tuple[Path, float]:
    """benchmarks/prepare_throughput's catalog of `rows` rows as folder/catalog.csv (printed); its path and seconds."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from prepare_throughput import make_rows  # the same catalog generator and options

    started = time.perf_counter()
    csv_path = folder / "catalog.csv"
    make_rows(rows).to_csv(csv_path, index=False)
    seconds = time.perf_counter() - started
    print(f"catalog: {rows:,} rows, {csv_path.stat().st_size / 2**20:,.0f} MiB, {seconds:.0f} s", flush=True)
    return csv_path, seconds


def start_ephemeral_api() -> None:
    """Run an empty flow, so Prefect's ephemeral API is up before the timed flow starts."""
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> None:
        """Starts the ephemeral API, so the timed flow does not pay for it."""

    warm_up()


def scale_config_fields(name: str, csv_path: Path, work: Path) -> dict:
    """The pipeline config of a scale run over `csv_path` (one trained phrasing a kind, no probes), store in `work`."""
    return dict(
        name=f"scale-{name}", base_dir=str(work), store=str(work / f"store-{name}"), runs_dir=str(work / "runs"),
        sources=[{"kind": "csv", "name": "anime_catalog", "path": str(csv_path)}],
        synthesize={"kind": "anime_qa", "anime_qa": {"trained_phrasings": 1, "heldout_phrasings": 0, "max_synopsis_words": 160,
                                                        "natural_questions": 0, "unknown_titles": 0}},
        format={"system_prompt": SYSTEM_PROMPT}, tokenize={"max_length": 512},
    )


# ---- one variant, in a child process


def run_variant(variant: str, csv_path: Path, work: Path, shards: int) -> dict:
    """Run the prepare flow once, cold, and return its timings; called in a fresh process."""
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT))
    from flows.prepare import prepare_flow
    from loraflow.config.pipeline import PipelineConfig

    start_ephemeral_api()
    config = PipelineConfig(**scale_config_fields(variant, csv_path, work),
                            prepare={"shards": shards, **VARIANTS[variant]} if variant != "single" else {})
    load_before, started = load(), time.perf_counter()
    summary = prepare_flow(config)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 2), "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load(),
        "examples": summary["tokens"]["rows"], "tokens_sha256": summary["tokens"]["sha256"],
        "tokens_total": summary["stages"]["tokenize" if variant == "single" else "tokenize:merge"]["stats"]["tokens_total"],
        "stage_seconds": {name: stage["seconds"] for name, stage in summary["stages"].items()},
        "preflight_passed": summary["preflight"]["passed"],
        # Linux: ru_maxrss is KiB; for children it is the largest one (a Dask worker), not their sum.
        "peak_rss_gib": {"flow_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                         "largest_worker_process": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)},
    }


# ---- the benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="Catalog rows (3 examples each).")
    parser.add_argument("--shards", type=int, default=8, help="prepare.shards of the sharded variants.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds a variant may take before it is stopped and reported so.")
    parser.add_argument("--note", default="", help="A sentence for the result file (e.g. why this size).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare_scale_cpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, Path(args.csv), Path(args.work), args.shards)))
        return

    load_at_start = load()
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="loraflow-scale-") as work:
        work = Path(work)
        csv_path, generate_seconds = write_catalog(args.rows, work)

        results = {}
        for variant in variants:
            command = [sys.executable, __file__, "--child", variant, "--csv", str(csv_path), "--work", str(work),
                       "--shards", str(args.shards)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results[variant] = {"error": f"did not finish within --timeout {args.timeout} s (stopped)", "load_after": load()}
                print(f"{variant}: timed out after {args.timeout} s", flush=True)
                continue
            if done.returncode != 0:
                results[variant] = {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
                print(f"{variant}: failed\n{done.stderr[-3000:]}", flush=True)
                continue
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{variant}: {results[variant]['seconds']:.1f} s, load {results[variant]['load_average_1_5_15_before']} "
                  f"-> {results[variant]['load_average_1_5_15_after']}", flush=True)

    baseline = results.get("single", {}).get("seconds")
    finished = {name: r for name, r in results.items() if "seconds" in r}
    result = {
        "command": "python " + shlex.join([sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(load_at_start, "2 cores shared with other engineers' work: a load average above 2 inflates every timing; "
                            "each variant's own load averages are recorded with it"),
        "note": args.note,
        "catalog_rows": args.rows, "shards": args.shards, "generate_catalog_seconds": round(generate_seconds, 1),
        "variants": results,
        "same_tokens_artifact": len({r["tokens_sha256"] for r in finished.values()}) == 1 if finished else None,
        "ratios_vs_single": {name: round(baseline / r["seconds"], 2) for name, r in finished.items()} if baseline else None,
    }
    print(f"\n{'variant':<10}{'seconds':>10}{'examples/s':>14}{'speed-up':>10}")
    for name, r in finished.items():
        speedup = f"{baseline / r['seconds']:.2f}x" if baseline else "-"
        print(f"{name:<10}{r['seconds']:>10.1f}{r['examples'] / r['seconds']:>14,.0f}{speedup:>10}")
    print("same tokens artifact in every variant:", result["same_tokens_artifact"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
