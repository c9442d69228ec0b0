"""The model half on a CUDA GPU: 4-bit QLoRA training (the packed fast path by default, and the padded one),
resume, evaluation and the fp32 merge check.

SmolLM2's architecture with random weights plus its real tokenizer (nothing can be downloaded on the
device machine). Run there with:
    export PYTHONPATH=$PWD/.gpu_site:$PWD LORAFLOW_SMOLLM2_FILES=$PWD/.device/smollm2
    python -m pytest tests/gpu -m gpu -q
.gpu_site from ../shared/gpu/make-carry bitsandbytes==0.50.2 liger-kernel==0.8.5 pydantic pydantic-core
typing-inspection annotated-types (Liger makes the fast path's fused head; without it the plan says why not).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from loraflow.training.varlen import varlen_available

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"),
]


@pytest.fixture(scope="module")
def smol_random(tmp_path_factory):
    """SmolLM2-135M's config with random bf16 weights, and its tokenizer files."""
    from tests.tiny_llama import build_random_smollm2

    return build_random_smollm2(tmp_path_factory.mktemp("smol") / "model")


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
    # The padded (unpacked) path on the GPU; the default packed path is tested below.
    config = TrainConfig(quantization="4bit", packing=False, max_steps=12, micro_batch_size=4, learning_rate=2e-3,
                         checkpoint_every=5)
    result = train_adapter(tokens, smol_random, config, tmp_path / "run", callbacks=[inspect])
    assert result.speed_plan is None and not result.packing
    assert not result.plan.fast_path and result.plan.fast_path_reason == "packing is off"
    assert (result.device, result.quantization, result.optimizer, result.precision) == ("cuda", "4bit", "paged_adamw_8bit", "bf16")
    assert inspect.quantized > 100, "base linear weights should be bitsandbytes Params4bit"
    assert inspect.lora and all("lora_" in n for n in inspect.lora) and inspect.changed == len(inspect.lora)
    assert result.final_loss is not None and result.final_loss == result.final_loss  # finite (not NaN)
    assert result.peak_memory_kind == "cuda_max_allocated" and result.peak_memory_bytes > 0
    assert result.tokens_per_second and result.tokens_per_second > 0


class LoraInspect:
    """TrainerCallback factory: counts 4-bit weights and which LoRA tensors changed during training."""

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class Inspect(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.quantized = sum(type(p).__name__ == "Params4bit" for p in model.parameters())
                self.lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                params = dict(model.named_parameters())
                self.changed = sum(not torch.equal(self.lora[n], params[n]) for n in self.lora)

        return Inspect()


def test_default_train_takes_the_packed_fast_path(smol_random, tokens, tmp_path):
    """train_adapter with default settings on CUDA: packed rows, configure_model_for_speed, plan recorded."""
    import pandas as pd

    from loraflow.config.train import TrainConfig
    from tasks.train import train_adapter

    train = tokens[tokens["split"] == "train"]
    # ~100 copies of the QA rows: several packed rows of 4,096 tokens, so the rows-per-micro-batch choice is real.
    many = pd.concat([train.assign(id=train["id"] + f"-{k}") for k in range(100)], ignore_index=True)
    inspect = LoraInspect.make()
    config = TrainConfig(max_steps=10, learning_rate=2e-3, lr_scheduler="constant", warmup_ratio=0.0, checkpoint_every=1000)
    assert config.packing == "auto" and config.memory_budget_gb is None
    result = train_adapter(many, smol_random, config, tmp_path / "run", callbacks=[inspect])

    plan = result.speed_plan
    assert result.packing and plan is not None, "CUDA + defaults must take the packed fast path"
    expected_attention = "loraflow_varlen" if varlen_available() else "flex_attention"
    assert plan["attn_implementation"] == expected_attention and plan["document_masking"]
    assert plan["lora_fused_layers"] > 0 and plan["total_layers"] == 30
    assert plan["memory_budget_gb"] > 10 and plan["rows_per_micro_batch"] >= 1 and plan["row_tokens"] == 4096
    assert plan["tokens_per_micro_batch"] == plan["rows_per_micro_batch"] * 4096
    if importlib.util.find_spec("liger_kernel"):
        assert "fused_linear_cross_entropy" in plan["liger"]
    train_plan = result.plan  # the TrainPlan holds the same decisions, typed
    assert train_plan.fast_path and train_plan.speed == plan and train_plan.attention == expected_attention
    assert (train_plan.rows_per_micro_batch, train_plan.checkpointed_layers) == (plan["rows_per_micro_batch"],
                                                                                 plan["checkpointed_layers"])
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["speed_plan"] == plan and metrics["packing_stats"]["documents"] == len(many)
    # tokens/s counts real tokens: at most what the packed rows hold, never the padding to 128.
    assert 0 < metrics["tokens_seen"] <= int(many["length"].sum()) * 10
    assert result.tokens_per_second > 0 and result.tokens_per_second_after_first_step > 0
    assert result.peak_memory_kind == "cuda_max_allocated" and result.peak_memory_bytes > 0

    curve = pd.read_parquet(result.loss_curve_path)
    assert len(curve) == 10 and curve["loss"].map(math.isfinite).all()
    assert curve["loss"].tail(3).mean() < curve["loss"].head(3).mean(), list(curve["loss"])
    assert inspect.quantized > 100, "base linear weights should be bitsandbytes Params4bit"
    assert inspect.lora and all("lora_" in n for n in inspect.lora) and inspect.changed == len(inspect.lora)
    print("fast path:", {k: plan[k] for k in ("rows_per_micro_batch", "checkpointed_layers", "liger", "rows_choice")},
          "tokens/s", result.tokens_per_second_after_first_step, "peak GB", result.peak_memory_bytes / 1e9)


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
    from loraflow.publishing.model_card import CardFacts
    from tasks.publish import publish_model
    from tasks.train import train_adapter

    trained = train_adapter(tokens, smol_random, TrainConfig(quantization="4bit", max_steps=6, micro_batch_size=4, learning_rate=5e-3),
                            tmp_path / "train")
    evaluated = evaluate_adapter(tokens, smol_random, trained.adapter_dir, EvalConfig(max_new_tokens=8), tmp_path / "eval")
    assert evaluated.base["eval_loss"] != evaluated.finetuned["eval_loss"]
    texts = list((tokens["prompt"] + tokens["reference"])[:4])
    published = publish_model(smol_random, trained.adapter_dir, PublishConfig(), tmp_path / "out",
                              card=CardFacts(run_name="gpu", base_model="smollm2-random"), verify_texts=texts)
    assert published.max_logit_diff < 1e-2 and Path(published.model_dir, "model.safetensors").exists()
