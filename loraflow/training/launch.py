"""Training on several processes: `accelerate launch` runs the train stage's function once per process.

    result = launch_training(tokens, model_dir, train_config, output_dir, log=log, train_fn=train_launched)

What the caller (train_adapter, the Prefect train task) sees is one call that returns one TrainResult: the
launcher writes a job file (the tokens as an ArtifactRef + store root, or as Parquet; the model folder; the
TrainConfig; which function each process runs, as "module:name": the train stage's `train_launched`, which trains
in that process and plans it there) and an accelerate config into `<output_dir>/launch/`, runs

    python -m accelerate.commands.launch --config_file accelerate_config.yaml -m loraflow.training.launch job.json

streams every line the processes print into the caller's logger (progress lines drive `on_step`), and reads
rank 0's TrainResult back as JSON. The same two files re-run the training by hand.

Supported: DDP (`distributed: ddp`, a whole model per GPU, device_map {"": local_rank}) and FSDP-QLoRA
(`distributed: fsdp`: the documented peft/accelerate recipe, see `accelerate_config`; CUDA only). On a machine
without CUDA, ddp trains in CPU processes over gloo (the tests): accelerate's own CPU launcher would need MPI for
more than one process, so the config says MULTI_GPU and the children's TrainingArguments(use_cpu=True) pick gloo.
Not supported: several machines, DeepSpeed, TrainerCallbacks from the caller (they cannot cross processes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from loraflow.runtime.atomic_files import atomic_file, write_json_atomic, write_text_atomic
from loraflow.training.distributed import process_rank

PROGRESS_PREFIX = "LORAFLOW_PROGRESS "
REPO = Path(__file__).resolve().parents[2]
# NVLink multicast (NVLS) must stay off on the lent GPU machines (device README); harmless elsewhere.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
log_default = logging.getLogger("loraflow.train")


class DistributedTrainingError(RuntimeError):
    """The launched processes failed; the message has the exit code and the last lines they printed."""


# ---- plan: how many processes, and the accelerate config ------------------------------------------------

def resolve_num_processes(train_config, cuda_devices: int) -> int:
    """train.num_processes, or every visible GPU; refuses what this machine cannot run, saying the fix."""
    wanted = train_config.num_processes
    if cuda_devices == 0 and train_config.distributed == "fsdp":
        # Measured: with use_cpu accelerate sets up MULTI_CPU and drops the FSDP plugin, so this would train as
        # plain data parallel under an FSDP label (and its sync_module_states needs an accelerator device).
        raise ValueError("train.distributed=fsdp needs CUDA GPUs: accelerate runs FSDP on accelerators only. "
                         "Use train.distributed=ddp on CPU, or run on a GPU machine")
    if cuda_devices == 0:
        if wanted is None:
            raise ValueError(f"train.distributed={train_config.distributed} on a machine without CUDA: set "
                             "train.num_processes (CPU processes over gloo, e.g. 2), or train.distributed=none")
        return wanted
    if wanted is not None and wanted > cuda_devices:
        raise ValueError(f"train.num_processes={wanted} but {cuda_devices} GPU(s) are visible: lower it, or leave it "
                         "unset to use every visible GPU (CUDA_VISIBLE_DEVICES picks them)")
    return wanted or cuda_devices


def decoder_layer_classes(model_dir: str | Path) -> list[str]:
    """The model's decoder layer class names (what FSDP wraps one unit each), from its `_no_split_modules`."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    classes = [getattr(transformers, name, None) for name in (config.architectures or [])]
    layers = sorted({layer for cls in classes if cls is not None for layer in (cls._no_split_modules or [])})
    if not layers:
        raise ValueError(f"{model_dir}: cannot tell the decoder layer class for FSDP wrapping from config.json "
                         f"(architectures={config.architectures}); use train.distributed=ddp")
    return layers


def accelerate_config(train_config, num_processes: int, *, precision: str,
                      layer_classes: list[str] | None = None) -> dict:
    """The accelerate config file (what `accelerate config` would write) for train.distributed.

    fsdp follows peft's "FSDP + QLoRA" recipe (docs/source/accelerate/fsdp.md) with FSDP1: full sharding, one
    FSDP unit per decoder layer, `cpu_ram_efficient_loading` + `sync_module_states` (rank 0 reads the weights,
    the others get them by broadcast), `use_orig_params: false` (the recipe's setting for GPU memory savings; with a
    peft model Trainer swaps in peft's `fsdp_auto_wrap_policy`, which puts the LoRA layers in FSDP units of their
    own, and for 4-bit weights sets FSDP's mixed precision to their storage dtype), sharded checkpoints (the final
    adapter is gathered whole on rank 0), no CPU offload (GPU memory is not the limit on an H200). Gradient
    checkpointing stays Trainer's (the recipe's), not FSDP's activation checkpointing.
    """
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "MULTI_GPU",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "num_machines": 1,
        "num_processes": num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        # false even on CPU: accelerate's CPU launcher runs one process without MPI (the module docstring).
        "use_cpu": False,
    }
    if train_config.distributed == "fsdp":
        if not layer_classes:
            raise ValueError("FSDP needs the decoder layer classes to wrap (decoder_layer_classes(model_dir))")
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": "FULL_SHARD",
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layer_classes),
            "fsdp_use_orig_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_offload_params": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_activation_checkpointing": False,
        }
    return config


def launch_command(config_path: Path, job_path: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
            "--main_process_port", str(port), "-m", "loraflow.training.launch", str(job_path)]


def child_environment(parent: dict | None = None) -> dict:
    """The launched processes' environment: the caller's, plus the repo on PYTHONPATH, NVLink multicast off,
    no progress bars (the bar's carriage returns make one endless log line; rank 0 prints a line per step)."""
    env = dict(os.environ if parent is None else parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(NVLINK_MULTICAST_OFF)
    env.update({"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    return env


# ---- the caller's side ----------------------------------------------------------------------------------

def launch_training(tokens, model_dir, train_config, output_dir, *, train_fn, store=None, trust_remote_code: bool = False,
                    log=None, on_step=None):
    """Run `train_fn` (tasks.train.train_launched: trains in the process it runs in) in train.num_processes
    processes; return rank 0's TrainResult.

    `train_fn` must be a module-level function: each process imports it by its "module:name" from the job file.

    `on_step(step, max_steps, loss)` is called for each optimizer step rank 0 reports (the Prefect progress
    artifact). A NonFiniteTrainingError or ResumeMismatchError raised in rank 0 is raised here again, with
    its message; any other failure raises DistributedTrainingError with the processes' last lines.
    """
    import pandas as pd
    import torch

    from loraflow.training.result import NonFiniteTrainingError, ResumeMismatchError, TrainResult

    log = log or log_default
    output_dir = Path(output_dir)
    launch_dir = output_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = resolve_num_processes(train_config, cuda_devices)
    # Only the config file's default: each process's Trainer sets its precision from its TrainPlan. Asking
    # torch here whether the GPU has bf16 would create a CUDA context in this process for the whole training.
    precision = "fp32" if train_config.precision == "fp32" else "bf16"
    layers = decoder_layer_classes(model_dir) if train_config.distributed == "fsdp" else None
    config_path = launch_dir / "accelerate_config.yaml"
    _write_yaml(config_path, accelerate_config(train_config, processes, precision=precision, layer_classes=layers))

    if isinstance(tokens, pd.DataFrame):
        tokens_path = launch_dir / "tokens.parquet"  # the hash of a frame survives the Parquet round trip
        with atomic_file(tokens_path) as staging:
            tokens.to_parquet(staging, index=False)
        tokens_job = {"parquet": str(tokens_path)}
    else:
        from loraflow.runtime.tokens_input import store_for

        tokens_job = {"ref": tokens.model_dump(mode="json"), "store_root": str((store or store_for(tokens)).root)}
    result_path, error_path = launch_dir / "result.json", launch_dir / "error-rank0.json"
    for stale in (result_path, error_path):
        stale.unlink(missing_ok=True)
    job_path = launch_dir / "job.json"
    write_json_atomic(job_path, {
        "tokens": tokens_job, "model_dir": str(model_dir), "output_dir": str(output_dir),
        "train_config": train_config.model_dump(mode="json"), "trust_remote_code": trust_remote_code,
        "result_path": str(result_path), "error_path": str(error_path),
        "train_function": f"{train_fn.__module__}:{train_fn.__qualname__}",
    })

    command = launch_command(config_path, job_path, _free_port())
    log.info("train: %s on %d %s process(es): %s", train_config.distributed, processes,
             "GPU" if cuda_devices else "CPU", " ".join(command))
    tail: deque[str] = deque(maxlen=40)
    started = time.perf_counter()
    returncode = run_streaming(command, log, on_step, tail)
    if returncode != 0 or not result_path.exists():
        if error_path.exists():
            error = json.loads(error_path.read_text())
            known = {"NonFiniteTrainingError": NonFiniteTrainingError, "ResumeMismatchError": ResumeMismatchError}
            if error["type"] in known:
                raise known[error["type"]](error["message"])
            raise DistributedTrainingError(f"train: rank 0 failed with {error['type']}: {error['message']}")
        raise DistributedTrainingError(
            f"train: the launched processes exited with {returncode}; config {config_path}, job {job_path}. "
            "Last lines:\n  " + "\n  ".join(tail)
        )
    result = TrainResult(**json.loads(result_path.read_text()))
    log.info("train: the launch took %.0f s in all (%.0f s of it in rank 0's training)",
             time.perf_counter() - started, result.seconds)
    return result


def run_streaming(command: list[str], log, on_step, tail: deque) -> int:
    """Run the launch, every line it prints into `log` (rank 0's progress lines to `on_step` as well, the last ones
    into `tail`); its exit code. The processes are stopped when the caller goes away."""
    launched = subprocess.Popen(command, cwd=REPO, env=child_environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in launched.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if line.startswith(PROGRESS_PREFIX):
                step = json.loads(line[len(PROGRESS_PREFIX):])
                log.info("train: step %d/%d, loss %s", step["step"], step["max_steps"], step["loss"])
                if on_step is not None:
                    on_step(step["step"], step["max_steps"], step["loss"])
            else:
                log.info("%s", line)
        return launched.wait()
    except BaseException:
        # The caller is going away (cancelled run, Ctrl-C, a failing on_step): accelerate launch forwards SIGTERM
        # to the training processes, which would otherwise keep the GPUs.
        launched.terminate()
        try:
            launched.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launched.kill()
        raise
    finally:
        launched.stdout.close()


# ---- the launched side -----------------------------------------------------------------------------------

def worker_main(job_path: str) -> None:
    """One launched process: the job's train function on the job; rank 0 writes the TrainResult (or its error) as JSON."""
    import importlib

    import pandas as pd
    import torch

    from loraflow.config.train import TrainConfig
    from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore

    job = json.loads(Path(job_path).read_text())
    module_name, function_name = job["train_function"].split(":")
    train_fn = getattr(importlib.import_module(module_name), function_name)
    rank, local_rank, world = process_rank()
    # Only rank 0 reports progress; the others' warnings and errors still reach the caller's log.
    # force: importing Prefect (the train stage's wrapper) has already configured the root logger.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"[rank {rank}/{world}] %(name)s %(levelname)s: %(message)s")
    logging.getLogger("loraflow").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if torch.cuda.is_available():
        # Before the model loads: bitsandbytes and device_map {"": current device} place weights by it.
        torch.cuda.set_device(local_rank)
    from accelerate import PartialState

    # The process group before the model loads: only then does transformers see FSDP's cpu_ram_efficient_loading
    # (is_fsdp_enabled) and load the full weights on rank 0 alone. Trainer reuses this state.
    PartialState(cpu=not torch.cuda.is_available())
    if "parquet" in job["tokens"]:
        tokens, store = pd.read_parquet(job["tokens"]["parquet"]), None
    else:
        tokens, store = ArtifactRef(**job["tokens"]["ref"]), ArtifactStore(job["tokens"]["store_root"])
    try:
        result = train_fn(
            tokens, job["model_dir"], TrainConfig(**job["train_config"]), job["output_dir"], store=store,
            trust_remote_code=job["trust_remote_code"], on_step=print_progress if rank == 0 else None,
        )
    except Exception as error:
        if rank == 0:
            write_json_atomic(Path(job["error_path"]), {"type": type(error).__name__, "message": str(error)})
        raise
    if rank == 0:
        write_json_atomic(Path(job["result_path"]), result.model_dump(mode="json"))


def print_progress(step: int, max_steps: int, loss: float | None) -> None:
    """Rank 0's step report: one machine-readable line, read back by launch_training."""
    print(PROGRESS_PREFIX + json.dumps({"step": step, "max_steps": max_steps, "loss": loss}), flush=True)


def _free_port() -> int:
    """A free TCP port for the rendezvous (two launches on one machine must not share 29500)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_yaml(path: Path, payload: dict) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(payload, sort_keys=False))


if __name__ == "__main__":
    from loraflow.training.distributed import leave_process_group

    worker_main(sys.argv[1])
    leave_process_group()
