"""The data plug-ins (sources, synthesizers, templates): one module plus one registry line each, and the config
built from the registries. The worked examples of docs/add_a_synthesizer.md and docs/add_a_template.md run here,
as written there, from a temporary module through `loraflow prepare`."""

import ast
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pandas as pd
import pytest

from loraflow.config.format import FormatConfig
from loraflow.config.pipeline import PipelineConfig
from loraflow.config.synthesize import SynthesizeConfig
from loraflow.sources import SOURCES
from loraflow.synthesizers import SYNTHESIZERS, missing_interface, register_synthesizer, text
from loraflow.templates import TEMPLATES, interface_problems, register_template

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def allowed(annotation) -> set[str]:
    """The values a `Literal` (or `Literal | None`) annotation allows."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(allowed(argument) for argument in typing.get_args(annotation)))


# ---- the config is built from the registries: every kind is named once


def test_the_config_allows_exactly_the_registered_kinds_and_names():
    assert allowed(SynthesizeConfig.model_fields["kind"].annotation) == set(SYNTHESIZERS)
    for source in SOURCES.values():
        assert allowed(source.Config.model_fields["synthesizer"].annotation) == set(SYNTHESIZERS), source.__name__
    assert allowed(FormatConfig.model_fields["template"].annotation) == set(TEMPLATES)


@pytest.mark.parametrize("kind", sorted(SYNTHESIZERS))
def test_every_synthesizer_owns_its_options_and_the_config_holds_them_under_its_kind(kind):
    module = SYNTHESIZERS[kind]
    assert missing_interface(module) == []
    field = SynthesizeConfig.model_fields[kind]
    assert module.Options in (field.annotation, *typing.get_args(field.annotation))
    undescribed = [name for name, option in module.Options.model_fields.items() if not option.description]
    assert undescribed == [], f"{kind}: every option needs a description= (the Prefect form and `loraflow schema` show it)"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_has_the_interface_under_its_own_name(name):
    assert interface_problems(name, TEMPLATES[name]) == []


@pytest.mark.parametrize("registry, plugins", [("synthesizers", lambda: [m.__name__ for m in SYNTHESIZERS.values()]),
                                               ("templates", lambda: [c.__module__ for c in TEMPLATES.values()])])
def test_each_registry_imports_its_plugins_at_its_top_level(registry, plugins):
    """A stage's cache key follows its imports: a plug-in the registry loaded any other way would escape it."""
    tree = ast.parse((REPO / "loraflow" / registry / "__init__.py").read_text(encoding="utf-8"))
    imported = {f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    imported |= {name.rpartition(".")[0] for name in imported}  # `from loraflow.templates.alpaca import Alpaca`
    assert sorted(set(plugins()) - imported) == []


def test_a_kind_in_use_whose_options_have_required_keys_is_refused_with_its_fix():
    with pytest.raises(ValueError, match=r"synthesize.table_qa: a source uses table_qa but it is not set -> declare "
                                         r"synthesize.table_qa \(Options of the table_qa synthesizer"):
        PipelineConfig(name="x", sources=[{"kind": "csv", "path": "a.csv", "synthesizer": "table_qa"}],
                       synthesize={"kind": "text"})


def test_registering_refuses_an_incomplete_module_a_taken_name_and_a_late_call():
    class NoRender:
        name = "half"

    with pytest.raises(TypeError, match=r"synthesizer 'half' \(half_module\) lacks \['Options', 'synthesize', "
                                        r"'required_columns', 'expansion', 'FACT_TYPES'\] -> define them "
                                        r"\(docs/add_a_synthesizer.md\)"):
        register_synthesizer("half", type(sys)("half_module"))
    with pytest.raises(TypeError, match=r"template 'half' .*no render\(\); no stop_texts\(\) -> fix the class"):
        register_template("half", NoRender)
    # This process has built the config already: a plug-in registered now could never be chosen in it.
    with pytest.raises(RuntimeError, match=r"came after the config was built from the registry -> register it before "
                                           r"importing loraflow.config"):
        register_synthesizer("text_again", text)
    with pytest.raises(RuntimeError, match="came after the config was built"):
        register_template("chatml_again", type("ChatMLAgain", (TEMPLATES["chatml"],), {"name": "chatml_again"}))


# ---- the guides' worked examples, as written, through `loraflow prepare`


def python_blocks(guide: Path) -> list[str]:
    """The ```python blocks of a guide, in order."""
    return re.findall(r"```python\n(.*?)```", guide.read_text(encoding="utf-8"), flags=re.S)


def plugin_block(guide: Path, first_line: str) -> str:
    """The guide's python block whose docstring starts with `first_line`."""
    matches = [block for block in python_blocks(guide) if block.startswith(f'"""{first_line}')]
    assert len(matches) == 1, f"{guide.name}: no single python block starting with {first_line!r}"
    return matches[0]


def run_prepare_with_plugin(folder: Path, guide: Path, module_name: str, module_first_line: str, config: str) -> dict:
    """Write the guide's plug-in module and launcher into `folder`, run `launcher prepare config.yaml` in a fresh
    process on the session's Prefect API, and return the run summary."""
    (folder / f"{module_name}.py").write_text(plugin_block(guide, module_first_line), encoding="utf-8")
    (folder / "my_loraflow.py").write_text(plugin_block(guide, "loraflow's command line with"), encoding="utf-8")
    (folder / "config.yaml").write_text(f"name: plugin-test\nstore: {folder / 'store'}\nruns_dir: {folder / 'runs'}\n"
                                        + config, encoding="utf-8")
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)]), "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([sys.executable, str(folder / "my_loraflow.py"), "prepare", str(folder / "config.yaml")],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())


def test_a_synthesizer_from_a_temporary_module_runs_through_loraflow_prepare(prefect_api, tmp_path):
    pd.DataFrame({"term": ["LoRA", "QLoRA", "adapter"],
                  "definition": ["Low-rank adaptation of a frozen model.", "LoRA on a 4-bit quantized model.", " "]}
                 ).to_csv(tmp_path / "terms.csv", index=False)
    summary = run_prepare_with_plugin(
        tmp_path, DOCS / "add_a_synthesizer.md", "glossary", "glossary: a term and its definition",
        "sources:\n  - {kind: csv, path: terms.csv}\n"
        "synthesize:\n  kind: glossary\n  glossary: {question: \"Define {term}.\"}\n"
        "tokenize: {validation_fraction: 0.0}\n")
    synthesize = summary["stages"]["synthesize"]
    assert (synthesize["rows_in"], synthesize["rows_out"], synthesize["rows_quarantined"]) == (3, 2, 1)
    assert [reason["example"] for reason in synthesize["quarantine_reasons"]] == ["glossary skipped: definition is empty"]
    formatted = pd.read_parquet(summary["formatted"]["uri"])
    assert sorted(formatted["reference"]) == ["LoRA on a 4-bit quantized model.", "Low-rank adaptation of a frozen model."]
    assert sorted(messages[0]["content"] for messages in formatted["messages"]) == ["Define LoRA.", "Define QLoRA."]
    assert set(formatted["kind"]) == {"glossary"} and all(len(facts) == 1 for facts in formatted["facts"])


def test_a_template_from_a_temporary_module_runs_through_loraflow_prepare(prefect_api, tmp_path):
    rows = [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "Say hi.", "output": "Hi!"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    summary = run_prepare_with_plugin(
        tmp_path, DOCS / "add_a_template.md", "vicuna", "Vicuna: the system prompt",
        "sources:\n  - {kind: json, path: rows.jsonl}\n"
        "synthesize: {kind: instruction, instruction: {input_column: null}}\n"
        "format: {template: vicuna, system_prompt: Be brief.}\n"
        "tokenize: {validation_fraction: 0.0}\n")
    formatted = pd.read_parquet(summary["formatted"]["uri"]).set_index("reference")
    segments = [(segment["text"], segment["trained"]) for segment in formatted.loc["Blue.", "segments"]]
    # SmolLM2's EOS is <|im_end|>; the answer, its lead space and EOS are trained, the rest is not.
    assert segments == [("Be brief.\n\nUSER: Name a colour.\nASSISTANT:", False), (" Blue.<|im_end|>", True), ("\n", False)]
    assert formatted.loc["Hi!", "prompt"] == "Be brief.\n\nUSER: Say hi.\nASSISTANT:"
    assert set(formatted["template"]) == {"vicuna"}
