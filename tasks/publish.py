"""publish: merge the adapter into a 16/32-bit base, prove the merge, save, write the card, push.

1. Reload the base unquantized (publish.merge_dtype; never 4-bit: merging into quantized weights rounds the
   adapter away), attach the adapter, take reference logits on a few validation texts, merge_and_unload,
   and fail (MergeVerificationError) if any logit moved more than publish.merge_tolerance.
2. Save in the base's dtype (safetensors) + tokenizer and chat template + generation_config whose EOS ids
   include the template's end-of-turn token + the adapter (adapter/) + README.md (model card from pipeline
   facts) + loraflow.json; re-read the saved weights and compare them bit for bit; manifest written last.
3. target=hf_hub: one commit with every file to a run branch, check the remote list and hashes, then one
   commit to publish.branch (parent = the head seen before, so a concurrent push fails instead of mixing)
   and check again. A request that fails in transit (connection, timeout, 408/429/5xx) is sent again with
   backoff (publish.hub_retries); a commit is skipped when its branch already holds the files, so a retry or
   a re-run after a push that failed half-way commits once. The token comes from a Prefect Secret block or
   HF_TOKEN, and goes only to the client.

`ask` answers a question with a published folder, streaming tokens (for `loraflow ask`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, Field

from loraflow.config.publish import PublishConfig
from loraflow.retrying import with_io_retries
from loraflow.store import file_sha256

MODEL_MANIFEST = "loraflow-manifest.json"
RUN_INFO = "loraflow.json"
log_default = logging.getLogger("loraflow.publish")


class MergeVerificationError(RuntimeError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""


class PublishError(RuntimeError):
    """Publishing cannot proceed (missing token, remote files that do not match, ...)."""


class SourceFacts(BaseModel):
    """One data source, as the model card lists it."""

    name: str
    kind: str | None = None
    location: str | None = Field(None, description="Path, URL or repo id.")
    sha256: str | None = None
    rows: int | None = None


class CardFacts(BaseModel):
    """Pipeline facts the model card is written from; the flow fills what it knows (no secrets)."""

    run_name: str
    base_model: str = Field(..., description="Hub id or path of the base model.")
    base_revision: str | None = None
    sources: list[SourceFacts] = Field(default_factory=list)
    rows: dict[str, int] = Field(default_factory=dict, description="Row counts per stage/split, e.g. {'raw': 30, 'train': 180}.")
    synthesizer: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    masking: str | None = Field(None, description="e.g. 'answer tokens only; padding masked by position'.")
    tokens_sha256: str | None = None
    preflight: dict = Field(default_factory=dict)
    train_config: dict = Field(default_factory=dict)
    train_metrics: dict = Field(default_factory=dict, description="TrainResult fields worth showing.")
    eval_report_markdown: str | None = Field(None, description="EvalResult's report (table + examples).")
    gate: dict | None = Field(None, description="GateDecision: passed + reasons.")
    library_versions: dict = Field(default_factory=dict, description="Filled in automatically when empty.")


class PublishResult(BaseModel):
    """Where the merged model went and how it was checked."""

    model_dir: str
    files: dict[str, str] = Field(..., description="Relative path -> sha256 of every published file.")
    max_logit_diff: float
    merge_dtype: str
    saved_dtype: str
    target: str
    hub_repo: str | None = None
    hub_run_branch: str | None = None
    hub_run_commit: str | None = None
    hub_branch: str | None = None
    hub_commit: str | None = None
    seconds: float


# ---- merge and verify ----------------------------------------------------------------------------------

def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, verify_texts: list[str], *, tolerance: float,
                  dtype: str = "float32", trust_remote_code: bool = False):
    """Base (unquantized, `dtype`) + adapter, merged; returns (merged model, tokenizer, max |Δlogit|)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    inputs = verification_batch(tokenizer, verify_texts, next(model.parameters()).device)
    reference = _logits(model, inputs)
    merged = model.merge_and_unload()
    merged.eval()
    return merged, tokenizer, check_merge(merged, inputs, reference, tolerance)


def verification_batch(tokenizer, texts: list[str], device) -> dict:
    if not texts:
        raise ValueError("the merge check needs at least one text (validation prompts + references)")
    tokenizer.padding_side = "right"
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)


def _logits(model, inputs: dict):
    import torch

    with torch.inference_mode():
        return model(**inputs).logits.float()


def check_merge(merged_model, inputs: dict, reference_logits, tolerance: float) -> float:
    """Max |logit difference| over real (non-padding) positions; MergeVerificationError above `tolerance`."""
    mask = inputs["attention_mask"].bool()
    difference = (_logits(merged_model, inputs) - reference_logits).abs()[mask]
    max_diff = float(difference.max())
    if not max_diff <= tolerance:  # also catches NaN
        raise MergeVerificationError(
            f"merged model differs from base + adapter: max |logit difference| {max_diff:.4g} > publish.merge_tolerance "
            f"{tolerance:g} on {int(mask.sum())} positions. The merged weights are wrong; nothing was published."
        )
    return max_diff


# ---- save ----------------------------------------------------------------------------------------------

def end_of_turn_ids(tokenizer) -> list[int]:
    from tasks.evaluate import stop_token_ids

    return stop_token_ids(tokenizer)


def save_merged(merged, tokenizer, folder: Path, *, model_dir: Path, adapter_dir: Path, card: str, run_info: dict) -> tuple[str, dict]:
    """Write the merged model folder atomically (staging, manifest last, rename); returns (dtype, files)."""
    import torch
    from transformers import GenerationConfig

    saved_dtype = _base_dtype(model_dir)
    staging = folder.with_name(f".{folder.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    merged = merged.to(getattr(torch, saved_dtype))
    merged.save_pretrained(staging, safe_serialization=True)
    verify_saved_weights(merged, staging)
    tokenizer.save_pretrained(staging)
    if (model_dir / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(model_dir)
    else:
        generation = GenerationConfig()
    eos = end_of_turn_ids(tokenizer)
    generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generation.save_pretrained(staging)
    shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("README.md"))
    (staging / "README.md").write_text(card)
    (staging / RUN_INFO).write_text(json.dumps(run_info, indent=1))
    files = folder_hashes(staging)
    (staging / MODEL_MANIFEST).write_text(json.dumps({"files": files, "saved_dtype": saved_dtype}, indent=1))
    files[MODEL_MANIFEST] = file_sha256(staging / MODEL_MANIFEST)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return saved_dtype, files


def verify_saved_weights(model, folder: Path) -> None:
    """Every tensor in the saved safetensors equals the in-memory one bit for bit (catches a bad write)."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    seen = set()
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                seen.add(name)
                if name in state and not torch.equal(handle.get_tensor(name), state[name].detach().cpu()):
                    raise PublishError(f"{shard.name}: tensor {name} differs from the merged model after saving")
    if not seen:
        raise PublishError(f"{folder}: no safetensors weights were written")


def _base_dtype(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- model card ----------------------------------------------------------------------------------------

def render_model_card(facts: CardFacts, *, max_logit_diff: float | None = None, tolerance: float | None = None,
                      merge_dtype: str | None = None) -> str:
    """README.md of the published model, written only from pipeline facts."""
    from tasks.train import library_versions

    versions = facts.library_versions or library_versions()
    lines = [
        "---",
        f"base_model: {facts.base_model}",
        "library_name: transformers",
        "tags: [loraflow, lora, peft]",
        "---",
        "",
        f"# {facts.run_name}",
        "",
        f"A LoRA fine-tune of `{facts.base_model}`" + (f" (revision `{facts.base_revision}`)" if facts.base_revision else "")
        + ", trained, evaluated, merged and published by loraflow.",
    ]
    if facts.gate is not None:
        lines += ["", "## Publish gate", "", f"**{'passed' if facts.gate.get('passed') else 'FAILED'}**", ""]
        lines += [f"- {reason}" for reason in facts.gate.get("reasons", [])]
    lines += ["", "## Data", ""]
    if facts.sources:
        lines += ["| source | kind | location | rows | sha256 |", "|---|---|---|---|---|"]
        lines += [f"| {s.name} | {s.kind or ''} | {s.location or ''} | {s.rows if s.rows is not None else ''} | "
                  f"`{(s.sha256 or '')[:16]}` |" for s in facts.sources]
    for label, value in (("Rows", ", ".join(f"{k}: {v}" for k, v in facts.rows.items()) or None),
                         ("Synthesizer", facts.synthesizer), ("Template", facts.template),
                         ("System prompt", facts.system_prompt and f"`{facts.system_prompt}`"),
                         ("Loss masking", facts.masking), ("Tokens artifact", facts.tokens_sha256 and f"`{facts.tokens_sha256}`")):
        if value:
            lines.append(f"- {label}: {value}")
    if facts.preflight:
        lines += ["", "## Pre-flight checks", ""] + [f"- {k}: {v}" for k, v in facts.preflight.items()]
    lines += ["", "## Training", ""]
    if facts.train_config:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts.train_config.items()]
    if facts.train_metrics:
        lines += [""] + [f"- {k}: {v}" for k, v in facts.train_metrics.items()]
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    if facts.eval_report_markdown:
        lines += ["", "## Evaluation", "", facts.eval_report_markdown.replace("## Evaluation", "### Result", 1).strip()]
    if max_logit_diff is not None:
        lines += ["", "## Merge check", "",
                  f"The adapter was merged into the unquantized base ({merge_dtype}); the merged model's logits differ "
                  f"from base + adapter by at most {max_logit_diff:.3g} (tolerance {tolerance:g}) on validation texts."]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tokenizer = AutoTokenizer.from_pretrained(MODEL)", "model = AutoModelForCausalLM.from_pretrained(MODEL)",
              "messages = [{'role': 'user', 'content': 'Who made ...?'}]",
              "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')",
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=96)[0][ids.shape[1]:], skip_special_tokens=True))",
              "```", "", "The LoRA adapter alone is in `adapter/`."]
    return "\n".join(lines) + "\n"


# ---- hub -----------------------------------------------------------------------------------------------

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

    Every request is sent again after a transient failure (loraflow.retrying). A commit is made only when its
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


def remote_files(api, repo_id: str, revision: str) -> dict:
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


def _assert_no_secret(folder: Path, secret: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            raise PublishError(f"{path}: contains the hub token; refusing to upload")


# ---- the stage -----------------------------------------------------------------------------------------

def publish_model(
    model_dir: str | Path,
    adapter_dir: str | Path,
    publish_config: PublishConfig,
    output_dir: str | Path,
    *,
    card: CardFacts,
    verify_texts: list[str],
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> PublishResult:
    """Merge, verify, save to `output_dir/model` and, for target=hf_hub, push. Call only when the gate passed.

    `verify_texts`: a few full validation texts (prompt + reference); the first publish.verify_prompts are used.
    `system_prompt`: the one training used (None = template default); stored for `ask`.
    """
    log = log or log_default
    started = time.perf_counter()
    model_dir, adapter_dir, output_dir = Path(model_dir), Path(adapter_dir), Path(output_dir)
    token = resolve_hub_token(publish_config.hf_token_secret) if publish_config.target == "hf_hub" else None

    merged, tokenizer, max_diff = merge_adapter(
        model_dir, adapter_dir, verify_texts[: publish_config.verify_prompts], tolerance=publish_config.merge_tolerance,
        dtype=publish_config.merge_dtype, trust_remote_code=trust_remote_code,
    )
    log.info("publish: merge verified, max |logit difference| %.3g <= %g (%s)", max_diff, publish_config.merge_tolerance,
             publish_config.merge_dtype)
    card_text = render_model_card(card, max_logit_diff=max_diff, tolerance=publish_config.merge_tolerance,
                                  merge_dtype=publish_config.merge_dtype)
    run_info = {"run_name": card.run_name, "base_model": card.base_model, "system_prompt": system_prompt,
                "gate": card.gate, "max_logit_diff": max_diff}
    folder = output_dir / "model"
    saved_dtype, files = save_merged(merged, tokenizer, folder, model_dir=model_dir, adapter_dir=adapter_dir,
                                     card=card_text, run_info=run_info)
    log.info("publish: saved %d files (%s) to %s", len(files), saved_dtype, folder)
    result = {"model_dir": str(folder), "files": files, "max_logit_diff": max_diff, "merge_dtype": publish_config.merge_dtype,
              "saved_dtype": saved_dtype, "target": publish_config.target}
    if publish_config.target == "hf_hub":
        _assert_no_secret(folder, token)
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        result |= push_folder(
            folder, files, repo_id=publish_config.repo_id, token=token, private=publish_config.private,
            branch=publish_config.branch, run_branch=f"loraflow-{card.run_name}-{digest}",
            message=f"loraflow: {card.run_name}", retries=publish_config.hub_retries,
            retry_delay=publish_config.hub_retry_delay, log=log,
        )
    return PublishResult(**result, seconds=round(time.perf_counter() - started, 2))


# ---- ask -----------------------------------------------------------------------------------------------

def ask(model_dir: str | Path, question: str, stream: bool = True, *, max_new_tokens: int = 256,
        system_prompt: str | None = None) -> Iterator[str] | str:
    """Answer `question` greedily with a published model folder and its saved chat template.

    stream=True returns an iterator of text pieces as they are generated; stream=False the whole answer.
    The system prompt defaults to the one training used (stored in loraflow.json by publish).
    """
    from threading import Thread

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    model_dir = Path(model_dir)
    if system_prompt is None and (model_dir / RUN_INFO).exists():
        system_prompt = json.loads((model_dir / RUN_INFO).read_text()).get("system_prompt")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from loraflow.precision import choose_precision

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if choose_precision("auto", "cuda" if cuda else "cpu").precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": 0} if cuda else None)
    model.eval()
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                    temperature=None, top_p=None, top_k=None)
    worker = Thread(target=model.generate, kwargs=settings, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        for piece in streamer:
            yield piece
        worker.join()

    return pieces() if stream else "".join(pieces()).strip()


# ---- Prefect wrapper -----------------------------------------------------------------------------------

try:
    from prefect import task
except ImportError:  # the GPU machine has no Prefect
    task = None

if task is not None:

    @task(name="publish")  # no cache: publishing is a side effect that must happen when asked
    def publish_task(
        model_dir: str, adapter_dir: str, publish_config: PublishConfig, output_dir: str, card: CardFacts,
        verify_texts: list[str], system_prompt: str | None = None, trust_remote_code: bool = False,
    ) -> PublishResult:
        """Prefect task around `publish_model` (the token is resolved inside, never a parameter)."""
        from prefect import get_run_logger

        return publish_model(model_dir, adapter_dir, publish_config, output_dir, card=card, verify_texts=verify_texts,
                             system_prompt=system_prompt, trust_remote_code=trust_remote_code, log=get_run_logger())
