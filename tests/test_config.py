"""The pipeline config: YAML loading, strictness, every problem reported with key and fix."""

import json
from pathlib import Path

import pytest

from loraflow.cli.commands import main
from loraflow.config.pipeline import ConfigError, PipelineConfig, config_hash, load_config


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, "name: demo\nsources:\n  - {kind: csv, path: rows.csv}\n"))
    assert config.synthesize.kind == "anime_qa"
    assert config.format.template == "chat_template"
    assert config.train.target_modules == "all-linear"
    assert config.model.trust_remote_code is False
    assert config.resolve("rows.csv") == tmp_path / "rows.csv"


def test_every_problem_is_listed_with_key_and_fix(tmp_path):
    path = write(tmp_path, (
        "name: demo\n"
        "sources:\n  - {kind: csv, path: a.csv, encodng: utf-8}\n  - {kind: ftp, path: b}\n"
        "format: {template: mistral}\n"
        "train: {lora_r: 0, learning_rte: 1}\n"
    ))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    for key in ("sources.0.csv.encodng", "sources.1", "format.template", "train.lora_r", "train.learning_rte"):
        assert key in message
    assert "remove it or check its spelling" in message
    assert "use one of the allowed values" in message


def test_a_misspelled_key_gets_did_you_mean_at_every_depth(tmp_path):
    path = write(tmp_path, (
        "name: demo\ntokenise: {max_length: 10}\n"
        "sources:\n  - {kind: csv, path: a.csv, encodng: utf-8}\n  - {kind: json, path: b.jsonl, max_row: 3}\n"
        "synthesize: {anime_qa: {trained_phrasing: 2, columns: {nmae: Title}}}\n"
        "train: {learning_rte: 1, zzzz: 1}\n"
    ))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    lines = str(error.value).splitlines()
    expected = {"tokenise": "tokenize", "sources.0.csv.encodng": "encoding", "sources.1.json.max_row": "max_rows",
                "synthesize.anime_qa.trained_phrasing": "trained_phrasings", "synthesize.anime_qa.columns.nmae": "name",
                "train.learning_rte": "learning_rate"}
    for key, meant in expected.items():
        assert any(line.startswith(f"  {key}:") and f"did you mean `{meant}`?" in line for line in lines), (key, lines)
    assert any(line.startswith("  train.zzzz:") and "did you mean" not in line for line in lines)


def test_cross_field_rules_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs model.revision pinned"):
        load_config(write(tmp_path, "name: d\nsources: [{kind: csv, path: a.csv}]\nmodel: {trust_remote_code: true}\n"))
    with pytest.raises(ConfigError, match="needs publish.repo_id"):
        load_config(write(tmp_path, "name: d\nsources: [{kind: csv, path: a.csv}]\npublish: {target: hf_hub}\n"))


def test_duplicate_source_names_refused(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        load_config(write(tmp_path, "name: d\nsources: [{kind: csv, path: x/a.csv}, {kind: csv, path: y/a.csv}]\n"))


def test_every_field_has_a_description():
    schema = json.dumps(PipelineConfig.model_json_schema())
    defs = PipelineConfig.model_json_schema()["$defs"]
    missing = [f"{model}.{name}" for model, body in defs.items() for name, field in body.get("properties", {}).items()
               if "description" not in field and name != "kind"]
    assert not missing, missing
    assert "all-linear" in schema


def test_config_hash_changes_with_values():
    base = PipelineConfig(name="a", sources=[{"kind": "csv", "path": "a.csv"}])
    changed = base.model_copy(update={"name": "b"})
    assert config_hash(base) == config_hash(base.model_copy())
    assert config_hash(base) != config_hash(changed)


def test_cli_check(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("x\n1\n")
    # (the synthesizer must find its columns in the file: the default anime_qa would not, and check says so)
    good = write(tmp_path, "name: d\nsources: [{kind: csv, path: a.csv}]\nsynthesize: {kind: text, text: {column: x}}\n")
    assert main(["check", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: d\nsources: [{kind: csv, path: missing.csv}]\n")
    assert main(["check", str(bad)]) == 2
    assert "sources.0.path" in capsys.readouterr().err


def test_paths_confined_to_data_roots(tmp_path):
    from loraflow.config.pipeline import check_confinement

    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "rows.csv").write_text("x\n1\n")
    (tmp_path / "link.csv").symlink_to("/etc/passwd")
    config = PipelineConfig(
        name="c", base_dir=str(inside), store=str(inside / "store"), runs_dir=str(inside / "runs"),
        sources=[{"kind": "csv", "path": "rows.csv"}],
    )
    check_confinement(config, None)  # no roots set: nothing to confine (local CLI use)
    check_confinement(config, str(inside))
    escaping = config.model_copy(update={"sources": [
        config.sources[0].model_copy(update={"path": "../../../../etc/passwd"}),
        config.sources[0].model_copy(update={"path": str(tmp_path / "link.csv"), "name": "link"}),
    ]})
    with pytest.raises(ConfigError) as error:
        check_confinement(escaping, f"{tmp_path / 'elsewhere'}:{inside}")
    assert "sources.0.path" in str(error.value) and "sources.1.path" in str(error.value)
    with pytest.raises(ConfigError, match="store"):
        check_confinement(config.model_copy(update={"store": "/tmp/outside-store"}), str(inside))


def test_the_deployment_form_names_every_source_kind():
    """The Prefect UI's source-kind selector shows each member's schema title: they must say what each kind is."""
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune_flow

    schema = parameter_schema(finetune_flow).model_dump()  # what `prefect deploy` stores as parameter_openapi_schema
    definitions = schema["definitions"]
    sources = definitions["PipelineConfig"]["properties"]["sources"]["items"]
    titles = sorted(definitions[member["$ref"].rsplit("/", 1)[-1]]["title"] for member in sources["oneOf"])
    assert titles == ["CSV file", "Hugging Face dataset", "JSON / JSONL file", "Parquet file", "SQL query"]


def test_a_source_without_path_or_repo_gets_its_default_name_and_is_confined(tmp_path):
    import sqlite3

    from loraflow.config.pipeline import confinement_problems

    sqlite3.connect(tmp_path / "rows.db").close()
    config = PipelineConfig(name="c", base_dir=str(tmp_path / "configs"), store=str(tmp_path / "store"),
                            runs_dir=str(tmp_path / "runs"),
                            sources=[{"kind": "sql", "url": "sqlite:///../rows.db", "query": "SELECT 1 AS text"}])
    [problem] = confinement_problems(config, [str(tmp_path / "configs"), str(tmp_path / "store"), str(tmp_path / "runs")])
    assert problem.startswith("  sources.0.url:") and "rows.db" in problem
    assert confinement_problems(config, [str(tmp_path)]) == []


def test_cli_check_runs_each_sources_own_check(tmp_path, capsys):
    import sqlite3

    from loraflow.cli.commands import main

    with sqlite3.connect(tmp_path / "rows.db") as connection:
        connection.execute("CREATE TABLE rows (text TEXT)")
    connection.close()
    config = tmp_path / "sql.yaml"
    config.write_text("name: d\nsources:\n  - {kind: sql, url: 'sqlite:///rows.db', table: rows}\n"
                      "  - {kind: sql, url: 'sqlite:///gone.db', table: rows, name: gone}\n"
                      "  - {kind: sql, url: 'sqlite:///rows.db', table: nope, name: nope}\n")
    assert main(["check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "sources.1.url: " in err and "gone.db: does not exist" in err
    assert "sources.2.url: " in err and "no such table: nope" in err
    assert not (tmp_path / "gone.db").exists()


def test_the_dpo_demo_reuses_the_demos_sft_adapter():
    """configs/anime_demo_dpo.yaml is the demo plus DPO: run after the demo in the same folder, its SFT adapter is
    a cache hit only if everything that makes the tokens and the adapter (sources, synthesize, format, tokenize,
    model, train, prepare) is the demo's. It once kept `tokenize.validation_fraction: 0.1` after the demo dropped
    it, so the DPO run trained its own SFT adapter on other tokens (docs/preference.md)."""
    repo = Path(__file__).resolve().parents[1]
    demo, dpo = (load_config(repo / "configs" / name).model_dump(mode="json")
                 for name in ("anime_demo.yaml", "anime_demo_dpo.yaml"))
    after_sft = {"name", "preference", "eval", "publish", "cost", "locks"}  # the run's label and what follows SFT
    differing = sorted(key for key in demo if key not in after_sft and demo[key] != dpo[key])
    assert differing == [], f"the DPO demo's {differing} differ from the demo's: it would train another SFT adapter"
    assert dpo["preference"]["enabled"] and not demo["preference"]["enabled"]
