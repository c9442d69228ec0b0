"""One optimizer step over a QLoRA adapter's tensors: bitsandbytes' 8-bit AdamW (paged and not) with its own step
and with loraflow's (one device sync per step), ms per step and the ratio to bitsandbytes' paged step, same run.

The adapter is Llama-3-8B's with r=16 on every linear layer (448 fp32 tensors, 42 M parameters), gradients random.
    python benchmarks/optimizer_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Llama-3-8B: (in, out) of q, k, v, o, gate, up, down per layer.
LINEARS_8B = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]


def adapter_tensors(torch, device, layers: int, rank: int):
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(layers):
        for fan_in, fan_out in LINEARS_8B:
            for shape in ((rank, fan_in), (fan_out, rank)):
                param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device) * 0.01)
                param.grad = torch.randn(shape, generator=generator).to(device) * 1e-3
                params.append(param)
    return params


def time_steps(torch, optimizer_class, device, args) -> dict:
    params = adapter_tensors(torch, device, args.layers, args.rank)
    optimizer = optimizer_class(params, lr=2e-4)
    for _ in range(args.warmup):
        optimizer.step()
    seconds = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"ms_median": statistics.median(seconds) * 1e3, "ms_min": min(seconds) * 1e3, "tensors": len(params),
            "parameters": sum(p.numel() for p in params)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    import bitsandbytes as bnb
    import torch

    from loraflow.training.optimizer import synchronising_once

    device = torch.device("cuda")
    classes = {
        "bitsandbytes PagedAdamW8bit": bnb.optim.PagedAdamW8bit,
        "loraflow PagedAdamW8bit (one sync)": synchronising_once(bnb.optim.PagedAdamW8bit),
        "bitsandbytes AdamW8bit": bnb.optim.AdamW8bit,
        "loraflow AdamW8bit (one sync)": synchronising_once(bnb.optim.AdamW8bit),
    }
    results = {name: time_steps(torch, cls, device, args) for name, cls in classes.items()}
    baseline = results["bitsandbytes PagedAdamW8bit"]["ms_median"]
    for name, result in results.items():
        result["ratio_to_bitsandbytes_paged"] = baseline / result["ms_median"]
        print(f"{name:40s} {result['ms_median']:8.2f} ms  x{result['ratio_to_bitsandbytes_paged']:.2f}")
    record = {"gpu": torch.cuda.get_device_name(0), "results": results, "command": " ".join(sys.argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "bitsandbytes": bnb.__version__, "torch": torch.__version__}
    out = Path(args.out) / "optimizer_step_h200.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
