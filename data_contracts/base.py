"""How a contract is declared and enforced.

Why pandera (0.35) plus vectorised row rules: pandera checks columns, types and nullability of a whole
DataFrame lazily, reporting every failure at once with its column and row (a failure-cases table we can
print and publish), at ~0.4 s per 100k rows. What pyarrow schemas cannot say (non-empty lists, masks with
at least one trained token, unique ids) is written as row rules: vectorised functions that mark violating
rows, which go to a quarantine artifact with the rule's reason instead of being dropped.
"""

import json
from dataclasses import dataclass, field, replace
from typing import Callable

import pandas as pd
import pandera.pandas as pa


@dataclass(frozen=True)
class RowRule:
    """A per-row rule: `violated(frame)` is True where a row breaks it; such rows are quarantined."""

    name: str
    reason: str
    violated: Callable[[pd.DataFrame], pd.Series]


@dataclass(frozen=True)
class Contract:
    """The schema of one artifact kind plus its row and dataset rules."""

    name: str
    version: int
    columns: dict[str, pa.Column]
    row_rules: tuple[RowRule, ...] = ()
    unique: tuple[str, ...] = ()
    allow_empty: bool = False
    extra_columns: bool = False  # True: columns beyond `columns` are allowed (raw rows, quarantine extras)
    schema: pa.DataFrameSchema = field(init=False, repr=False)

    def __post_init__(self):
        schema = pa.DataFrameSchema(self.columns, strict=not self.extra_columns, coerce=False)
        object.__setattr__(self, "schema", schema)

    def narrowed(self, columns: list[str]) -> "Contract":
        """The contract of these of its columns alone (a reader that reads only what it needs checks what it read)."""
        key = (self.name, self.version, tuple(columns))
        if key not in _NARROWED:
            _NARROWED[key] = replace(self, columns={name: self.columns[name] for name in columns}, row_rules=(), unique=())
        return _NARROWED[key]


_NARROWED: dict[tuple, Contract] = {}


class ContractViolation(ValueError):
    """An artifact that breaks its contract; the message lists every failing column/row and the fix."""

    def __init__(self, message: str, failures: pd.DataFrame | None = None):
        super().__init__(message)
        self.failures = failures


def check_structure(frame: pd.DataFrame, contract: Contract, where: str = "") -> None:
    """Raise one ContractViolation listing every missing column, unexpected column, wrong type and null
    where none is allowed, each with its fix."""
    where = where or contract.name
    if len(frame) == 0:
        # An empty frame has no values to type-check (its columns are untyped); only names can be wrong.
        missing = [name for name, column in contract.columns.items() if column.required and name not in frame.columns]
        unexpected = [] if contract.extra_columns else [name for name in frame.columns if name not in contract.columns]
        lines = [f"  missing column '{name}' -> {fix_for('column_in_dataframe', contract)}" for name in missing]
        lines += [f"  unexpected column '{name}' -> {fix_for('column_in_schema', contract)}" for name in unexpected]
        if lines:
            raise ContractViolation("\n".join([f"{where}: {len(lines)} contract failure(s) against '{contract.name}' "
                                               f"v{contract.version}:"] + lines))
        return
    try:
        contract.schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as errors:
        lines = failure_lines(errors.failure_cases, frame, contract)
        header = f"{where}: {len(lines)} contract failure(s) against '{contract.name}' v{contract.version}:"
        more = [f"  ... and {len(lines) - 50} more"] if len(lines) > 50 else []
        raise ContractViolation("\n".join([header] + lines[:50] + more), failures=errors.failure_cases) from None


def failure_lines(cases: pd.DataFrame, frame: pd.DataFrame, contract: Contract) -> list[str]:
    """One line, with its fix, per missing column, unexpected column, wrongly typed column and failing value."""
    checks = cases["check"].astype(str)
    lines = [f"  missing column '{name}' -> {fix_for('column_in_dataframe', contract)}"
             for name in cases.loc[checks == "column_in_dataframe", "failure_case"]]
    lines += [f"  unexpected column '{name}' -> {fix_for('column_in_schema', contract)}"
              for name in cases.loc[checks == "column_in_schema", "failure_case"]]
    typed = checks.str.startswith("dtype(")
    for column, group in cases[typed].groupby("column", sort=False):
        rows = [int(i) for i in group["index"] if i is not None and not pd.isna(i)]
        at = f" (rows {rows[:5]}{' ...' if len(rows) > 5 else ''})" if rows else ""
        expected = str(group["check"].iloc[0])[len("dtype("):-1].strip("'")
        lines.append(f"  column '{column}': wrong type, expected {expected}, found {frame[column].dtype}{at} -> "
                     f"{fix_for('dtype', contract)}")
    for case in cases[~(typed | checks.isin(["column_in_dataframe", "column_in_schema"]))].itertuples():
        row = "" if case.index is None or pd.isna(case.index) else f" row {int(case.index)}"
        column = case.column if case.column is not None else case.failure_case
        lines.append(f"  column '{column}'{row}: {case.check} (found {case.failure_case!r}) -> {fix_for(str(case.check), contract)}")
    return lines


def fix_for(check: str, contract: Contract | None = None) -> str:
    """A hint for a pandera check name."""
    if "column_in_dataframe" in check:
        return "add the column, or map the config's column names to the ones in your data"
    if "column_in_schema" in check and contract is not None:
        return f"drop the column, or declare it in the '{contract.name}' contract (data_contracts/{contract.name}.py)"
    if "nullable" in check:
        return "fill or remove the empty values"
    if "dtype" in check:
        return "convert the column to the expected type"
    return "fix the value"


def enforce(frame: pd.DataFrame, contract: Contract, where: str = "", *, seen_before: Callable | None = None,
            first_row: int = 0, raise_if_empty: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check structure (raise on failure), then split rows into (valid, quarantined-with-reason).

    For a frame that is one batch of a bigger artifact: `seen_before(column, values)` marks values of a unique column
    that earlier batches already hold, `first_row` is the batch's first row position (the quarantine's row_index),
    and `raise_if_empty=False` lets a batch have no valid row (the stage checks the whole artifact at its end).
    """
    check_structure(frame, contract, where)
    frame = frame.reset_index(drop=True)
    reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    for rule in contract.row_rules:
        broken = rule.violated(frame).fillna(False).astype(bool) & reasons.isna()
        reasons[broken] = f"{rule.name}: {rule.reason}"
    for column in contract.unique:
        duplicated = frame[column].duplicated(keep="first")
        if seen_before is not None and len(frame):
            duplicated |= seen_before(column, frame[column])
        reasons[duplicated & reasons.isna()] = f"duplicate_{column}: another row already has this {column}"
    bad = reasons.notna()
    valid = frame[~bad].reset_index(drop=True)
    quarantined = quarantine_rows(frame[bad].set_axis(frame.index[bad] + first_row), reasons[bad], contract.name)
    if len(valid) == 0 and not contract.allow_empty and raise_if_empty:
        cause = "the input had no rows" if len(frame) == 0 else f"all {len(frame)} rows were quarantined"
        top = quarantined["reason"].value_counts().head(3).to_dict() if len(quarantined) else {}
        raise ContractViolation(f"{where or contract.name}: no valid rows left: {cause}. Top reasons: {top}")
    return valid, quarantined


def quarantine_rows(rows: pd.DataFrame, reasons: pd.Series, contract_name: str) -> pd.DataFrame:
    """Rows kept verbatim (as JSON) with the reason they were set aside."""
    records = rows.to_dict(orient="records")
    return pd.DataFrame(
        {
            "contract": [contract_name] * len(records),
            "reason": [str(r) for r in reasons],
            "row_index": [int(i) for i in rows.index],
            "row_json": [json.dumps(r, default=_jsonable, ensure_ascii=False) for r in records],
        }
    )


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
