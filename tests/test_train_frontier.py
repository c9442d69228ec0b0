"""benchmarks/train_frontier.py's orchestration (issue 34): Unsloth's settings each in their own child process
with their own timeout, merged into the same JSON as loraflow's rows; a setting that fails loses only its row."""

import json

import pytest

from benchmarks import train_frontier


def test_a_failed_or_timed_out_setting_is_only_its_own_row():
    ok = {"runs": {"rows 2": {"tokens_per_s": 900.0, "peak_gb": 7.0}}, "isolation_max_rel_diff": {"packed": 1e-3},
          "unsloth_version": "2026.10.9", "wall_s": 80.0}
    sweep = train_frontier.merge_sweep("rows", {1: {"failed": "rc timeout: ...", "wall_s": 150.0}, 2: ok, 4: None})
    assert sweep["runs"]["rows 1"] == {"failed": "rc timeout: ...", "child_wall_s": 150.0}
    assert sweep["runs"]["rows 2"] == {"tokens_per_s": 900.0, "peak_gb": 7.0, "child_wall_s": 80.0}
    assert sweep["runs"]["rows 4"]["failed"] == "no result"
    assert (sweep["isolation_max_rel_diff"], sweep["unsloth_version"]) == ({"packed": 1e-3}, "2026.10.9")
    assert train_frontier._best_unsloth(sweep, 8.0) == ("rows 2", sweep["runs"]["rows 2"])
    assert train_frontier._best_unsloth(sweep, 6.0) == (None, None)  # its one result is over this budget


@pytest.mark.slow
def test_unsloth_settings_run_in_their_own_children_beside_loraflows_row(tmp_path):
    """On CPU the Unsloth children fail (no GPU, no Unsloth here): each setting's child fails on its own, after
    its own start, and the JSON still holds loraflow's measured row and both Unsloth settings' failures."""
    out = tmp_path / "out"
    code = train_frontier.main(["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--budgets",
                                "unlimited", "--unsloth-rows", "1,2", "--tables", "frontier", "--child-timeout", "300",
                                "--model-dir", str(tmp_path / "model"), "--out", str(out)])
    assert code == 0
    record = json.loads((out / "train_frontier_cpu_tiny.json").read_text())
    row = record["frontier"]["rows"][0]
    assert row["loraflow_ok"] and row["loraflow_tokens_per_s"] > 0
    runs = record["frontier"]["unsloth_sweep"]["runs"]
    assert set(runs) == {"rows 1", "rows 2"}
    assert all(run["failed"].startswith("rc ") and run["child_wall_s"] > 0 for run in runs.values())
    assert row["unsloth_setting"] is None and "ratio" not in row
    log = (out / "train_frontier_cpu_tiny.log").read_text()
    assert log.count("==== unsloth-sweep") == 2  # one child per setting
