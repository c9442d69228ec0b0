"""Answer-only logits: the same loss and the same LoRA gradients as transformers' loss over every position."""

import pytest
import torch

from loraflow.config.train import TrainConfig
from loraflow.training.answer_loss import answer_only_loss, has_answer_only_loss
from loraflow.training.model_loading import load_lora_model
from tests.tiny_llama import build_tiny_llama


@pytest.fixture
def tiny_lora(tmp_path):
    env = {"device": "cpu", "precision": "fp32", "quantization": "none", "optimizer": "adamw_torch"}
    torch.manual_seed(0)
    model = load_lora_model(build_tiny_llama(tmp_path / "tiny"), TrainConfig(lora_dropout=0.0), env)
    for name, parameter in model.named_parameters():  # B starts at zero: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model.float().train()


def padded_batch() -> dict:
    """Two rows of different length, right-padded; prompt and padding labelled -100."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 25])
def test_answer_only_loss_equals_the_full_logits_loss_and_its_gradients(tiny_lora, num_items):
    batch = padded_batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    full = tiny_lora(**batch, **kwargs).loss
    full.backward()
    expected = lora_grads(tiny_lora)
    tiny_lora.zero_grad()

    ours = answer_only_loss(tiny_lora, batch, num_items)
    ours.backward()
    assert has_answer_only_loss(tiny_lora)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    for name, grad in lora_grads(tiny_lora).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-4 * expected[name].abs().max().item(), msg=name)


def train_three_steps(folder, tmp_path, answer_only: bool, check_callbacks: bool = False) -> list[float]:
    """Three Trainer steps on the tiny model's TOKENS rows; the logged losses."""
    import logging

    from transformers import AutoTokenizer, set_seed

    from loraflow.training.data import plan_batches
    from loraflow.training.trainer import build_trainer
    from tests.tiny_llama import tokens_frame

    config = TrainConfig(max_steps=3, micro_batch_size=2, learning_rate=1e-2, lora_dropout=0.0)
    env = {"device": "cpu", "precision": "fp32", "quantization": "none", "optimizer": "adamw_torch"}
    rows = tokens_frame(AutoTokenizer.from_pretrained(folder))
    set_seed(0)
    model = load_lora_model(folder, config, env)
    batches = plan_batches(model, rows[rows["split"] == "train"], config, env, pad_id=2, packing=False, fast=False,
                           log=logging.getLogger("test"))
    trainer, _ = build_trainer(model, batches, config, env, tmp_path / f"ckpt-{answer_only}", identity={})
    assert trainer.answer_only_logits  # the CPU default
    trainer.answer_only_logits = answer_only
    if check_callbacks:
        from loraflow.cpu_threads import ThreadsForLoad

        assert any(isinstance(c, ThreadsForLoad) for c in trainer.callback_handler.callbacks)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_the_cpu_trainer_trains_the_same_curve_with_answer_only_logits(tmp_path):
    folder = build_tiny_llama(tmp_path / "tiny")
    full, ours = train_three_steps(folder, tmp_path, False), train_three_steps(folder, tmp_path, True)
    assert len(ours) == 3 and ours[-1] < ours[0]
    assert ours == pytest.approx(full, rel=1e-4)
