"""The whole pipeline through Prefect on the real default model, tiny sizes: summary sections, publish once,
an unchanged re-run all cached with nothing new published, a retrained model that is worse than the published
one refused by the gate (Refused, still askable) and then, with a looser threshold, re-decided on the cached
evaluation and published as version 2; rolled back to version 1, which the next gate compares against. Two
identical runs at once: tests/test_concurrent_runs.py (its own file, so that pytest-xdist's `--dist loadfile` can
run it beside this one).

The first run is a real `loraflow run` in its own process (its own ephemeral Prefect API); the runs after it, `ask`
and `rollback` go through the same entry point (`loraflow.cli.commands.main`: exit code, stdout, stderr) in this
process, on the session's Prefect API: another process than the first run's, so the caches are still read back from
the store, without starting Python, torch and a Prefect server again for each (about 25 s a command)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.publishing.registry import champion, versions

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, model_dir: Path | str | None = None, *, store: str | None = None,
                runs_dir: str | None = None, extra: str = "") -> Path:
    """Four titles, two optimizer steps, one question of each kind (trained, held-out, natural, unknown title) and
    a general one, 8 new tokens each, a gate that lets the tiny model through; written to `tmp_path`/tiny.yaml.

    `model_dir`: a local base model (the tiny random Llama, where the real SmolLM2 is not the point). `store` and
    `runs_dir` default to folders in `tmp_path`; `extra`: more top-level YAML (e.g. `locks: {...}`)."""
    path = tmp_path / "tiny.yaml"
    model = f"model: {{base: {model_dir}}}\n" if model_dir else ""
    path.write_text(f"""
name: tiny
{model}
store: {store or tmp_path / 'store'}
runs_dir: {runs_dir or tmp_path / 'runs'}
{extra}
sources:
  - {{kind: csv, name: catalog, path: {REPO / 'data/sample/anime_catalog.csv'}, max_rows: 4}}
synthesize: {{anime_qa: {{trained_phrasings: 1, heldout_phrasings: 1, max_synopsis_words: 8}}}}
format: {{system_prompt: "You are an anime catalog assistant."}}
tokenize: {{validation_fraction: 0.25}}
train: {{max_steps: 2, micro_batch_size: 4, learning_rate: 0.001, gradient_checkpointing: false}}
eval:
  max_questions: 2
  max_new_tokens: 8
  general_questions: ["What is 2 + 2?"]
  general_max_new_tokens: 8
  general_expected: {{"What is 2 + 2?": "4|four"}}
  gate: {{min_fact_accuracy: 0.0, min_stop_rate: 0.0, must_beat_base: false, min_natural_fact_accuracy: null, min_refusal_rate: null, max_false_refusal_rate: null, max_general_regressions: null}}
cost: {{price_per_device_hour: 3.6}}
""")
    return path


def loraflow(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`loraflow ARGS` in its own process (its own ephemeral Prefect API in `home`)."""
    env = {**__import__("os").environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    return subprocess.run([sys.executable, "-m", "loraflow.cli.commands", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def run_cli(config: Path, home: Path, expect_returncode: int = 0, stderr: list | None = None) -> dict:
    """`loraflow run CONFIG`; returns the summary (its stderr appended to `stderr`, when given).

    A run whose gate refuses the model exits 1 (after printing the summary path)."""
    done = loraflow(home, "run", str(config))
    assert done.returncode == expect_returncode, done.stdout[-3000:] + done.stderr[-3000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())


def run_here(*args: str, expect_returncode: int = 0) -> tuple[str, str]:
    """`loraflow ARGS` through the console script's entry point in this process; its (stdout, stderr).

    (contextlib's redirects, not capsys: a stream that Prefect's console handler might take up meanwhile stays open
    after the test.)"""
    import contextlib
    import io

    from loraflow.cli.commands import main

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        returncode = main(list(args))
    assert returncode == expect_returncode, out.getvalue()[-3000:] + err.getvalue()[-3000:]
    return out.getvalue(), err.getvalue()


def run_cli_here(config: Path, expect_returncode: int = 0, stderr: list | None = None) -> dict:
    """`run_cli` in this process (`run_here`)."""
    out, err = run_here("run", str(config), expect_returncode=expect_returncode)
    if stderr is not None:
        stderr.append(err)
    return json.loads(Path(out.strip().splitlines()[-1]).read_text())


def test_run_publishes_once_and_rerun_is_all_cached(tmp_path, prefect_api):
    config = tiny_config(tmp_path)
    first = run_cli(config, tmp_path / "home")
    for model in ("base", "finetuned"):
        for metric in ("fact_accuracy", "heldout_fact_accuracy", "rouge_l", "stop_rate", "eval_loss"):
            assert metric in first["eval"][model]
    assert first["publish"]["published"] and first["publish"]["gate_passed"]
    model_dir = Path(first["publish"]["model_dir"])
    assert (model_dir / "model.safetensors").exists() and (model_dir / "README.md").exists()
    assert first["train"]["global_step"] == 2 and not first["train"]["cached"]
    assert (Path(first["run_dir"]) / "model").resolve() == model_dir.resolve()  # the run folder is where a user looks
    cost = first["cost"]  # this run's seconds per stage at 3.6 per device-hour: 0.001 per second
    assert set(cost["device_seconds"]) == {"prepare", "train", "evaluate", "gate", "publish"}
    assert cost["cost"] == pytest.approx(cost["total_device_seconds"] / 1000, abs=1e-5) and cost["currency"] == "USD"
    assert "Cost of this run up to publishing (prepare, train, evaluate):" in (model_dir / "README.md").read_text()
    (version_one,) = versions(tmp_path / "store" / "published", "tiny")  # the publish is version 1, with its lineage
    assert version_one["version"] == first["publish"]["version"] == 1 and version_one["model_dir"] == str(model_dir)
    assert version_one["metrics"] == first["eval"]["finetuned"] and version_one["config"]["train"]["max_steps"] == 2
    assert version_one["data"]["sources"][0]["fingerprint"] == first["sources"][0]["fingerprint"]
    assert version_one["code"]["code_hash"] and version_one["flow_run_id"] and version_one["run_dir"] == first["run_dir"]

    second = run_cli_here(config)
    assert second["all_cached"] and second["train"]["cached"] and second["eval"]["cached"]
    assert second["publish"]["reused"] and not second["publish"]["published"]
    assert second["publish"]["model_dir"] == first["publish"]["model_dir"]
    assert (Path(second["run_dir"]) / "model" / "model.safetensors").exists()  # a reused publish is linked too
    assert second["tokens"]["sha256"] == first["tokens"]["sha256"]
    assert second["eval"]["previous"] is None  # the published model is this very adapter's

    # A source row more and a learning rate too small to learn anything: retrained and evaluated beside the champion
    # (the first run's model), and refused on its validation loss (gated here whatever the number of examples):
    changed = config.read_text().replace("max_rows: 4", "max_rows: 5").replace("learning_rate: 0.001", "learning_rate: 1.0e-9")
    config.write_text(changed.replace("max_general_regressions: null}", "max_general_regressions: null, "
                                      "min_loss_examples: 1, min_loss_tokens: 1}"))  # here it is gated, and refuses
    errors = []
    third = run_cli_here(config, expect_returncode=1, stderr=errors)
    assert not third["train"]["cached"] and third["tokens"]["sha256"] != first["tokens"]["sha256"]
    assert third["eval"]["previous_model_dir"] == first["publish"]["model_dir"]
    assert third["eval"]["previous"]["eval_loss"] < third["eval"]["finetuned"]["eval_loss"], third["eval"]
    assert not third["publish"]["gate_passed"] and not third["publish"]["published"]
    assert any(r.startswith("FAIL: validation loss") for r in third["publish"]["gate_reasons"]), third["publish"]["gate_reasons"]
    assert "(run state Refused)" in errors[0] and f"loraflow ask {third['run_dir']}" in errors[0]
    record = json.loads((tmp_path / "store" / "published" / "tiny.json").read_text())
    assert record["model_dir"] == first["publish"]["model_dir"]
    # The refused candidate still answers, and says it is not the published model.
    answer, note = run_here("ask", third["run_dir"], "What is 2 + 2?", "--max-new-tokens", "4")
    assert answer.strip(), note[-2000:]
    assert "candidate the gate refused, NOT a published model" in note

    # The same data with the loss tolerance loosened: the gate re-decides on the cached evaluation and publishes.
    config.write_text(config.read_text().replace("min_loss_tokens: 1}", "min_loss_tokens: 1, previous_loss_tolerance: 100.0}"))
    fourth = run_cli_here(config)
    assert fourth["train"]["cached"] and fourth["eval"]["cached"], fourth["eval"]
    assert fourth["publish"]["gate_passed"] and fourth["publish"]["published"]
    assert any(r.startswith("PASS: validation loss") for r in fourth["publish"]["gate_reasons"])
    assert fourth["publish"]["version"] == 2 and champion(tmp_path / "store" / "published", "tiny")["version"] == 2

    # A threshold changed after that publish: the champion is now the candidate itself, so the evaluation stage runs
    # again (no champion beside it), but asks no model anything: both were asked these prompts in the fourth run.
    config.write_text(config.read_text().replace("previous_loss_tolerance: 100.0}", "previous_loss_tolerance: 100.0, previous_tolerance: 0.5}"))
    after = run_cli_here(config)
    assert not after["eval"]["cached"] and after["eval"]["previous"] is None
    assert {name: timing.get("reused") for name, timing in after["eval"]["timing"].items()} == {"base": True, "finetuned": True}
    assert after["eval"]["finetuned"] == fourth["eval"]["finetuned"] and after["publish"]["reused"]

    # Rolled back to version 1, the next run's gate compares against it again (here all cached: the same evaluation
    # as the fourth run's, beside version 1), and reusing version 2's publish does not move the champion back.
    rolled, _ = run_here("rollback", "tiny", "--store", str(tmp_path / "store"), "--why", "test", "--by", "ci")
    assert "version 1 is the champion (was 2; rollback by ci: test)" in rolled
    fifth = run_cli_here(config)
    assert fifth["eval"]["cached"] and fifth["eval"]["previous_model_dir"] == first["publish"]["model_dir"]
    assert fifth["publish"]["reused"] and champion(tmp_path / "store" / "published", "tiny")["version"] == 1
