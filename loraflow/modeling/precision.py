"""Which float precision this machine computes fast: bf16 or fp32, with the reason, for training, evaluation
and generation.

On a GPU: bf16 where `torch.cuda.is_bf16_supported()`. On a CPU every torch build *accepts* bf16, but only CPUs
with bf16 instructions (x86 AVX512-BF16 or AMX, some Arm cores) compute it fast; elsewhere it is emulated and
much slower (measured on a 2-core AVX2 EPYC: a 1024x576 @ 576x1536 matmul 55 ms fp32, 1,472 ms bf16). So on a
CPU bf16 is chosen only when (1) nothing says the CPU lacks bf16 instructions (torch's dispatch capability and,
on Linux x86, the `avx512_bf16`/`amx_bf16` flags) and (2) a ~0.1 s micro-benchmark of both dtypes at a
model-like shape shows bf16 faster. The benchmark's answer is cached per host (CPU model, flags, torch version,
threads) in `<loraflow cache>/cpu_precision.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow.runtime.atomic_files import write_json_atomic

# bf16 must beat fp32 by this factor to be chosen (a tie is not worth bf16's rounding).
BF16_MIN_SPEEDUP = 1.15
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16" | "fp32"
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def choose_precision(requested: str = "auto", device: str | None = None) -> PrecisionChoice:
    """`requested` (auto | bf16 | fp32) resolved for `device` (cuda | cpu; default: cuda if available)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32 requested")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "bf16 requested" if requested == "bf16" else "GPU supports bf16")
        if requested == "bf16":
            raise ValueError("precision bf16 requested but this GPU has no bf16 support: use auto or fp32")
        return PrecisionChoice("fp32", "GPU has no bf16 support")
    if requested == "bf16":
        return PrecisionChoice("bf16", "bf16 requested (on this CPU it may be slow: see loraflow.modeling.precision)")
    return cpu_auto_precision()


def cpu_auto_precision() -> PrecisionChoice:
    """bf16 when this CPU has bf16 instructions and a micro-benchmark shows it faster than fp32, else fp32."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    missing = missing_bf16_instructions(capability, cpu_flags(), platform.machine())
    if missing:
        return PrecisionChoice("fp32", f"{missing}: bf16 would be emulated, fp32 is faster")
    key = host_key(capability)
    cache = _cache_path()
    cached = _read_cache(cache).get(key)
    if cached is None:
        cached = benchmark_matmul()
        _write_cache(cache, key, cached)
    speedup = cached["fp32_ms"] / max(cached["bf16_ms"], 1e-9)
    timing = f"matmul fp32 {cached['fp32_ms']:.1f} ms, bf16 {cached['bf16_ms']:.1f} ms ({speedup:.1f}x)"
    if speedup >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU {capability} with bf16 instructions; {timing}")
    return PrecisionChoice("fp32", f"CPU {capability}: bf16 not faster; {timing}")


def missing_bf16_instructions(capability: str, flags: set[str] | None, machine: str) -> str | None:
    """Why this CPU cannot compute bf16 fast (a sentence), or None when nothing says so.

    `capability` is torch's dispatch level (AVX2, AVX512, ...; ATEN_CPU_CAPABILITY lowers it), `flags` the
    kernel's CPU flags (None where unknown, e.g. not Linux)."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None  # Arm and others: the benchmark decides
    if not capability.upper().startswith(("AVX512", "AMX")):
        return f"CPU capability {capability} (no AVX512-BF16/AMX kernels)"
    if flags is not None and not any(flag in flags for flag in _X86_BF16_FLAGS):
        return f"CPU capability {capability} without avx512_bf16/amx_bf16 flags"
    return None


def cpu_flags() -> set[str] | None:
    """The CPU flags of /proc/cpuinfo (Linux), else None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def benchmark_matmul(repeats: int = 3) -> dict:
    """Best-of-`repeats` milliseconds of a (1024x576) @ (576x1536) matmul, a 135M model's MLP shape, per dtype."""
    import torch

    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(1024, 576).to(dtype)
        b = torch.randn(576, 1536).to(dtype)
        a @ b  # warm-up (kernel selection)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
            if best > 0.05:  # emulated bf16 on a slow CPU: one timing says enough
                break
        result[f"{name}_ms"] = round(best * 1000, 3)
    return result


def host_key(capability: str) -> str:
    """What the benchmark's answer depends on: CPU model and flags, torch version, dispatch level, threads."""
    import torch

    flags = cpu_flags()
    payload = [platform.processor() or platform.machine(), _cpu_model(), sorted(flags or ()), torch.__version__,
               capability, torch.get_num_threads(), os.environ.get("ONEDNN_MAX_CPU_ISA", "")]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_path() -> Path:
    root = os.environ.get("LORAFLOW_CACHE") or Path.home() / ".cache" / "loraflow"
    return Path(root) / "cpu_precision.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, value: dict) -> None:
    entries = _read_cache(path)
    entries[key] = value
    try:
        write_json_atomic(path, entries)
    except OSError:
        pass  # a read-only cache only costs the benchmark again
