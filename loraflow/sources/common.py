"""What every source shares: the interface core code relies on, path resolution, the error type, and how a
source sets bad records aside.

Core code (config validation, confinement, `loraflow check`, the cache key, the run summary) never guesses
from field names: it asks the source's module, which defines (loraflow/sources/__init__.py checks it on import):

- `Config`: the pydantic model, with `kind`, `name`, `max_rows` and a schema `title` (the Prefect UI's label).
- `read(config, base_dir)`: the rows (or `(rows, rejected)`).
- `default_name(config)`: the provenance name when `name:` is not set.
- `locations(config, base_dir)`: every place it reads, as `Location`s (local ones are confined).
- `fingerprint(config, base_dir)`: a string that changes whenever the data read would change.
- `check(config, base_dir)`: problems (exists, reachable, readable) as messages with their fix; [] = fine.

File sources share the `file_*` implementations below.
"""

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import Field

from loraflow.config.base import StrictModel
from loraflow.config.synthesize import SynthesizerKind
from loraflow.runtime.artifact_store import file_sha256

UTF8_BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class Location:
    """One place a source reads: a local file or folder (confined to LORAFLOW_DATA_ROOTS) or a remote address."""

    key: str  # the config key that names it ("path", "repo", "url"), for error messages
    address: str  # what the run summary and model card show: the path as configured, or a URL without credentials
    local: Path | None = None  # the file or folder on this machine it reads; None when remote


class SourceBase(StrictModel):
    """Fields every source has, whatever its kind."""

    synthesizer: SynthesizerKind | None = Field(
        None, description="Synthesizer for this source's rows; None uses synthesize.kind (lets one run mix, e.g., QA with replay data)."
    )


class SourceError(ValueError):
    """A source that cannot be read; the message names the file (line / byte offset where known) and the fix."""


@dataclass(frozen=True)
class Rejected:
    """A record a source could not parse: it goes to the quarantine artifact instead of stopping the run."""

    row: int  # 0-based record position within the source (the numbering `_row` uses)
    reason: str  # e.g. "invalid JSON at line 7: Expecting ',' delimiter (column 12)"
    text: str  # the record as it stood in the file


# How a JSON value is named in reasons; int and float share "number" (Parquet stores them in one column).
VALUE_KINDS = {str: "text", int: "number", float: "number", bool: "true/false", list: "list", dict: "object"}


def value_kind(value) -> str | None:
    """The kind of a parsed JSON value ("text", "number", "list", ...), None for null."""
    return None if value is None else VALUE_KINDS.get(type(value), type(value).__name__)


def odd_typed_records(records: list[dict], counts: dict[str, dict[str, int]] | None = None) -> dict[int, str]:
    """Records whose value in some field has another kind than most records have there: index -> reason.

    A field's kind is the one more than half of its non-null values have; a field without such a majority
    is left alone (ingest then refuses the column by name). Parquet cannot store, e.g., a list beside text.
    `counts` (`kind_counts` of the whole file) decides the majorities when `records` are one batch of it.
    """
    counts = kind_counts(records) if counts is None else counts
    odd: dict[int, str] = {}
    for field, by_kind in counts.items():
        majority, count = max(by_kind.items(), key=lambda item: item[1])
        if len(by_kind) == 1 or count * 2 <= sum(by_kind.values()):
            continue
        for index, record in enumerate(records):
            kind = value_kind(record.get(field))
            if kind is not None and kind != majority and index not in odd:
                odd[index] = (f"field {field!r} is {kind}, but {count} other record(s) have {majority} there "
                              f"-> make it {majority} like the others")
    return odd


def kind_counts(records, counts: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """Per field (in order of first appearance), how many records hold each kind of non-null value there; added to
    `counts` when given (a file read in batches)."""
    counts = {} if counts is None else counts
    for record in records:
        for field, value in record.items():
            kind = value_kind(value)
            if kind is not None:
                by_kind = counts.setdefault(field, {})
                by_kind[kind] = by_kind.get(kind, 0) + 1
    return counts


def resolve_path(path: str, base_dir) -> Path:
    """A config path, resolved against base_dir (the config file's folder) unless absolute."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else Path(base_dir) / candidate


def existing_file(path: str, base_dir) -> Path:
    """The resolved file, or a SourceError that says where it was looked for and how to fix it."""
    resolved = resolve_path(path, base_dir)
    if not resolved.is_file():
        what = "is a folder, not a file" if resolved.is_dir() else "does not exist"
        raise SourceError(
            f"{resolved}: {what} -> fix the source's `path:` (relative paths start at the config file's folder, {base_dir})"
        )
    return resolved


def decode_text(path, payload: bytes, encoding: str) -> str:
    """The file's text; a UTF-8 BOM is dropped whatever the encoding, a wrong encoding is refused with its offset."""
    skipped = len(UTF8_BOM) if payload.startswith(UTF8_BOM) else 0
    try:
        return payload[skipped:].decode(encoding)
    except LookupError:
        raise SourceError(f"{path}: unknown encoding {encoding!r} -> set `encoding:` to a Python codec name, e.g. utf-8, cp949, latin-1") from None
    except UnicodeDecodeError as error:
        offset = skipped + error.start
        bad = payload[offset:skipped + error.end].hex(" ")
        hint = " (the file is valid UTF-8: set `encoding: utf-8`)" if encoding.lower().replace("_", "-") not in ("utf-8", "utf8") \
            and _decodes(payload[skipped:], "utf-8") else ""
        raise SourceError(
            f"{path}: not valid {encoding} at byte offset {offset} (bytes {bad}: {error.reason}) -> set the source's "
            f"`encoding:` option to the file's encoding, e.g. `encoding: cp949` (Korean), `encoding: shift_jis` "
            f"(Japanese) or `encoding: latin-1` (Western European){hint}"
        ) from None


def _decodes(payload: bytes, encoding: str) -> bool:
    try:
        payload.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def folder_sha256(folder: Path) -> str:
    """sha256 over every file's relative path and bytes in a folder (hidden files and folders skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


# ---- the interface for sources that read one local file (csv, json, parquet)
def file_default_name(config) -> str:
    """The file name of `path:`."""
    return Path(config.path).name


def file_locations(config, base_dir) -> list[Location]:
    """The one file `path:` names (resolved against the config's folder for confinement)."""
    return [Location("path", config.path, resolve_path(config.path, base_dir))]


def file_fingerprint(config, base_dir) -> str:
    """sha256 of the file's bytes."""
    return file_sha256(existing_file(config.path, base_dir))


def file_check(config, base_dir) -> list[str]:
    """The file exists and can be opened for reading."""
    try:
        path = existing_file(config.path, base_dir)
        with open(path, "rb") as handle:
            handle.read(1)
    except SourceError as error:
        return [str(error)]
    except OSError as error:
        return [f"{resolve_path(config.path, base_dir)}: cannot be read ({error.strerror}) -> give the worker read access, or fix `path:`"]
    return []
