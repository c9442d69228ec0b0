"""The fast path's patches of peft, bitsandbytes and transformers internals refuse a release newer than the one
they were verified with, naming the package, that release and the setting that turns the patch off."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loraflow.training import version_guard
from loraflow.training.version_guard import VERIFIED, UnverifiedVersionError, newer_than_verified


def tiny_lora_llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


@pytest.fixture
def installed(monkeypatch):
    """Pretend `package` is installed at `release` (the rest as they are)."""
    def pretend(package: str, release: str) -> None:
        real = version_guard.installed_version
        monkeypatch.setattr(version_guard, "installed_version", lambda name: release if name == package else real(name))
    return pretend


def test_a_later_release_series_is_newer_a_patch_release_is_not():
    assert newer_than_verified("0.22.0", "0.21") and newer_than_verified("5.24.0.dev0", "5.23")
    assert newer_than_verified("1.0.0", "0.50")
    assert not newer_than_verified("0.21.9", "0.21") and not newer_than_verified("5.17.0", "5.23")


def test_the_installed_releases_are_the_verified_ones():
    for package in VERIFIED:
        release = version_guard.installed_version(package)
        assert release is None or not newer_than_verified(release, VERIFIED[package]), (package, release)


def test_fused_lora_refuses_a_newer_peft(installed):
    from loraflow.training.lora_fast import fuse_lora_epilogues

    model = tiny_lora_llama()
    installed("peft", "0.22.0")
    with pytest.raises(UnverifiedVersionError, match=r"peft internals verified with peft 0\.21\.x, and peft 0\.22\.0 "
                                                     r"is installed.*Turn it off with train\.packing=false.*peft<0\.22"):
        fuse_lora_epilogues(model)
    assert not any(hasattr(module, "_loraflow_peft_forward") for module in model.modules()), "nothing was patched"


def test_the_8bit_optimizer_step_refuses_a_newer_bitsandbytes(installed):
    from bitsandbytes.optim import PagedAdamW8bit

    from loraflow.training.optimizer import synchronising_once

    synchronising_once.cache_clear()  # a class made under the verified release would come back from the cache
    installed("bitsandbytes", "0.51.0")
    with pytest.raises(UnverifiedVersionError, match=r"bitsandbytes 0\.51\.0.*train\.optimizer=adamw_torch"):
        synchronising_once(PagedAdamW8bit)
    assert synchronising_once(torch.optim.AdamW) is torch.optim.AdamW  # torch's optimizers are not patched


def test_offloaded_checkpointing_refuses_a_newer_transformers(installed):
    from loraflow.training.masking import _decoder
    from loraflow.training.offload import enable_offloaded_checkpointing

    layers = _decoder(tiny_lora_llama()).layers
    for layer in layers:
        layer.gradient_checkpointing = True
    installed("transformers", "5.24.0")
    with pytest.raises(UnverifiedVersionError, match=r"transformers 5\.24\.0.*train\.gradient_checkpointing=false"):
        enable_offloaded_checkpointing(layers, to_host=False)
    assert "_gradient_checkpointing_func" not in vars(layers[0])
    installed("transformers", "5.23.1")
    assert enable_offloaded_checkpointing(layers, to_host=False) == 2  # a patch release of the verified series
