"""train.distributed on CUDA: DDP and FSDP-QLoRA through `accelerate launch`, 1 process (2 where 2 GPUs are visible).

SmolLM2's architecture with random bf16 weights and its real tokenizer (as tests/gpu). Run on the device machine:
    export PYTHONPATH=$PWD/.gpu_site:$PWD LORAFLOW_SMOLLM2_FILES=$PWD/.device/smollm2
    python -m pytest -q -m gpu tests/test_distributed_gpu.py
One process still goes through the launcher, accelerate's FSDP wrapping (FSDP with one rank), sharded checkpoints
and the whole-adapter gather at the end; what needs two GPUs (NCCL, real sharding) is the last test and
benchmarks/train_multigpu.py.
"""

import json
import math
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
    from tests.tiny_llama import build_random_smollm2

    return build_random_smollm2(tmp_path_factory.mktemp("smol") / "model")


@pytest.fixture(scope="module")
def tokens(smol_random):
    from transformers import AutoTokenizer

    from tests.tiny_llama import HELDOUT_ROWS, QA_ROWS, tokens_frame

    return tokens_frame(AutoTokenizer.from_pretrained(smol_random), rows=QA_ROWS + HELDOUT_ROWS, heldout=[])


def config(**overrides):
    from loraflow.config.train import TrainConfig

    settings = dict(quantization="4bit", max_steps=4, micro_batch_size=2, learning_rate=2e-3, checkpoint_every=2)
    return TrainConfig(**{**settings, **overrides})


def lora_b_moved(adapter_dir: str) -> bool:
    from safetensors.torch import load_file

    adapter = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    lora_b = [name for name in adapter if "lora_B" in name]
    return bool(lora_b) and all(float(adapter[name].abs().sum()) > 0 for name in lora_b)


def test_ddp_one_process_takes_the_packed_fast_path(smol_random, tokens, tmp_path):
    from tasks.train import train_adapter

    result = train_adapter(tokens, smol_random, config(distributed="ddp", num_processes=1), tmp_path / "run")
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["distributed"]["strategy"] == "ddp" and metrics["distributed"]["processes"] == 1
    assert (result.device, result.quantization, result.optimizer) == ("cuda", "4bit", "paged_adamw_8bit")
    assert result.packing and result.speed_plan is not None, "DDP keeps the fast path"
    assert result.global_step == 4 and math.isfinite(result.final_loss) and lora_b_moved(result.adapter_dir)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])  # padded first: FSDP itself
def test_fsdp_qlora_one_process_wraps_saves_and_gathers_the_adapter(smol_random, tokens, tmp_path, packing):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.train import train_adapter

    result = train_adapter(tokens, smol_random, config(distributed="fsdp", num_processes=1, packing=packing), tmp_path / "run")
    assert result.packing is packing
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["distributed"] == {"strategy": "fsdp", "processes": 1, "accelerate_distributed_type": "FSDP"}
    assert (result.quantization, result.optimizer, result.precision) == ("4bit", "adamw_torch", "bf16")
    assert result.speed_plan is None, "FSDP runs without the fast path's model surgery"
    assert result.global_step == 4 and math.isfinite(result.final_loss) and lora_b_moved(result.adapter_dir)
    launch = json.loads((tmp_path / "run" / "launch" / "job.json").read_text())
    assert launch["train_config"]["distributed"] == "fsdp"
    # The gathered adapter is a normal peft adapter: it loads onto the base model.
    base = AutoModelForCausalLM.from_pretrained(smol_random, dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, result.adapter_dir)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_on_the_same_global_batch(smol_random, tokens, tmp_path):
    import pandas as pd

    from tasks.train import train_adapter

    common = dict(quantization="none", packing=False, precision="fp32", optimizer="adamw_torch", max_steps=4)
    one = train_adapter(tokens, smol_random, config(**common, gradient_accumulation=2), tmp_path / "one")
    two = train_adapter(tokens, smol_random, config(**common, distributed="ddp", num_processes=2), tmp_path / "two")
    one_loss = pd.read_parquet(one.loss_curve_path)["loss"]
    two_loss = pd.read_parquet(two.loss_curve_path)["loss"]
    # fp32 on GPU: cuBLAS/NCCL sum orders differ more than on CPU.
    pd.testing.assert_series_equal(two_loss, one_loss, rtol=0, atol=1e-3)
