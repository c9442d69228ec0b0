"""The house's shape: imports run flows -> tasks -> loraflow -> data_contracts, with no circle; inside loraflow,
each trade (runtime, modeling, training, ...) imports only the trades listed for it below."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "loraflow", "data_contracts")
FLOOR = {name: level for level, name in enumerate(PACKAGES)}  # a module may import its own level or lower ones


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, top_level_only: bool) -> set[str]:
    """Project modules `path` imports (every import, or only those run when the module loads)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in PACKAGES}


def test_no_module_imports_a_higher_floor():
    modules = project_modules()
    upward = []
    for name, path in modules.items():
        if name.startswith("loraflow.cli."):  # the command line starts the flows: the one sanctioned exception
            continue
        for used in imported_names(path, top_level_only=False):
            if FLOOR[used.split(".")[0]] < FLOOR[name.split(".")[0]]:
                upward.append(f"{name} imports {used}")
    assert upward == []


def test_no_import_circle():
    modules = project_modules()
    graph = {name: {used for used in imported_names(path, top_level_only=True) if used in modules} - {name}
             for name, path in modules.items()}
    state, circles = {}, []

    def visit(name, trail):
        state[name] = "open"
        for used in sorted(graph[name]):
            if state.get(used) == "open" and not name.startswith(used + "."):  # a package's own __init__ is no circle
                circles.append(" -> ".join(trail[trail.index(used):] + [used]))
            elif used not in state:
                visit(used, trail + [used])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_source_file_over_400_lines(package):
    long_files = {str(path.relative_to(ROOT)): n for path in (ROOT / package).rglob("*.py")
                  if (n := len(path.read_text().splitlines())) > 400}
    assert long_files == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_80_lines(package):
    long_functions = {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
                      for path in (ROOT / package).rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 80}
    assert long_functions == {}


# Inside the library, the trades a trade may import (errors.py, loraflow's root, may be imported by any).
# config and the data plug-ins (sources, synthesizers, templates) are the typed-config floor: a plug-in owns its
# config model, and the pipeline config is built from the plug-in registries.
ALLOWED_TRADES = {
    "config": {"sources", "synthesizers", "templates"},
    "sources": {"config", "runtime"},
    "synthesizers": {"config"},
    "templates": set(),
    "runtime": {"config"},
    "modeling": {"config", "runtime"},
    "tracking": {"config", "runtime"},
    "evaluation": {"config", "modeling", "runtime"},
    "training": {"config", "modeling", "runtime", "tracking"},
    "preference": {"config"},  # pair building: pure functions over the synthesized rows
    "publishing": {"config", "modeling", "runtime", "training", "evaluation"},
    "ops": {"config", "runtime"},
    "runs": {"config", "runtime", "training", "evaluation", "publishing", "tracking"},  # summary.json gathers them all
    "cli": {"config", "sources", "runtime", "modeling", "training", "evaluation", "publishing", "tracking", "ops", "runs"},
}


def trade(module: str) -> str | None:
    """The trade (loraflow's sub-package) a library module belongs to; None for loraflow's root modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / "loraflow" / parts[1]).is_dir() else None


def test_every_library_module_lives_in_a_trade():
    modules = [name for name in project_modules() if name.startswith("loraflow.")]
    assert {name for name in modules if trade(name) is None} <= {"loraflow.errors"}
    assert {trade(name) for name in modules} - {None} == set(ALLOWED_TRADES)


def test_trades_import_only_the_trades_allowed_them():
    arrows = []
    for name, path in project_modules().items():
        if not name.startswith("loraflow.") or trade(name) is None:
            continue
        for used in imported_names(path, top_level_only=False):
            used_trade = trade(used) if used.startswith("loraflow.") else None
            if used_trade and used_trade != trade(name) and used_trade not in ALLOWED_TRADES[trade(name)]:
                arrows.append(f"{name} ({trade(name)}) imports {used} ({used_trade})")
    assert arrows == []
