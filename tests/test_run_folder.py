"""The run folder points at the published model (`model` symlink, or model.txt), and `loraflow ask RUN_DIR` finds it."""

import os

import pytest

from loraflow.cli import commands as cli
from loraflow.runs.summary import PublishSummary, RunSummary
from loraflow.runtime.run_folder import link_model, published_model_dir


@pytest.fixture
def published(tmp_path):
    """A run folder (summary.json only, as the flow writes it) and a model folder in the store."""
    model_dir = tmp_path / "store" / "publish" / "0123abcd" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    run_dir = tmp_path / "runs" / "demo" / "20261202T000000Z-local"
    run_dir.mkdir(parents=True)
    published_here = PublishSummary(gate_passed=True, adapter_dir=str(tmp_path / "adapter"), model_dir=str(model_dir))
    RunSummary(name="demo", run_dir=str(run_dir), store=str(tmp_path / "store"), publish=published_here).write(run_dir)
    return run_dir, model_dir


def test_run_folder_gets_a_model_link(published):
    run_dir, model_dir = published
    assert link_model(run_dir, model_dir) == run_dir / "model"
    assert (run_dir / "model").is_symlink() and (run_dir / "model" / "config.json").exists()
    assert link_model(run_dir, model_dir) == run_dir / "model"  # a re-link replaces the old one
    (run_dir / "summary.json").unlink()  # the link alone is enough
    assert published_model_dir(run_dir) == model_dir.resolve()
    assert published_model_dir(run_dir / "model") == run_dir / "model"


def test_run_folder_gets_model_txt_where_symlinks_fail(published, monkeypatch):
    run_dir, model_dir = published

    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    assert link_model(run_dir, model_dir) == run_dir / "model.txt"
    assert (run_dir / "model.txt").read_text().strip() == str(model_dir.resolve())
    (run_dir / "summary.json").unlink()
    assert published_model_dir(run_dir) == model_dir.resolve()


def test_ask_takes_the_run_folder_or_its_model_link(published, monkeypatch, capsys):
    run_dir, model_dir = published
    asked = []
    monkeypatch.setattr("loraflow.modeling.inference.ask", lambda folder, question, **kwargs: asked.append(folder) or iter(["ok"]))
    link_model(run_dir, model_dir)
    assert cli.main(["ask", str(run_dir), "hi"]) == 0
    assert cli.main(["ask", str(run_dir / "model"), "hi"]) == 0
    assert [os.path.realpath(folder) for folder in asked] == [str(model_dir.resolve())] * 2
    (run_dir / "model").unlink()  # no link: the summary says where the model is
    assert cli.main(["ask", str(run_dir), "hi"]) == 0 and os.path.realpath(asked[-1]) == str(model_dir.resolve())
    refused = PublishSummary(gate_passed=False, gate_reasons=["FAIL: fact accuracy"], adapter_dir=str(run_dir / "adapter"))
    RunSummary(name="demo", run_dir=str(run_dir), store=str(run_dir), publish=refused).write(run_dir)
    assert cli.main(["ask", str(run_dir), "hi"]) == 2
    assert "published no model" in capsys.readouterr().err

