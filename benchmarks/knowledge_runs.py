"""One markdown row per finished run folder for docs/knowledge.md: the issue's target metrics, false refusals
recounted from the run's answers (so runs made before the metric existed are counted the same way), the validation
loss with its size, the rows withheld, steps and times.

    python benchmarks/knowledge_runs.py RUN_DIR [RUN_DIR ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from loraflow.evaluation.metrics import refused
from loraflow.runs.summary import RunSummary


def run_row(run_dir: str) -> dict:
    """The measured numbers of one run folder."""
    summary = RunSummary.read(run_dir)
    answers = pd.read_parquet(Path(summary.eval.report).parent / "eval_answers.parquet")
    natural = answers[(answers["set"] == "natural") & (answers["kind"] != "refusal")]
    falsely = natural["finetuned_answer"].map(refused)
    tuned, base = summary.eval.finetuned, summary.eval.base
    regressions = next((int(m.group(1)) for reason in summary.eval.gate.reasons
                        if (m := re.search(r"(\d+) general answer\(s\) went from right to wrong", reason))), None)
    tokenize = summary.stages.get("tokenize") or summary.stages.get("tokenize:merge")
    return {
        "run_dir": run_dir, "trained": tuned.get("fact_accuracy"), "heldout": tuned.get("heldout_fact_accuracy"),
        "natural": tuned.get("natural_fact_accuracy"), "made_up_refused": tuned.get("refusal_rate"),
        "false_refusals": round(float(falsely.mean()), 4) if len(natural) else None,
        "false_refusals_n": f"{int(falsely.sum())}/{len(natural)}",
        "false_refusals_by_kind": {k: f"{int(v.sum())}/{len(v)}" for k, v in falsely.groupby(natural["kind"])},
        "stop": tuned.get("stop_rate"), "general": tuned.get("general_right"), "general_base": base.get("general_right"),
        "general_regressions": regressions, "eval_loss": tuned.get("eval_loss"), "base_eval_loss": base.get("eval_loss"),
        "eval_loss_split": tuned.get("eval_loss_split"), "eval_loss_examples": tuned.get("eval_loss_examples"),
        "eval_loss_tokens": tuned.get("eval_loss_tokens"), "withheld_rows": tokenize.stats.get("withheld_source_ids", []),
        "steps": summary.train.global_step, "train_s": summary.train.seconds, "eval_s": summary.eval.seconds,
        "run_s": summary.seconds, "gate_passed": summary.eval.gate.passed,
        "gate_failures": summary.eval.gate.failures,
    }


def main() -> None:
    """Print a JSON object per run folder (and write them all to --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows = [run_row(run_dir) for run_dir in args.run_dirs]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
