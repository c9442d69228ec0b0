"""Hugging Face Hub source: `datasets.load_dataset` on a repo id or a local dataset folder.

Only data files are loaded (Parquet, JSON Lines, CSV, ...): dataset loading scripts are never run, so no
code from the dataset repo executes. A local folder (`repo: ../data/my_dataset`) works offline.
"""

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field

from tasks.sources.common import SourceBase, SourceError, folder_sha256, resolve_path


class Config(SourceBase):
    """A dataset on the Hugging Face Hub (or a local folder laid out like one)."""

    kind: Literal["hf_hub"] = Field("hf_hub", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the repo id).")
    repo: str = Field(..., description="Dataset repo id (e.g. 'tatsu-lab/alpaca') or a local dataset folder.")
    config_name: str | None = Field(None, description="Dataset config (subset) name.")
    split: str = Field("train", description="Split to load.")
    revision: str | None = Field(None, description="Branch, tag or commit to pin.")
    max_rows: int | None = Field(None, ge=1, description="Load only the first N rows of the split (small demos). None loads all.")


def local_folder(config: Config, base_dir) -> Path | None:
    """The dataset folder when `repo` names one on this machine (relative to the config file), else None."""
    folder = resolve_path(config.repo, base_dir)
    return folder if folder.is_dir() else None


def read(config: Config, base_dir) -> pd.DataFrame:
    """Load the split with `datasets.load_dataset` and return it as a DataFrame."""
    import datasets  # imported here: it takes seconds and only this source needs it

    folder = local_folder(config, base_dir)
    location = str(folder) if folder else config.repo
    split = f"{config.split}[:{config.max_rows}]" if config.max_rows else config.split
    try:
        dataset = datasets.load_dataset(location, name=config.config_name, split=split, revision=config.revision)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise SourceError(
            f"hf_hub {location!r}: not found ({error}) -> check `repo:` (a Hub dataset id like 'tatsu-lab/alpaca', or "
            f"a local folder relative to the config file); offline, only local folders and cached datasets load"
        ) from None
    except ConnectionError as error:
        raise SourceError(
            f"hf_hub {location!r}: cannot reach the Hub ({error}) -> go online (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), "
            f"or download the dataset once and point `repo:` at its local folder"
        ) from None
    except RuntimeError as error:
        if "Dataset scripts are no longer supported" not in str(error):
            raise
        # datasets refuses the whole folder or repo before running anything; say how to load its data files.
        raise SourceError(
            f"hf_hub {location!r}: has a dataset loading script ({str(error).rsplit('found ', 1)[-1]}), and loraflow "
            f"never runs code from a dataset -> point `repo:` at the folder holding its data files (Parquet, JSON "
            f"Lines, CSV), or use a revision of the dataset that ships them"
        ) from None
    except ValueError as error:
        # Unknown split or config name: datasets lists the ones that exist in its message.
        raise SourceError(f"hf_hub {location!r}: {error} -> set `split:` / `config_name:` to one that exists") from None
    return dataset.to_pandas()


def fingerprint(config: Config, base_dir) -> str:
    """Cache identity: a hash of a local folder's files, else the repo and pinned revision (None = unpinned)."""
    folder = local_folder(config, base_dir)
    return folder_sha256(folder) if folder else f"{config.repo}@{config.revision}"
