"""JSON source on real files: arrays, JSON Lines, broken lines (set aside) and broken arrays (refused)."""

import json

import pytest

from loraflow.sources import SourceError, json_file


def read(tmp_path, name: str, text: str, **options):
    (tmp_path / name).write_text(text, encoding="utf-8")
    return json_file.read(json_file.Config(path=name, **options), tmp_path)


SHAREGPT = [
    {"id": "c1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"id": "c2", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
]


def test_json_array_keeps_nested_values(tmp_path):
    rows, rejected = read(tmp_path, "chats.json", json.dumps(SHAREGPT, indent=2))
    assert rejected == [] and rows.index.tolist() == [0, 1]
    assert rows["conversations"].tolist() == [row["conversations"] for row in SHAREGPT]


def test_jsonl_is_detected_and_blank_lines_are_not_rows(tmp_path):
    rows, rejected = read(tmp_path, "q.jsonl", '\n{"text": "a"}\n\n{"text": "b"}\r\n')
    assert rows["text"].tolist() == ["a", "b"] and rows.index.tolist() == [0, 1] and rejected == []


def test_broken_jsonl_lines_are_rejected_with_their_line_numbers_and_the_rest_is_read(tmp_path):
    text = '{"text": "a"}\n{"text": "b",}\n\n{"text": "c"}\n[1, 2]\n{"text": "d"\n'
    rows, rejected = read(tmp_path, "q.jsonl", text)
    assert rows["text"].tolist() == ["a", "c"] and rows.index.tolist() == [0, 2]
    assert [(r.row, r.reason.split(":")[0]) for r in rejected] == [
        (1, "invalid JSON at line 2"), (3, "line 5 is a list, not a JSON object"), (4, "invalid JSON at line 6"),
    ]
    assert rejected[0].text == '{"text": "b",}'


def test_broken_array_is_an_error_naming_file_line_and_column(tmp_path):
    with pytest.raises(SourceError) as error:
        read(tmp_path, "bad.json", '[\n  {"a": 1},\n  {"a": 2,}\n]')
    assert "bad.json" in str(error.value) and "line 3, column 11" in str(error.value)


def test_top_level_object_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SourceError, match=r"expected an array of objects"):
        read(tmp_path, "obj.json", '{"data": [1]}', lines=False)


def test_lines_option_overrides_the_guess(tmp_path):
    rows, rejected = read(tmp_path, "one.json", '[{"a": 1}]', lines=True)
    assert len(rows) == 0 and "line 1 is a list" in rejected[0].reason


def test_unknown_start_and_empty_file(tmp_path):
    with pytest.raises(SourceError, match=r"line 2 starts with 'x'"):
        read(tmp_path, "x.json", "\nx")
    with pytest.raises(SourceError, match=r"e\.json: the file is empty"):
        read(tmp_path, "e.json", "  \n")


def test_max_rows_counts_records_broken_or_not(tmp_path):
    rows, rejected = read(tmp_path, "q.jsonl", '{"t": 1}\nnot json\n{"t": 3}\n{"t": 4}\n', max_rows=3)
    assert rows.index.tolist() == [0, 2] and [r.row for r in rejected] == [1]
    rows, _ = read(tmp_path, "a.json", json.dumps([{"t": i} for i in range(5)]), max_rows=2)
    assert rows["t"].tolist() == [0, 1]


def test_wrong_encoding_is_refused_with_offset(tmp_path):
    (tmp_path / "k.jsonl").write_bytes('{"t": "한국어"}\n'.encode("cp949"))
    with pytest.raises(SourceError, match=r"k\.jsonl: not valid utf-8 at byte offset 7"):
        json_file.read(json_file.Config(path="k.jsonl"), tmp_path)
    rows, _ = json_file.read(json_file.Config(path="k.jsonl", encoding="cp949"), tmp_path)
    assert rows["t"].tolist() == ["한국어"]


def test_a_record_whose_field_has_another_kind_is_rejected_with_its_line_and_the_rest_is_read(tmp_path):
    text = ('{"instruction": "Say hi", "output": "Hi"}\n{"instruction": "Say bye", "output": "Bye"}\n'
            '{"instruction": ["a", "b"], "output": "x"}\n{"instruction": "Count", "output": "1 2 3"}\n')
    rows, rejected = read(tmp_path, "mixed.jsonl", text)
    assert rows["instruction"].tolist() == ["Say hi", "Say bye", "Count"] and rows.index.tolist() == [0, 1, 3]
    assert [(r.row, r.text) for r in rejected] == [(2, '{"instruction": ["a", "b"], "output": "x"}')]
    assert rejected[0].reason.startswith("line 3: field 'instruction' is list, but 3 other record(s) have text there")
    rows, rejected = read(tmp_path, "mixed.json", json.dumps([{"n": 1}, {"n": 2.5}, {"n": "three"}]))
    assert rows["n"].tolist() == [1, 2.5] and rejected[0].reason.startswith("array element 2: field 'n' is text")


def test_a_wrongly_typed_record_is_quarantined_by_ingest_and_the_source_goes_on(tmp_path):
    from loraflow.runtime.artifact_store import ArtifactStore
    from tasks.ingest import run_ingest

    (tmp_path / "mixed.jsonl").write_text('{"t": "a"}\n{"t": "b"}\n{"t": ["c"]}\n{"t": "d"}\n')
    store = ArtifactStore(tmp_path / "store")
    result = run_ingest(json_file.Config(path="mixed.jsonl"), store, tmp_path)
    assert (result.rows_in, result.rows_out, result.rows_quarantined) == (4, 3, 1)
    quarantine = store.read(result.quarantine)
    assert quarantine["row_index"].tolist() == [2] and quarantine["reason"].str.startswith("line 3: field 't' is list").all()
