"""The Hub's `champion` tag moves with the champion (issue 33, item 4): `move_champion_tag` against the local Hub
stand-in (the real huggingface_hub client), idempotent and retried after a lost answer; `loraflow promote` and
`rollback` move it before the local record (and move nothing when the Hub refuses), recording it in the history.
Publishing as champion through the flow: tests/test_reliability_flow.py."""

import huggingface_hub.constants
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

from loraflow.cli.commands import main
from loraflow.publishing.hub import move_champion_tag
from loraflow.publishing.registry import add_version, champion, history, move_champion, registry_root
from tests.hub_standin import HubStandIn

REPO_ID = "loraflow-test/tagged"
TOKEN = "hf_test_token_tag"


@pytest.fixture
def hub(monkeypatch):
    standin = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", standin.start())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest makes the session offline; the stand-in is local
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield standin
    standin.stop()


def publish_commits(hub: HubStandIn, count: int) -> list[str]:
    """`count` commits on main, each with its own model.txt (what `count` publishes would leave)."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo(REPO_ID)
    return [api.create_commit(REPO_ID, operations=[CommitOperationAdd("model.txt", f"model {n}".encode())],
                              commit_message=f"publish {n}").oid for n in range(1, count + 1)]


def tag_requests(hub: HubStandIn) -> list[str]:
    """'POST <commit>' (create) and 'DELETE champion' requests, in order."""
    return [f"{r['method']} {r['path'].rsplit('/', 1)[-1]}" for r in hub.requests if "/tag/" in r["path"]]


def test_the_tag_moves_to_the_commit_and_loads_it(hub, tmp_path):
    one, two = publish_commits(hub, 2)
    moved = move_champion_tag(REPO_ID, one, token=TOKEN, message="v1")
    assert hub.tags(REPO_ID) == {"champion": one} and moved == {"repo": REPO_ID, "tag": "champion", "commit": one,
                                                               "moved_from": None}
    assert move_champion_tag(REPO_ID, two, token=TOKEN, message="v2")["moved_from"] == one
    assert hub.tags(REPO_ID) == {"champion": two}
    path = hf_hub_download(REPO_ID, "model.txt", revision="champion", cache_dir=tmp_path / "cache", endpoint=hub.endpoint)
    assert open(path).read() == "model 2"  # revision="champion" is the champion's model
    before = tag_requests(hub)
    move_champion_tag(REPO_ID, two, token=TOKEN, message="again")
    assert tag_requests(hub) == before  # already there: nothing deleted or created


def test_a_lost_answer_is_retried_and_the_tag_created_once(hub):
    one, two = publish_commits(hub, 2)
    move_champion_tag(REPO_ID, one, token=TOKEN, message="v1")
    hub.fail("tag", two, how="drop_response")  # the tag is created, the answer lost: the retry finds it there
    moved = move_champion_tag(REPO_ID, two, token=TOKEN, message="v2", retry_delay=0.01)
    assert hub.faults_hit == 1 and hub.tags(REPO_ID) == {"champion": two} and moved["commit"] == two
    assert tag_requests(hub).count(f"POST {two}") == 1


def registry_with_hub_versions(store, commits: list[str]) -> None:
    """Versions 1..n published to the Hub (the fields record_version writes), the last one the champion."""
    root = registry_root(store)
    for number, commit in enumerate(commits, start=1):
        add_version(root, "anime", {"hub_repo": REPO_ID, "hub_commit": commit, "model_dir": str(store / f"m{number}"),
                                    "config": {"publish": {"target": "hf_hub", "repo_id": REPO_ID, "hub_retry_delay": 0.01}}})
        move_champion(root, "anime", number, action="publish", why="passed the gate", by="gate")


def test_promote_and_rollback_move_the_hub_tag_first(hub, tmp_path, capsys):
    commits = publish_commits(hub, 3)
    registry_with_hub_versions(tmp_path, commits)
    store = ["--store", str(tmp_path)]
    assert main(["promote", "anime", "1", "--why", "checked", "--by", "ana", *store]) == 0
    assert hub.tags(REPO_ID) == {"champion": commits[0]}
    assert f"Hub tag champion of {REPO_ID} -> {commits[0][:10]}" in capsys.readouterr().out
    assert main(["rollback", "anime", "--why", "worse", *store]) == 0  # back to 3, the champion before 1
    assert hub.tags(REPO_ID) == {"champion": commits[2]} and champion(registry_root(tmp_path), "anime")["version"] == 3
    last = history(registry_root(tmp_path), "anime")[-1]
    assert last["hub_tag"] == {"repo": REPO_ID, "tag": "champion", "commit": commits[2], "moved_from": commits[0]}

    hub.fail("tag", commits[1], how=500, times=10)  # the Hub down for the tag: nothing moves anywhere
    assert main(["promote", "anime", "2", "--why", "try", *store]) == 1
    error = capsys.readouterr().err
    assert "did not move" in error and "nothing moved" in error  # and the old tag is put back where it was:
    assert hub.tags(REPO_ID) == {"champion": commits[2]} and champion(registry_root(tmp_path), "anime")["version"] == 3
