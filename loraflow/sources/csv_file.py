"""CSV source: one file, any encoding, BOM and quoted multi-line fields handled.

Every column is read as text, exactly as written ("UNKNOWN", "" and "nan" stay strings): what a value means
is the synthesizer's business, not the reader's.
"""

import io
from typing import Literal

import pandas as pd
from pydantic import ConfigDict, Field

from loraflow.sources.common import UTF8_BOM, SourceBase, SourceError, decode_text, existing_file
# The rest of the source interface (loraflow/sources/common.py) is the one every single-file source shares.
from loraflow.sources.common import file_check as check, file_default_name as default_name  # noqa: F401
from loraflow.sources.common import file_fingerprint as fingerprint, file_locations as locations  # noqa: F401


class Config(SourceBase):
    """A CSV file."""

    model_config = ConfigDict(title="CSV file")
    kind: Literal["csv"] = Field("csv", description="Source kind.")
    name: str | None = Field(None, description="Source name in provenance columns (default: the file name).")
    path: str = Field(..., description="Path of the CSV file (relative to the config file).")
    encoding: str = Field("utf-8", description="Text encoding, e.g. utf-8, cp949, latin-1. A UTF-8 BOM is always accepted.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field delimiter.")
    max_rows: int | None = Field(None, ge=1, description="Read only the first N data rows (small demos). None reads all.")


def read(config: Config, base_dir) -> pd.DataFrame:
    """Read the CSV into a DataFrame of strings (types are the synthesizer's business)."""
    path = existing_file(config.path, base_dir)
    text = decode_text(path, path.read_bytes(), config.encoding)
    if not text.strip():
        raise SourceError(f"{path}: the file is empty -> export the data again (a header line plus one row per record)")
    try:
        rows = pd.read_csv(
            io.StringIO(text), sep=config.delimiter, dtype=str, keep_default_na=False, na_filter=False,
            nrows=config.max_rows, skip_blank_lines=True,
        )
    except pd.errors.ParserError as error:
        # pandas says "Expected 23 fields in line 7, saw 24": usually an unquoted delimiter inside a value.
        raise SourceError(
            f"{path}: not valid CSV: {error} -> quote values that contain the delimiter {config.delimiter!r} "
            f"or a line break (\"like, this\"), or set `delimiter:` to the file's separator"
        ) from None
    return rows


def read_batches(config: Config, base_dir, batch_rows: int):
    """The rows of a UTF-8 CSV as DataFrames of `batch_rows` rows, parsed as they are read (memory: one batch); the
    same rows and values as `read`, whose messages any file it refuses gets (another encoding: read whole)."""
    path = existing_file(config.path, base_dir)
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if config.encoding.lower().replace("_", "-") not in ("utf-8", "utf8") or not head.removeprefix(UTF8_BOM).strip():
        yield read(config, base_dir)  # decoded whole: its offsets and hints for a wrong encoding, or the empty file
        return
    try:
        with pd.read_csv(path, sep=config.delimiter, dtype=str, keep_default_na=False, na_filter=False, nrows=config.max_rows,
                         skip_blank_lines=True, encoding="utf-8-sig", chunksize=batch_rows) as chunks:
            yield from chunks
    except (UnicodeDecodeError, pd.errors.ParserError):
        yield read(config, base_dir)  # raises the SourceError that names the offset or line, and the fix
        raise  # not reached: read() refuses the same file


def column_names(config: Config, base_dir) -> list[str]:
    """The header's column names (for `loraflow check`: a template naming a column the file lacks)."""
    path = existing_file(config.path, base_dir)
    text = decode_text(path, path.read_bytes(), config.encoding)
    try:
        return [str(name) for name in pd.read_csv(io.StringIO(text), sep=config.delimiter, dtype=str, nrows=0).columns]
    except (pd.errors.ParserError, pd.errors.EmptyDataError):
        return []  # read() reports the file itself
