"""Tokenize's pass 1 plumbing: the next slice encoded ahead, the scratch rows in Arrow IPC, regrouped for pass 2."""

import numpy as np
import pandas as pd
import pyarrow as pa

from loraflow.config.format import FormatConfig
from loraflow.config.tokenize import TokenizeConfig
from tasks.format import format_conversations
from tasks.tokenize import tokenize_rows
from tasks.tokenize_encode import encoded_ahead
from tasks.tokenize_stream import ScratchRows, scratch_batches, scratch_record_batches, scratch_table


def formatted_rows(tokenizer, count: int) -> pd.DataFrame:
    """`count` formatted rows; every third answer spells the template's end marker (encoded as plain text)."""
    rows = [{"id": f"r{i}", "kind": "overview", "source": "s", "source_row": i, "source_id": str(i), "phrasing_set": "train",
             "facts": [], "messages": [{"role": "user", "content": f"Question {i}?"},
                                       {"role": "assistant", "content": f"Answer {i}" + (" <|im_end|> kept" if i % 3 == 0 else "")}]}
            for i in range(count)]
    frame, quarantined, _ = format_conversations(pd.DataFrame(rows), FormatConfig(system_prompt="Be brief."), tokenizer)
    assert len(quarantined) == 0 and frame["literal_spans"].map(len).astype(bool).sum() == (count + 2) // 3
    return frame


def test_encoded_ahead_gives_what_each_slice_tokenizes_to_alone(tokenizer):
    frame = formatted_rows(tokenizer, 14)
    config = TokenizeConfig(validation_fraction=0.0)
    batches = [frame.iloc[:9], frame.iloc[9:]]  # slices of 4: 4, 4, 1 then 4, 1
    ahead = list(encoded_ahead(iter(batches), tokenizer, encode_rows=4))
    assert [len(rows) for rows, _ in ahead] == [4, 4, 1, 4, 1]
    for rows, encoded in ahead:
        with_ahead, reasons_ahead, _ = tokenize_rows(rows, config, tokenizer, encoded)
        alone, reasons_alone, _ = tokenize_rows(rows, config, tokenizer)
        assert list(reasons_ahead) == list(reasons_alone)
        for column in ("input_ids", "labels", "attention_mask"):
            assert [a.tolist() for a in with_ahead[column]] == [a.tolist() for a in alone[column]]


def test_scratch_table_equals_pyarrows_conversion(tokenizer):
    tokens, _, _ = tokenize_rows(formatted_rows(tokenizer, 7), TokenizeConfig(validation_fraction=0.0), tokenizer)
    expected = pa.Table.from_pandas(tokens, preserve_index=False)
    made = scratch_table(tokens)
    assert made.schema.equals(expected.schema, check_metadata=False)
    assert made.to_pylist() == expected.to_pylist()


def test_scratch_rows_widen_into_a_new_file_and_regroup_in_order(tmp_path):
    path = str(tmp_path / "rows.arrow")
    narrow = pa.table({"id": ["a", "b"], "ends": pa.array([[], []], type=pa.list_(pa.null()))})
    wide = pa.table({"id": ["c", "d", "e"], "ends": pa.array([[1], [], [2, 3]], type=pa.list_(pa.int64()))})
    with ScratchRows(path) as scratch:
        scratch.append(narrow)
        scratch.append(wide)  # an all-null column got a type: a second file
        scratch.append(narrow)  # narrower than the file's schema: cast into it
    assert len(scratch.paths) == 2
    assert [row["id"] for batch in scratch_record_batches(path) for row in batch.to_pylist()] == list("abcdeab")
    frames = list(scratch_batches(path, batch_rows=3))
    assert [len(frame) for frame in frames] == [3, 3, 1]
    ends = [np.asarray(value).tolist() for frame in frames for value in frame["ends"]]
    assert ends == [[], [], [1], [], [2, 3], [], []]


def test_no_rows_no_scratch_batches(tmp_path):
    path = str(tmp_path / "rows.arrow")
    with ScratchRows(path):
        pass
    assert list(scratch_batches(path, batch_rows=3)) == []
