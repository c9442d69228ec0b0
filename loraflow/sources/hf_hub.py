"""Hugging Face Hub source: `datasets.load_dataset` on a repo id or a local dataset folder.

Only data files are loaded (Parquet, JSON Lines, CSV, ...): dataset loading scripts are never run, so no
code from the dataset repo executes. A local folder (`repo: ../data/my_dataset`) works offline.
"""

import re
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.sources.common import Location, SourceBase, SourceError, folder_sha256, resolve_path


class Config(SourceBase):
    """A dataset on the Hugging Face Hub (or a local folder laid out like one)."""

    model_config = ConfigDict(title="Hugging Face dataset")
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


def default_name(config: Config) -> str:
    """The repo id (or the folder as written)."""
    return config.repo


def locations(config: Config, base_dir) -> list[Location]:
    """The local dataset folder (confined), or the dataset's Hub address."""
    folder = local_folder(config, base_dir)
    if folder:
        return [Location("repo", config.repo, folder)]
    return [Location("repo", f"https://huggingface.co/datasets/{config.repo}")]


def fingerprint(config: Config, base_dir) -> str:
    """Cache identity: a hash of a local folder's files; for a Hub repo, the commit its revision points at now
    (so a new commit on an unpinned dataset is seen), or `repo@revision` when the Hub cannot be asked (offline:
    `datasets` then loads its cached copy, which does not change)."""
    folder = local_folder(config, base_dir)
    if folder:
        return folder_sha256(folder)
    commit = hub_commit(config)
    return f"{config.repo}@{commit or config.revision}"


def hub_commit(config: Config) -> str | None:
    """The commit sha `revision` resolves to on the Hub, or None offline / unreachable."""
    import huggingface_hub

    if config.revision and re.fullmatch(r"[0-9a-f]{40}", config.revision):
        return config.revision  # a commit already: nothing to ask
    try:
        return huggingface_hub.HfApi().dataset_info(config.repo, revision=config.revision, timeout=10).sha
    except Exception:  # noqa: BLE001 - offline, unreachable, unknown: the load itself reports what is wrong
        return None


def in_local_cache(repo: str) -> bool:
    """A Hub dataset downloaded before: in huggingface_hub's cache or in `datasets`' own (`owner___name`; a bare
    name there may be a local folder's cache, which does not count)."""
    import datasets.config
    import huggingface_hub.constants

    hub = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    own = Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___")
    return hub.is_dir() or ("/" in repo and own.is_dir())


def check(config: Config, base_dir) -> list[str]:
    """A local folder exists and holds files; a Hub dataset (and revision) exists, when the Hub can be asked."""
    folder = local_folder(config, base_dir)
    if folder:
        return [] if any(p.is_file() for p in folder.rglob("*")) else [f"{folder}: the dataset folder holds no files -> fix `repo:`"]
    import huggingface_hub
    from huggingface_hub.utils import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        huggingface_hub.HfApi().dataset_info(config.repo, revision=config.revision, timeout=10)
    except OfflineModeIsEnabled:
        if in_local_cache(config.repo):
            return []  # offline, `datasets` loads the cached copy
        return [f"hf_hub {config.repo!r}: no local folder {resolve_path(config.repo, base_dir)}, and offline the Hub "
                f"dataset is not in the local cache -> fix `repo:` (a folder relative to the config file), or go online "
                f"(unset HF_HUB_OFFLINE) once to download it"]
    except RevisionNotFoundError:
        return [f"hf_hub {config.repo!r}: no revision {config.revision!r} -> fix `revision:` (a branch, tag or commit)"]
    except RepositoryNotFoundError:
        return [f"hf_hub {config.repo!r}: no such dataset on the Hub (or it is private) -> fix `repo:` (a Hub id like "
                f"'tatsu-lab/alpaca', or a local folder relative to the config file)"]
    except Exception as error:  # noqa: BLE001 - connection errors come as OSError or the HTTP client's own types
        return [f"hf_hub {config.repo!r}: cannot reach the Hub ({error}) -> go online, or point `repo:` at a local folder"]
    return []
