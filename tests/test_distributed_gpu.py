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
import os
import signal
import subprocess
import sys
import time
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


REPO = Path(__file__).resolve().parent.parent
# The same global batch, schedule and optimizer with and without FSDP (no fast path in either: padded batches).
PARITY = dict(packing=False, optimizer="adamw_torch", lr_scheduler="constant", warmup_ratio=0.0, max_steps=6,
              checkpoint_every=2, gradient_accumulation=1)


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


def adapter_tensors(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(adapter_dir) / "adapter_model.safetensors")


def greedy_answers(model_dir, adapter_dir, prompts: list[str]) -> tuple[list[str], "torch.Tensor"]:
    """The merged (bf16 base + adapter) model's greedy answers to `prompts`, and its logits on them."""
    from loraflow.publishing.merge import merge_adapter

    merged, tokenizer, _ = merge_adapter(model_dir, adapter_dir, prompts, tolerance=1.0, dtype="bfloat16")
    answers, logits = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(merged.device)
        with torch.no_grad():
            logits.append(merged(**ids).logits[0].float().cpu())
            out = merged.generate(**ids, max_new_tokens=8, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
    return answers, torch.cat(logits)


def relative_difference(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖a‖ over all tensors of two adapters together."""
    squared = sum(float((a[n].float() - b[n].float()).pow(2).sum()) for n in a)
    return math.sqrt(squared / sum(float(a[n].float().pow(2).sum()) for n in a))


def test_fsdp_qlora_adapter_equals_the_single_process_adapter_and_merges_to_the_same_answers(smol_random, tokens, tmp_path):
    """NF4 on the GPU: FSDP (one process) trains the in-process path's adapter within bf16 noise.

    The noise floor: the in-process path with the same global batch cut into micro-batches of 1 (accumulation 2),
    the same computation summed in another order; FSDP must be as close to the reference as that run is."""
    import pandas as pd
    from transformers import AutoTokenizer

    from tasks.train import train_adapter
    from tests.tiny_llama import QA_ROWS, prompt_text

    settings = dict(PARITY, learning_rate=5e-4)
    single = train_adapter(tokens, smol_random, config(**settings), tmp_path / "single")
    floor = train_adapter(tokens, smol_random, config(**settings | dict(micro_batch_size=1, gradient_accumulation=2)),
                          tmp_path / "floor")
    fsdp = train_adapter(tokens, smol_random, config(**settings, distributed="fsdp", num_processes=1), tmp_path / "fsdp")
    assert single.speed_plan is None and fsdp.speed_plan is None and single.global_step == fsdp.global_step == 6
    curves = {name: pd.read_parquet(run.loss_curve_path)["loss"] for name, run in
              (("single", single), ("floor", floor), ("fsdp", fsdp))}
    print("loss", {name: curve.round(4).tolist() for name, curve in curves.items()})
    assert curves["single"].iloc[-1] < curves["single"].iloc[0], "training moved the loss"
    # bf16 compute; the in-process path keeps norms and embeddings in fp32 (prepare_model_for_kbit_training), FSDP in bf16.
    pd.testing.assert_series_equal(curves["fsdp"], curves["single"], rtol=2e-2, atol=0)

    reference = adapter_tensors(single.adapter_dir)
    gathered, noise = adapter_tensors(fsdp.adapter_dir), adapter_tensors(floor.adapter_dir)
    assert set(gathered) == set(reference) and any("lora_B" in name for name in reference)
    fsdp_diff, floor_diff = relative_difference(reference, gathered), relative_difference(reference, noise)
    print(f"adapter relative L2 difference to the in-process adapter: fsdp {fsdp_diff:.4f}, noise floor {floor_diff:.4f}")
    assert fsdp_diff <= 2 * floor_diff + 0.01

    tokenizer = AutoTokenizer.from_pretrained(smol_random)
    prompts = [prompt_text(tokenizer, question) for question, *_ in QA_ROWS[:3]]
    answers = {name: greedy_answers(smol_random, run.adapter_dir, prompts) for name, run in
               (("single", single), ("floor", floor), ("fsdp", fsdp))}
    agreement = {name: float((answers[name][1].argmax(-1) == answers["single"][1].argmax(-1)).float().mean())
                 for name in ("floor", "fsdp")}
    print("merged answers", {name: a for name, (a, _) in answers.items()}, "next-token agreement", agreement)
    assert agreement["fsdp"] >= min(0.95, agreement["floor"] - 0.02)
    # The per-GPU estimate made before loading holds the measured peak.
    measured = fsdp.peak_memory_bytes / 1024**3
    print("FSDP per-GPU peak: measured", round(measured, 3), "GiB, estimated", fsdp.fsdp_memory)
    assert fsdp.fsdp_memory is not None and measured <= fsdp.fsdp_memory["total_gib"]


# ---- FSDP's sharded checkpoints: kill -9 of the launch, then resume --------------------------------------

LAUNCH = """
import sys, pandas as pd
from tasks.train import train_adapter
from tests.test_distributed_gpu import PARITY, config
model_dir, tokens_path, out = sys.argv[1:4]
result = train_adapter(pd.read_parquet(tokens_path), model_dir, config(**PARITY, distributed="fsdp", num_processes=1), out)
print("RESULT", result.model_dump_json(), flush=True)
"""


def launch(model_dir, tokens_path, out) -> subprocess.Popen:
    """train_adapter with FSDP in a child process writing `<out>.log`; its session of its own lets kill -9 of the
    process group take the caller, accelerate launch and the trainer together."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(f"{out}.log", "a")
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(model_dir), str(tokens_path), str(out)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finished(process: subprocess.Popen, out) -> dict:
    """Wait for a launch; its TrainResult (the RESULT line of its log)."""
    process.wait(timeout=600)
    lines = Path(f"{out}.log").read_text().splitlines()
    assert process.returncode == 0, "\n".join(lines[-60:])
    return json.loads(next(line for line in reversed(lines) if line.startswith("RESULT ")).split(" ", 1)[1])


def kill_family(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def test_fsdp_sharded_checkpoint_survives_kill_minus_nine_and_the_resume_continues_the_curve(smol_random, tokens, tmp_path):
    import pandas as pd

    from loraflow.training.checkpoints import CHECKPOINT_MARKER

    tokens_path = tmp_path / "tokens.parquet"
    tokens.to_parquet(tokens_path, index=False)
    uninterrupted = finished(launch(smol_random, tokens_path, tmp_path / "whole"), tmp_path / "whole")

    out = tmp_path / "killed"
    killed = launch(smol_random, tokens_path, out)
    marker = out / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER
    deadline = time.time() + 300
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    kill_family(killed)
    assert marker.exists(), "checkpoint-2 was never completed"
    assert not (out / "adapter").exists(), "killed before the end"
    checkpoint = marker.parent
    shards = sorted(p.name for p in checkpoint.rglob("*") if p.is_file())
    print("checkpoint-2 files", shards)
    assert any("fsdp" in name or name.endswith(".distcp") for name in shards), "FSDP wrote sharded state"

    result = finished(launch(smol_random, tokens_path, out), out)
    assert result["global_step"] == 6 and result["resumed_from_step"] in (2, 4)
    curve = pd.read_parquet(result["loss_curve_path"]).set_index("step")["loss"]
    reference = pd.read_parquet(uninterrupted["loss_curve_path"]).set_index("step")["loss"]
    steps = list(range(result["resumed_from_step"] + 1, 7))
    print("resumed", curve.round(5).tolist(), "uninterrupted", reference.loc[steps].round(5).tolist())
    assert list(curve.index) == steps
    # Same weights, optimizer state, data order and RNG after the resume: only bf16 kernel nondeterminism remains.
    pd.testing.assert_series_equal(curve, reference.loc[steps], rtol=1e-2, atol=0)
    a, b = adapter_tensors(uninterrupted["adapter_dir"]), adapter_tensors(result["adapter_dir"])
    worst = max(float((a[n].float() - b[n].float()).norm() / a[n].float().norm().clamp_min(1e-12)) for n in a)
    print("resumed vs uninterrupted adapter, max relative L2", worst)
    assert worst < 0.05
