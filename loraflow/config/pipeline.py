"""The pipeline config: one pydantic model for the CLI, the Prefect UI form, YAML files and tests."""

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from loraflow.config.base import StrictModel
from loraflow.config.cost import CostConfig
from loraflow.config.evaluate import EvalConfig
from loraflow.config.format import FormatConfig
from loraflow.config.locks import LockConfig
from loraflow.config.model import ModelConfig
from loraflow.config.preference import PreferenceConfig
from loraflow.config.prepare import PrepareConfig
from loraflow.config.publish import PublishConfig
from loraflow.config.synthesize import SynthesizeConfig, missing_options
from loraflow.synthesizers.table_qa_options import heldout_problems
from loraflow.config.tokenize import TokenizeConfig, default_validation_fraction
from loraflow.config.train import TrainConfig
from loraflow.sources import SourceConfig, source_locations, source_name


class PipelineConfig(StrictModel):
    """Everything one loraflow run needs, stage by stage."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name (letters, digits, . _ -).")
    base_dir: str = Field(".", description="Folder that relative paths are resolved against (set to the config file's folder when loaded from YAML).")
    store: str = Field(".loraflow/store", description="Artifact store: a local folder (relative to the working directory) or an fsspec URL.")
    runs_dir: str = Field(".loraflow/runs", description="Where each run's folder (summary.json, model) is written (relative to the working directory).")
    sources: list[SourceConfig] = Field(..., min_length=1, description="Where the raw rows come from.")
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig, description="Rows -> conversations.")
    format: FormatConfig = Field(default_factory=FormatConfig, description="Conversations -> text with roles.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Text -> tokens, labels, split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model and tokenizer.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="LoRA / QLoRA training.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Preference pairs and DPO after SFT (off by default).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and publish gate.")
    publish: PublishConfig = Field(default_factory=PublishConfig, description="Merged model output.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig, description="How the data stages run: one process, or sharded over workers.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Price per device-hour, for the run's cost figure.")
    locks: LockConfig = Field(default_factory=LockConfig, description="Where stage locks live: this host, or shared by every host of an s3:// store.")

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources):
        names = [source_name(s) for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique, found {duplicates} twice: set `name:` on each source")
        return sources

    @model_validator(mode="after")
    def _synthesizers_in_use_are_set(self):
        for kind in dict.fromkeys(self.synthesizer_kinds()):
            if getattr(self.synthesize, kind) is None:
                raise ValueError(f"synthesize.{kind}: a source uses {kind} but it is not set -> {missing_options(kind)}")
        if "table_qa" in self.synthesizer_kinds() and self.eval.gate.min_heldout_fact_accuracy is not None:
            problems = heldout_problems(self.synthesize.table_qa)
            if problems:
                raise ValueError("\n".join(f"synthesize.table_qa.{problem}" for problem in problems))
        return self

    @model_validator(mode="after")
    def _validation_split_by_synthesizer(self):
        if self.tokenize.validation_fraction is None:
            self.tokenize.validation_fraction = default_validation_fraction(self.synthesizer_kinds())
        return self

    @model_validator(mode="after")
    def _registry_needs_mlflow(self):
        if self.publish.register_model and "mlflow" not in self.train.report_to:
            raise ValueError("publish.register_model registers under training's MLflow run -> add mlflow to "
                             "train.report_to, or set publish.register_model: false")
        return self

    @model_validator(mode="after")
    def _object_store_locks_need_s3(self):
        if self.locks.backend == "object-store" and not self.store.startswith("s3://"):
            raise ValueError(f"locks.backend: object-store keeps its leases in an s3:// store, and store is {self.store!r} "
                             "-> set store to s3://bucket/prefix, or locks.backend: local (a local folder's lock files "
                             "already hold for every host that mounts it)")
        return self

    def synthesizer_kinds(self) -> list[str]:
        """The synthesizer of each source (its own `synthesizer:`, else synthesize.kind)."""
        return [source.synthesizer or self.synthesize.kind for source in self.sources]

    def resolve(self, path: str) -> Path:
        """A source path from the config, resolved against base_dir (the config file's folder)."""
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else Path(self.base_dir) / candidate

    def store_root(self) -> str:
        """The artifact store location: a URL as is, a relative folder against the working directory."""
        return self.store if "://" in self.store else str(Path(self.store).expanduser().resolve())

    def runs_root(self) -> Path:
        """The folder that holds run folders, resolved against the working directory."""
        return Path(self.runs_dir).expanduser().resolve()


def config_hash(model: StrictModel, exclude: set[str] | None = None) -> str:
    """A short stable hash of a config model (or sub-model), without the fields in `exclude`."""
    payload = json.dumps(model.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem with its key and fix."""


def confinement_problems(config: PipelineConfig, roots: list[str]) -> list[str]:
    """Paths of `config` (what the sources read, store, runs) that resolve outside every folder in `roots`.

    Operators set the roots (LORAFLOW_DATA_ROOTS, ':'-separated) on a worker, so a run triggered from the UI
    cannot read or write outside them (no `../../etc/passwd` as a source). Symlinks are resolved first.
    """
    allowed = [Path(root).expanduser().resolve() for root in roots if root]
    # Each source says which local files and folders it reads (a CSV's path, a SQLite database, a dataset folder).
    checked = [(f"sources.{i}.{location.key}", location.local) for i, source in enumerate(config.sources)
               for location in source_locations(source, config.base_dir) if location.local is not None]
    if "://" not in config.store:
        checked.append(("store", Path(config.store_root())))
    checked.append(("runs_dir", config.runs_root()))
    return [f"  {key}: {path.resolve()} is outside the allowed data roots {[str(r) for r in allowed]} -> use a path inside them"
            for key, path in checked if not any(path.resolve().is_relative_to(root) for root in allowed)]


def check_confinement(config: PipelineConfig, roots: str | None) -> None:
    """Raise ConfigError when roots are set (':'-separated) and a config path escapes them."""
    if not roots:
        return
    problems = confinement_problems(config, roots.split(":"))
    if problems:
        raise ConfigError(f"config '{config.name}': {len(problems)} path(s) outside LORAFLOW_DATA_ROOTS\n" + "\n".join(problems))


def load_config(path: str | Path) -> PipelineConfig:
    """Load and validate a YAML config; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (name:, sources:, ...)")
    raw.setdefault("base_dir", str(path.resolve().parent))
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_errors(path, error)) from None


def allowed_keys(loc: tuple) -> list[str]:
    """The keys a config allows at `loc` (a pydantic error location such as ('sources', 0, 'csv')); [] if unknown."""
    models = [PipelineConfig]
    for part in loc:
        if isinstance(part, int):  # a list item
            continue
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        # a field leads to the models it holds; anything else is a tagged union's tag, e.g. the source kind 'csv'
        models = models_in(fields[0].annotation) if fields else [model for model in models if kind_tag(model) == part]
        if not models:
            return []
    return list(models[0].model_fields) if len(models) == 1 else []


def models_in(annotation) -> list[type]:
    """The pydantic models an annotation holds (itself, list items, union members, Annotated's type)."""
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in models_in(argument)]


def kind_tag(model: type) -> str | None:
    """A tagged-union member's `kind` default (the source kind)."""
    field = model.model_fields.get("kind")
    return field.default if field is not None else None


def describe_errors(path, error: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, and how to fix it."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        kind = problem["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(problem["loc"][-1]), allowed_keys(problem["loc"][:-1]), n=1, cutoff=0.6)
            fix = (f"did you mean `{close[0]}`? " if close else "") + \
                "remove it or check its spelling (run `loraflow schema` for every key)"
        elif kind == "missing":
            fix = "add this key"
        elif kind in ("literal_error", "union_tag_invalid"):
            fix = "use one of the allowed values"
        elif kind == "value_error" and "->" in problem["msg"]:
            # A validator that names its own keys and fixes ('kinds.tasting.answers.0: ... -> ...'), one per line.
            for line in problem["msg"].removeprefix("Value error, ").splitlines():
                subkey = line.split(": ", 1)[0]
                if not re.fullmatch(r"[\w.]+", subkey):
                    lines.append(f"  {key}: {line}")
                else:  # a key under this model's own ('kinds.where...'), or already from the top ('synthesize...')
                    lines.append(f"  {key}.{line}" if problem["loc"] and not subkey.startswith(key) else f"  {line}")
            continue
        else:
            fix = "change the value"
        lines.append(f"  {key}: {problem['msg']} -> {fix}")
    return "\n".join([f"{path}: {len(lines)} problem(s)", *lines])
