"""GGUF export on the tiny random Llama (SmolLM2's tokenizer): read back by the gguf reader and transformers' loader."""

import json

import pytest

from loraflow.gguf_export import GGUFExportError, export_gguf, gguf_logit_difference
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
    assert path.name == f"model-{quantization}.gguf" and not list(tiny_folder.glob(".*.partial"))
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


def test_unsupported_architecture_is_named(tiny_folder, tmp_path):
    config = json.loads((tiny_folder / "config.json").read_text()) | {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="gemma2.*Gemma2ForCausalLM"):
        export_gguf(tmp_path)
