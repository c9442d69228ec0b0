"""Issue 33's retraining scenario replayed through a real Prefect server and process worker.

    python benchmarks/retrain_scenario.py            # configs/anime_demo.yaml, 30-60 min on a loaded 2-core CPU
    python benchmarks/retrain_scenario.py --tiny     # 4 catalog rows, 2 steps, 2 questions: a few minutes

A `loraflow server`-style server (its own PREFECT_HOME and port) with a `loraflow-cpu` process worker; the demo
config, its catalog copied into a temporary project folder, put on a schedule with `loraflow schedule CONFIG --cron`
(a cron that does not fire during the benchmark) and `loraflow notify-on-failure` posting to a local HTTP listener.
Each run is `prefect deployment run finetune/<name>-schedule`, timed from that command to the flow run's final
state:
  1. first       the demo's own catalog rows;
  2. unchanged   nothing changed;
  3. changed     3 rows edited (continue_vs_fresh_flow.changed_catalog) and 2 added: published, or Refused and
                 posted to the webhook (with the `loraflow.model.refused` event);
  4. threshold   same data, gate thresholds changed (`loraflow schedule` again): what refused run 3 loosened, else
                 min_stop_rate 0.97 -> 0.96; the gate re-decides on the cached evaluation;
  5. rollback    `loraflow rollback NAME` (seconds), then one more run whose gate compares against that champion.
--init-from-champion adds run 3's data again with `train.init_from: champion`: it continues from the champion in
force after the rollback (trained on the first catalog) instead of training fresh.
--tiny forces a refusal in run 3 as tests/test_finetune_flow.py does (a learning rate that learns nothing, the
validation loss gated on any number of examples), so the refusal path is exercised in minutes.
Per run: wall seconds, load average before, final state, flow and per-stage seconds and what was cached
(summary.json), gate verdict and reasons, published version, the champion after, candidate vs champion metrics.
Writes benchmarks/results/retrain_scenario_cpu.json (--out) with the command, date, machine and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from continue_vs_fresh_flow import changed_catalog, read_catalog  # noqa: E402
from prepare_scale import load, machine_record  # noqa: E402
from tests.test_server import free_port  # noqa: E402
from tests.webhook import start_hook, wait_for_hook  # noqa: E402

import loraflow  # noqa: E402
from loraflow.ops.server import CPU_POOL, LocalPrefect  # noqa: E402
from loraflow.publishing.registry import champion, registry_root  # noqa: E402

MACHINE_NOTE = "2 cores shared with other engineers' runs and tests (load averages per run)"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
METRICS = ("fact_accuracy", "heldout_fact_accuracy", "natural_fact_accuracy", "refusal_rate", "false_refusal_rate",
           "general_accuracy", "stop_rate", "eval_loss", "eval_loss_examples")
# A gate reason (loraflow.evaluation.gate) -> the eval.gate setting that lets it pass; the first match wins.
LOOSENING = (
    ("validation loss", ("previous_loss_tolerance", 100.0)),
    ("champion's", ("previous_tolerance", 1.0)),
    ("beats base", ("must_beat_base", False)),
    ("general answer", ("max_general_regressions", None)),
    ("false_refusal_rate", ("max_false_refusal_rate", None)),
    ("refusal_rate", ("min_refusal_rate", None)),
    ("heldout_fact_accuracy", ("min_heldout_fact_accuracy", None)),
    ("natural_fact_accuracy", ("min_natural_fact_accuracy", None)),
    ("fact accuracy", ("min_fact_accuracy", 0.0)),
    ("stop rate", ("min_stop_rate", 0.0)),
)


def loosened_gate(failures: list[str]) -> dict:
    """The eval.gate settings that let each FAIL line of a refused gate pass (empty when nothing failed)."""
    settings = {}
    for failure in failures:
        key, value = next(setting for text, setting in LOOSENING if text in failure)
        settings[key] = value
    return settings


# ---- the config and its catalog

def demo_config(project: Path, tiny: bool) -> dict:
    """configs/anime_demo.yaml reading project/catalog.csv (every row), storing in project/store and project/runs."""
    config = yaml.safe_load((ROOT / "configs" / "anime_demo.yaml").read_text())
    config["sources"][0].update(path="catalog.csv", max_rows=None)
    config["sources"][1]["path"] = str(ROOT / "data" / "sample" / "general_replay.jsonl")
    config.update(store="store", runs_dir="runs")
    if tiny:  # tests/test_finetune_flow.py's tiny sizes and a gate the tiny model passes
        config["synthesize"]["anime_qa"].update(trained_phrasings=1, heldout_phrasings=1, max_synopsis_words=8,
                                                trained_title_variants=0, refusal_examples=1)
        config["tokenize"]["validation_fraction"] = 0.25
        config["train"].update(max_steps=2, learning_rate=0.001)
        config["eval"].update(max_questions=2, max_new_tokens=8, general_questions=["What is 2 + 2?"],
                              general_max_new_tokens=8, general_expected={"What is 2 + 2?": "4|four"})
        config["eval"]["gate"].update(min_fact_accuracy=0.0, min_stop_rate=0.0, must_beat_base=False,
                                      min_natural_fact_accuracy=None, min_refusal_rate=None,
                                      max_false_refusal_rate=None, max_general_regressions=None)
    return config


def forced_refusal(config: dict) -> dict:
    """tests/test_finetune_flow.py's refusal: a learning rate that learns nothing, the loss gated on any size and
    with no tolerance (two steps barely move the champion's loss: 0.695 against the base's 0.705)."""
    config["train"]["learning_rate"] = 1.0e-9
    config["eval"]["gate"].update(min_loss_examples=1, min_loss_tokens=1, previous_loss_tolerance=0.0)
    return config


def schedule(local: LocalPrefect, project: Path, config: dict) -> float:
    """Write project/scenario.yaml and `loraflow schedule` it (creates or updates the deployment); its seconds."""
    path = project / "scenario.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    done = loraflow_cli(local, "schedule", str(path), "--cron", "0 3 * * *", "--timezone", "UTC")
    print(done.stdout.strip().splitlines()[-1], flush=True)
    return round(time.perf_counter() - started, 2)


def loraflow_cli(local: LocalPrefect, *args: str) -> subprocess.CompletedProcess:
    """`loraflow ARGS` of this checkout against the server; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", *args], env=local.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"loraflow {shlex.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


# ---- one run through the server

def api(local: LocalPrefect, method: str, path: str, body: dict | None = None):
    """One request to the server's REST API, its JSON answer."""
    request = urllib.request.Request(f"{local.api_url}{path}", method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def deployment_run(local: LocalPrefect, deployment: str, timeout: float) -> tuple[dict, float, list[float]]:
    """`prefect deployment run DEPLOYMENT`, then the flow run polled to its final state: (flow run, wall s, load before)."""
    load_before, started = load(), time.perf_counter()
    printed = local.prefect("deployment", "run", deployment).stdout
    command_seconds = time.perf_counter() - started
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", printed).group(1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        flow_run = api(local, "GET", f"/flow_runs/{flow_run_id}")
        if flow_run["state"]["type"] in TERMINAL:
            flow_run["command_seconds"] = round(command_seconds, 1)
            return flow_run, round(time.perf_counter() - started, 1), load_before
        time.sleep(0.5)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s; see the worker log")


def run_summary(runs_dir: Path, since: float) -> dict:
    """The summary.json written last, after `since` (epoch seconds): one worker runs one flow run at a time here."""
    written = [path for path in runs_dir.glob("*/*/summary.json") if path.stat().st_mtime >= since]
    if not written:
        raise FileNotFoundError(f"no summary.json under {runs_dir} written by the last flow run")
    return json.loads(max(written, key=lambda path: path.stat().st_mtime).read_text())


def seconds_between(earlier: str, later: str | None) -> float | None:
    """Seconds between two of the server's ISO timestamps: a flow run's creation and its start (worker pickup and
    process start), None when it never started."""
    if later is None:
        return None
    return round((datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds(), 1)


def run_facts(flow_run: dict, wall: float, load_before: list[float], summary: dict, published: Path, name: str) -> dict:
    """What one run cost, what ran, what the gate said and what is published after it."""
    stages = summary.get("stages") or {}
    train, evaluation, publish = summary.get("train") or {}, summary.get("eval") or {}, summary.get("publish") or {}
    gate = evaluation.get("gate") or {}
    return {
        "flow_run": {"id": flow_run["id"], "name": flow_run["name"]}, "wall_seconds": wall, "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load(),
        "state": {"type": flow_run["state"]["type"], "name": flow_run["state"]["name"]},
        "prefect_deployment_run_command_seconds": flow_run["command_seconds"],
        "created_to_running_seconds": seconds_between(flow_run["created"], flow_run["start_time"]),
        "server_run_seconds": flow_run.get("total_run_time"),
        "flow_seconds": summary.get("seconds"),
        "stage_seconds": (summary.get("cost") or {}).get("device_seconds"),
        "cached": {"data_stages": {stage: part.get("cached") for stage, part in stages.items()},
                   "all": summary.get("all_cached"), "train": train.get("cached"), "evaluate": evaluation.get("cached")},
        "train": {key: train.get(key) for key in ("seconds", "global_step", "train_rows", "continuation")},
        "evaluate_seconds": evaluation.get("seconds"),
        "gate": {"passed": gate.get("passed", publish.get("gate_passed")),
                 "reasons": gate.get("reasons", publish.get("gate_reasons"))},
        "published": publish.get("published"), "reused": publish.get("reused"), "version": publish.get("version"),
        "champion_after": (champion(published, name) or {}).get("version"),
        "compared_with": evaluation.get("previous_model_dir"),
        "metrics": {model: {key: (evaluation.get(model) or {}).get(key) for key in METRICS}
                    for model in ("base", "finetuned", "previous")},
        "run_dir": summary.get("run_dir"),
    }


def refusal_notice(local: LocalPrefect, flow_run: dict, seconds: float = 90) -> dict:
    """Whether the webhook received the refused run and the server holds its `loraflow.model.refused` event."""
    posted = wait_for_hook(flow_run["name"], seconds)
    mine, deadline = [], time.time() + seconds
    while time.time() < deadline and not mine:  # the server stores events in batches
        events = api(local, "POST", "/events/filter", {"filter": {"event": {"name": ["loraflow.model.refused"]}}})["events"]
        mine = [event for event in events if flow_run["id"] in json.dumps(event["related"])]
        time.sleep(0 if mine else 2)
    return {"webhook_posts": len(posted), "webhook_says_refused": any("Refused" in message for message in posted),
            "refused_events": len(mine), "event_failures": mine[0]["payload"].get("failures") if mine else None}


# ---- the scenario

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="4 catalog rows, 2 training steps, 2 questions")
    parser.add_argument("--init-from-champion", action="store_true", help="also run 3 with train.init_from: champion")
    parser.add_argument("--timeout", type=float, default=5400, help="seconds one flow run may take")
    parser.add_argument("--work", default=None, help="the project folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/retrain_scenario_cpu[_tiny].json)")
    args = parser.parse_args()
    os.environ.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")  # the server, worker and flow runs run this checkout
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"retrain_scenario_cpu{'_tiny' if args.tiny else ''}.json")
    load_at_start, rows = load(), 4 if args.tiny else 8
    result = {"command": "python " + shlex.join(["benchmarks/retrain_scenario.py", *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "code": code_version(),
              "loraflow_imported_from": loraflow.__file__, "runs": {}}
    print(f"loraflow from {loraflow.__file__}", flush=True)

    def record(label: str, facts: dict) -> None:
        result["runs"][label] = facts
        print(label, json.dumps({k: facts[k] for k in ("wall_seconds", "flow_seconds", "state", "published", "version",
                                                        "champion_after", "load_average_1_5_15_before")}), flush=True)
        result["machine"] = machine_record(load_at_start, MACHINE_NOTE)
        out.write_text(json.dumps(result, indent=2) + "\n")  # what ran so far survives a later failure

    hook = start_hook()
    with tempfile.TemporaryDirectory(prefix="loraflow-retrain-") as folder:
        project = Path(args.work or folder)
        project.mkdir(parents=True, exist_ok=True)
        published = registry_root(project / "store")
        local = LocalPrefect(port=free_port(), home=project / "prefect-home", log_dir=project / "logs")
        config = demo_config(project, args.tiny)
        name, deployment = config["name"], f"finetune/{config['name']}-schedule"
        read_catalog().head(rows).to_csv(project / "catalog.csv", index=False)
        with local:
            local.ensure_pools()
            result["setup_seconds"] = {"schedule": schedule(local, project, config)}
            loraflow_cli(local, "notify-on-failure", f"http://127.0.0.1:{hook.server_port}/hook")
            local.start_worker(CPU_POOL)

            def through_server(label: str) -> dict:
                since = time.time()
                flow_run, wall, load_before = deployment_run(local, deployment, args.timeout)
                summary = run_summary(project / "runs", since)
                facts = run_facts(flow_run, wall, load_before, summary, published, name)
                record(label, facts)
                return facts

            through_server("1_first")
            through_server("2_unchanged")

            changed_catalog(rows, 2).to_csv(project / "catalog.csv", index=False)
            if args.tiny:
                result["setup_seconds"]["schedule_forced_refusal"] = schedule(local, project, forced_refusal(config))
            changed = through_server("3_changed")
            if changed["state"]["name"] == "Refused":
                changed["refusal_notice"] = refusal_notice(local, changed["flow_run"])
                record("3_changed", changed)

            failures = [r for r in changed["gate"]["reasons"] or [] if r.startswith("FAIL")]
            gate_change = loosened_gate(failures) or {"min_stop_rate": 0.96}
            config["eval"]["gate"].update(gate_change)
            result["threshold_change"] = gate_change
            result["setup_seconds"]["schedule_threshold"] = schedule(local, project, config)
            through_server("4_threshold")

            started = time.perf_counter()
            rolled = loraflow_cli(local, "rollback", name, "--store", str(project / "store"), "--why", "benchmark",
                                  "--by", "retrain_scenario")
            result["rollback"] = {"seconds": round(time.perf_counter() - started, 2), "printed": rolled.stdout.strip(),
                                  "load_average_1_5_15": load(), "champion_after": (champion(published, name) or {}).get("version")}
            print("rollback", json.dumps(result["rollback"]), flush=True)
            after = through_server("5_after_rollback")
            after["champion_model_dir"] = (champion(published, name) or {}).get("model_dir")
            record("5_after_rollback", after)

            if args.init_from_champion:
                config["train"].update(init_from="champion", replay_unchanged=0.25)
                result["setup_seconds"]["schedule_init_from_champion"] = schedule(local, project, config)
                through_server("6_changed_init_from_champion")
    hook.shutdown()
    result["machine"] = machine_record(load_at_start, MACHINE_NOTE)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def code_version() -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"git_commit": commit, "branch": subprocess.run(["git", "branch", "--show-current"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip()}


if __name__ == "__main__":
    main()
