"""The model half on a CUDA GPU: 4-bit QLoRA training, resume, evaluation and the fp32 merge check.

SmolLM2's architecture with random weights plus its real tokenizer (nothing can be downloaded on the
device machine). Run there with:
    export PYTHONPATH=$PWD/.gpu_site:$PWD LORAFLOW_SMOLLM2_FILES=$PWD/.device/smollm2
    python -m pytest tests/gpu -m gpu -q
"""

import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


@pytest.fixture(scope="module")
def smol_random(tmp_path_factory):
    """SmolLM2-135M's config with random bf16 weights, and its tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraflow.models import TOKENIZER_FILES
    from tests.tiny_llama import smollm2_dir

    source, folder = smollm2_dir(), tmp_path_factory.mktemp("smol") / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tokens(smol_random):
    from transformers import AutoTokenizer

    from tests.tiny_llama import tokens_frame

    return tokens_frame(AutoTokenizer.from_pretrained(smol_random))


def test_qlora_4bit_trains_lora_only_with_paged_adamw(smol_random, tokens, tmp_path):
    from transformers import TrainerCallback

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter

    class Inspect(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.quantized = sum(type(p).__name__ == "Params4bit" for p in model.parameters())
            self.lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            self.changed = sum(not torch.equal(self.lora[n], params[n]) for n in self.lora)

    inspect = Inspect()
    config = TrainConfig(quantization="4bit", max_steps=12, micro_batch_size=4, learning_rate=2e-3, checkpoint_every=5)
    result = train_adapter(tokens, smol_random, config, tmp_path / "run", callbacks=[inspect])
    assert (result.device, result.quantization, result.optimizer, result.precision) == ("cuda", "4bit", "paged_adamw_8bit", "bf16")
    assert inspect.quantized > 100, "base linear weights should be bitsandbytes Params4bit"
    assert inspect.lora and all("lora_" in n for n in inspect.lora) and inspect.changed == len(inspect.lora)
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite (not NaN)
    assert result.peak_memory_kind == "cuda_max_allocated" and result.peak_memory_bytes > 0
    assert result.tokens_per_second and result.tokens_per_second > 0


def test_qlora_resume_on_gpu(smol_random, tokens, tmp_path):
    from transformers import TrainerCallback

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt("simulated crash")

    config = TrainConfig(quantization="4bit", max_steps=6, micro_batch_size=2, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tokens, smol_random, config, tmp_path / "run", callbacks=[CrashAt()])
    resumed = train_adapter(tokens, smol_random, config, tmp_path / "run")
    assert resumed.resumed_from_step == 4 and resumed.global_step == 6


def test_evaluate_and_fp32_merge_of_a_4bit_trained_adapter(smol_random, tokens, tmp_path):
    from loraflow.config.evaluate import EvalConfig
    from loraflow.config.publish import PublishConfig
    from loraflow.config.train import TrainConfig
    from tasks.evaluate import evaluate_adapter
    from tasks.publish import CardFacts, publish_model
    from tasks.train import train_adapter

    trained = train_adapter(tokens, smol_random, TrainConfig(quantization="4bit", max_steps=6, micro_batch_size=4, learning_rate=5e-3),
                            tmp_path / "train")
    evaluated = evaluate_adapter(tokens, smol_random, trained.adapter_dir, EvalConfig(max_new_tokens=8), tmp_path / "eval")
    assert evaluated.base["eval_loss"] != evaluated.finetuned["eval_loss"]
    texts = list((tokens["prompt"] + tokens["reference"])[:4])
    published = publish_model(smol_random, trained.adapter_dir, PublishConfig(), tmp_path / "out",
                              card=CardFacts(run_name="gpu", base_model="smollm2-random"), verify_texts=texts)
    assert published.max_logit_diff < 1e-2 and Path(published.model_dir, "model.safetensors").exists()
