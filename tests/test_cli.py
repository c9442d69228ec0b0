"""The `loraflow` command line as a user meets it: one plain message per user error, quarantine reasons on the
console, a warning for an empty validation split, help text on every argument."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, records: str, **tokenize) -> Path:
    """An instruction source (JSON Lines `records`) and a prepare config over it, in `folder`."""
    (folder / "rows.jsonl").write_text(records, encoding="utf-8")
    options = ", ".join(f"{key}: {value}" for key, value in tokenize.items())
    (folder / "config.yaml").write_text(
        f"name: cli-test\nstore: {folder / 'store'}\nruns_dir: {folder / 'runs'}\n"
        "sources:\n  - {kind: json, name: rows, path: rows.jsonl}\n"
        "synthesize: {kind: instruction, instruction: {input_column: null}}\n"
        + (f"tokenize: {{{options}}}\n" if options else "")
    )
    return folder / "config.yaml"


def loraflow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": os.environ["PREFECT_HOME"]}
    return subprocess.run([sys.executable, "-m", "loraflow.cli.commands", *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_source_error_prints_once_with_its_fix_and_the_traceback_goes_to_the_log_file(prefect_api, tmp_path):
    config = write_config(tmp_path, "{oops\n{nope\n")
    done = loraflow("prepare", str(config))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.count("nothing to ingest: all 2 records are broken") == 1, output
    assert "Traceback" not in output and len(output.splitlines()) < 15, output
    log_path = Path(output.split("the full log with the traceback: ")[1].split(";")[0])
    assert log_path.parent == tmp_path / "runs" / "cli-test" / "logs"
    assert "Traceback" in log_path.read_text() and "SourceError" in log_path.read_text()

    # --debug lets the error through with its traceback (in this process: a second Python, torch and Prefect start
    # would prove nothing more than that an uncaught exception prints one)
    from loraflow.cli.commands import main
    from loraflow.sources.common import SourceError

    with pytest.raises(SourceError, match="nothing to ingest: all 2 records are broken"):
        main(["prepare", str(config), "--debug"])


def test_prepare_prints_the_top_quarantine_reasons_per_stage(prefect_api, tmp_path):
    from loraflow.cli.commands import main

    records = "".join(json.dumps({"instruction": f"Say {n}", "output": str(n)}) + "\n" for n in range(6))
    config = write_config(tmp_path, records + "{broken\n" + '{"instruction": ["a"], "output": "x"}\n' + "{broken too\n")
    # stdout only: capsys would also swap the stderr that Prefect's console handler keeps after the test
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["prepare", str(config)]) == 0
    out = printed.getvalue()
    assert "quarantined rows, top reasons per stage" in out
    assert re.search(r"\n  ingest:rows +2 x invalid JSON at line 7: Expecting property name.* \(and similar\)\n", out), out
    assert re.search(r"\n  ingest:rows +1 x line 8: field 'instruction' is list, but 6 other record\(s\) have text", out), out
    summary = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert [reason["rows"] for reason in summary["stages"]["ingest:rows"]["quarantine_reasons"]] == [2, 1]


def test_an_empty_validation_split_and_a_max_rows_cut_are_warned_about(prefect_api, tmp_path):
    from flows.prepare import prepare_flow
    from loraflow.config.pipeline import load_config

    records = "".join(json.dumps({"instruction": f"Say {n}", "output": str(n)}) + "\n" for n in range(2))
    summary = prepare_flow(load_config(write_config(tmp_path, records, validation_fraction=0.001)))
    assert summary["stages"]["tokenize"]["stats"]["splits"]["validation"] == 0
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("the validation split is empty (2 train examples")
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["warnings"] == summary["warnings"]
    none_asked = prepare_flow(load_config(write_config(tmp_path, records, validation_fraction=0.0)))
    assert none_asked["warnings"] == []

    # A source that stopped at its max_rows says so: rows an upstream appends would be left out, run after run.
    config = write_config(tmp_path, records, validation_fraction=0.0)
    config.write_text(config.read_text().replace("path: rows.jsonl}", "path: rows.jsonl, max_rows: 2}"))
    cut = prepare_flow(load_config(config))
    assert cut["warnings"] == ["source 'rows' stopped at max_rows=2: any rows after the first 2 (rows an upstream "
                               "appends included) are left out -> remove sources[].max_rows (or raise it) to train on all of them"]


@pytest.mark.parametrize("command", ["check", "schema", "prepare", "run", "ask", "notify-on-failure",
                                     "detect-crashed-runs", "server", "models", "promote", "rollback", "schedule",
                                     "schedules"])
def test_every_subcommand_argument_has_a_help_text(command):
    from loraflow.cli.commands import build_parser

    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        assert action.help and action.help != "==SUPPRESS==", (command, action.dest)
    assert subparser.description


def test_a_crash_window_no_longer_than_the_heartbeat_interval_is_refused(capsys):
    from loraflow.ops.automations import HEARTBEAT_SECONDS
    from loraflow.cli.commands import main

    assert main(["detect-crashed-runs", "--silent-seconds", str(HEARTBEAT_SECONDS)]) == 2
    assert f"heartbeats are {HEARTBEAT_SECONDS} s apart" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_gate_exits_1_through_the_real_cli_with_its_reasons_once(tmp_path):
    from tests.test_finetune_flow import tiny_config
    from tests.tiny_llama import build_tiny_llama

    config = tiny_config(tmp_path, build_tiny_llama(tmp_path / "tiny-llama"))  # a random model learns no facts
    text, gates = re.subn(r"(?m)^  gate: \{.*\}$", "  gate: {min_fact_accuracy: 0.9, min_stop_rate: 0.0, must_beat_base: true}",
                          config.read_text())
    assert gates == 1
    config.write_text(text)
    done = loraflow("run", str(config))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    summary = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())  # the summary path is still printed last
    reasons = [reason for reason in summary["publish"]["gate_reasons"] if reason.startswith("FAIL")]
    assert any("fact accuracy" in reason for reason in reasons) and not summary["publish"]["published"], summary["publish"]
    for reason in reasons:
        assert output.count(reason) == 1, (reason, output[-3000:])
    assert "error: the evaluation gate refused the fine-tuned model (run state Refused), nothing was published" in done.stderr
    assert "gate: FAILED" in done.stdout and "Traceback" not in output
