"""The docs/preference.md table: SFT alone vs SFT + DPO, from two `loraflow run` summaries (summary.json).

    python benchmarks/preference_table.py RUN_DIR_SFT/summary.json RUN_DIR_DPO/summary.json

Prints one markdown row per run: the evaluation's headline metrics of the fine-tuned model with their sample sizes,
general right -> wrong, the gate, and the seconds of training, DPO, evaluation and the whole run.
"""

import json
import sys
from pathlib import Path

# (column, metric, the metric holding its sample size)
METRICS = (("trained", "fact_accuracy", "fact_questions"), ("held-out", "heldout_fact_accuracy", "heldout_questions"),
           ("natural", "natural_fact_accuracy", "natural_questions"), ("made-up refused", "refusal_rate", "refusal_questions"),
           ("known refused", "false_refusal_rate", "false_refusal_questions"), ("stop", "stop_rate", "questions"))


def cell(metrics: dict, key: str, count_key: str) -> str:
    value, count = metrics.get(key), metrics.get(count_key)
    return "—" if value is None else f"{value:.3f}" + (f" (n={count})" if count else "")


def row(summary: dict) -> str:
    tuned, base = summary["eval"]["finetuned"], summary["eval"]["base"]
    general = f"{tuned.get('general_right')} of {tuned.get('general_total')} (base {base.get('general_right')})"
    evaluation = json.loads((Path(summary["eval"]["report"]).parent / "eval_metrics.json").read_text())
    regressions = evaluation["general_regressions"]
    stage_seconds = summary["cost"]["device_seconds"]
    gate = summary["eval"]["gate"]
    verdict = "passed" if gate["passed"] else "refused: " + "; ".join(r for r in gate["reasons"] if not r.startswith("PASS"))
    cells = [summary["name"], *[cell(tuned, key, count) for _, key, count in METRICS], general, str(regressions), verdict,
             *[f"{stage_seconds.get(stage, 0):.0f}" for stage in ("train", "preference", "evaluate")], f"{summary['seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print("| run | " + " | ".join(name for name, *_ in METRICS) + " | general right | right -> wrong | gate | train s | "
          "pairs + DPO s | evaluate s | run s |")
    print("|" + "---|" * (len(METRICS) + 8))
    for path in sys.argv[1:]:
        print(row(json.loads(open(path).read())))
