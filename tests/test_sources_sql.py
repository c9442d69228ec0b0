"""sql source on real SQLite database files made here: types, streaming, freshness, check, confinement, secrets."""

import logging
import sqlite3

import pytest
from pydantic import ValidationError

from loraflow.config.pipeline import ConfigError, PipelineConfig, check_confinement, load_config
from loraflow.runtime.artifact_store import ArtifactStore
from tasks.ingest import ingest_frame, run_ingest
from loraflow.sources import SourceError, check_source, source_fingerprint, source_locations, source_name, sql


def make_database(path, rows=(("Alpha", 12, 7.5), ("Beta", 24, None), ("Gamma", 1, 9.0))):
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE shows (title TEXT, episodes INTEGER, score REAL)")
        connection.executemany("INSERT INTO shows VALUES (?, ?, ?)", rows)
    return path


def test_reads_a_table_or_a_query_with_the_database_types_in_chunks(tmp_path):
    make_database(tmp_path / "catalog.db")
    rows = sql.read(sql.Config(url="sqlite:///catalog.db", table="shows", chunk_rows=2), tmp_path)
    assert rows["title"].tolist() == ["Alpha", "Beta", "Gamma"]
    assert str(rows["episodes"].dtype) == "int64" and str(rows["score"].dtype) == "float64"
    query = sql.Config(url="sqlite:///catalog.db", query="SELECT title FROM shows WHERE episodes > 5 ORDER BY title DESC")
    assert sql.read(query, tmp_path)["title"].tolist() == ["Beta", "Alpha"]
    limited = sql.read(sql.Config(url="sqlite:///catalog.db", table="shows", chunk_rows=1, max_rows=2), tmp_path)
    assert limited["title"].tolist() == ["Alpha", "Beta"]


def test_default_name_and_location_come_from_the_source_not_from_field_names(tmp_path):
    make_database(tmp_path / "catalog.db")
    table = sql.Config(url="sqlite:///catalog.db", table="shows")
    query = sql.Config(url="sqlite:///catalog.db", query="SELECT * FROM shows")
    assert source_name(table) == "shows" and source_name(query) == "catalog.db"
    rows, _ = ingest_frame(query, tmp_path)
    assert set(rows["_source"]) == {"catalog.db"}
    [location] = source_locations(table, tmp_path)
    assert location.address == "sqlite:///catalog.db" and location.local == tmp_path / "catalog.db"
    remote = sql.Config(url="postgresql+psycopg://loader@db.internal:5432/catalog", password_env="PGPASS", query="SELECT 1")
    assert [(l.address, l.local) for l in source_locations(remote, tmp_path)] == [("postgresql+psycopg://loader@db.internal:5432/catalog", None)]


def test_a_changed_row_changes_the_fingerprint_an_unchanged_database_does_not(tmp_path):
    database = make_database(tmp_path / "catalog.db")
    source = sql.Config(url="sqlite:///catalog.db", table="shows")
    cheap = sql.Config(url="sqlite:///catalog.db", table="shows", fingerprint_query="SELECT count(*), sum(episodes) FROM shows")
    before, cheap_before = source_fingerprint(source, tmp_path), source_fingerprint(cheap, tmp_path)
    assert source_fingerprint(source, tmp_path) == before  # reading does not change it
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE shows SET episodes = 13 WHERE title = 'Alpha'")
    assert source_fingerprint(source, tmp_path) != before
    assert source_fingerprint(cheap, tmp_path) != cheap_before


def test_a_changed_row_reingests_and_an_unchanged_database_is_a_cache_hit(prefect_api, tmp_path):
    from flows.prepare import prepare_flow

    database = make_database(tmp_path / "catalog.db", rows=[(f"Show {n}", n, 1.0) for n in range(6)])
    (tmp_path / "config.yaml").write_text(
        f"name: sql-fresh\nstore: {tmp_path / 'store'}\nruns_dir: {tmp_path / 'runs'}\n"
        "sources:\n  - {kind: sql, url: 'sqlite:///catalog.db', query: 'SELECT title AS text FROM shows ORDER BY episodes'}\n"
        "synthesize: {kind: text}\n"
    )
    prepare = lambda: prepare_flow(load_config(tmp_path / "config.yaml"))  # noqa: E731
    first, again = prepare(), prepare()
    assert not first["stages"]["ingest:catalog.db"]["cached"] and again["all_cached"]
    assert again["sources"][0]["location"] == "sqlite:///catalog.db"
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE shows SET title = 'Renamed' WHERE episodes = 3")
    changed = prepare()
    assert not changed["stages"]["ingest:catalog.db"]["cached"]
    assert changed["sources"][0]["fingerprint"] != first["sources"][0]["fingerprint"]


def test_check_reports_a_missing_database_a_missing_table_and_a_bad_query(tmp_path):
    make_database(tmp_path / "catalog.db")
    assert check_source(sql.Config(url="sqlite:///catalog.db", table="shows"), tmp_path) == []
    [missing] = check_source(sql.Config(url="sqlite:///gone.db", table="shows"), tmp_path)
    assert "gone.db: does not exist" in missing and "url:" in missing
    assert not (tmp_path / "gone.db").exists()  # read-only: never creates an empty database
    [no_table] = check_source(sql.Config(url="sqlite:///catalog.db", table="episodes"), tmp_path)
    assert "no such table: episodes" in no_table and "fix `table:`" in no_table
    [bad_query] = check_source(sql.Config(url="sqlite:///catalog.db", query="SELECT nope FROM shows"), tmp_path)
    assert "no such column: nope" in bad_query and "fix `query:`" in bad_query
    with pytest.raises(SourceError, match="gone.db: does not exist"):
        sql.read(sql.Config(url="sqlite:///gone.db", table="shows"), tmp_path)


def test_a_sqlite_database_outside_the_data_roots_is_refused(tmp_path):
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    make_database(outside / "secret.db")
    config = PipelineConfig(name="c", base_dir=str(inside), store=str(inside / "store"), runs_dir=str(inside / "runs"),
                            sources=[{"kind": "sql", "url": "sqlite:///../elsewhere/secret.db", "table": "shows"}])
    with pytest.raises(ConfigError, match=r"sources\.0\.url: .*secret\.db is outside the allowed data roots"):
        check_confinement(config, str(inside))
    check_confinement(config, f"{inside}:{outside}")


def test_a_password_in_the_url_is_refused_without_showing_it(tmp_path):
    with pytest.raises(ValidationError) as error:
        sql.Config(url="postgresql://loader:Hunter2Sentinel@db/catalog", table="shows")
    assert "password" in str(error.value) and "Hunter2Sentinel" not in str(error.value)
    (tmp_path / "config.yaml").write_text("name: c\nsources:\n  - {kind: sql, url: 'postgresql://u:Hunter2Sentinel@db/x', table: t}\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "config.yaml")
    assert "password_env" in str(error.value) and "Hunter2Sentinel" not in str(error.value)
    with pytest.raises(ValidationError, match="exactly one of `table:`"):
        sql.Config(url="sqlite:///x.db")


def test_the_password_from_the_environment_reaches_no_log_artifact_or_summary(tmp_path, monkeypatch, caplog):
    make_database(tmp_path / "catalog.db")
    monkeypatch.setenv("CATALOG_DB_PASSWORD", "Hunter2Sentinel")
    source = sql.Config(url="sqlite:///catalog.db", table="shows", password_env="CATALOG_DB_PASSWORD")
    store = ArtifactStore(tmp_path / "store")
    with caplog.at_level(logging.DEBUG):
        run_ingest(source, store, tmp_path)
    shown = [source.model_dump_json(), source_fingerprint(source, tmp_path), caplog.text,
             *(l.address for l in source_locations(source, tmp_path))]
    assert not any("Hunter2Sentinel" in text for text in shown)
    assert not any(b"Hunter2Sentinel" in path.read_bytes() for path in (tmp_path / "store").rglob("*") if path.is_file())
    monkeypatch.delenv("CATALOG_DB_PASSWORD")
    remote = sql.Config(url="postgresql://loader@127.0.0.1:9/catalog", password_env="CATALOG_DB_PASSWORD", table="shows")
    [problem] = check_source(remote, tmp_path)
    assert "environment variable 'CATALOG_DB_PASSWORD' is not set" in problem


def test_a_missing_driver_or_dialect_is_a_check_problem_with_its_fix(tmp_path):
    [driver] = check_source(sql.Config(url="postgresql+psycopg://loader@127.0.0.1:9/catalog", table="shows"), tmp_path)
    assert "not installed" in driver or "connection" in driver.lower() or "connect" in driver.lower()
    [dialect] = check_source(sql.Config(url="nosuchdb://loader@host/catalog", table="shows"), tmp_path)
    assert "no dialect 'nosuchdb'" in dialect


def test_a_password_in_the_url_is_not_echoed_by_the_pipeline_config_either():
    with pytest.raises(ValidationError) as error:
        PipelineConfig(name="c", sources=[{"kind": "sql", "url": "postgresql://u:Hunter2Sentinel@db/x", "table": "t"}])
    assert "password_env" in str(error.value) and "Hunter2Sentinel" not in str(error.value)
