"""Version guards for loraflow's patches of library internals: a newer release than the one verified refuses.

The fast path reaches past public APIs in three places: peft's LoRA layer forward (lora_fast.py, and the lean
recompute that rides on it), bitsandbytes' 8-bit optimizer step (optimizer.py) and transformers' per-layer
checkpoint function and Trainer's sampler hook (offload.py, trainer.py). Each was checked against the releases named
in VERIFIED (CPU tests here; tests/gpu on the H100/H200 image). A later release may rename or change what the patch
relies on and then train wrongly without an error; so it refuses, naming the package, the release verified and the
setting that turns the patch off. To lift a guard: run tests/test_packing_speed.py, tests/test_offload.py and
tests/gpu on the new release, then raise its entry here.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# The newest release series each patched package was verified with (any patch release of it is accepted).
VERIFIED = {
    "peft": "0.21",  # 0.21.0 on the GPU image, 0.21.2 here
    "bitsandbytes": "0.50",  # 0.50.2
    "transformers": "5.23",  # 5.17 on the GPU image up to 5.23 here
}


class UnverifiedVersionError(RuntimeError):
    """A patched library is newer than the release the patch was verified with."""


@lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    """The installed release of `package`, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def newer_than_verified(installed: str, verified: str) -> bool:
    """Whether `installed` belongs to a release series after `verified` ("0.22.0" after "0.21"; "0.21.9" is not)."""
    series = Version(verified).release
    return Version(installed).release[:len(series)] > series


def require_verified(package: str, patch: str, turn_off: str) -> None:
    """Refuse (UnverifiedVersionError) when the installed `package` is newer than VERIFIED[package]: `patch` says
    what reaches into it, `turn_off` the setting that avoids the patch. A package not installed is not checked."""
    installed, verified = installed_version(package), VERIFIED[package]
    if installed is None or not newer_than_verified(installed, verified):
        return
    raise UnverifiedVersionError(
        f"{patch} relies on {package} internals verified with {package} {verified}.x, and {package} {installed} is "
        f"installed: it may train wrongly without an error. Turn it off with {turn_off}, or install "
        f"{package}<{_next_series(verified)} (loraflow/training/version_guard.py says how to verify a new release)"
    )


def _next_series(verified: str) -> str:
    release = list(Version(verified).release)
    release[-1] += 1
    return ".".join(map(str, release))
