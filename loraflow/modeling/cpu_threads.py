"""How many torch threads CPU training uses: every core on a quiet machine, fewer beside other busy processes.

torch starts one thread per core. When another process keeps a core busy, every matmul's threads wait for the
slowest one at each barrier, and a step gets many times slower, not a little (measured on 2 cores, emulated AVX2:
1.7 s/step quiet with 2 threads, 13–37 s/step with 2 threads beside other jobs, 2.0–2.8 s/step with 1 thread
beside them; `benchmarks/cpu_train_step.py --threads-study`). So the train stage looks at the load average now
and then (ThreadsForLoad) and uses the cores nobody else is using.
"""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for_load(cores: int, load_average: float, own_threads: int) -> int:
    """Threads to use: the cores left once the other processes' load (the load average less our own threads,
    rounded up from half a core) is taken away; at least 1."""
    others = max(0.0, load_average - own_threads)
    busy = math.floor(others + 0.5)
    return max(1, min(cores, cores - busy))


class ThreadsForLoad(TrainerCallback):
    """Every `every` steps, set torch's thread count from the 1-minute load average (CPU training only)."""

    def __init__(self, log=None, every: int = 5, cores: int | None = None):
        self.log, self.every, self.cores = log, every, cores or usable_cores()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        import torch

        current, load = torch.get_num_threads(), os.getloadavg()[0]
        wanted = threads_for_load(self.cores, load, current)
        if wanted != current:
            torch.set_num_threads(wanted)
            if self.log:
                self.log.info("train: %d torch thread(s) instead of %d (load average %.1f on %d cores)",
                              wanted, current, load, self.cores)
