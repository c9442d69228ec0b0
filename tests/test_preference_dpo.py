"""DPO on the real SmolLM2 with a LoRA adapter, on CPU, through TRL's DPOTrainer: a few steps on real pairs move the
chosen-vs-rejected log-prob margin up, train only the adapter, and save an adapter without TRL's reference copy."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loraflow.config.preference import PreferenceConfig
from loraflow.preference.pairs import build_pairs
from loraflow.training.checkpoints import ADAPTER_MANIFEST
from loraflow.training.preference import finished_preference, train_preference
from tests.test_preference_pairs import prepared, rows  # noqa: F401 - fixtures: the demo catalog through the real stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, model_dir):
    """A LoRA adapter on SmolLM2 as the train stage saves one (fresh: B = 0, so it starts as the base model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sft") / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


def test_dpo_moves_the_margin_up_and_trains_only_the_adapter(rows, sft_adapter, model_dir, tmp_path):  # noqa: F811
    pairs, _ = build_pairs(rows, ["fact_swap", "made_up_title", "false_refusal"])
    pairs = pairs.groupby("kind").head(2).reset_index(drop=True)  # 6 pairs, 2 of each kind
    config = PreferenceConfig(enabled=True, loss_type=["sigmoid"], steps=4, batch_size=3, learning_rate=2e-3, beta=0.1,
                              margin_sample=6)  # plain DPO: the margin moves by the preference loss alone
    result = train_preference(pairs, model_dir, sft_adapter, config, tmp_path / "dpo", fingerprint="test", seed=0)

    assert result.steps == 4 and result.margin_after > result.margin_before + 1.0
    assert set(result.margins_by_kind) == {"fact_swap", "made_up_title", "false_refusal"}
    assert all(kind["after"] > kind["before"] for kind in result.margins_by_kind.values())

    saved = load_file(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors")
    start = load_file(sft_adapter / "adapter_model.safetensors")
    assert saved.keys() == start.keys()  # the policy adapter alone: TRL's "ref" copy is not saved
    assert any(not torch.equal(saved[name], start[name]) for name in saved)  # the adapter moved
    assert not any("ref" in name.split(".") for name in saved)
    manifest = json.loads((tmp_path / "dpo" / "adapter" / ADAPTER_MANIFEST).read_text())
    assert manifest["kind"] == "dpo" and manifest["fingerprint"] == "test"
    history = json.loads((tmp_path / "dpo" / "metrics.json").read_text())["log_history"]
    assert len(history) == 4 and "rewards/margins" in history[0]

    # A finished adapter for the same inputs is reused, for other inputs it is not.
    assert finished_preference(tmp_path / "dpo", "test") == result
    assert finished_preference(tmp_path / "dpo", "other") is None


def test_finetune_flow_runs_pairs_and_dpo_behind_the_switch_and_caches_them(tmp_path, prefect_api):
    """The whole `loraflow run` with preference.enabled on a tiny random Llama (the wiring, not the quality): the pairs
    stage and the DPO step run after SFT, evaluation and publish take the DPO adapter, and a re-run (through the same
    entry point in this process) is all cached."""
    from tests.test_finetune_flow import run_cli, run_cli_here, tiny_config
    from tests.tiny_llama import build_tiny_llama

    config = tiny_config(tmp_path, build_tiny_llama(tmp_path / "tiny-llama"))
    config.write_text(config.read_text() + "preference: {enabled: true, steps: 2, batch_size: 2, margin_sample: 4}\n")
    first = run_cli(config, tmp_path / "home")
    assert first["stages"]["pairs"]["rows_out"] > 0 and not first["preference"]["cached"]
    assert first["preference"]["steps"] == 2 and first["preference"]["sft_adapter_dir"] != first["preference"]["adapter_dir"]
    assert first["publish"]["adapter_dir"] == first["preference"]["adapter_dir"] == first["candidate"]["adapter_dir"]
    again = run_cli_here(config)
    assert again["preference"]["cached"] and again["stages"]["pairs"]["cached"]
    assert again["preference"]["adapter_dir"] == first["preference"]["adapter_dir"]
