"""Bad input shapes: one error that lists every column problem with its fix; empty input (or input that a
stage empties) fails at that stage, naming the cause, and training never starts."""

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from data_contracts import CONVERSATIONS, RAW, TOKENS, ContractViolation, check_structure
from loraflow.runtime.stage_output import read_input
from loraflow.runtime.artifact_store import ArtifactStore
from tests.tiny_llama import build_tiny_llama

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "data" / "sample" / "anime_catalog.csv"


def conversations_frame() -> pd.DataFrame:
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return pd.DataFrame({"id": ["a", "b"], "messages": [good, good], "kind": ["k", "k"], "source": ["s", "s"],
                         "source_row": [0, 1], "source_id": ["1", "2"], "phrasing_set": ["train", "train"],
                         "facts": [[], []]})


# ---- missing, extra and wrongly typed columns: one error


def test_missing_extra_and_wrongly_typed_columns_are_reported_together_with_their_fixes():
    frame = conversations_frame().drop(columns=["facts", "source"]).assign(
        notes=["x", "y"], source_row=["0", "1"], length=[1.5, 2.5])
    frame.loc[1, "id"] = None
    with pytest.raises(ContractViolation) as error:
        check_structure(frame, CONVERSATIONS, where="catalog.parquet")
    lines = str(error.value).splitlines()
    assert lines[0] == "catalog.parquet: 6 contract failure(s) against 'conversations' v2:", lines
    assert lines[1:] == [
        "  missing column 'source' -> add the column, or map the config's column names to the ones in your data",
        "  missing column 'facts' -> add the column, or map the config's column names to the ones in your data",
        "  unexpected column 'notes' -> drop the column, or declare it in the 'conversations' contract "
        "(data_contracts/conversations.py)",
        "  unexpected column 'length' -> drop the column, or declare it in the 'conversations' contract "
        "(data_contracts/conversations.py)",
        "  column 'source_row': wrong type, expected int64, found str -> convert the column to the expected type",
        "  column 'id' row 1: not_nullable (found nan) -> fill or remove the empty values",
    ], lines


def test_an_artifact_read_with_the_wrong_columns_names_the_file(tmp_path):
    store = ArtifactStore(tmp_path)
    frame = conversations_frame().drop(columns=["facts"]).assign(extra=[1, 2], source_row=[0.0, 1.0])
    ref = store.write(frame, stage="synthesize", contract="conversations", schema_version=1, config_hash="h")
    with pytest.raises(ContractViolation) as error:
        read_input(store, ref, CONVERSATIONS)
    message = str(error.value)
    assert message.startswith(f"{ref.uri}: 3 contract failure(s)")
    for expected in ("missing column 'facts'", "unexpected column 'extra'",
                     "column 'source_row': wrong type, expected int64, found float64 ->"):
        assert expected in message, message


def test_an_empty_frame_with_wrong_columns_lists_missing_and_unexpected():
    frame = pd.DataFrame(columns=["id", "input_ids", "surprise"])
    with pytest.raises(ContractViolation) as error:
        check_structure(frame, TOKENS)
    message = str(error.value)
    assert "missing column 'labels'" in message and "unexpected column 'surprise'" in message
    assert "missing column 'answer_start'" not in message  # optional columns are not required


def test_raw_rows_keep_their_own_columns():
    check_structure(pd.DataFrame({"_source": ["s"], "_row": [0], "Name": ["x"], "anything": [1.5]}), RAW)


# ---- empty input, or input a stage empties: the flow fails at that stage and never trains


def run_finetune(tmp_path: Path, catalog: Path, **sections):
    from flows.finetune import finetune_flow
    from loraflow.config.pipeline import PipelineConfig

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        build_tiny_llama(model_dir)
    config = PipelineConfig.model_validate({
        "name": "empty", "store": str(tmp_path / "store"), "runs_dir": str(tmp_path / "runs"),
        "sources": [{"kind": "csv", "name": "catalog", "path": str(catalog)}],
        "synthesize": {"anime_qa": {"trained_phrasings": 1, "heldout_phrasings": 1, "max_synopsis_words": 8}},
        "model": {"base": str(model_dir)}, "train": {"max_steps": 1}, **sections,
    })
    return finetune_flow(config, return_state=True)


def task_run_states(flow_state) -> dict[str, str]:
    """Task name -> final state name, for the task runs of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
            return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}

    return asyncio.run(read())


def catalog_rows(tmp_path: Path, rows: pd.DataFrame) -> Path:
    path = tmp_path / "catalog.csv"
    rows.to_csv(path, index=False)
    return path


CATALOG_ROWS = pd.read_csv(CATALOG, dtype=str, keep_default_na=False).head(3)


@pytest.mark.parametrize("case, rows, sections, failed_stage, cause", [
    ("header only", CATALOG_ROWS.head(0), {}, "ingest", "source 'catalog': nothing to ingest: it has no data rows"),
    ("every fact unknown", CATALOG_ROWS.assign(**{c: "UNKNOWN" for c in CATALOG_ROWS.columns if c != "anime_id"}), {},
     "synthesize", "synthesize (anime_qa): all 3 input rows were skipped"),
    ("every example too long", CATALOG_ROWS, {"tokenize": {"max_length": 16, "truncation": "drop"}},
     "tokenize", "stage 'tokenize': no rows left: all 33 input rows were set aside (33 x too_long: more than "
                 "max_length=16 tokens (truncation=drop))"),
    ("nothing left to train on", CATALOG_ROWS, {"tokenize": {"validation_fraction": 0.99}},
     "preflight", "the train split is empty"),
])
def test_empty_input_fails_at_the_stage_that_emptied_it_and_never_trains(prefect_api, tmp_path, case, rows, sections,
                                                                         failed_stage, cause):
    state = run_finetune(tmp_path, catalog_rows(tmp_path, rows), **sections)
    assert state.is_failed(), case
    with pytest.raises(Exception) as error:
        state.result()
    assert cause in str(error.value), str(error.value)
    states = task_run_states(state)
    assert states.get(failed_stage) == "Failed", states
    assert [name for name, value in states.items() if value == "Failed"] == [failed_stage], states
    assert "train" not in states and "evaluate" not in states and "publish" not in states, states
