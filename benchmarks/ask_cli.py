"""`loraflow ask` end to end, each call a fresh process (what a user waits for), before and after a change.

    python benchmarks/ask_cli.py RUN_DIR                       # baseline: a1c81d8 (before issue 15 item 10's ask half)
    python benchmarks/ask_cli.py RUN_DIR --baseline COMMIT --repeats 5

RUN_DIR is a run folder `loraflow run` printed (its `model` link is the published model). The baseline commit's
tree is exported with `git archive` into a temp folder; both trees run `python -m loraflow.cli.commands ask RUN_DIR
QUESTION` with the same interpreter, interleaved (so machine load hits both alike), timed by this process from
start to exit. Both must print the same answer. Writes benchmarks/results/ask_cpu.json with the command and date.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Who made the anime Nagomaju Tantei, and how many episodes does it have?"


def export_tree(commit: str, folder: Path) -> Path:
    """The project's files at `commit`, unpacked into `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def cpu_seconds_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_ask(tree: Path, run_dir: str, question: str) -> tuple[float, float, str]:
    """Wall seconds from start to exit of one `loraflow ask` with `tree` on PYTHONPATH, the CPU seconds it used,
    and the answer it printed."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    started, cpu_before = time.perf_counter(), cpu_seconds_of_children()
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "ask", run_dir, question], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - started, cpu_seconds_of_children() - cpu_before, done.stdout.strip()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder `loraflow run` printed (or its model link)")
    parser.add_argument("--baseline", default="a1c81d8", help="commit to compare against (default: a1c81d8)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per tree (default: 5)")
    parser.add_argument("--question", default=QUESTION, help="the question asked")
    args = parser.parse_args()
    trees = {"before": export_tree(args.baseline, Path(tempfile.mkdtemp(prefix="ask-baseline-"))), "after": ROOT}
    timed_ask(ROOT, args.run_dir, args.question)  # warm the page cache with the model's weights
    seconds, cpu, answers, loads = {name: [] for name in trees}, {name: [] for name in trees}, {}, []
    for _ in range(args.repeats):
        for name, tree in trees.items():
            loads.append(os.getloadavg()[0])
            took, used, answers[name] = timed_ask(tree, args.run_dir, args.question)
            seconds[name].append(round(took, 2))
            cpu[name].append(round(used, 2))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    result = {
        "command": f"python benchmarks/ask_cli.py RUN_DIR --baseline {args.baseline} --repeats {args.repeats}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_during": [min(loads), max(loads)]},
        "question": args.question, "answers": answers, "same_answer": answers["before"] == answers["after"],
        "seconds": seconds, "median_seconds": medians,
        "ratio_after_to_before": round(medians["after"] / medians["before"], 3),
        "cpu_seconds": cpu, "median_cpu_seconds": cpu_medians,
        "cpu_ratio_after_to_before": round(cpu_medians["after"] / cpu_medians["before"], 3),
    }
    out_path = ROOT / "benchmarks" / "results" / "ask_cpu.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
