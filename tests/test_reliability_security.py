"""Loading a dataset never executes code from it: a local hf_hub folder with a loading script is refused with
the fix, the script never runs (it would leave a marker file), and its data files load once pointed at."""

from pathlib import Path

import pytest

from loraflow.sources import SourceError, hf_hub

SCRIPT = '''
import pathlib
pathlib.Path(__file__).with_name("EXECUTED").write_text("this dataset script ran")
import datasets

class Evil(datasets.GeneratorBasedBuilder):
    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({"text": datasets.Value("string")}))

    def _split_generators(self, download_manager):
        return [datasets.SplitGenerator(name="train")]

    def _generate_examples(self):
        yield 0, {"text": "made by the script"}
'''


@pytest.mark.parametrize("with_data_files", [True, False])
def test_a_dataset_script_is_never_run(tmp_path, with_data_files):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil.py").write_text(SCRIPT)
    if with_data_files:
        (folder / "data").mkdir()
        (folder / "data" / "train.jsonl").write_text('{"text": "from the data file"}\n')

    with pytest.raises(SourceError, match=r"has a dataset loading script \(evil\.py\).*never runs code.*point `repo:`"):
        hf_hub.read(hf_hub.Config(repo="evil"), tmp_path)
    assert not (folder / "EXECUTED").exists()

    if with_data_files:
        rows = hf_hub.read(hf_hub.Config(repo="evil/data"), tmp_path)
        assert rows["text"].tolist() == ["from the data file"]
        assert not (folder / "EXECUTED").exists()


def test_sources_never_pass_trust_remote_code():
    source = (Path(__file__).resolve().parent.parent / "loraflow" / "sources" / "hf_hub.py").read_text()
    assert "trust_remote_code" not in source
