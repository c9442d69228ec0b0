"""JSON source: a JSON array of objects, or JSON Lines (one object per line).

A JSONL line that does not parse, or whose field holds another kind of value than the other records have
there (a list where the others have text), is set aside (quarantined with its line number and the reason)
and the other lines go on; a JSON array that does not parse is one error naming its line and column. Nested values (lists, objects,
e.g. ShareGPT `conversations`) are kept as they are.
"""

import json
from typing import Literal

import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.runtime.parquet_stream import ROW_GROUP_ROWS
from loraflow.sources.common import UTF8_BOM, SourceBase, Rejected, SourceError, decode_text, existing_file, kind_counts, odd_typed_records
# The rest of the source interface (loraflow/sources/common.py) is the one every single-file source shares.
from loraflow.sources.common import file_check as check, file_default_name as default_name  # noqa: F401
from loraflow.sources.common import file_fingerprint as fingerprint, file_locations as locations  # noqa: F401


class Config(SourceBase):
    """A JSON or JSONL file."""

    model_config = ConfigDict(title="JSON / JSONL file")
    kind: Literal["json"] = Field("json", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the file name).")
    path: str = Field(..., description="Path of the .json / .jsonl file (relative to the config file).")
    lines: bool | None = Field(None, description="JSON Lines? None = guess from the first non-blank character ('[' array, '{' lines).")
    encoding: str = Field("utf-8", description="Text encoding.")
    max_rows: int | None = Field(None, ge=1, description="Read only the first N records (small demos). None reads all.")


def read(config: Config, base_dir) -> tuple[pd.DataFrame, list[Rejected]]:
    """Read the file into a DataFrame indexed by record position; bad records come back as Rejected."""
    path = existing_file(config.path, base_dir)
    text = decode_text(path, path.read_bytes(), config.encoding)
    stripped = text.lstrip()
    if not stripped:
        raise SourceError(f"{path}: the file is empty -> write a JSON array of objects, or one JSON object per line")
    if config.lines is None and stripped[0] not in "[{":
        line = text[: len(text) - len(stripped)].count("\n") + 1
        raise SourceError(
            f"{path}: line {line} starts with {stripped[0]!r}, expected '[' (a JSON array of objects) or '{{' "
            f"(JSON Lines, one object per line) -> fix the file, or set `lines:` explicitly"
        )
    lines = config.lines if config.lines is not None else stripped[0] == "{"
    return read_lines(path, text, config.max_rows) if lines else read_array(path, text, config.max_rows)


def read_array(path, text: str, max_rows: int | None) -> tuple[pd.DataFrame, list[Rejected]]:
    """A whole-file JSON array of objects; any syntax error fails the file."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg} -> fix the file there "
            f"(if it holds one object per line, set `lines: true`)"
        ) from None
    if not isinstance(document, list):
        keys = f" with keys {sorted(document)[:5]}" if isinstance(document, dict) else ""
        raise SourceError(
            f"{path}: the top level is a {type(document).__name__}{keys}, expected an array of objects -> "
            f"store the records as [{{...}}, {{...}}] or as JSON Lines"
        )
    records, positions, rejected = [], [], []
    for position, element in enumerate(document[:max_rows]):
        if isinstance(element, dict):
            records.append(element)
            positions.append(position)
        else:
            reason = f"array element {position} is a {type(element).__name__}, not an object"
            rejected.append(Rejected(position, reason, json.dumps(element, ensure_ascii=False)))
    texts = [json.dumps(record, ensure_ascii=False) for record in records]
    return split_odd_typed(records, positions, [f"array element {p}" for p in positions], texts, rejected)


def read_lines(path, text: str, max_rows: int | None) -> tuple[pd.DataFrame, list[Rejected]]:
    """JSON Lines: one object per non-blank line; a line that is not an object is Rejected with its number."""
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    parsed = parse_lines(iter(enumerate(text.split("\n"), start=1)), 0, max_rows)
    return split_odd_typed(*parsed[:5])


def parse_lines(numbered_lines, position: int, max_rows: int | None, limit: int | None = None):
    """Parse (line number, text) pairs until `limit` non-blank lines (or max_rows records in all) are read:
    (records, positions, line names, texts, rejected, the next record position)."""
    records, positions, numbers, texts, rejected = [], [], [], [], []
    first = position
    for number, line in numbered_lines:
        if max_rows is not None and position >= max_rows:
            break
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            rejected.append(Rejected(position, f"invalid JSON at line {number}: {error.msg} (column {error.colno})", line))
        else:
            if isinstance(record, dict):
                records.append(record), positions.append(position), numbers.append(f"line {number}"), texts.append(line)
            else:
                rejected.append(Rejected(position, f"line {number} is a {type(record).__name__}, not a JSON object", line))
        position += 1
        if limit is not None and position - first >= limit:
            break
    return records, positions, numbers, texts, rejected, position


def read_batches(config: Config, base_dir, batch_rows: int):
    """JSON Lines in UTF-8, `batch_rows` records at a time: (rows indexed by record position, rejected), the rows and
    reasons `read` gives. A first pass counts every field's kinds of value over the file, so a record whose value is
    of another kind than most is set aside as in a whole read. A JSON array, another encoding, or a file that is not
    valid UTF-8 is read whole (one batch, or read's error)."""
    path = existing_file(config.path, base_dir)
    counts = whole_file_kinds(path, config) if streams(path, config) else None
    if counts is None:
        yield read(config, base_dir)
        return
    counts, fields = counts
    for records, positions, numbers, texts, rejected in line_batches(path, batch_rows, config.max_rows):
        frame, rejected = split_odd_typed(records, positions, numbers, texts, rejected, counts)
        missing = [field for field in fields if field not in frame.columns]  # all-null here: typed by other batches
        yield frame.assign(**{field: pd.Series(None, index=frame.index, dtype=object) for field in missing})[fields], rejected


def streams(path, config: Config) -> bool:
    """Whether the file is read in batches: UTF-8 (no BOM) JSON Lines, by `lines:` or by its first character."""
    if config.encoding.lower().replace("_", "-") not in ("utf-8", "utf8") or config.lines is False:
        return False
    with open(path, "rb") as file:
        start = file.read(1 << 16)
    if start.startswith(UTF8_BOM) or not start.strip():
        return False
    return config.lines is True or start.lstrip()[:1] == b"{"


def whole_file_kinds(path, config: Config) -> tuple[dict, list[str]] | None:
    """Pass one: every field's kinds of value over the file (`kind_counts`) and the fields in order of first
    appearance; None when a line is not UTF-8 (then `read` says where)."""
    counts, fields = {}, {}
    try:
        for records, *_ in line_batches(path, ROW_GROUP_ROWS, config.max_rows):
            kind_counts(records, counts)
            fields.update(dict.fromkeys(field for record in records for field in record))
    except UnicodeDecodeError:
        return None
    return counts, list(fields)


def line_batches(path, batch_rows: int, max_rows: int | None):
    """(records, positions, line names, texts, rejected) of every `batch_rows` records of a UTF-8 JSON Lines file."""
    with open(path, "rb") as file:  # binary lines end at b"\n" only, as text.split("\n") does
        numbered = ((number, raw.decode("utf-8").removesuffix("\n")) for number, raw in enumerate(file, start=1))
        position = 0
        while True:
            *parts, after = parse_lines(numbered, position, max_rows, limit=batch_rows)
            if after == position:
                return
            yield parts
            position = after


def split_odd_typed(records: list[dict], positions: list[int], places: list[str], texts: list[str],
                    rejected: list[Rejected], counts: dict | None = None) -> tuple[pd.DataFrame, list[Rejected]]:
    """Rows of the records whose fields agree in kind with the others (`counts`: the whole file's, for a batch);
    the rest Rejected, in record order."""
    odd = odd_typed_records(records, counts)
    rejected = rejected + [Rejected(positions[i], f"{places[i]}: {reason}", texts[i]) for i, reason in odd.items()]
    kept = [i for i in range(len(records)) if i not in odd]
    frame = with_positions([records[i] for i in kept], [positions[i] for i in kept])
    return frame, sorted(rejected, key=lambda record: record.row)


def with_positions(records: list[dict], positions: list[int]) -> pd.DataFrame:
    """Rows from a list of dicts, indexed by their record position within the source."""
    return pd.DataFrame(records, index=pd.Index(positions, dtype="int64"))
