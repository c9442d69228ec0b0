"""table_qa's config: what a user gets wrong is refused before any row is read, with its key and the fix
(`loraflow check` included); presets and their overrides."""

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from loraflow.cli.commands import main
from loraflow.config.pipeline import ConfigError, load_config
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.synthesizers.table_qa_options import TableQAOptions, preset_names
from tests.test_table_qa import options

REPO = Path(__file__).resolve().parents[1]
TEA_CONFIG = REPO / "configs" / "tea_catalog.yaml"


def write_config(folder: Path, table_qa: dict, gate: dict | None = None, source: str = "staff.csv") -> Path:
    """A config with one csv source and the given table_qa options (the csv is the staff table's header)."""
    (folder / "staff.csv").write_text("id,Name,Team,Room,Skills,Nickname\ns1,Ana,data,12,SQL,\n", encoding="utf-8")
    config = {"name": "t", "sources": [{"kind": "csv", "path": source}],
              "synthesize": {"kind": "table_qa", "table_qa": table_qa}}
    if gate is not None:
        config["eval"] = {"gate": gate}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def problems(tmp_path, table_qa: dict, gate: dict | None = None) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(write_config(tmp_path, table_qa, gate))
    message = str(error.value)
    assert message.splitlines()[0].endswith(f"{len(message.splitlines()) - 1} problem(s)")  # one line per problem
    return message


def with_kind(name: str, **changes) -> dict:
    kinds = options()["kinds"]
    kinds[name] = {**kinds[name], **changes}
    return options(kinds=kinds)


def test_a_valid_config_loads_and_checks(tmp_path, capsys):
    config = load_config(write_config(tmp_path, options()))
    assert list(config.synthesize.table_qa.kinds) == ["where", "skills"]
    assert main(["check", str(tmp_path / "config.yaml")]) == 0
    assert "synthesize=table_qa" in capsys.readouterr().out


def test_a_placeholder_that_is_no_field_names_the_key_and_the_closest_field(tmp_path):
    message = problems(tmp_path, with_kind("where", answers=["{name} sits in room {rooom}.", "{name}: {room}, {teem}"]))
    assert "synthesize.table_qa.kinds.where.answers.0: {rooom} is not a field -> did you mean {room}?" in message
    assert "synthesize.table_qa.kinds.where.answers.1: {teem} is not a field -> did you mean {team}?" in message
    assert "declare it under fields" in message


def test_duplicate_phrasings_are_refused_with_both_keys(tmp_path):
    message = problems(tmp_path, with_kind("where", heldout_questions=["where does  {name} SIT?"]))
    assert ("synthesize.table_qa.kinds.where.heldout_questions.0: duplicate phrasing, the same as "
            "kinds.where.questions.0") in message
    assert "reword or remove one" in message


def test_a_kind_without_a_held_out_phrasing_is_refused_only_when_the_gate_needs_one(tmp_path):
    load_config(write_config(tmp_path, options()))  # "skills" has none: fine while nothing asks for it
    message = problems(tmp_path, options(), gate={"min_heldout_fact_accuracy": 0.8})
    assert "synthesize.table_qa.kinds.skills.heldout_questions: none asked, but eval.gate.min_heldout_fact_accuracy" in message
    assert "kinds.where" not in message
    message = problems(tmp_path, options(heldout_per_row=0), gate={"min_heldout_fact_accuracy": 0.8})
    assert "kinds.where.heldout_questions" in message  # heldout_per_row: 0 asks none either


@pytest.mark.parametrize("change, expected", [
    ({"questions": ["Where does {name} sit, {nick}?"]}, "kinds.where.optional: 'nick' is named by a question"),
    ({"answers": ["{name} ({nick}) sits in room {room}."]}, "kinds.where.answers: every answer names an optional field"),
    ({"answers": ["Yes, {name}.", "{name} sits in room {room}."]}, "kinds.where.answers.0: states no field the question"),
    ({"answers": ["{name} sits in {room:>4}."]}, "kinds.where.answers.0: '{name} sits in {room:>4}.' has the placeholder"),
    ({"questions": ["Where is {name?"]}, "kinds.where.questions.0: 'Where is {name?' is not a valid template"),
    ({"optional": ["nik"]}, "kinds.where.optional.0: 'nik' is not a field"),
    ({"questions": ["  "]}, "kinds.where.questions.0: the phrasing is empty"),
])
def test_template_mistakes_each_get_their_key_and_fix(tmp_path, change, expected):
    message = problems(tmp_path, with_kind("where", **change))
    assert expected in message and "->" in message.split(expected, 1)[1].splitlines()[0]


def test_reserved_kind_names_and_missing_options(tmp_path):
    kinds = options()["kinds"]
    message = problems(tmp_path, options(kinds={"refusal": kinds["skills"]}))
    assert "synthesize.table_qa.kinds.refusal: the kind name 'refusal' is reserved" in message
    with pytest.raises(ValidationError, match="synthesize.table_qa is not set"):
        SynthesizeConfig(kind="table_qa")
    path = tmp_path / "mixed.yaml"
    (tmp_path / "staff.csv").write_text("id,Name\n1,Ana\n")
    path.write_text("name: t\nsources: [{kind: csv, path: staff.csv, synthesizer: table_qa}]\n")
    with pytest.raises(ConfigError, match="a source uses table_qa but it is not set"):
        load_config(path)


def test_loraflow_check_names_a_column_the_source_lacks(tmp_path, capsys):
    fields = {**options()["fields"], "room": {"column": "Rooms", "type": "count"}, "team": "Division"}
    path = write_config(tmp_path, options(fields=fields))
    load_config(path)  # the config itself is valid: only the source can say the column is not there
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "synthesize.table_qa.fields.room.column: 'Rooms' is not a column of source 'staff.csv' -> did you mean 'Room'?" in err
    assert "synthesize.table_qa.fields.team.column: 'Division' is not a column of source 'staff.csv'" in err
    # The same check for the other synthesizers: anime_qa's default columns on this table.
    path.write_text("name: t\nsources: [{kind: csv, path: staff.csv}]\n")
    assert main(["check", str(path)]) == 2
    assert "synthesize.anime_qa.columns.name: 'Name' is not" not in (err := capsys.readouterr().err)
    assert "synthesize.anime_qa.columns.id: 'anime_id' is not a column of source 'staff.csv'" in err


def test_presets_are_shipped_and_fields_can_be_remapped_one_at_a_time():
    assert {"anime_ko"} <= set(preset_names())
    korean = TableQAOptions(preset="anime_ko")
    assert list(korean.kinds) == ["overview", "production", "reception"]
    remapped = TableQAOptions(preset="anime_ko", id_column="mal_id", fields={"name": "title", "score": {"column": "rating_avg"}})
    assert remapped.fields["name"].column == "title" and remapped.id_column == "mal_id"
    assert remapped.fields["score"].column == "rating_avg" and remapped.fields["score"].type == "score"  # type kept
    assert remapped.fields["genres"] == korean.fields["genres"] and remapped.kinds == korean.kinds
    with pytest.raises(ValidationError, match=r"preset 'anime_jp' does not exist -> use one of \['anime_ko'"):
        TableQAOptions(preset="anime_jp")


def test_the_shipped_tea_config_checks(tmp_path, capsys):
    shutil.copytree(REPO / "data" / "sample", tmp_path / "data" / "sample")
    (tmp_path / "configs").mkdir()
    shutil.copy(TEA_CONFIG, tmp_path / "configs" / TEA_CONFIG.name)
    assert main(["check", str(tmp_path / "configs" / TEA_CONFIG.name)]) == 0
    (tmp_path / "data" / "sample" / "tea_catalog.csv").write_text("tea_id,Name\nT1,Sorrin Pearl\n")
    assert main(["check", str(tmp_path / "configs" / TEA_CONFIG.name)]) == 2
    assert "synthesize.table_qa.fields.water.column: 'Water (°C)' is not a column of source 'tea_catalog'" in capsys.readouterr().err
