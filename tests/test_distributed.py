"""train.distributed on CPU: `accelerate launch` runs train_adapter in 2 processes over gloo (tiny Llama, fp32).

What runs for real: DDP with 2 processes through the Prefect train task (one TrainResult, the processes' lines in
the task's log, the progress artifact); loss parity with the in-process run on the same global batch; kill -9 of
the launched processes, then a resume. FSDP cannot run here: with use_cpu accelerate sets up MULTI_CPU and drops
the FSDP plugin (checked: it trained as plain data parallel), so the launcher refuses FSDP without CUDA, and the
FSDP config is tested by what accelerate's own launcher turns it into (the processes' environment).
tests/test_distributed_gpu.py runs DDP and FSDP-QLoRA on a GPU.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from loraflow.config.train import TrainConfig
from loraflow.training.launch import accelerate_config, decoder_layer_classes, launch_command, resolve_num_processes
from loraflow.training.checkpoints import CHECKPOINT_MARKER

REPO = Path(__file__).resolve().parent.parent
# Loss parity tolerance: fp32, the same examples per optimizer step; what differs is the order of float sums
# (one process adds two micro-batches' gradients, DDP all-reduces two processes'). Measured: bit-identical (0.0).
PARITY_ATOL = 1e-5


def parity_config(**overrides) -> TrainConfig:
    """Global batch 4 = micro-batch 2 x accumulation x processes; 8 train rows = 2 steps per epoch, no partial step."""
    settings = dict(max_steps=6, micro_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", warmup_ratio=0.0,
                    checkpoint_every=2, lora_r=8, lora_alpha=16, cpu_threads=1, precision="fp32")
    return TrainConfig(**{**settings, **overrides})


DDP_2 = dict(distributed="ddp", num_processes=2, gradient_accumulation=1)
ONE_PROCESS = dict(gradient_accumulation=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokens(tiny_model):
    """8 train rows: the QA rows plus the held-out paraphrases (evaluation does not matter here)."""
    from transformers import AutoTokenizer

    from tests.tiny_llama import HELDOUT_ROWS, QA_ROWS, tokens_frame

    return tokens_frame(AutoTokenizer.from_pretrained(tiny_model), rows=QA_ROWS + HELDOUT_ROWS, heldout=[])


# ---- config and plan (no processes) ---------------------------------------------------------------------

def test_distributed_settings_are_checked_with_the_fix_in_the_message():
    assert TrainConfig().distributed == "none" and TrainConfig().num_processes is None
    with pytest.raises(ValidationError, match="num_processes=2 needs train.distributed=ddp or fsdp"):
        TrainConfig(num_processes=2)
    with pytest.raises(ValidationError, match="cannot shard 8-bit weights.*quantization=4bit"):
        TrainConfig(distributed="fsdp", quantization="8bit")
    with pytest.raises(ValidationError, match="paged_adamw_8bit fails when a checkpoint is saved.*optimizer=auto"):
        TrainConfig(distributed="fsdp", optimizer="paged_adamw_8bit")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainConfig(distributed="ddp", processes=2)


def test_process_count_follows_the_visible_gpus_and_refuses_what_cannot_run():
    assert resolve_num_processes(TrainConfig(distributed="ddp"), cuda_devices=4) == 4
    assert resolve_num_processes(TrainConfig(distributed="fsdp", num_processes=2), cuda_devices=4) == 2
    assert resolve_num_processes(TrainConfig(distributed="ddp", num_processes=2), cuda_devices=0) == 2
    with pytest.raises(ValueError, match="without CUDA: set train.num_processes"):
        resolve_num_processes(TrainConfig(distributed="ddp"), cuda_devices=0)
    with pytest.raises(ValueError, match="num_processes=3 but 2 GPU"):
        resolve_num_processes(TrainConfig(distributed="ddp", num_processes=3), cuda_devices=2)
    with pytest.raises(ValueError, match="fsdp needs CUDA GPUs.*ddp on CPU"):
        resolve_num_processes(TrainConfig(distributed="fsdp", num_processes=2), cuda_devices=0)


def test_fsdp_config_is_what_accelerate_launch_hands_the_processes(tiny_model, tmp_path):
    """The FSDP-QLoRA recipe's settings, read back through accelerate launch's own parser and environment builder."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from loraflow.training.launch import _write_yaml

    layers = decoder_layer_classes(tiny_model)
    assert layers == ["LlamaDecoderLayer"]
    config_path = tmp_path / "accelerate_config.yaml"
    _write_yaml(config_path, accelerate_config(TrainConfig(distributed="fsdp"), 2, precision="bf16", layer_classes=layers))
    command = launch_command(config_path, tmp_path / "job.json", port=29555)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert (args.use_fsdp, args.num_processes, args.module, args.training_script) == (True, 2, True, "loraflow.training.launch")
    env = prepare_multi_gpu_env(args)
    assert {key: env[key] for key in (
        "ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP",
        "FSDP_USE_ORIG_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING", "FSDP_SYNC_MODULE_STATES", "FSDP_OFFLOAD_PARAMS",
        "FSDP_STATE_DICT_TYPE", "ACCELERATE_MIXED_PRECISION",
    )} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
        "FSDP_USE_ORIG_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_OFFLOAD_PARAMS": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "ACCELERATE_MIXED_PRECISION": "bf16",
    }
    # transformers' is_fsdp_enabled() (rank 0 loads, the others get the weights by broadcast) reads these two.
    ddp = accelerate_config(TrainConfig(distributed="ddp"), 2, precision="fp32")
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["mixed_precision"] == "no" and "fsdp_config" not in ddp


def test_launched_processes_keep_nvlink_multicast_off_and_find_the_repo():
    from loraflow.training.launch import child_environment

    env = child_environment({"PYTHONPATH": "/elsewhere", "NCCL_NVLS_ENABLE": "1"})
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1", "1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]


def test_callbacks_cannot_cross_into_launched_processes(tiny_model, tokens, tmp_path):
    from transformers import TrainerCallback

    from tasks.train import train_adapter

    with pytest.raises(ValueError, match="callbacks from this process cannot run: drop callbacks"):
        train_adapter(tokens, tiny_model, parity_config(**DDP_2), tmp_path / "run", callbacks=[TrainerCallback()])
    assert not (tmp_path / "run").exists(), "refused before anything was written or launched"


def test_a_process_told_fsdp_refuses_to_train_without_it(tiny_model, tokens, tmp_path):
    """A launched process's entry point (train_launched) run without accelerate's FSDP: stop before the first step."""
    from tasks.train import train_launched

    with pytest.raises(RuntimeError, match="train.distributed=fsdp but accelerate set up NO:"):
        train_launched(tokens, tiny_model, parity_config(distributed="fsdp", num_processes=1), tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


# ---- DDP, 2 CPU processes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tiny_model, tokens, tmp_path_factory, prefect_api):
    """DDP with 2 processes through the Prefect train task, as the finetune flow calls it."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from loraflow.runtime.artifact_store import ArtifactStore
    from tasks.train import train_task

    root = tmp_path_factory.mktemp("ddp")
    store = ArtifactStore(root / "store")
    tokens_ref = store.write(tokens, stage="tokenize", contract="tokens", schema_version=2, config_hash="x")

    @flow(name="distributed-train-test")
    def train_flow():
        return train_task(tokens_ref, str(tiny_model), parity_config(**DDP_2), str(root / "run"), str(root / "store"))

    state = train_flow(return_state=True)
    result = state.result()

    async def read_back():
        async with get_client() as client:
            await asyncio.sleep(2)  # run loggers ship records in batches
            return await client.read_logs(), await client.read_artifacts()

    logs, artifacts = asyncio.run(read_back())
    run_logs = [log.message for log in logs if log.flow_run_id == state.state_details.flow_run_id]
    return {"result": result, "logs": run_logs, "artifacts": artifacts, "root": root, "store": store, "tokens_ref": tokens_ref}


@pytest.mark.slow
def test_ddp_two_processes_return_one_train_result_through_the_prefect_task(ddp_run, tiny_model):
    from safetensors.torch import load_file

    from loraflow.training.result import TrainResult
    from tasks.train import train_adapter

    result = ddp_run["result"]
    assert isinstance(result, TrainResult) and result.global_step == 6 and not result.reused
    metrics = json.loads(Path(result.metrics_path).read_text())
    assert metrics["distributed"] == {"strategy": "ddp", "processes": 2, "accelerate_distributed_type": "MULTI_CPU"}
    # Both processes' tokens: 3 epochs of the 8 rows (each process counts its own micro-batches).
    assert metrics["tokens_seen"] == 3 * result.train_tokens
    curve = pd.read_parquet(result.loss_curve_path)
    assert list(curve["step"]) == [1, 2, 3, 4, 5, 6] and curve["loss"].notna().all()
    adapter = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    lora_b = [name for name in adapter if "lora_B" in name]
    assert lora_b and all(adapter[name].abs().sum() > 0 for name in lora_b), "LoRA B starts at zero: training moved it"
    assert not (Path(result.adapter_dir).parent / "checkpoints").exists()

    # One task in Prefect: the processes' lines are its log lines, and its progress artifact reached 100 %.
    assert any(line.startswith("train: ddp on 2 CPU process(es)") for line in ddp_run["logs"])
    assert any(line.startswith("[rank 0/2] loraflow.train INFO: train: done in") for line in ddp_run["logs"])
    assert any(line.startswith("train: step 6/6, loss") for line in ddp_run["logs"])
    progress = [a for a in ddp_run["artifacts"] if a.type == "progress" and a.data == 100.0]
    assert progress, "the training progress artifact did not reach 100 %"

    # Same inputs again: the finished adapter is reused without launching anything.
    again = train_adapter(ddp_run["tokens_ref"], tiny_model, parity_config(**DDP_2), Path(result.adapter_dir).parent,
                          store=ddp_run["store"])
    assert again.reused and again.fingerprint == result.fingerprint


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(ddp_run, tiny_model, tokens, tmp_path):
    """1 process x accumulation 2 == 2 processes x accumulation 1 (global batch 4), step by step.

    The same examples form each global batch because the length-grouped sampler groups by the *global* batch and
    draws its order from (seed, epoch) on every process; accelerate then deals micro-batch k to process k mod 2,
    which are the micro-batches one process accumulates (loraflow.training.trainer.resumable_trainer_class)."""
    from safetensors.torch import load_file

    from tasks.train import train_adapter

    single = train_adapter(tokens, tiny_model, parity_config(**ONE_PROCESS), tmp_path / "one")
    one = pd.read_parquet(single.loss_curve_path).set_index("step")
    two = pd.read_parquet(ddp_run["result"].loss_curve_path).set_index("step")
    assert list(one.index) == list(two.index) == [1, 2, 3, 4, 5, 6]
    assert one["loss"].nunique() == 6, "a constant curve would match anything"
    pd.testing.assert_series_equal(two["loss"], one["loss"], rtol=0, atol=PARITY_ATOL)
    pd.testing.assert_series_equal(two["grad_norm"], one["grad_norm"], rtol=0, atol=PARITY_ATOL)
    one_weights = load_file(Path(single.adapter_dir) / "adapter_model.safetensors")
    two_weights = load_file(Path(ddp_run["result"].adapter_dir) / "adapter_model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    assert max(float((one_weights[k] - two_weights[k]).abs().max()) for k in one_weights) < PARITY_ATOL


# ---- kill -9 during a launch, then resume -----------------------------------------------------------------

LAUNCH = """
import sys, pandas as pd
from loraflow.config.train import TrainConfig
from tasks.train import train_adapter
from tests.test_distributed import DDP_2, parity_config
model_dir, tokens_path, out = sys.argv[1:4]
result = train_adapter(pd.read_parquet(tokens_path), model_dir, parity_config(**DDP_2), out)
print("RESULT", result.model_dump_json(), flush=True)
"""


@pytest.fixture(scope="module")
def killed_launch(tiny_model, tokens, tmp_path_factory):
    """A DDP launch killed with -9 (the caller, accelerate launch and both training processes, each by its pid)
    once checkpoint-2 is complete; returns the tokens file and the run folder it left."""
    import psutil

    root = tmp_path_factory.mktemp("killed")
    tokens_path, out = root / "tokens.parquet", root / "run"
    tokens.to_parquet(tokens_path, index=False)
    caller = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tiny_model), str(tokens_path), str(out)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER
    deadline = time.time() + 120
    while not marker.exists() and caller.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    family = [caller.pid] + [child.pid for child in psutil.Process(caller.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    caller.wait(timeout=30)
    assert marker.exists(), "checkpoint-2 was never completed"
    assert not (out / "adapter").exists()
    return {"tokens_path": tokens_path, "out": out}


@pytest.mark.slow
def test_changed_config_after_a_kill_is_refused_in_the_launch_and_raised_in_the_caller(killed_launch, tiny_model, tokens):
    from loraflow.training.result import ResumeMismatchError
    from tasks.train import train_adapter

    with pytest.raises(ResumeMismatchError, match=r"train.learning_rate: 0.01 \(checkpoint\) -> 0.005 \(now\)"):
        train_adapter(tokens, tiny_model, parity_config(**DDP_2, learning_rate=5e-3), killed_launch["out"])
    assert (killed_launch["out"] / "checkpoints" / "checkpoint-2" / CHECKPOINT_MARKER).exists(), "a refusal keeps the checkpoint"


@pytest.mark.slow
def test_kill_minus_nine_of_the_launch_then_resume_continues_the_curve(killed_launch, ddp_run, tiny_model):
    resumed = subprocess.run([sys.executable, "-c", LAUNCH, str(tiny_model), str(killed_launch["tokens_path"]),
                              str(killed_launch["out"])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    # Steps take ~0.3 s here: the kill lands after checkpoint-2, at the latest during step 5 (the next save is 6).
    assert result["global_step"] == 6 and result["resumed_from_step"] in (2, 4)
    curve = pd.read_parquet(result["loss_curve_path"]).set_index("step")
    uninterrupted = pd.read_parquet(ddp_run["result"].loss_curve_path).set_index("step")
    steps = list(range(result["resumed_from_step"] + 1, 7))
    assert list(curve.index) == steps
    pd.testing.assert_series_equal(curve["loss"], uninterrupted["loss"].loc[steps], rtol=0, atol=PARITY_ATOL)


# ---- the GPU benchmark's plan (its CPU-safe part) --------------------------------------------------------

def test_multigpu_benchmark_dry_run_plans_every_strategy_with_its_launch_files(tmp_path):
    planned = subprocess.run([sys.executable, "benchmarks/train_multigpu.py", "--dry-run", "--work", str(tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout[planned.stdout.index("{"):])
    assert [(run["strategy"], run["gpus"]) for run in plan["runs"]] == [("none", 1), ("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
    assert plan["shape"]["hidden_size"] == 4096 and plan["shape"]["num_hidden_layers"] == 32  # Llama-3-8B
    fsdp_two = plan["runs"][-1]
    assert fsdp_two["accelerate_config"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp_two["accelerate_config"]["num_processes"] == 2 and fsdp_two["global_batch_rows"] == 4
    assert fsdp_two["train_config"]["num_processes"] == 2 and plan["runs"][0]["train_config"]["distributed"] == "none"
    assert plan["launched_environment"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
