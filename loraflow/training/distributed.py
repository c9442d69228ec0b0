"""Helpers for code that runs in one process or in each of several launched ones: rank, world size, barrier, sums.

Outside a launch (no torch.distributed process group) each is the one-process answer: rank 0, world size 1, no
wait, the value itself. The launcher that starts the processes is loraflow.training.launch.
"""

from __future__ import annotations

import os


def process_rank() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) outside a launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 of a launch, or the only process: the one that writes outputs."""
    return int(os.environ.get("RANK", 0)) == 0


def _distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in this launch (1 outside one)."""
    if not _distributed_ready():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def barrier() -> None:
    """Wait for every launched process (nothing to wait for in one process)."""
    if _distributed_ready():
        import torch.distributed as dist

        dist.barrier()


def leave_process_group() -> None:
    """Wait for every launched process, then destroy the process group: a rank that exits while another still
    holds the group open can abort at teardown ("terminate called without an active exception", seen with gloo)."""
    if _distributed_ready():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def sum_over_processes(value: int) -> int:
    """`value` summed over the launched processes (a collective: every process must call it); itself in one."""
    if not _distributed_ready():
        return value
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())
