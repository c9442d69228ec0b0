"""bitsandbytes' 8-bit (paged) AdamW, stepped without a device synchronisation per parameter.

bitsandbytes 0.50's `Optimizer8bit.step` calls `torch.cuda.synchronize()` after updating each parameter. A QLoRA
adapter has hundreds of small tensors (448 on Llama-3-8B with every linear layer adapted), so one step waits for
the GPU 448 times. On an H200 the optimizer took 32 ms of an 8 GiB-budget step's 716 ms
(`benchmarks/results/train_throughput_h200_llama3-8b-profile.json`); one step over those 448 tensors alone went from
20.3 to 16.3 ms without the per-parameter waits (`optimizer_step_h200.json`, 2026-12-04). Every update
kernel runs on the current stream in parameter order, so the per-parameter waits order nothing that the stream
does not already order; the step here keeps bitsandbytes' update (its own `init_state`, `prefetch_state` and
`update_step`) and synchronises once, at the end, as bitsandbytes does for paged state.
"""

from __future__ import annotations

from functools import lru_cache

from loraflow.training.version_guard import require_verified


def _step_synchronising_once(self, closure=None):
    """Optimizer8bit.step (bitsandbytes 0.50.2) with its per-parameter `sync_gpu` moved after the loop."""
    import torch

    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    with torch.no_grad():
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        last = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                last = p
        if last is not None and last.device.type == "cuda":
            torch.cuda.synchronize()  # once: paged state must be settled before the next forward touches it
    return loss


@lru_cache(maxsize=None)
def synchronising_once(optimizer_class: type) -> type:
    """The same optimizer class with a step that synchronises once; classes other than bitsandbytes' 8-bit
    optimizers come back unchanged. Refuses a bitsandbytes newer than the release the step was verified with."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return optimizer_class
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer8bit)):
        return optimizer_class
    require_verified("bitsandbytes", "The 8-bit optimizer step with one device sync (loraflow.training.optimizer)",
                     "train.optimizer=adamw_torch")
    return type(optimizer_class.__name__, (optimizer_class,),
                {"step": _step_synchronising_once, "__module__": __name__,
                 "__doc__": f"{optimizer_class.__name__} stepped with one device synchronisation (loraflow)."})
