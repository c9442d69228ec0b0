"""Continue from the champion vs train fresh (issue 33, item 7), on the issue's scenario, stage by stage (no flow).

    python benchmarks/continue_vs_fresh.py --work /tmp/cvf        # the reduced demo config of continue_vs_fresh_flow.py

The same scenario and configs as benchmarks/continue_vs_fresh_flow.py (the demo config, reduced: the champion
trained on the first 5 catalog rows; then rows 2-4 get another studio, score and genres and 2 rows are added), but
run through the library so that it ends on a loaded 2-core CPU, where the flow version's evaluation of three models
per run (base, candidate, champion) did not: `loraflow prepare` makes both TOKENS artifacts, then
`tasks.train.train_adapter` trains the champion (reused from the flow's store folder when it is there; it answers too, so its accuracy on the
unchanged titles is the baseline, and on the edited ones it still states the old facts), the
continued adapter (`train.init_from: champion`, `replay_unchanged` 0.25) and the fresh one, timed; then each
candidate alone (no base, no champion) answers the trained and held-out phrasings about every title (greedy, the
evaluation's own budgets and scoring) and 11 questions of the general suite. Fact accuracy per title group (edited,
new, unchanged). Writes benchmarks/results/continue_vs_fresh_cpu.json with the command, date, machine and loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from continue_vs_fresh_flow import EDITED, changed_catalog, cpu_name, read_catalog, write_config  # noqa: E402

ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "PYTHONPATH": str(ROOT)}


def prepare(config: Path, home: Path) -> dict:
    """`loraflow prepare CONFIG`: the data half's summary (its TOKENS artifact)."""
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "prepare", str(config)], cwd=ROOT,
                          env={**os.environ, **ENV, "PREFECT_HOME": str(home)}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"loraflow prepare {config}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())


def timed_training(tokens, model_dir, train_config, output_dir, store, start=None) -> tuple[object, float, list[float]]:
    from tasks.train import train_adapter

    load, started = [round(x, 2) for x in os.getloadavg()], time.perf_counter()
    result = train_adapter(tokens, model_dir, train_config, output_dir, store=store, start=start)
    return result, round(time.perf_counter() - started, 1), load


def answer(model_dir: Path, adapter_dir: str, frame: pd.DataFrame, eval_config, system_prompt: str) -> dict:
    """The candidate alone: fact hits on the trained/held-out/natural questions, and the general suite."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from loraflow.evaluation.generation import (answer_budgets, generate_answers, load_for_inference, question_prompts,
                                                stop_token_ids)
    from loraflow.evaluation.metrics import evaluation_rows, general_answer_ok, score_answers
    from loraflow.modeling.precision import choose_precision
    from loraflow.modeling.prompt_encoding import question_prompt_ids

    questions, _, _ = evaluation_rows(frame, eval_config)
    questions = questions[questions["set"].isin(["trained", "heldout", "natural"])].reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = stop_token_ids(tokenizer, model_dir)
    model = load_for_inference(model_dir, precision=choose_precision("auto", "cpu").precision)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, question_prompts(questions), max_new_tokens=answer_budgets(questions, tokenizer, eval_config),
                               batch_size=16, stop_ids=stop_ids)
    scored = score_answers(questions, answers, tokenizer)
    general_questions = eval_config.general_questions
    general = generate_answers(model, tokenizer, [question_prompt_ids(tokenizer, q, system_prompt) for q in general_questions],
                               max_new_tokens=eval_config.general_max_new_tokens, batch_size=16, stop_ids=stop_ids)
    right = sum(general_answer_ok(g["text"], eval_config.general_expected[q], q) for g, q in zip(general, general_questions))
    return {"scored": scored, "general_right": int(right), "general_total": len(general_questions),
            "seconds": round(time.perf_counter() - started, 1)}


def accuracy_by_title(scored: pd.DataFrame, rows: int) -> dict:
    """Fact accuracy (and n) per title group (edited, new, unchanged) and phrasing set."""
    scored = scored[scored["id"].str.startswith("anime_catalog:")]
    row = scored["id"].str.split(":").str[1].astype(int)
    scored = scored.assign(group=["edited" if r in EDITED else "new" if r >= rows else "unchanged" for r in row])
    result = {}
    for (group, phrasing), part in scored.groupby(["group", "set"]):
        result.setdefault(group, {})[phrasing] = {"accuracy": round(float(part["fact_hit"].astype(float).mean()), 3), "n": len(part)}
    for group, part in scored.groupby("group"):
        result[group]["all"] = {"accuracy": round(float(part["fact_hit"].astype(float).mean()), 3), "n": len(part)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the store (a champion trained there is reused)")
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--added", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--replay", type=float, default=0.25)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continue_vs_fresh_cpu.json"))
    args = parser.parse_args()
    options = SimpleNamespace(trained_phrasings=3, refusal_examples=2, epochs=args.epochs, replay=args.replay, threads=1,
                              max_questions=10_000, general_every=4)
    from flows.finetune import work_dir
    from loraflow.config.pipeline import config_hash, load_config
    from loraflow.modeling.base_model import resolve_model_dir
    from loraflow.publishing.champion_start import adapter_sha256
    from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
    from loraflow.training.checkpoints import base_model_fingerprint
    from loraflow.training.continuation import StartAdapter

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    catalog, home = work / "catalog.csv", work / "prefect-home"
    read_catalog().head(args.rows).to_csv(catalog, index=False)
    config_path = write_config(work, catalog, options, "none")
    config = load_config(config_path)
    tokens_before = ArtifactRef(**prepare(config_path, home)["tokens"])
    changed_catalog(args.rows, args.added).to_csv(catalog, index=False)
    tokens_after = ArtifactRef(**prepare(config_path, home)["tokens"])
    store, model_dir = ArtifactStore(config.store_root()), resolve_model_dir(config.model)
    runs = {}
    # ---- the champion: in the flow's own folder for it, so a champion the flow trained is reused
    champion_dir = work_dir(config.store_root(), "train", tokens_before.sha256, base_model_fingerprint(model_dir),
                            config_hash(config.train))
    champion, seconds, load = timed_training(tokens_before, model_dir, config.train, champion_dir, store)
    runs["champion"] = {"train_seconds": champion.seconds, "wall_seconds_here": seconds, "reused": champion.reused,
                        "train_steps": champion.global_step, "train_rows": champion.train_rows, "load_before": load}
    print("champion", runs["champion"], flush=True)
    start = StartAdapter(model_name=config.name, version=1, adapter_dir=champion.adapter_dir,
                         adapter_sha256=adapter_sha256(Path(champion.adapter_dir)), tokens=tokens_before)
    continued_config = config.train.model_copy(update={"init_from": "champion"})
    frame = store.read(tokens_after)
    answered = answer(model_dir, champion.adapter_dir, frame, config.eval, config.format.system_prompt)
    runs["champion"] |= {"accuracy_by_title": accuracy_by_title(answered["scored"], args.rows),  # edited: its old facts
                         "general_right": answered["general_right"], "general_total": answered["general_total"]}
    for name, train_config, start_adapter in (("continued", continued_config, start), ("fresh", config.train, None)):
        result, seconds, load = timed_training(tokens_after, model_dir, train_config, work / f"train_{name}", store, start_adapter)
        answered = answer(model_dir, result.adapter_dir, frame, config.eval, config.format.system_prompt)
        runs[name] = {"train_seconds": result.seconds, "train_steps": result.global_step, "train_rows": result.train_rows,
                      "final_loss": result.final_loss, "load_before": load, "reused": result.reused,
                      "continuation": result.continuation.model_dump(mode="json", exclude={"start"}) if result.continuation else None,
                      "accuracy_by_title": accuracy_by_title(answered["scored"], args.rows),
                      "general_right": answered["general_right"], "general_total": answered["general_total"],
                      "answer_seconds": answered["seconds"], "load_after": [round(x, 2) for x in os.getloadavg()]}
        print(name, json.dumps(runs[name]), flush=True)
    result = {
        "command": "python " + shlex.join([sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_name(), "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other engineers' runs and tests (load averages per step)"},
        "scenario": {"champion_rows": args.rows, "edited_rows": list(EDITED), "added_rows": args.added,
                     "config": "configs/anime_demo.yaml reduced (benchmarks/continue_vs_fresh_flow.py write_config): epochs "
                               f"{args.epochs}, 3 trained phrasings, 2 refusal examples, replay_unchanged {args.replay}, "
                               "cpu_threads 1; every trained/held-out/natural question, general suite every 4th (11)"},
        "runs": runs,
        "continued_vs_fresh": {key: round(runs["continued"][key] / runs["fresh"][key], 3) for key in ("train_seconds", "train_steps")},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["continued_vs_fresh"]))


if __name__ == "__main__":
    main()
