"""publish stage: merge check, saved folder, model card, local and hub publish (stand-in Hub API), ask."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.config.publish import PublishConfig
from loraflow.config.train import TrainConfig
from loraflow.modeling.inference import ask
from loraflow.publishing.merge import MergeVerificationError, PublishError, check_merge, verification_batch
from loraflow.publishing.model_card import TRAIN_RAN_FIELDS, CardFacts, SourceFacts, render_model_card
from tasks.publish import publish_model
from tasks.train import train_adapter
from tests.hub_standin import HubStandIn
from tests.tiny_llama import build_tiny_llama, tokens_frame

SENTINEL_TOKEN = "hf_SENTINEL_do_not_leak_0123456789"


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A tiny base model, its TrainResult (an adapter trained enough to move the logits) and verification texts."""
    root = tmp_path_factory.mktemp("publish")
    model_dir = build_tiny_llama(root / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    config = TrainConfig(max_steps=6, micro_batch_size=2, learning_rate=2e-2, lr_scheduler="constant", warmup_ratio=0.0)
    result = train_adapter(tokens, model_dir, config, root / "train")
    texts = list((tokens["prompt"] + tokens["reference"])[tokens["split"] == "validation"]) + list(tokens["prompt"][:2])
    return model_dir, result, texts


@pytest.fixture(scope="module")
def trained(training):
    model_dir, result, texts = training
    return model_dir, result.adapter_dir, texts


def card_facts(**overrides) -> CardFacts:
    return CardFacts(**{
        "run_name": "anime-demo", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "sources": [SourceFacts(name="catalog", kind="csv", location="data/anime.csv", sha256="ab" * 32, rows=30)],
        "rows": {"raw": 30, "train": 180, "validation": 18}, "synthesizer": "anime_qa (overview, production, reception)",
        "template": "chat_template", "system_prompt": "Answer briefly.", "masking": "answer tokens only; padding by position",
        "tokens_sha256": "cd" * 32, "preflight": {"longest example": "212 tokens"},
        "train_config": {"lora_r": 16, "learning_rate": 0.002}, "train_metrics": {"final_loss": 0.12},
        "eval_report_markdown": "## Evaluation: gate passed\n\n| metric | base | fine-tuned | delta |\n|---|---|---|---|\n| fact_accuracy | 0.000 | 0.950 | +0.950 |\n",
        "gate": {"passed": True, "reasons": ["PASS: fact accuracy 0.950 >= 0.900 (trained phrasings)"]},
        **overrides,
    })


def test_merge_check_passes_and_catches_a_bad_merge(trained):
    from peft import PeftModel

    model_dir, adapter_dir, texts = trained
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir)
    inputs = verification_batch(tokenizer, texts, "cpu")
    with torch.inference_mode():
        reference = model(**inputs).logits.float()
    merged = model.merge_and_unload()
    assert check_merge(merged, inputs, reference, tolerance=1e-3) < 1e-3

    with torch.no_grad():
        merged.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # a merge that got one layer wrong
    with pytest.raises(MergeVerificationError, match="merged model differs from base \\+ adapter"):
        check_merge(merged, inputs, reference, tolerance=1e-2)
    adapter_never_merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with pytest.raises(MergeVerificationError):
        check_merge(adapter_never_merged, inputs, reference, tolerance=1e-2)


def test_model_card_is_written_from_pipeline_facts():
    card = render_model_card(card_facts(), max_logit_diff=3e-7, tolerance=1e-2, merge_dtype="float32")
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    for expected in ("| catalog | csv | data/anime.csv | 30 | `abababababababab` |", "raw: 30, train: 180, validation: 18",
                     "Synthesizer: anime_qa", "Loss masking: answer tokens only", "`" + "cd" * 32 + "`",
                     "longest example: 212 tokens", "| lora_r | 16 |", "final_loss: 0.12", "transformers ",
                     "| fact_accuracy | 0.000 | 0.950 | +0.950 |", "**passed**", "PASS: fact accuracy 0.950",
                     "at most 3e-07 (tolerance 0.01)"):
        assert expected in card, expected


def test_model_card_says_which_version_a_continued_adapter_started_from():
    from loraflow.runtime.artifact_store import ArtifactRef
    from loraflow.training.continuation import ContinuationPlan, StartAdapter

    tokens = ArtifactRef(uri="store/artifacts/tokenize/ab.parquet", sha256="ab" * 32, rows=9, contract="tokens",
                         schema_version=2, stage="tokenize", config_hash="c")
    plan = ContinuationPlan(start=StartAdapter(model_name="anime-demo", version=3, adapter_dir="/models/v3/adapter",
                                               adapter_sha256="ef" * 32, tokens=tokens),
                            records_new=1, records_edited=2, records_unchanged=5, rows_changed=6, rows_unchanged=10,
                            rows_replayed=5, replay_share=0.5)
    card = render_model_card(card_facts(continued_from=plan.describe()))
    assert "Not a fresh adapter: continuing from anime-demo version 3 (adapter efefefefefef): 1 new + 2 edited" in card
    assert "Not a fresh adapter" not in render_model_card(card_facts())


def test_model_card_reports_what_training_ran_not_what_was_configured(training):
    """A 4-bit config trained on CPU: the card says unquantized, on cpu, in the precision that ran (item 7)."""
    _, result, _ = training
    assert result.quantization == "none" and result.device == "cpu" and "no CUDA device" in result.quantization_reason
    config = TrainConfig(quantization="4bit").model_dump(mode="json")
    card = render_model_card(card_facts(train_config=config,
                                        train_ran={k: getattr(result, k) for k in TRAIN_RAN_FIELDS}))
    assert "| quantization | none (configured: 4bit) |" in card and "| quantization | 4bit |" not in card
    assert f"| precision | {result.precision} (configured: auto) |" in card
    assert f"Trained on cpu ({result.device_name}), {result.precision} ({result.precision_reason}), quantization none" in card
    assert "runs unquantized (16-bit base) on CPU" in card


def test_local_publish_loads_back_and_answers(trained, tmp_path):
    model_dir, adapter_dir, texts = trained
    result = publish_model(model_dir, adapter_dir, PublishConfig(), tmp_path / "out", card=card_facts(),
                           verify_texts=texts, system_prompt="Answer briefly.")
    folder = tmp_path / "out" / "model"
    assert result.model_dir == str(folder) and result.max_logit_diff < 1e-3 and result.saved_dtype == "bfloat16"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "README.md", "loraflow.json", "adapter/adapter_model.safetensors", "loraflow-manifest.json"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] in (2, [2])

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    merged_in_memory = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not torch.equal(reloaded.lm_head.weight.float(), merged_in_memory.lm_head.weight) or not torch.equal(
        reloaded.model.layers[0].self_attn.q_proj.weight.float(), merged_in_memory.model.layers[0].self_attn.q_proj.weight
    ), "the published weights must contain the merged adapter"

    pieces = list(ask(folder, "Who made Starlit Ferry?", max_new_tokens=6))
    assert len(pieces) >= 1 and isinstance(ask(folder, "Who made Starlit Ferry?", stream=False, max_new_tokens=4), str)


def card_snippet(card_text: str) -> str:
    """The python code block of a model card."""
    return card_text.split("```python\n", 1)[1].split("```", 1)[0]


def test_model_card_use_snippet_runs_against_the_published_folder(trained, tmp_path, capsys):
    """The card's "Use" code, run as a user would copy it, loads the published folder and prints an answer."""
    model_dir, adapter_dir, texts = trained
    result = publish_model(model_dir, adapter_dir, PublishConfig(), tmp_path / "out", card=card_facts(),
                           verify_texts=texts, system_prompt="Answer briefly.")
    snippet = card_snippet((tmp_path / "out" / "model" / "README.md").read_text())
    assert repr(result.model_dir) in snippet and "'Answer briefly.'" in snippet
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip() != ""
    hub_card = render_model_card(card_facts(), model_ref="my-org/anime-demo")
    assert "MODEL = 'my-org/anime-demo'" in card_snippet(hub_card)


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    standin = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", standin.start())
    # conftest makes the session offline; the stand-in is local, so let the client talk to it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield standin
    standin.stop()


def test_hub_publish_through_the_real_client(trained, tmp_path, hub, monkeypatch, caplog):
    model_dir, adapter_dir, texts = trained
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    config = PublishConfig(target="hf_hub", repo_id="loraflow-test/anime-demo", private=True)
    with caplog.at_level(logging.DEBUG):
        result = publish_model(model_dir, adapter_dir, config, tmp_path / "out", card=card_facts(), verify_texts=texts)

    local = {name for name in result.files}
    assert set(hub.files("loraflow-test/anime-demo", "main")) == local | {".gitattributes"}
    assert set(hub.files("loraflow-test/anime-demo", result.hub_run_branch)) == local | {".gitattributes"}
    model_bytes = (tmp_path / "out" / "model" / "model.safetensors").read_bytes()
    assert hub.files("loraflow-test/anime-demo")["model.safetensors"] == model_bytes
    assert hub.repos["loraflow-test/anime-demo"]["private"] is True
    assert result.hub_commit == hub.repos["loraflow-test/anime-demo"]["branches"]["main"]
    commits = [r for r in hub.requests if r["method"] == "POST" and "/commit/" in r["path"]]
    assert len(commits) == 2  # one to the run branch, one to main
    assert all(r["headers"].get("authorization") == f"Bearer {SENTINEL_TOKEN}" for r in hub.requests)

    # The token went only into Authorization headers: not into logs, files, results or the hub's files.
    assert SENTINEL_TOKEN not in caplog.text
    assert SENTINEL_TOKEN not in result.model_dump_json()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and SENTINEL_TOKEN.encode() in p.read_bytes()]
    assert not [p for p, content in hub.files("loraflow-test/anime-demo").items() if SENTINEL_TOKEN.encode() in content]


def test_hub_publish_replaces_stale_files_on_main(trained, tmp_path, hub, monkeypatch):
    model_dir, adapter_dir, texts = trained
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    config = PublishConfig(target="hf_hub", repo_id="loraflow-test/second", private=False)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.endpoint, token=SENTINEL_TOKEN)
    api.create_repo("loraflow-test/second")
    api.create_commit("loraflow-test/second", operations=[CommitOperationAdd("old-weights.bin", b"old")], commit_message="old")
    result = publish_model(model_dir, adapter_dir, config, tmp_path / "out", card=card_facts(), verify_texts=texts)
    assert "old-weights.bin" not in hub.files("loraflow-test/second")
    assert "old-weights.bin" in hub.files("loraflow-test/second", result.hub_run_branch)  # branch came from the old main


def test_hub_publish_needs_a_token(trained, tmp_path, monkeypatch):
    model_dir, adapter_dir, texts = trained
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = PublishConfig(target="hf_hub", repo_id="loraflow-test/none")
    with pytest.raises(PublishError, match="HF_TOKEN"):
        publish_model(model_dir, adapter_dir, config, tmp_path / "out", card=card_facts(), verify_texts=texts)


def test_model_card_metadata_is_valid_yaml_for_any_base_model_path():
    """A local base model path with ': ' once broke the card's hand-written YAML; ModelCardData quotes it."""
    from huggingface_hub import ModelCard

    path = "/srv/models/base: v2 #1"
    card = ModelCard(render_model_card(card_facts(base_model=path, eval_metrics={"fact_accuracy": 0.95,
                                                                                "eval_loss": float("nan")})))
    assert card.data.base_model == path and card.data.library_name == "transformers"
    assert "loraflow" in card.data.tags
    [result] = card.data.eval_results  # the NaN loss is left out
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("fact_accuracy", 0.95, "validation")
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()  # read back, written again: the same
    assert f"A LoRA fine-tune of `{path}`" in card.text
