"""train stage: real training of a LoRA adapter on a tiny random Llama with SmolLM2's tokenizer (CPU, seconds)."""

import json
import math

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from data_contracts.tokens import IGNORE_INDEX
from loraflow.config.train import TrainConfig
from loraflow.training.checkpoints import CHECKPOINT_MARKER, identity_differences
from loraflow.training.data import PadByPosition
from loraflow.training.micro_batch import choose_rows_per_micro_batch
from loraflow.training.plan import fast_path_choice, packing_enabled, plan_training
from loraflow.training.result import NonFiniteTrainingError, ResumeMismatchError
from tasks.train import train_adapter
from tests.tiny_llama import build_tiny_llama, tokens_frame


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tokens_frame(AutoTokenizer.from_pretrained(tiny_model))


def quick_config(**overrides) -> TrainConfig:
    settings = dict(max_steps=8, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                    checkpoint_every=2, lora_r=8, lora_alpha=16)
    return TrainConfig(**{**settings, **overrides})


class Snapshot(TrainerCallback):
    """Copies every parameter at the start and end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


class CrashAt(TrainerCallback):
    """Simulates a crash (e.g. the machine going away) when a step ends."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def test_padding_is_masked_by_position_so_eos_stays_a_target():
    eos = pad = 2
    collate = PadByPosition(pad_id=pad)
    batch = collate([
        {"input_ids": [5, 6, eos], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, eos]},
        {"input_ids": [7, eos], "attention_mask": [1, 1], "labels": [IGNORE_INDEX, eos]},
    ])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, eos], [IGNORE_INDEX, eos, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, pad]]
    assert collate.tokens_seen == 5


def cpu_plan(config: TrainConfig, **changes):
    """The TrainPlan `config` gets on this (CUDA-less) machine, with `changes` (what another machine would decide)."""
    import logging

    return plan_training(config, "no-model-dir", 64, logging.getLogger("test")).model_copy(update=changes)


def test_cpu_runs_the_same_path_unquantized(caplog):
    if torch.cuda.is_available():
        pytest.skip("the CPU plan")
    from loraflow.modeling.precision import choose_precision

    with caplog.at_level("INFO"):
        plan = cpu_plan(TrainConfig(quantization="4bit"))
    assert (plan.device, plan.quantization, plan.optimizer) == ("cpu", "none", "adamw_torch")
    assert (plan.precision, plan.precision_reason) == (choose_precision("auto", "cpu").precision,
                                                       choose_precision("auto", "cpu").reason)
    assert plan.quantization_reason.startswith("no CUDA device, so train.quantization=4bit runs unquantized")
    assert not plan.packing and not plan.fast_path and plan.launcher is None and plan.processes == 1
    assert plan.fast_path_reason == "train.packing=auto packs on CUDA only"
    assert "train: plan device=cpu" in caplog.text and plan.quantization_reason in caplog.text  # logged once, with why


def test_training_changes_lora_weights_only_and_loss_decreases(tiny_model, tokens, tmp_path):
    snapshot = Snapshot()
    result = train_adapter(tokens, tiny_model, quick_config(), tmp_path / "run", callbacks=[snapshot])

    trainable = [n for n, (_, grad) in snapshot.before.items() if grad]
    frozen = [n for n, (_, grad) in snapshot.before.items() if not grad]
    assert trainable and all("lora_" in n for n in trainable)
    changed = [n for n in trainable if not torch.equal(snapshot.before[n][0], snapshot.after[n])]
    assert len(changed) == len(trainable), f"LoRA weights that did not change: {set(trainable) - set(changed)}"
    assert all(torch.equal(snapshot.before[n][0], snapshot.after[n]) for n in frozen), "a base weight changed"

    curve = pd.read_parquet(result.loss_curve_path)
    assert list(curve["step"]) == list(range(1, 9))
    assert curve["loss"].map(math.isfinite).all()
    assert curve["loss"].tail(3).mean() < curve["loss"].head(3).mean()
    assert result.global_step == 8 and result.train_rows == 6 and result.quantization == "none"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert not (tmp_path / "run" / "checkpoints").exists(), "checkpoints are removed once the adapter is saved"
    if not torch.cuda.is_available():  # packing="auto" is off on CPU: the padded path, no speed plan
        assert not result.packing and result.speed_plan is None and metrics["packing_stats"] is None

    again = train_adapter(tokens, tiny_model, quick_config(), tmp_path / "run")
    assert again.reused and again.adapter_dir == result.adapter_dir


def test_resume_continues_from_last_complete_checkpoint_and_refuses_changed_inputs(tiny_model, tokens, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tokens, tiny_model, quick_config(max_steps=6), run, callbacks=[CrashAt(5)])
    checkpoints = run / "checkpoints"
    assert (checkpoints / "checkpoint-4" / CHECKPOINT_MARKER).exists()
    # A checkpoint the crash left half-written: no marker, so it must not be resumed from.
    partial = checkpoints / "checkpoint-5"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"partial")

    with pytest.raises(ResumeMismatchError) as refused:
        train_adapter(tokens, tiny_model, quick_config(max_steps=6, learning_rate=5e-3), run)
    assert "train.learning_rate: 0.01 (checkpoint) -> 0.005 (now)" in str(refused.value)
    changed_data = tokens.assign(split=["train"] * 7 + ["validation"] * 2)
    with pytest.raises(ResumeMismatchError, match="data_sha256"):
        train_adapter(changed_data, tiny_model, quick_config(max_steps=6), run)

    resumed = train_adapter(tokens, tiny_model, quick_config(max_steps=6), run)
    assert resumed.resumed_from_step == 4 and resumed.global_step == 6
    assert list(pd.read_parquet(resumed.loss_curve_path)["step"]) == [5, 6]
    assert not partial.exists()


def test_resume_mismatch_can_be_allowed(tiny_model, tokens, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_adapter(tokens, tiny_model, quick_config(max_steps=4), run, callbacks=[CrashAt(3)])
    resumed = train_adapter(tokens, tiny_model, quick_config(max_steps=4, learning_rate=5e-3, allow_resume_mismatch=True), run)
    assert resumed.resumed_from_step == 2 and resumed.global_step == 4


class PoisonAt(TrainerCallback):
    """Writes inf into one LoRA weight before a step (lr=1e6 merely saturates this tiny model's loss)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("inf"))


def test_nonfinite_guard_stops_training(tiny_model, tokens, tmp_path):
    config = quick_config(nonfinite_patience=2, max_steps=20)
    with pytest.raises(NonFiniteTrainingError, match="non-finite for 2 consecutive steps") as stopped:
        train_adapter(tokens, tiny_model, config, tmp_path / "run", callbacks=[PoisonAt(3)])
    assert "up to step 5" in str(stopped.value)
    assert not (tmp_path / "run" / "adapter").exists()


def test_packed_training_runs_on_fewer_rows(tiny_model, tokens, tmp_path):
    result = train_adapter(tokens, tiny_model, quick_config(packing=True, pack_max_tokens=128, max_steps=3), tmp_path / "run")
    curve = pd.read_parquet(result.loss_curve_path)
    assert result.global_step == 3 and curve["loss"].map(math.isfinite).all()
    # 6 examples of 34-48 tokens fit into 2-3 rows of 128: tokens/s counts real tokens only.
    assert curve["tokens_seen"].iloc[-1] <= 3 * 2 * 128
    # The plan that ran travels with the result and into metrics.json: packed on CPU, so not the fast path.
    plan = result.plan
    assert plan.packing and not plan.fast_path and plan.fast_path_reason.startswith("no CUDA device")
    assert (plan.rows_per_micro_batch, plan.row_tokens) == (result.rows_per_micro_batch, 128) and plan.speed is None
    assert json.loads(open(result.metrics_path).read())["plan"] == plan.model_dump(mode="json")


def test_packing_auto_is_on_for_cuda_only():
    cuda, cpu = "cuda", "cpu"
    assert TrainConfig().packing == "auto"
    assert packing_enabled(TrainConfig(), cuda) and not packing_enabled(TrainConfig(), cpu)
    assert packing_enabled(TrainConfig(packing=True), cpu) and not packing_enabled(TrainConfig(packing=False), cuda)


def test_the_fast_path_runs_packed_on_cuda_outside_fsdp_and_says_why_not():
    assert fast_path_choice(TrainConfig(), "cuda") == (True, "packed rows on CUDA")
    assert fast_path_choice(TrainConfig(distributed="ddp", num_processes=2), "cuda")[0]
    assert fast_path_choice(TrainConfig(), "cpu") == (False, "train.packing=auto packs on CUDA only")
    assert fast_path_choice(TrainConfig(packing=False), "cuda") == (False, "packing is off")
    assert fast_path_choice(TrainConfig(packing=True), "cpu")[1].startswith("no CUDA device")
    assert fast_path_choice(TrainConfig(distributed="fsdp"), "cuda")[1].startswith("train.distributed=fsdp")


def test_rows_per_micro_batch_follow_the_memory_budget(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraflow.training import plan_checkpointing

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=8, target_modules="all-linear"))
    config = TrainConfig()
    whole = lambda rows: plan_checkpointing(model, rows * 4096, 1e6, fused_head=False)[1]  # noqa: E731 - GiB, no layer checkpointed
    assert whole(1) < whole(2) < whole(4) < whole(8)
    assert choose_rows_per_micro_batch(model, config, 4096, 100, whole(8) + 0.01)[0] == 8
    assert choose_rows_per_micro_batch(model, config, 4096, 100, whole(4) + 0.01)[0] == 4
    rows, reason = choose_rows_per_micro_batch(model, config, 4096, 100, (whole(2) + whole(4)) / 2)
    assert rows == 2 and "2 rows, 0/" in reason
    assert choose_rows_per_micro_batch(model, config, 4096, 3, 1e6)[0] == 2, "never more rows than the data has"
    assert choose_rows_per_micro_batch(model, TrainConfig(pack_rows_per_micro_batch=3), 4096, 100, 1e6) == (3, "train.pack_rows_per_micro_batch")
    assert choose_rows_per_micro_batch(model, config, 4096, 100, 1e6)[0] == 16, "16 rows when everything fits whole"
    # Below what one whole-layer row needs: 2 rows, the plan checkpoints layers; far below: 1 row.
    rows, reason = choose_rows_per_micro_batch(model, config, 4096, 100, whole(1) - 1e-4)
    assert rows in (1, 2) and "checkpointed" in reason
    assert choose_rows_per_micro_batch(model, TrainConfig(gradient_checkpointing=False), 4096, 100, 1e-3)[0] == 1


def test_fast_path_training_arguments_leave_checkpointing_to_the_plan(tmp_path):
    from loraflow.training.trainer import training_arguments

    plain_plan = cpu_plan(TrainConfig(), precision="bf16")
    fast = training_arguments(TrainConfig(), plain_plan.model_copy(update=dict(fast_path=True, packing=True,
                                                                               rows_per_micro_batch=4)), tmp_path)
    plain = training_arguments(TrainConfig(), plain_plan, tmp_path)
    flag = "activation_checkpointing" if hasattr(fast, "activation_checkpointing") else "gradient_checkpointing"
    assert getattr(fast, flag) is False and getattr(plain, flag) is True
    assert fast.per_device_train_batch_size == 4 and fast.remove_unused_columns is False and fast.bf16


def test_identity_differences_name_each_changed_key():
    saved = {"data_sha256": "a", "train": {"lora_r": 8, "epochs": 1.0}}
    now = {"data_sha256": "b", "train": {"lora_r": 16, "epochs": 1.0}}
    assert identity_differences(saved, now) == [
        "data_sha256: 'a' (checkpoint) -> 'b' (now)", "train.lora_r: 8 (checkpoint) -> 16 (now)",
    ]
