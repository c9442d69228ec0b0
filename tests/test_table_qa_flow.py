"""A config-only table_qa run through Prefect: the shipped tea catalog config prepares end to end (sources ->
table_qa -> format -> tokenize -> pre-flight), its held-out phrasings land in the evaluation split, the
evaluation picks its questions per kind from the tokens artifact, and sharded prepare gives the same bytes."""

import shutil
from pathlib import Path

import pandas as pd

from loraflow.config.pipeline import load_config
from loraflow.evaluation.metrics import select_questions

REPO = Path(__file__).resolve().parents[1]


def tea_config(folder: Path, store: str, extra: str = "") -> Path:
    """The shipped tea config and sample data in `folder`, with its own store (and `extra` top-level keys)."""
    if not (folder / "data").exists():
        shutil.copytree(REPO / "data" / "sample", folder / "data" / "sample")
        (folder / "configs").mkdir()
    text = (REPO / "configs" / "tea_catalog.yaml").read_text(encoding="utf-8")
    path = folder / "configs" / f"{store}.yaml"
    path.write_text(text.replace("name: tea-catalog", f"name: tea-test\nstore: {folder / store}\n"
                                 f"runs_dir: {folder / 'runs'}\n{extra}"), encoding="utf-8")
    return path


def test_the_tea_config_prepares_end_to_end(prefect_api, tmp_path):
    from flows.prepare import prepare_flow

    summary = prepare_flow(load_config(tea_config(tmp_path, "store")))

    synthesize = summary["stages"]["synthesize"]
    assert synthesize["stats"]["synthesizer"] == "table_qa"
    assert synthesize["stats"]["conversations_by_kind"] == {"profile": 40, "brewing": 36, "instruction": 12}
    assert synthesize["stats"]["skipped_by_column"] == {"brewing": {"Caffeine (mg per cup)": 1}}
    for name, stage in summary["stages"].items():
        assert stage["stats"]["unaccounted_rows"] == 0, (name, stage)
    assert summary["preflight"]

    tokens = pd.read_parquet(summary["stages"]["tokenize"]["artifact"])
    assert tokens.groupby("split")["kind"].value_counts().to_dict() == {
        ("heldout", "profile"): 10, ("heldout", "brewing"): 9,
        ("train", "profile"): 30, ("train", "brewing"): 27, ("train", "instruction"): 12,
    }
    questions = select_questions(tokens, max_questions=40)
    asked = questions.groupby(["set", "kind"]).size().to_dict()
    assert {kind: n for (group, kind), n in asked.items() if group == "heldout"} == {"brewing": 9, "profile": 10}  # all
    assert sum(n for (group, _), n in asked.items() if group == "trained") == 40 - 19
    assert {"brewing", "profile"} <= {kind for group, kind in asked if group == "trained"}
    assert all(len(facts) > 0 for facts, kind in zip(questions["facts"], questions["kind"]) if kind != "instruction")


def test_sharded_table_qa_equals_single_process(prefect_api, tmp_path):
    from flows.prepare import prepare_flow

    single = prepare_flow(load_config(tea_config(tmp_path, "single")))
    sharded = prepare_flow(load_config(tea_config(tmp_path, "sharded", "prepare: {shards: 3}")))
    assert "tokenize:merge" in sharded["stages"] and "tokenize:merge" not in single["stages"]
    assert sharded["tokens"]["sha256"] == single["tokens"]["sha256"]  # table_qa's id_column keeps a row in one shard
    assert sharded["formatted"]["sha256"] == single["formatted"]["sha256"]
