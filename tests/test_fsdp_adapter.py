"""The adapter gathered from an FSDP1-wrapped peft model is the trained one (CPU, gloo, one process).

peft's save_pretrained writes no LoRA tensors for such a model (its key filter misses the `_fsdp_wrapped_module.`
in the middle of the names); loraflow writes the adapter from FSDP's full state dict instead. Here: the same
steps on the same batch, plain vs FSDP-wrapped, give the same adapter file (keys and values).
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch

from loraflow.training.checkpoints import write_gathered_adapter


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(model, batch, steps: int = 3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _fresh_and_trained_fsdp_models():
    """Two FSDP1-wrapped copies of one tiny LoRA Llama (loraflow's FSDP config), the second trained 3 steps with
    AdamW: (fresh, trained, the trained one's optimizer)."""
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    def wrap(model):
        return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                                        device_id=torch.device("cpu"))

    PartialState(cpu=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=128))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    fresh, trained = wrap(copy.deepcopy(peft_model)), wrap(peft_model)
    batch = {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    return fresh, trained, _train(trained, batch)


def _accelerate_fsdp_setup():
    """accelerate's FSDP1 sharded-state-dict plugin and the few accelerator fields its save/load helpers read."""
    import types

    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="SHARDED_STATE_DICT")
    accelerator = types.SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, is_fsdp2=False,
                                        wait_for_everyone=lambda: None)
    return plugin, accelerator


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_adapter_equals_the_single_process_adapter(gloo_group, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=128))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    fsdp_peft_model = copy.deepcopy(peft_model)
    batch = {"input_ids": torch.randint(0, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}

    _train(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "single")

    # loraflow's FSDP config: one unit per decoder layer via peft's policy, flat parameters (use_orig_params=False).
    wrapped = FullyShardedDataParallel(fsdp_peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(fsdp_peft_model),
                                       use_orig_params=False, device_id=torch.device("cpu"))
    _train(wrapped, batch)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        full_state_dict = wrapped.state_dict()
    write_gathered_adapter(fsdp_peft_model, full_state_dict, tmp_path / "fsdp")

    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    gathered = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert set(gathered) == set(single) and any("lora_B" in name for name in single)
    for name, tensor in single.items():
        assert torch.allclose(gathered[name], tensor, atol=1e-5), name
    assert any(tensor.abs().max() > 0 for name, tensor in gathered.items() if "lora_B" in name), "training moved B"
    # It is an ordinary peft adapter: it loads onto a fresh base.
    fresh = LlamaForCausalLM(copy.deepcopy(base.config))
    PeftModel.from_pretrained(fresh, tmp_path / "fsdp")


def test_an_fsdp_checkpoint_keeps_the_trained_adapter_and_a_resume_restores_it(gloo_group, tmp_path):
    """accelerate's adapter-only FSDP load (what Trainer resumes with) takes none of the LoRA keys; loraflow's
    gathered adapter in the checkpoint puts them back, exactly."""
    from accelerate.utils import load_fsdp_model, save_fsdp_model
    from torch.distributed.fsdp import FullyShardedDataParallel

    from loraflow.training.fsdp_checkpoint import FSDP_ADAPTER_FILE, restore_fsdp_adapter, save_fsdp_adapter

    def lora_values(wrapped):
        with FullyShardedDataParallel.summon_full_params(wrapped):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in wrapped.named_parameters() if "lora_" in n}

    fresh, trained, _ = _fresh_and_trained_fsdp_models()
    expected, initial = lora_values(trained), lora_values(fresh)
    assert any(not torch.equal(expected[n], initial[n]) for n in expected if "lora_B" in n), "training moved B"

    # What Trainer's resume does today: nothing of the adapter is loaded.
    plugin, accelerator = _accelerate_fsdp_setup()
    save_fsdp_model(plugin, accelerator, trained, tmp_path, adapter_only=True)
    result = load_fsdp_model(plugin, accelerator, fresh, tmp_path, adapter_only=True)
    assert any("lora_B" in key for key in result.missing_keys), "accelerate's adapter-only load took the LoRA keys"

    save_fsdp_adapter(trained, tmp_path)
    assert (tmp_path / FSDP_ADAPTER_FILE).exists()
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])  # what Trainer holds by then
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert restore_fsdp_adapter(fresh, tmp_path) == len(expected) == 2 * 7 * 2
    restored = lora_values(fresh)
    for name in expected:
        assert torch.equal(restored[name], expected[name]), name
    # Written into the parameters in place: the optimizer still steps the tensors the model computes with.
    assert held == [id(p) for p in fresh.parameters() if p.requires_grad]
    flat = [p for p in fresh.parameters() if p.requires_grad]
    assert any(p.abs().sum() > 0 for p in flat)


def test_a_resume_restores_the_fsdp_optimizer_state_that_accelerates_load_leaves_empty(gloo_group, tmp_path):
    """accelerate's sharded optimizer load (what Trainer resumes with) fills a fresh optimizer's empty state dict,
    so the Adam moments and step count never come back; loraflow's restore brings every one back exactly."""
    import types

    from accelerate.utils import load_fsdp_optimizer, save_fsdp_optimizer

    from loraflow.training.fsdp_checkpoint import restore_fsdp_optimizer

    fresh, trained, optimizer = _fresh_and_trained_fsdp_models()
    plugin, accelerator = _accelerate_fsdp_setup()
    save_fsdp_optimizer(plugin, accelerator, optimizer, trained, tmp_path)

    resumed = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_fsdp_optimizer(plugin, accelerator, resumed, fresh, tmp_path)
    assert resumed.state_dict()["state"] == {}, "accelerate's load brought the optimizer state back"

    before = [p.detach().clone() for p in fresh.parameters()]
    wrapped_optimizer = types.SimpleNamespace(optimizer=resumed)  # as Trainer's callbacks see it (accelerate's wrapper)
    assert restore_fsdp_optimizer(fresh, wrapped_optimizer, tmp_path) == 2 * 7 * 2
    saved, restored = optimizer.state_dict()["state"], resumed.state_dict()["state"]
    assert set(saved) == set(restored)
    for index, state in saved.items():
        assert float(restored[index]["step"]) == float(state["step"]) == 3.0
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[index][moment], state[moment]), (index, moment)
    # Creating the state took a zero-learning-rate step: the parameters are untouched.
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
