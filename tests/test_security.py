"""Safe loading, checked over the code itself: no pickle, no unpinned remote code, safetensors only."""

import re
from pathlib import Path

import pytest

from loraflow.config.model import ModelConfig

REPO = Path(__file__).resolve().parent.parent
CODE = [p for folder in ("loraflow", "tasks", "flows", "data_contracts", "scripts", "benchmarks")
        for p in (REPO / folder).rglob("*.py")]


@pytest.mark.parametrize("pattern, why", [
    (r"\bpickle\.loads?\(", "pickle executes code from the file"),
    (r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True can execute code"),
    (r"trust_remote_code\s*=\s*True", "remote code must come from the config, with a pinned revision"),
    (r"safe_serialization\s*=\s*False", "weights are written as safetensors only"),
])
def test_no_unsafe_loading_in_code(pattern, why):
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in CODE
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(pattern, line) and not line.lstrip().startswith("#")]
    assert not offenders, f"{why}: {offenders}"


def test_remote_code_needs_explicit_flag_and_pinned_revision():
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="revision"):
        ModelConfig(trust_remote_code=True)
    assert ModelConfig(trust_remote_code=True, revision="0123abcd").trust_remote_code
