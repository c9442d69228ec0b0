"""Publishing a model folder to the Hugging Face Hub: the token, one verified commit to a run branch, then main;
the tag `champion` on the commit of the model name's champion.

    token = resolve_hub_token(publish_config.hf_token_secret)     # a Prefect Secret block, or HF_TOKEN
    push_folder(folder, files, repo_id=..., token=token, private=..., branch="main", run_branch=..., message=...)
    move_champion_tag(repo_id, commit, token=token)               # publish as champion, promote, rollback

A request that fails in transit (connection, timeout, 408/429/5xx) is sent again with backoff (loraflow.runtime.io_retries);
a commit is skipped when its branch already holds the files, so a retry or a re-run after a push that failed
half-way commits once, and the published branch changes only after the run branch holds every file, verified.
The token goes only to the client: never a log line, a result or a file (assert_no_secret checks the folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from loraflow.publishing.merge import PublishError
from loraflow.runtime.io_retries import with_io_retries

log_default = logging.getLogger("loraflow.publish")


def resolve_hub_token(secret_name: str | None) -> str:
    """The hub token from a Prefect Secret block (by name) or HF_TOKEN. Never log or store the result."""
    if secret_name:
        try:
            from prefect.blocks.system import Secret
        except ImportError:
            raise PublishError(f"publish.hf_token_secret={secret_name!r} needs Prefect installed; or set HF_TOKEN") from None
        try:
            return Secret.load(secret_name).get()
        except ValueError as error:
            raise PublishError(f"Prefect Secret block {secret_name!r} not found ({type(error).__name__}); create it "
                               "with `prefect block create secret` or set HF_TOKEN") from None
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError("publish.target=hf_hub needs a token: set publish.hf_token_secret to a Prefect Secret "
                           "block name, or the HF_TOKEN environment variable")
    return token


def push_folder(folder: Path, files: dict[str, str], *, repo_id: str, token: str, private: bool, branch: str,
                run_branch: str, message: str, retries: int = 3, retry_delay: float = 2.0, log=log_default) -> dict:
    """Upload `folder` as one commit to `run_branch`, verify it, then make `branch` match in one commit.

    Every request is sent again after a transient failure (loraflow.runtime.io_retries). A commit is made only when its
    branch does not already hold the files, so a retry after a lost answer, or a re-run after a push that
    failed half-way, commits once; `branch` changes only after the run branch holds every file, verified.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    def request(what: str, call):
        return with_io_retries(call, f"publish: hub {what} ({repo_id})", retries=retries, delay=retry_delay, log=log)

    def additions():
        return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in sorted(files)]

    def commit_once(revision: str, operations, commit_message: str, parent: str | None, exact: bool) -> str:
        def attempt() -> str:
            current = api.repo_info(repo_id, revision=revision).sha
            if not remote_problems(api, repo_id, current, folder, files, exact):
                return current  # an earlier attempt landed (its answer was lost) or an earlier run pushed it
            return api.create_commit(repo_id, operations=operations(), commit_message=commit_message, revision=revision,
                                     parent_commit=parent).oid
        return request(f"commit to {revision}", attempt)

    # Read HF_ENDPOINT now rather than at import, so tests (and users) can point it anywhere.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    request("create_repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    head = request("repo_info", lambda: api.repo_info(repo_id, revision=branch).sha)
    request("create_branch", lambda: api.create_branch(repo_id, branch=run_branch, revision=head, exist_ok=True))

    run_commit = commit_once(run_branch, additions, message, parent=None, exact=False)
    request("verify", lambda: verify_remote(api, repo_id, run_commit, folder, files))
    log.info("publish: %s@%s verified (%d files, commit %s)", repo_id, run_branch, len(files), run_commit[:10])

    stale = [path for path in request("list files", lambda: remote_files(api, repo_id, head))
             if path not in files and path != ".gitattributes"]
    main_commit = commit_once(
        branch, lambda: additions() + [CommitOperationDelete(path_in_repo=p) for p in stale],
        f"{message} (verified on {run_branch})", parent=head, exact=True,
    )
    request("verify", lambda: verify_remote(api, repo_id, main_commit, folder, files, exact=True))
    log.info("publish: %s@%s is %s%s", repo_id, branch, main_commit[:10], " (unchanged: already published)" if main_commit == head else "")
    return {"hub_repo": repo_id, "hub_run_branch": run_branch, "hub_run_commit": run_commit,
            "hub_branch": branch, "hub_commit": main_commit}


CHAMPION_TAG = "champion"


def move_champion_tag(repo_id: str, commit: str, *, token: str, message: str, tag: str = CHAMPION_TAG, retries: int = 3,
                      retry_delay: float = 2.0, log=log_default) -> dict:
    """Point the tag `tag` of `repo_id` at `commit`, so `revision="champion"` loads the champion; returns
    {"repo", "tag", "commit", "moved_from"}.

    The Hub moves no tag in place: the old one is deleted, then the new one created. Each attempt reads the repo's
    tags first, so a retry after a lost answer (or a second move to the same commit) changes nothing twice. When
    the new tag cannot be created, the old one is put back (best effort) before the error is raised."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    moved_from: list[str | None] = []

    def tagged() -> str | None:
        return next((ref.target_commit for ref in api.list_repo_refs(repo_id).tags if ref.name == tag), None)

    def attempt() -> None:
        current = tagged()
        moved_from.append(current)
        if current == commit:
            return
        if current is not None:
            api.delete_tag(repo_id, tag=tag)
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=message)

    try:
        with_io_retries(attempt, f"hub tag {tag} ({repo_id})", retries=retries, delay=retry_delay, log=log)
    except Exception:
        if moved_from and moved_from[0] is not None:  # put the champion's old tag back rather than leave none
            try:
                if tagged() is None:
                    api.create_tag(repo_id, tag=tag, revision=moved_from[0], tag_message=f"{message} (failed; kept)")
            except Exception as error:
                log.warning("hub: %s has no tag %s now (putting it back on %s failed: %s)", repo_id, tag,
                            moved_from[0][:10], type(error).__name__)
        raise
    log.info("hub: %s@%s is %s%s", repo_id, tag, commit[:10], " (already)" if moved_from[0] == commit else "")
    return {"repo": repo_id, "tag": tag, "commit": commit, "moved_from": moved_from[0]}


def move_champion_tag_to(record: dict, message: str, log=log_default) -> dict | None:
    """Move the Hub tag `champion` to the commit of a published version (its registry record, or the publish result
    with the config), with the token and retries of the publish config it was made with; None when it was not
    published to the Hub."""
    if not record.get("hub_repo") or not record.get("hub_commit"):
        return None
    publish = (record.get("config") or {}).get("publish") or {}
    token = resolve_hub_token(publish.get("hf_token_secret"))
    return move_champion_tag(record["hub_repo"], record["hub_commit"], token=token, message=message,
                             retries=publish.get("hub_retries", 3), retry_delay=publish.get("hub_retry_delay", 2.0), log=log)


def remote_files(api, repo_id: str, revision: str) -> dict:
    """Remote path -> RepoFile of every file at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)}


def remote_problems(api, repo_id: str, revision: str, folder: Path, files: dict[str, str], exact: bool = False) -> list[str]:
    """How the remote revision differs from the local files (size and LFS sha256 or git blob sha1); [] if it holds them."""
    remote = remote_files(api, repo_id, revision)
    problems = []
    for name, sha256 in files.items():
        entry = remote.get(name)
        local = folder / name
        if entry is None:
            problems.append(f"{name}: missing")
        elif entry.size != local.stat().st_size:
            problems.append(f"{name}: {entry.size} bytes remote, {local.stat().st_size} local")
        elif entry.lfs is not None and entry.lfs.sha256 != sha256:
            problems.append(f"{name}: LFS sha256 differs")
        elif entry.lfs is None and entry.blob_id != _git_blob_sha1(local):
            problems.append(f"{name}: git blob id differs")
    if exact:
        problems += [f"{name}: unexpected file on the remote" for name in remote if name not in files and name != ".gitattributes"]
    return problems


def verify_remote(api, repo_id: str, revision: str, folder: Path, files: dict[str, str], exact: bool = False) -> None:
    """PublishError unless every local file is on the remote revision with the same size and hash."""
    problems = remote_problems(api, repo_id, revision, folder, files, exact)
    if problems:
        raise PublishError(f"{repo_id}@{revision[:12]}: uploaded files do not match:\n  " + "\n  ".join(problems))


def _git_blob_sha1(path: Path) -> str:
    content = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def assert_no_secret(folder: Path, secret: str) -> None:
    """PublishError if any file under `folder` contains `secret` (checked before an upload)."""
    for path in folder.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            raise PublishError(f"{path}: contains the hub token; refusing to upload")
