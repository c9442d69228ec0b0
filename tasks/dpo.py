"""dpo: the SFT adapter trained further on the pairs stage's PAIRS with TRL's DPOTrainer (loraflow.training.preference).

The recipe lives in loraflow.training.preference (model, TRL config, margins, save); this module reads the PAIRS
artifact (contract-checked) and is the Prefect task. The flow caches and locks it like training
(loraflow.runtime.stage_task.run_locked), in a store folder named by the SFT adapter, the pairs and the settings.
"""

from __future__ import annotations

from data_contracts import PAIRS
from loraflow.config.preference import PreferenceConfig
from loraflow.runtime.artifact_store import ArtifactRef, ArtifactStore
from loraflow.runtime.stage_output import read_input
from loraflow.runtime.store_folders import ship_folder
from loraflow.training.preference import PreferenceResult, train_preference


def run_dpo(pairs: ArtifactRef, model_dir: str, sft_adapter_dir: str, config: PreferenceConfig, output_dir: str,
            store: ArtifactStore, *, fingerprint: str, seed: int = 0, precision: str = "auto",
            trust_remote_code: bool = False, log=None) -> PreferenceResult:
    """Read the pairs, then DPO from the SFT adapter into output_dir/adapter."""
    frame = read_input(store, pairs, PAIRS)
    return train_preference(frame, model_dir, sft_adapter_dir, config, output_dir, fingerprint=fingerprint, seed=seed,
                            precision=precision, trust_remote_code=trust_remote_code, log=log)


try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect: run_dpo is what runs there
    task = None

if task is not None:

    @task(name="dpo")  # cached and locked by the flow (loraflow.runtime.stage_task.run_locked)
    def dpo_task(pairs: ArtifactRef, model_dir: str, sft_adapter_dir: str, config: PreferenceConfig, output_dir: str,
                 store_root: str, fingerprint: str, seed: int = 0, precision: str = "auto",
                 trust_remote_code: bool = False) -> PreferenceResult:
        """Prefect task around `run_dpo`; `fingerprint` (SFT adapter + pairs + settings) names what it makes."""
        from prefect import get_run_logger

        result = run_dpo(pairs, model_dir, sft_adapter_dir, config, output_dir, ArtifactStore(store_root),
                         fingerprint=fingerprint, seed=seed, precision=precision, trust_remote_code=trust_remote_code,
                         log=get_run_logger())
        ship_folder(store_root, output_dir)  # a URL store: other hosts reuse this adapter
        return result
