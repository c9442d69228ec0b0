"""train.init_from: champion (issue 33, item 7): which rows a continued run trains (pure, on small frames), the
champion's LoRA settings checked, the train stage's key holding the champion's adapter hash, and through the whole
pipeline on the tiny random Llama (the continuation's wiring is the point, not what SmolLM2 learns; the whole pipeline
on SmolLM2: tests/test_finetune_flow.py): a first run with no champion, a real `loraflow run`, trains fresh (warned),
a run after 1 edited and 1 added catalog row continues from version 1 on the changed records' rows plus the replayed
share, an unchanged re-run is all cached (these two through the same entry point in this process), and the continued
model starts from exactly the champion's LoRA weights."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from loraflow.config.train import TrainConfig
from loraflow.publishing.registry import champion, versions
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.training.continuation import (ContinuationError, StartAdapter, check_lora_settings, continuation_rows,
                                            record_fingerprints)
from tests.test_finetune_flow import REPO, run_cli, run_cli_here, tiny_config


def examples(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A train split of (source_id, prompt, reference) examples."""
    return pd.DataFrame({"source_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                         "reference": [r[2] for r in rows], "split": "train"})


def start(name: str = "m", sha: str = "a" * 64) -> StartAdapter:
    tokens = ArtifactRef(uri="/s/artifacts/tokenize/x.parquet", sha256="x", rows=1, contract="tokens", schema_version=2,
                         stage="tokenize", config_hash="c")
    return StartAdapter(model_name=name, version=1, adapter_dir="/nowhere", adapter_sha256=sha, tokens=tokens)


CHAMPION_DATA = examples([("1", "q1a", "a1"), ("1", "q1b", "a1"), ("2", "q2a", "a2"), ("2", "q2b", "a2"),
                          ("3", "q3a", "a3"), ("3", "q3b", "a3"), ("4", "q4a", "a4"), ("4", "q4b", "a4")])


def test_changed_and_new_records_are_trained_and_a_share_of_the_rest_replayed():
    now = examples([("1", "q1a", "a1"), ("1", "q1b", "a1"),              # unchanged
                    ("2", "q2a", "a2 EDITED"), ("2", "q2b", "a2 EDITED"),  # edited
                    ("3", "q3b", "a3"), ("3", "q3a", "a3"),              # unchanged (order does not matter)
                    ("4", "q4a", "a4"), ("4", "q4b", "a4"),              # unchanged
                    ("5", "q5a", "a5")])                                 # new
    keep, plan = continuation_rows(now, CHAMPION_DATA, start(), replay_share=0.5, seed=0)
    rows = now[keep]
    assert (plan.records_new, plan.records_edited, plan.records_unchanged) == (1, 1, 3)
    assert (plan.rows_changed, plan.rows_unchanged, plan.rows_replayed) == (3, 6, 3)
    assert set(rows.loc[rows["source_id"].isin(["2", "5"])].index) == {2, 3, 8}  # every changed row
    assert len(rows) == 6 and list(rows.index) == sorted(rows.index)  # + 3 replayed, in the original order
    again = now[continuation_rows(now, CHAMPION_DATA, start(), replay_share=0.5, seed=0)[0]]
    assert list(again.index) == list(rows.index)  # drawn with the seed: another seed, other replayed rows
    assert any(list(now[continuation_rows(now, CHAMPION_DATA, start(), replay_share=0.5, seed=seed)[0]].index) != list(rows.index)
               for seed in range(1, 6))
    keep, plan = continuation_rows(now, CHAMPION_DATA, start(), replay_share=0.0, seed=0)
    only_changed = now[keep]
    assert set(only_changed["source_id"]) == {"2", "5"} and plan.rows_replayed == 0
    assert continuation_rows(now, CHAMPION_DATA, start(), replay_share=1.0, seed=0)[0].all()


def test_nothing_changed_and_nothing_replayed_is_refused_with_the_fix():
    with pytest.raises(ContinuationError, match="raise train.replay_unchanged, or set train.init_from=none"):
        continuation_rows(CHAMPION_DATA, CHAMPION_DATA, start(), replay_share=0.0, seed=0)
    assert record_fingerprints(CHAMPION_DATA).nunique() == 4


def test_other_lora_settings_than_the_champions_are_refused_naming_them():
    champion_train = TrainConfig().model_dump(mode="json")
    check_lora_settings(champion_train, TrainConfig(learning_rate=1e-3, init_from="champion"), "version 1")  # no error
    with pytest.raises(ContinuationError, match=r"train.lora_r: 16 in the champion, 8 here.*train.init_from=none"):
        check_lora_settings(champion_train, TrainConfig(lora_r=8), "version 1")


def test_continuing_needs_training_in_this_process():
    with pytest.raises(ValueError, match="set train.distributed=none, or train.init_from=none"):
        TrainConfig(init_from="champion", distributed="ddp", num_processes=2)


def test_the_train_key_and_folder_change_when_the_champion_changes(tmp_path):
    from flows.finetune import TRAIN_CACHE, work_dir
    from tasks.train import train_task

    tokens = ArtifactStore(tmp_path).write(examples([("1", "q", "a")]), stage="tokenize", contract="tokens",
                                           schema_version=2, config_hash="c")
    context = SimpleNamespace(task=train_task)

    def key(start_adapter):
        inputs = dict(tokens=tokens, model_dir="m", train_config=TrainConfig(init_from="champion"), output_dir="o",
                      store_root=str(tmp_path), start=start_adapter)
        return TRAIN_CACHE.compute_key(context, inputs, {})

    one, two = start(sha="1" * 64), start(sha="2" * 64)
    assert key(one) == key(one) and len({key(None), key(one), key(two)}) == 3
    assert work_dir("s", "train", "t", one.adapter_sha256) != work_dir("s", "train", "t", two.adapter_sha256)


# ---- the whole pipeline on the tiny random Llama, through `loraflow run` ---------------------------------------

def edited_catalog(source: Path, target: Path) -> None:
    """The first 5 catalog rows with the second one's title edited (the 5th is new when max_rows goes 4 -> 5)."""
    table = pd.read_csv(source).head(5)
    table.loc[1, "Name"] = table.loc[1, "Name"] + " Returns"
    table.to_csv(target, index=False)


@pytest.mark.slow
def test_a_continued_run_starts_from_the_champion_and_trains_the_changed_rows(tmp_path, prefect_api):
    from tests.tiny_llama import build_tiny_llama

    catalog = tmp_path / "catalog.csv"
    shutil.copy(REPO / "data/sample/anime_catalog.csv", catalog)
    model_dir = build_tiny_llama(tmp_path / "tiny-llama")
    config = tiny_config(tmp_path, model_dir)
    config.write_text(config.read_text()
                      .replace(str(REPO / "data/sample/anime_catalog.csv"), str(catalog))
                      .replace("gradient_checkpointing: false}", "gradient_checkpointing: false, init_from: champion, "
                                                                 "replay_unchanged: 0.5}")
                      .replace("max_general_regressions: null}", "max_general_regressions: null, previous_tolerance: 1.0}"))
    home, registry = tmp_path / "home", tmp_path / "store" / "published"
    stderr = []
    first = run_cli(config, home, stderr=stderr)  # no champion yet: a fresh adapter, and a warning that says so
    assert first["train"]["continuation"] is None and first["publish"]["version"] == 1
    assert "tiny has no champion yet" in stderr[0] and "training a fresh adapter" in stderr[0]

    edited_catalog(REPO / "data/sample/anime_catalog.csv", catalog)
    config.write_text(config.read_text().replace("max_rows: 4", "max_rows: 5"))
    second = run_cli_here(config)
    plan = second["train"]["continuation"]
    assert plan["start"]["version"] == 1 and plan["start"]["adapter_dir"] == str(Path(first["publish"]["model_dir"]) / "adapter")
    assert (plan["records_new"], plan["records_edited"]) == (1, 1) and plan["records_unchanged"] >= 3
    assert plan["rows_changed"] > 0 and plan["rows_replayed"] == round(0.5 * plan["rows_unchanged"])
    assert second["train"]["train_rows"] == plan["rows_changed"] + plan["rows_replayed"]
    assert second["publish"]["version"] == 2
    card = (Path(second["publish"]["model_dir"]) / "README.md").read_text()  # the card says where it started
    assert "Not a fresh adapter: continuing from tiny version 1 (adapter " in card
    (_, version_two) = versions(registry, "tiny")
    assert version_two["init_from"] == plan["start"]  # the lineage says where it started

    third = run_cli_here(config)  # unchanged data: the champion's own start, so the key that made it: all cached
    assert third["train"]["cached"] and third["publish"]["reused"] and champion(registry, "tiny")["version"] == 2

    # The continued model's LoRA weights before its first step are the champion's, bit for bit; after it they moved.
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from tasks.train import train_adapter

    class LoraWeights(TrainerCallback):
        seen = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from peft import get_peft_model_state_dict

            self.seen = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}

    start_adapter = StartAdapter(**plan["start"])
    captured = LoraWeights()
    # One step at the full learning rate (no warm-up step at rate 0), so that it moves the weights.
    train_config = TrainConfig(**{**version_two["config"]["train"], "max_steps": 1, "warmup_ratio": 0.0,
                                  "lr_scheduler": "constant"})
    result = train_adapter(ArtifactRef(**second["tokens"]), model_dir, train_config, tmp_path / "again",
                           store=ArtifactStore(tmp_path / "store"), start=start_adapter, callbacks=[captured])
    champion_weights = load_file(Path(start_adapter.adapter_dir) / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for name, tensor in champion_weights.items() if "lora_B" in name)  # not a fresh B
    assert set(captured.seen) == set(champion_weights)
    assert all(captured.seen[name].equal(champion_weights[name].to(captured.seen[name].dtype)) for name in champion_weights)
    after = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    assert any(not after[name].equal(champion_weights[name]) for name in champion_weights)
    assert result.train_rows == second["train"]["train_rows"] and result.continuation.start == start_adapter


def test_the_champion_to_continue_from_or_why_not(tmp_path):
    from loraflow.publishing.champion_start import adapter_sha256, champion_start
    from loraflow.publishing.registry import FolderRegistry, add_version, move_champion, registry_root

    store, root = ArtifactStore(tmp_path / "store"), registry_root(tmp_path / "store")
    registry = FolderRegistry(root)
    train = TrainConfig(init_from="champion")
    assert champion_start(registry, store, "m", train, "now")[1] == f"m has no champion yet (nothing published in {root})"

    tokens = store.write(CHAMPION_DATA, stage="tokenize", contract="tokens", schema_version=2, config_hash="c")
    model_dir = tmp_path / "published-model"
    add_version(root, "m", {"model_dir": str(model_dir), "data": {"tokens_sha256": tokens.sha256},
                            "config": {"train": TrainConfig().model_dump(mode="json")}})
    move_champion(root, "m", 1, action="publish", why="gate", by="ci")
    assert "the champion's adapter (version 1" in champion_start(registry, store, "m", train, "now")[1]

    (model_dir / "adapter").mkdir(parents=True)
    (model_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (model_dir / "adapter" / "adapter_config.json").write_text("{}")
    found, why_fresh = champion_start(registry, store, "m", train, "now")
    assert why_fresh is None and found.version == 1 and found.tokens == tokens
    assert found.adapter_sha256 == adapter_sha256(model_dir / "adapter") and found.adapter_dir == str(model_dir / "adapter")
    (model_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert champion_start(registry, store, "m", train, "now")[0].adapter_sha256 != found.adapter_sha256  # content, not path

    # Trained on these very data (fresh): the run starts where the champion started, fresh.
    assert champion_start(registry, store, "m", train, tokens.sha256) == (None, None)
    with pytest.raises(ContinuationError, match="train.lora_r: 16 in the champion, 4 here"):
        champion_start(registry, store, "m", TrainConfig(init_from="champion", lora_r=4), "now")
    for path in (tmp_path / "store" / "artifacts").rglob("*"):
        path.unlink() if path.is_file() else None
    assert "is no longer in the store" in champion_start(registry, store, "m", train, "now")[1]
