"""CPU training uses the cores other processes leave free (loraflow/modeling/cpu_threads.py)."""

import pytest
import torch

from loraflow.config.train import TrainConfig
from loraflow.modeling.cpu_threads import ThreadsForLoad, threads_for_load
from loraflow.training.model_loading import load_lora_model


@pytest.mark.parametrize("cores, load, own, expected", [
    (2, 2.0, 2, 2),   # only us: every core
    (2, 3.1, 2, 1),   # one other busy process beside our two threads
    (2, 2.0, 1, 1),   # it is still there (our one thread + it)
    (2, 1.2, 1, 2),   # it has gone
    (2, 9.0, 2, 1),   # a crowded machine: never below one
    (16, 6.0, 16, 16),  # fewer runnable threads than ours (a load average lags): all cores
    (16, 22.0, 16, 10),
])
def test_threads_for_load(cores, load, own, expected):
    assert threads_for_load(cores, load, own) == expected


def test_the_callback_follows_the_load_average(monkeypatch):
    from types import SimpleNamespace

    before = torch.get_num_threads()
    callback = ThreadsForLoad(every=5, cores=2)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr("os.getloadavg", lambda: (3.2, 3.0, 3.0))
        callback.on_step_begin(None, SimpleNamespace(global_step=3), None)
        assert torch.get_num_threads() == 2  # only every fifth step
        callback.on_step_begin(None, SimpleNamespace(global_step=5), None)
        assert torch.get_num_threads() == 1
        monkeypatch.setattr("os.getloadavg", lambda: (1.1, 2.0, 3.0))
        callback.on_step_begin(None, SimpleNamespace(global_step=10), None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_training_gets_the_callback(tmp_path):
    from tests.tiny_llama import build_tiny_llama

    losses, callbacks = train_three_steps(build_tiny_llama(tmp_path / "tiny"), tmp_path)
    assert len(losses) == 3 and any(isinstance(callback, ThreadsForLoad) for callback in callbacks)


def train_three_steps(folder, tmp_path) -> tuple[list[float], list]:
    """Three Trainer steps on the tiny model's TOKENS rows (CPU); the logged losses and the callbacks."""
    import logging

    from transformers import AutoTokenizer, set_seed

    from loraflow.training.data import plan_batches
    from loraflow.training.trainer import build_trainer
    from tests.test_train import cpu_plan
    from tests.tiny_llama import tokens_frame

    config = TrainConfig(max_steps=3, micro_batch_size=2, learning_rate=1e-2, lora_dropout=0.0)
    plan = cpu_plan(config, precision="fp32", packing=False)
    rows = tokens_frame(AutoTokenizer.from_pretrained(folder))
    set_seed(0)
    model = load_lora_model(folder, config, plan)
    batches = plan_batches(model, rows[rows["split"] == "train"], config, plan, pad_id=2, log=logging.getLogger("test"))
    trainer, _ = build_trainer(model, batches, config, tmp_path / "ckpt", identity={})
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer.callback_handler.callbacks
