"""GGUF export on the tiny random Llama (SmolLM2's tokenizer): read back by the gguf reader and transformers' loader."""

import json

import pytest

from loraflow.publishing.gguf import GGUFExportError, export_gguf, gguf_logit_difference
from tests.tiny_llama import build_tiny_llama

TEXTS = ["<|im_start|>user\nWho made Starlit Ferry?<|im_end|>\n<|im_start|>assistant\nStudio Kaze.<|im_end|>",
         "The sky is blue."]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("quantization, bound", [("f16", 0.05), ("q8_0", 0.2)])
def test_gguf_round_trip_logits_tokenizer_and_stop_ids(tiny_folder, quantization, bound):
    import gguf
    from transformers import AutoTokenizer

    path = export_gguf(tiny_folder, quantization=quantization, eos_ids=[2])
    assert path.name == f"model-{quantization}.gguf" and not list(tiny_folder.glob(f".{path.name}.*"))
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert kinds == ({"F16"} if quantization == "f16" else {"Q8_0"})
    max_diff = gguf_logit_difference(tiny_folder, path, TEXTS)
    assert max_diff < bound, max_diff
    merged_tok = AutoTokenizer.from_pretrained(tiny_folder)
    gguf_tok = AutoTokenizer.from_pretrained(tiny_folder, gguf_file=path.name)
    for text in TEXTS:
        assert gguf_tok(text, add_special_tokens=False).input_ids == merged_tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_streamed_file_is_byte_for_byte_the_buffered_writers(tiny_folder, quantization):
    from loraflow.runtime.artifact_store import file_sha256

    buffered = file_sha256(export_gguf(tiny_folder, quantization=quantization, eos_ids=[2], buffered=True))
    assert file_sha256(export_gguf(tiny_folder, quantization=quantization, eos_ids=[2])) == buffered


def test_in_place_check_agrees_with_the_reload_check_and_catches_a_wrong_layout(tiny_folder, monkeypatch):
    """The merged model with the GGUF's weights swapped in gives the reload check's logits (f16 of a float32
    model: the same rounding); with the rotary permutation not undone the difference is large; a header that
    disagrees with config.json is refused."""
    import loraflow.publishing.gguf_check as gguf_check
    from loraflow.publishing.merge import verification_batch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export_gguf(tiny_folder, quantization="f16", eos_ids=[2])
    inputs = verification_batch(AutoTokenizer.from_pretrained(tiny_folder), TEXTS, "cpu")

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype="float32")

    in_place = gguf_check.gguf_logit_difference_in_place(fresh(), path, inputs)
    assert in_place == pytest.approx(gguf_logit_difference(tiny_folder, path, TEXTS), abs=1e-4)
    monkeypatch.setattr(gguf_check, "unpermute_for_rotary", lambda weights, *_: weights)
    assert gguf_check.gguf_logit_difference_in_place(fresh(), path, inputs) > 100 * max(in_place, 1e-4)
    monkeypatch.undo()
    config = json.loads((tiny_folder / "config.json").read_text())
    with pytest.raises(GGUFExportError, match="block_count"):
        gguf_check.load_gguf_weights(fresh(), path, config | {"num_hidden_layers": config["num_hidden_layers"] + 1})


def test_unsupported_architecture_is_named(tiny_folder, tmp_path):
    config = json.loads((tiny_folder / "config.json").read_text()) | {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="gemma2.*Gemma2ForCausalLM"):
        export_gguf(tmp_path)


def test_publish_with_gguf_lists_it_and_puts_the_check_in_the_card(tmp_path):
    """A real train -> publish with publish.gguf: the file is in the manifest and the card carries its |Δlogit|."""
    from loraflow.config.publish import GGUFConfig, PublishConfig
    from loraflow.runtime.artifact_store import file_sha256
    from tasks.publish import publish_model
    from transformers import AutoTokenizer

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter
    from tests.test_publish import card_facts
    from tests.tiny_llama import tokens_frame

    model_dir = build_tiny_llama(tmp_path / "model")
    tokens = tokens_frame(AutoTokenizer.from_pretrained(model_dir))
    trained = train_adapter(tokens, model_dir, TrainConfig(max_steps=3, micro_batch_size=2, learning_rate=2e-2), tmp_path / "train")
    texts = list(tokens["prompt"] + tokens["reference"])[:2]
    result = publish_model(model_dir, trained.adapter_dir, PublishConfig(gguf=GGUFConfig(quantization="q8_0")),
                           tmp_path / "out", card=card_facts(), verify_texts=texts)
    folder = tmp_path / "out" / "model"
    assert result.gguf_file == str(folder / "model-q8_0.gguf") and 0 < result.gguf_max_logit_diff < 1.0
    manifest = json.loads((folder / "loraflow-manifest.json").read_text())["files"]
    assert manifest["model-q8_0.gguf"] == file_sha256(folder / "model-q8_0.gguf")
    assert manifest["README.md"] == file_sha256(folder / "README.md")
    card = (folder / "README.md").read_text()
    assert "## GGUF" in card and f"{result.gguf_max_logit_diff:.3g}" in card


def test_gguf_tolerance_defaults_by_quantization_and_a_set_one_wins():
    from loraflow.config.publish import GGUFConfig

    assert GGUFConfig().max_logit_difference == 1.0
    assert GGUFConfig(quantization="q8_0").max_logit_difference == 2.0  # SmolLM2-135M measured 1.02 in q8_0
    assert GGUFConfig(quantization="q8_0", tolerance=0.5).max_logit_difference == 0.5
