"""The sql source against a real PostgreSQL (Debian's, started as tests/postgres.py does, with a password over TCP)
and its password from a Prefect Secret block on a real Prefect server: the demo's rows from a table give the same
tokens as the demo's CSV, a changed row re-ingests on the next run, an unchanged database is all cached."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from loraflow.sources import check_source, source_fingerprint, source_locations, sql
from tests.postgres import postgres_bin, running_postgres
from tests.test_server import free_port

pytest.importorskip("psycopg")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(postgres_bin() is None, reason="Debian's postgresql is not installed")]

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "Hunter2Sentinel-pg"
DEMO_ROWS = 8  # configs/anime_demo.yaml: max_rows of the catalog


def catalog_rows() -> pd.DataFrame:
    """The demo catalog's first rows, as its CSV source reads them (every value text, nothing as NaN)."""
    rows = pd.read_csv(REPO / "data/sample/anime_catalog.csv", dtype=str, keep_default_na=False).head(DEMO_ROWS)
    return rows.assign(row_no=range(len(rows)))


def admin_engine(url: str):
    import sqlalchemy as sa

    return sa.create_engine(sa.engine.make_url(url).set(password=PASSWORD))


@pytest.fixture(scope="module")
def database():
    """A PostgreSQL URL (no password in it) whose `anime_catalog` table holds the demo's catalog rows."""
    with running_postgres(free_port(), password=PASSWORD) as asyncpg_url:
        url = asyncpg_url.replace("postgresql+asyncpg://", "postgresql+psycopg://")
        engine = admin_engine(url)
        catalog_rows().to_sql("anime_catalog", engine, index=False)
        engine.dispose()
        yield url


def demo_config(tmp_path: Path, catalog_source: dict):
    """configs/anime_demo.yaml with its catalog source replaced, store and runs in `tmp_path`."""
    from loraflow.config.pipeline import PipelineConfig

    settings = yaml.safe_load((REPO / "configs/anime_demo.yaml").read_text())
    settings["sources"][0] = catalog_source
    return PipelineConfig(**settings, base_dir=str(REPO / "configs"), store=str(tmp_path / "store"),
                          runs_dir=str(tmp_path / "runs"))


def table_query() -> str:
    """The catalog's columns (not row_no) in the CSV's order."""
    columns = ", ".join(f'"{column}"' for column in catalog_rows().columns if column != "row_no")
    return f"SELECT {columns} FROM anime_catalog ORDER BY row_no"


def test_the_demo_from_a_postgresql_table_then_fresh_and_cached(database, prefect_api, tmp_path, monkeypatch):
    from flows.prepare import prepare_flow

    monkeypatch.setenv("CATALOG_DB_PASSWORD", PASSWORD)
    postgres_source = {"kind": "sql", "name": "anime_catalog", "url": database, "password_env": "CATALOG_DB_PASSWORD",
                       "query": table_query()}
    from_csv = prepare_flow(demo_config(tmp_path / "csv", yaml.safe_load((REPO / "configs/anime_demo.yaml").read_text())["sources"][0]))
    first = prepare_flow(demo_config(tmp_path, postgres_source))
    assert first["sources"][0]["rows"] == DEMO_ROWS and first["sources"][0]["location"] == database
    assert first["tokens"]["sha256"] == from_csv["tokens"]["sha256"]  # the same training data, byte for byte

    again = prepare_flow(demo_config(tmp_path, postgres_source))
    assert again["all_cached"] and again["tokens"]["sha256"] == first["tokens"]["sha256"]

    with admin_engine(database).begin() as connection:
        connection.exec_driver_sql("UPDATE anime_catalog SET \"Studios\" = 'Kazeno Works' WHERE row_no = 0")
    changed = prepare_flow(demo_config(tmp_path, postgres_source))
    assert not changed["stages"]["ingest:anime_catalog"]["cached"]
    assert changed["stages"]["ingest:general_replay"]["cached"]  # the other source is untouched
    assert changed["sources"][0]["fingerprint"] != first["sources"][0]["fingerprint"]
    assert changed["tokens"]["sha256"] != first["tokens"]["sha256"]


def test_the_database_refuses_a_connection_without_the_password(database, tmp_path):
    [problem] = check_source(sql.Config(url=database, table="anime_catalog"), tmp_path)
    assert "password" in problem and "check `url:`" in problem


def test_the_password_from_a_prefect_secret_block_on_a_real_server(database, tmp_path):
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from loraflow.ops.server import LocalPrefect

    local = LocalPrefect(port=free_port(), home=tmp_path / "home", log_dir=tmp_path / "logs")
    with local, temporary_settings(updates={PREFECT_API_URL: local.api_url}):
        Secret(value=PASSWORD).save("catalog-db-password")
        Secret(value="not-the-password").save("stale-db-password")
        source = sql.Config(url=database, password_secret="catalog-db-password", query=table_query())
        rows = sql.read(source, tmp_path)
        assert rows["Name"].tolist() == catalog_rows()["Name"].tolist() and len(rows.columns) == 23
        assert check_source(source, tmp_path) == []
        shown = [source.model_dump_json(), source_fingerprint(source, tmp_path),
                 *(location.address for location in source_locations(source, tmp_path))]
        assert not any(PASSWORD in text for text in shown)

        [wrong] = check_source(source.model_copy(update={"password_secret": "stale-db-password"}), tmp_path)
        assert "password authentication failed" in wrong and "not-the-password" not in wrong
        [missing] = check_source(source.model_copy(update={"password_secret": "no-such-block"}), tmp_path)
        assert "Prefect Secret block 'no-such-block'" in missing and "prefect block create secret" in missing
