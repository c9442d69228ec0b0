"""Stage folders shipped through a shared store, so a host that reuses another host's adapter or evaluation has it.

Train, DPO, evaluate and publish write folders (adapter, eval tables, merged model) that transformers reads by path,
so they live in this host's folder for the store (`local_root(store)/<stage>/<name>`, named by what they are made
from). With a URL store (`s3://...`) the host that made one ships it to `<store>/folders/<stage>/<name>/`: every
file, then `loraflow-folder.json` (each file's sha256) last, so a folder without it is incomplete. A host whose
cached result points at a folder it lacks fetches it into a staging folder beside its own copy's place, checks every
file against that manifest and swaps it in whole (the adapter's own manifest, `loraflow-adapter.json`, travels as one
of the checked files). A local store is the folder itself: nothing is copied.

    ship_folder(store_root, output_dir)                          # in the stage's task, before its lock is released
    result = from_store(result, store_root, output_dir, is_valid)  # where a cached result is used

A path inside a stage folder can be named for every host by its URL in the store (a version record's `model_url`):

    url = store_url(store_root, local_root, model_dir)   # `<store>/folders/publish/<name>/model`; None: local store
    model_dir = local_copy(store_root, url, local_root)  # this host's copy, the folder fetched when missing here
"""

import json
from pathlib import Path

import fsspec
from pydantic import BaseModel

from loraflow.runtime.artifact_store import file_sha256, is_url
from loraflow.runtime.atomic_files import atomic_folder

FOLDER_MANIFEST = "loraflow-folder.json"
# Training's resumable state: large, and of no use once the adapter is saved.
NOT_SHIPPED = ("checkpoints", "trainer")


class FolderFetchError(RuntimeError):
    """A shipped folder whose files do not match its manifest; never used (the stage is computed here instead)."""


def folder_url(store_root: str, folder: str | Path) -> str:
    """Where this host's stage folder `<local root>/<stage>/<name>` lives in the store: `<store>/folders/<stage>/<name>`."""
    folder = Path(folder)
    return f"{store_root.rstrip('/')}/folders/{folder.parent.name}/{folder.name}"


def shipped_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file of `folder` that is shipped (not the NOT_SHIPPED subfolders)."""
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.relative_to(folder).parts[0] not in NOT_SHIPPED
            and path.name != FOLDER_MANIFEST}


def ship_folder(store_root: str, folder: str | Path) -> str | None:
    """Copy a finished stage folder to a URL store, its manifest last; returns its URL (None for a local store,
    where the folder already is the store's)."""
    if not is_url(store_root):
        return None
    folder, url = Path(folder), folder_url(store_root, folder)
    fs, base = fsspec.core.url_to_fs(url)
    files = shipped_files(folder)
    for name in files:
        fs.put_file(str(folder / name), f"{base}/{name}")
    fs.pipe_file(f"{base}/{FOLDER_MANIFEST}", json.dumps({"files": files}, indent=1).encode())
    return url


def fetch_folder(store_root: str, folder: str | Path) -> bool:
    """Make `folder` a verified copy of the store's; False when the store holds no complete copy of it."""
    folder, url = Path(folder), folder_url(store_root, folder)
    fs, base = fsspec.core.url_to_fs(url)
    try:
        manifest = json.loads(fs.cat_file(f"{base}/{FOLDER_MANIFEST}"))
    except FileNotFoundError:
        return False
    with atomic_folder(folder) as staging:
        for name, sha256 in manifest["files"].items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{base}/{name}", str(target))
            if file_sha256(target) != sha256:
                raise FolderFetchError(f"{url}/{name}: sha256 {file_sha256(target)[:12]}… is not the {sha256[:12]}… "
                                       f"of {url}/{FOLDER_MANIFEST} (a modified or partial upload) -> delete {url} and "
                                       "re-run: the stage is computed again")
        (staging / FOLDER_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return True


def relocated(result: BaseModel, folder: str | Path) -> BaseModel:
    """`result` with its paths in another host's copy of the stage folder (`.../<stage>/<name>/...`) moved to this
    host's, `folder`: the other host's folder for the store is replaced by this one's in every path under it."""
    folder = Path(folder)
    marker = f"/{folder.parent.name}/{folder.name}"
    values = result.model_dump(mode="json")
    others = {value.split(marker)[0] for value in _strings(values) if marker in value}
    here = str(folder.parent.parent)
    other_root = next((root for root in others if root != here), None)
    if other_root is None:
        return result
    return type(result).model_validate(_moved(values, other_root, here))


def store_url(store_root: str, local_root: str | Path, path: str | Path) -> str | None:
    """The URL in a URL store of `path`, a file or folder inside a stage folder of this host's `local_root`
    (`<local root>/<stage>/<name>/<rest>` -> `<store>/folders/<stage>/<name>/<rest>`); None for a local store."""
    if not is_url(store_root):
        return None
    stage, name, *rest = Path(path).relative_to(local_root).parts
    return "/".join([folder_url(store_root, Path(stage) / name), *rest])


def local_copy(store_root: str, url: str, local_root: str | Path) -> Path:
    """This host's copy of `url` (a `store_url`): `<local root>/<stage>/<name>/<rest>`, its stage folder fetched and
    verified when that path is missing here (still missing when the store holds no complete copy)."""
    prefix = f"{store_root.rstrip('/')}/folders/"
    if not url.startswith(prefix):
        raise ValueError(f"{url} is not a stage folder of the store {store_root} (expected {prefix}<stage>/<name>/...) "
                         "-> it was published through another store: name that store (the config's `store`, --store)")
    stage, name, *rest = url.removeprefix(prefix).split("/")
    folder = Path(local_root) / stage / name
    here = folder.joinpath(*rest)
    if not here.exists():
        fetch_folder(store_root, folder)
    return here


def from_store(result: BaseModel, store_root: str, folder: str | Path, is_valid) -> BaseModel:
    """A stage result ready for this host: its paths moved to this host's `folder`, which is fetched from a URL store
    when `is_valid` finds it missing here (another host made it). A local store's result is returned as it is."""
    if not is_url(store_root):
        return result
    from loraflow.runtime.stage_locks import lock_logger  # the run's logger (this module's other users run without Prefect)

    here = relocated(result, folder)
    if is_valid(here):
        return here
    try:
        if fetch_folder(store_root, folder):
            lock_logger().info("fetched %s into %s (made by another host)", folder_url(store_root, folder), folder)
    except FolderFetchError as error:  # left out: is_valid still rejects the result, so the stage runs here
        lock_logger().warning("%s", error)
    return here


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _moved(value, old_root: str, new_root: str):
    if isinstance(value, str):
        return new_root + value[len(old_root):] if value == old_root or value.startswith(old_root + "/") else value
    if isinstance(value, dict):
        return {key: _moved(item, old_root, new_root) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, old_root, new_root) for item in value]
    return value
