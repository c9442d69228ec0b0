"""docs/mlflow-run.png, mlflow-metrics.png and mlflow-curve.png: a demo-like run seen in the MLflow UI (headless Chromium).

Starts `mlflow server` (SQLite) on a loopback port, runs `loraflow run` on configs/anime_demo.yaml cut to
--steps optimizer steps and fewer evaluation questions (the real SmolLM2-135M, the demo's data, report_to
[mlflow, tensorboard], publish.register_model), then screenshots the run's overview (eval metrics per model, the registered version) its Model metrics tab and the logged loss curve.
`--steps 0` runs the demo itself (its training, evaluation and gate); `--gguf f16` also exports the GGUF.

    nice -n 19 .venv/bin/python scripts/mlflow_screenshot.py --steps 120 --out /tmp/loraflow-mlflow-demo
    .venv/bin/python scripts/mlflow_screenshot.py --steps 0 --gguf f16 --out /tmp/loraflow-mlflow-demo
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mlflow_server import mlflow_server  # noqa: E402 - the tests' server helper, run from the repo root
from loraflow.runs.summary import RunSummary  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--virtual-time-budget=25000", "--hide-scrollbars"]


def demo_like_config(out: Path, uri: str, steps: int, gguf: str | None = None) -> Path:
    """The demo's config with tracking on; cut to `steps` optimizer steps and 8 questions unless steps is 0."""
    config = yaml.safe_load((REPO / "configs/anime_demo.yaml").read_text())
    for source in config["sources"]:
        source["path"] = str((REPO / "configs" / source["path"]).resolve())
    config |= {"store": str(out / "store"), "runs_dir": str(out / "runs")}
    config["train"] |= {"report_to": ["mlflow", "tensorboard"], "tracking_uri": uri, "tracking_experiment": "anime-demo"}
    if steps:
        config["train"] |= {"max_steps": steps, "checkpoint_every": steps, "cpu_threads": 1}
        config["eval"] |= {"max_questions": 8, "max_new_tokens": 48, "cpu_threads": 1}
        config["eval"]["gate"] |= {"min_fact_accuracy": 0.0, "min_stop_rate": 0.0, "must_beat_base": False,
                                   "min_natural_fact_accuracy": None, "min_refusal_rate": None}
    config["publish"] = {**config.get("publish", {}), "register_model": True,
                         **({"gguf": {"quantization": gguf}} if gguf else {})}
    path = out / "anime_demo_mlflow.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def screenshot(url: str, png: Path, profile: Path, size: str = "1400,1000") -> str:
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]
    subprocess.run(["chromium", *flags, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("/tmp/loraflow-mlflow-demo"))
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--gguf", choices=["f16", "q8_0"], default=None, help="also export the GGUF (publish.gguf)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    with mlflow_server(args.out / "mlflow") as uri:
        config = demo_like_config(args.out, str(uri), args.steps, args.gguf)
        env = {**os.environ, "PREFECT_HOME": str(args.out / "prefect"), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        done = subprocess.run([sys.executable, "-m", "loraflow.cli.commands", "run", str(config)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: the gate refused the model (the metrics are there all the same)
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        summary_path = done.stdout.strip().splitlines()[-1]  # `loraflow run` prints the summary's path last
        summary = RunSummary.read(summary_path)
        run_url = summary.tracking.url
        overview = screenshot(run_url, args.docs / "mlflow-run.png", args.out / "chrome", size="1400,2300")
        charts = screenshot(f"{run_url}/model-metrics", args.docs / "mlflow-metrics.png", args.out / "chrome")
        curve = screenshot(f"{run_url}/artifacts/train/loss_curve.png", args.docs / "mlflow-curve.png", args.out / "chrome")
        print(json.dumps({"run": run_url, "overview_has_eval": "eval.finetuned.fact_accuracy" in overview,
                          "metrics_tab_has_charts": "eval.base.eval_loss" in charts, "curve_shown": "loss_curve" in curve, "train_seconds": summary.train.seconds,
                          "summary": summary_path,
                          "eval": {"base": summary.eval.base.get("fact_accuracy"),
                                   "finetuned": summary.eval.finetuned.get("fact_accuracy")}}))


if __name__ == "__main__":
    main()
