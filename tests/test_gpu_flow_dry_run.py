"""configs/gpu_8b.yaml end to end on CPU (issue 31): `loraflow run` with the 8B stand-in shrunk to 2 layers.

The same config the GPU run uses (benchmarks/gpu_flow.py), with its paths under tmp_path, a 12-title catalog, 2
training steps, 4 questions and 4 general ones: every stage runs (prepare, QLoRA path, evaluation with eval.batch_size auto, merge,
save, GGUF f16 and its logit check), through the real CLI.
"""

import json

import pytest

from benchmarks.gpu_flow import run_config
from loraflow.config.pipeline import load_config
from scripts.make_8b_model import build, default_tokenizer_dir, stand_in_config
from scripts.make_sample_data import write_catalog


def test_gpu_config_loads_with_the_8b_stand_in_and_the_gguf_publish():
    config = load_config("configs/gpu_8b.yaml")
    assert config.model.base.endswith(".loraflow/gpu_8b/llama3-8b-smollm2")
    assert (config.train.quantization, config.train.max_steps, config.eval.batch_size) == ("4bit", 30, "auto")
    assert config.publish.target == "local" and config.publish.gguf.quantization == "f16"
    shape = stand_in_config(default_tokenizer_dir())
    assert (shape["hidden_size"], shape["num_hidden_layers"], shape["num_key_value_heads"], shape["vocab_size"]) == (4096, 32, 8, 49152)


@pytest.mark.slow
def test_loraflow_run_on_the_gpu_config_with_a_two_layer_stand_in(tmp_path, prefect_api):
    from loraflow.cli.commands import main

    write_catalog(tmp_path, 12)
    build(tmp_path / "model", default_tokenizer_dir(), layers=2, hidden=256)
    config_path = run_config(tmp_path, max_steps=2, questions=4, general_questions=4)

    assert main(["run", str(config_path)]) == 0

    summary = json.loads(next((tmp_path / "runs").glob("gpu-8b/*/summary.json")).read_text())
    assert summary["train"]["global_step"] == 2
    assert 0 < summary["train"]["first_step_seconds"] < summary["train"]["seconds"]
    for model in ("base", "finetuned"):
        timing = summary["eval"]["timing"][model]
        assert timing["questions"] >= 4 and timing["batch_size"] == 16  # auto on CPU
    publish = summary["publish"]
    assert publish["published"] and publish["gguf_file"].endswith("model-f16.gguf")
    assert publish["gguf_max_logit_diff"] <= 1.0 and publish["max_logit_diff"] <= 1e-2
    assert set(publish["timing"]) == {"load", "merge", "save", "gguf_export", "gguf_check"}
    assert publish["timing"]["load"] < publish["timing"]["merge"] < publish["seconds"]
    manifest = json.loads((next((tmp_path / "runs" / "gpu-8b").glob("*/model")) / "loraflow-manifest.json").read_text())
    assert "model-f16.gguf" in manifest["files"]
