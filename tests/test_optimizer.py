"""loraflow's bitsandbytes 8-bit AdamW step (one device synchronisation per step) updates exactly as bitsandbytes'."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from loraflow.training.optimizer import synchronising_once  # noqa: E402


def _adapter_like_params(device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(16, 4096), (4096, 16), (16, 512), (512, 16), (300,)]  # below and above bitsandbytes' paging size
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in shapes]


def _run(optimizer_class, device, steps=4):
    params = _adapter_like_params(device)
    optimizer = optimizer_class(params, lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for index, p in enumerate(params):
            p.grad = None if (step == 1 and index == 2) else torch.randn(p.shape, generator=generator).to(device)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pytest.mark.parametrize("name", ["PagedAdamW8bit", "AdamW8bit"])
def test_the_step_synchronising_once_updates_exactly_as_bitsandbytes(device, name):
    stock_class = getattr(bnb.optim, name)
    ours_class = synchronising_once(stock_class)
    assert ours_class is not stock_class and issubclass(ours_class, stock_class)
    stock_params, stock = _run(stock_class, device)
    ours_params, ours = _run(ours_class, device)
    for a, b, initial in zip(stock_params, ours_params, _adapter_like_params(device)):
        assert torch.equal(a, b)
        assert not torch.equal(a, initial), "the step moved the weights"
    for a, b in zip(stock_params, ours_params):
        for key, value in stock.state[a].items():
            other = ours.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def test_other_optimizers_are_left_alone():
    assert synchronising_once(torch.optim.AdamW) is torch.optim.AdamW
    assert synchronising_once(bnb.optim.PagedAdamW8bit) is synchronising_once(bnb.optim.PagedAdamW8bit)


def test_the_train_stage_trainer_builds_paged_adamw_8bit_with_the_step_synchronising_once(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from loraflow.training.optimizer import _step_synchronising_once
    from loraflow.training.trainer import resumable_trainer_class

    model = get_peft_model(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64)),
                           LoraConfig(r=4, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_8bit", use_cpu=True, report_to=[])
    optimizer = resumable_trainer_class()(model=model, args=args).create_optimizer()
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit) and optimizer.args.optim_bits == 8
    step = type(optimizer).step  # torch wraps a class's step in its profiling hook on first construction
    assert optimizer.is_paged and getattr(step, "__wrapped__", step) is _step_synchronising_once
