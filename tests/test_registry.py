"""Champion and challenger: numbered versions of a model name, promote and rollback with who and why, through the
real `loraflow` CLI on a store folder (the flow that writes versions: tests/test_finetune_flow.py)."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from loraflow.cli.commands import main
from loraflow.publishing.registry import (RegistryError, add_version, champion, history, move_champion, registry_root,
                                          rollback_target, versions)
from loraflow.runtime.code_version import code_version


def published(root, name, count):
    for index in range(count):
        number = add_version(root, name, {"model_dir": f"/models/{index + 1}", "published_at": 1_800_000_000 + index,
                                          "metrics": {"fact_accuracy": 0.5 + index / 10}, "code": code_version()})
        move_champion(root, name, number, action="publish", why="passed the gate", by="gate")


def test_versions_are_numbered_and_the_last_publish_is_the_champion(tmp_path):
    root = registry_root(tmp_path)
    published(root, "anime", 3)
    assert [v["version"] for v in versions(root, "anime")] == [1, 2, 3]
    assert champion(root, "anime")["version"] == 3 and champion(root, "anime")["model_dir"] == "/models/3"
    assert [(h["action"], h["version"], h["from_version"]) for h in history(root, "anime")] == [
        ("publish", 1, None), ("publish", 2, 1), ("publish", 3, 2)]


def test_two_publishes_at_once_get_two_numbers(tmp_path):
    root = registry_root(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda i: add_version(root, "anime", {"i": i}), range(16)))
    assert sorted(numbers) == list(range(1, 17))
    assert sorted(v["i"] for v in versions(root, "anime")) == list(range(16))


def test_rollback_steps_back_through_the_champions_and_records_who_and_why(tmp_path, capsys):
    root = registry_root(tmp_path)
    published(root, "anime", 3)
    store = ["--store", str(tmp_path)]
    assert main(["rollback", "anime", "--why", "answers got worse", "--by", "ana", *store]) == 0
    assert champion(root, "anime")["version"] == 2 and "version 2 is the champion (was 3" in capsys.readouterr().out
    assert main(["rollback", "anime", "--why", "still worse", *store]) == 0  # back again, not forth
    assert champion(root, "anime")["version"] == 1
    with pytest.raises(RegistryError, match="first champion"):
        rollback_target(root, "anime")
    assert main(["promote", "anime", "3", "--why", "fixed upstream", "--by", "bo", *store]) == 0
    assert main(["rollback", "anime", "--to", "2", "--why", "pin", *store]) == 0
    moves = [(h["action"], h["version"], h["from_version"], h["by"], h["why"]) for h in history(root, "anime")][3:]
    assert moves[0] == ("rollback", 2, 3, "ana", "answers got worse")
    assert moves[2:] == [("promote", 3, 1, "bo", "fixed upstream"), ("rollback", 2, 3, moves[3][3], "pin")]
    assert champion(root, "anime")["champion_since"]["why"] == "pin"

    capsys.readouterr()
    assert main(["models", "anime", *store]) == 0
    listing = capsys.readouterr().out
    assert [line.split()[0] for line in listing.splitlines()[1:4]] == ["1", "*", "3"]  # the champion is marked
    assert "champion: version 2 (rollback by" in listing


def test_unknown_versions_and_names_are_refused_with_what_there_is(tmp_path, capsys):
    root = registry_root(tmp_path)
    published(root, "anime", 2)
    assert main(["promote", "anime", "7", "--why", "x", "--store", str(tmp_path)]) == 2
    assert "no version 7" in capsys.readouterr().err and champion(root, "anime")["version"] == 2
    assert main(["models", "tea", "--store", str(tmp_path)]) == 2
    assert main(["rollback", "tea", "--why", "x", "--store", str(tmp_path)]) == 2
    assert "nothing published" in capsys.readouterr().err


def test_code_version_names_the_package_the_commit_and_the_sources():
    code = code_version()
    assert code["package"] == __import__("loraflow").__version__ and len(code["code_hash"]) == 16
    assert code["git_commit"] is None or len(code["git_commit"]) == 40
    json.dumps(code)  # goes into the version record as it is
