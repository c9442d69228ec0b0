"""CPU precision is chosen by what the CPU computes fast (loraflow.modeling.precision), and the choice is reported."""

import json
import os
import subprocess
import sys

import pytest

from loraflow.modeling import precision
from loraflow.modeling.precision import PrecisionChoice, choose_precision, missing_bf16_instructions

CHOOSE = "from loraflow.modeling.precision import choose_precision; import json; print(json.dumps(choose_precision('auto', 'cpu').as_dict()))"


def _choose_in_subprocess(tmp_path, **env):
    environment = {**os.environ, "LORAFLOW_CACHE": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-c", CHOOSE], env=environment, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forced_avx2_capability_chooses_fp32_without_benchmarking(tmp_path):
    # ATEN_CPU_CAPABILITY lowers torch's kernel dispatch, as on an AVX2-only CPU (bf16 emulated there: 27x slower).
    choice = _choose_in_subprocess(tmp_path, ATEN_CPU_CAPABILITY="avx2")
    assert choice["precision"] == "fp32"
    assert "AVX2" in choice["reason"]
    assert not (tmp_path / "cache" / "cpu_precision.json").exists()  # decided by capability, no benchmark


@pytest.mark.parametrize("capability, flags, machine, missing", [
    ("AVX2", {"avx2", "fma"}, "x86_64", True),
    ("DEFAULT", None, "x86_64", True),
    ("AVX512", {"avx512f", "avx512bw"}, "x86_64", True),  # Skylake-class AVX512 without bf16 instructions
    ("AVX512", {"avx512f", "avx512_bf16"}, "x86_64", False),
    ("AVX512", {"avx512f", "amx_bf16"}, "x86_64", False),
    ("AVX512", None, "x86_64", False),  # flags unknown: the benchmark decides
    ("SVE256", {"sve", "bf16"}, "aarch64", False),  # Arm: the benchmark decides
])
def test_missing_bf16_instructions(capability, flags, machine, missing):
    assert (missing_bf16_instructions(capability, flags, machine) is not None) == missing


def test_benchmark_decides_and_is_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "missing_bf16_instructions", lambda *args: None)
    timings = iter([{"fp32_ms": 10.0, "bf16_ms": 20.0}])
    monkeypatch.setattr(precision, "benchmark_matmul", lambda: next(timings))
    first = choose_precision("auto", "cpu")
    assert first.precision == "fp32" and "not faster" in first.reason
    assert choose_precision("auto", "cpu") == first  # second call read the cache (the iterator is spent)
    cached = json.loads((tmp_path / "cpu_precision.json").read_text())
    assert list(cached.values()) == [{"fp32_ms": 10.0, "bf16_ms": 20.0}]


def test_bf16_chosen_only_when_clearly_faster(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "missing_bf16_instructions", lambda *args: None)
    monkeypatch.setattr(precision, "benchmark_matmul", lambda: {"fp32_ms": 30.0, "bf16_ms": 10.0})
    assert choose_precision("auto", "cpu").precision == "bf16"


def test_benchmark_measures_both_dtypes():
    timings = precision.benchmark_matmul(repeats=1)
    assert set(timings) == {"fp32_ms", "bf16_ms"} and all(value > 0 for value in timings.values())


def test_explicit_requests_are_kept():
    assert choose_precision("fp32", "cpu") == PrecisionChoice("fp32", "fp32 requested")
    assert choose_precision("bf16", "cpu").precision == "bf16"
