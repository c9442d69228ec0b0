"""The project modules a stage's output depends on, from the static import graph of its source files.

    covered_modules("tasks.train")   # {"tasks.train": Path(...), "loraflow.modeling.precision": Path(...), ...}
    code_hash("tasks.train")         # sha256 of those modules' names and sources

The graph is read with `ast` from the files under the project root; nothing is imported and `sys.modules` is never
asked, so a stage's hash is the same in every process whatever else that process imported. Followed from each
module: every `import` / `from ... import` anywhere in it (module level or inside a function), a `from package
import name` whose name is a submodule, relative imports, the packages a module sits in (Python runs their
`__init__` first: a registry package's imports of its plug-ins count), and `importlib.import_module("literal")`.
A dynamic import this cannot resolve (`import_module(name)`, `pkgutil.iter_modules`, entry points) must be
declared in DYNAMIC_IMPORTS, else the hash refuses with the file and line. Ops-only modules are left out by name
(OPS_ONLY); every other project module a stage reaches is in its hash.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("flows", "tasks", "loraflow", "data_contracts")

# Modules that run the pipeline but shape no stage's output (the command line, the server and its automations).
# The one list of what a stage's hash leaves out: a module not named here is followed.
OPS_ONLY = ("loraflow.cli", "loraflow.ops")

# Modules whose imports name their target at run time, and the project modules those imports can reach
# ("package.*" means every module in that package's folder). The walk refuses a dynamic import not listed here.
DYNAMIC_IMPORTS: dict[str, tuple[str, ...]] = {
    # The launched worker imports the train function its caller named in job.json: the caller's own module,
    # which the caller's stage already covers (tasks.train passes its train_adapter).
    "loraflow.training.launch": (),
}

# Calls that import a module named at run time, or discover modules (a plug-in folder, installed entry points).
DYNAMIC_CALLS = {"import_module", "__import__", "iter_modules", "walk_packages", "spec_from_file_location",
                 "entry_points"}


class UndeclaredDynamicImport(RuntimeError):
    """A project module imports a module named at run time that DYNAMIC_IMPORTS does not declare."""


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of project module `name` under `root` (a package's `__init__.py`); None if it has none."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def is_ops_only(name: str) -> bool:
    """True for a module OPS_ONLY names (or one inside a package it names)."""
    return any(name == ops or name.startswith(ops + ".") for ops in OPS_ONLY)


def covered_modules(module: str, root: Path = PROJECT_ROOT, start_file: Path | None = None) -> dict[str, Path]:
    """Every project module `module` reaches, itself included: name -> source file, sorted by name.

    `start_file` is `module`'s source when it lies outside the project packages (a task defined in a test)."""
    start = start_file or module_file(module, root)
    if start is None:
        raise FileNotFoundError(f"no source file for module {module!r} under {root}: a stage's code hash reads "
                                f"its source from there (pass start_file for a module outside {PROJECT_PACKAGES})")
    found, pending = {module: start}, [module]
    while pending:
        name = pending.pop()
        imported = _imports_of(name, found[name], root) | ({name} if name == module else set())  # its own packages
        for used in _with_parent_packages(imported):
            if used not in found and not is_ops_only(used) and (used_path := module_file(used, root)):
                found[used] = used_path
                pending.append(used)
    return dict(sorted(found.items()))


@lru_cache(maxsize=None)
def code_hash(module: str, root: Path = PROJECT_ROOT, start_file: Path | None = None) -> str:
    """Hash of the names and sources of every project module `module` reaches (`covered_modules`)."""
    digest = hashlib.sha256()
    for name, path in covered_modules(module, root, start_file).items():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _with_parent_packages(names: set[str]) -> set[str]:
    return {".".join(name.split(".")[:depth]) for name in names for depth in range(1, name.count(".") + 2)}


def _imports_of(name: str, path: Path, root: Path) -> set[str]:
    """The module names `name` (source at `path`) may import: candidates, kept by the caller where a file exists."""
    stat = path.stat()
    found, dynamic_sites = _parsed_imports(name, path, path.name == "__init__.py", stat.st_mtime_ns, stat.st_size)
    if dynamic_sites and name not in DYNAMIC_IMPORTS:
        sites = ", ".join(f"{path}:{line}" for line in dynamic_sites)
        raise UndeclaredDynamicImport(
            f"{sites}: a dynamic import the code hash cannot follow. Declare the project modules it can import "
            f"in DYNAMIC_IMPORTS[{name!r}] (loraflow/runtime/code_graph.py; 'package.*' for a plug-in folder), "
            f"or import them by name")
    return found | _expand_declared(DYNAMIC_IMPORTS.get(name, ()), root)


def _expand_declared(declared: tuple[str, ...], root: Path) -> set[str]:
    names = set()
    for entry in declared:
        if not entry.endswith(".*"):
            names.add(entry)
            continue
        package = entry[:-2]
        folder = root.joinpath(*package.split("."))
        names |= {f"{package}.{'.'.join(path.relative_to(folder).with_suffix('').parts)}".removesuffix(".__init__")
                  for path in folder.rglob("*.py")}
    return names


@lru_cache(maxsize=None)
def _parsed_imports(name: str, path: Path, is_package: bool, mtime_ns: int, size: int) -> tuple[set[str], list[int]]:
    """(imported module candidates, line numbers of dynamic imports) of one source file; cached per file version."""
    package = name if is_package else name.rpartition(".")[0]
    found, dynamic_sites = set(), []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.Call) and _called_name(node.func) in DYNAMIC_CALLS:
            target = node.args[0] if node.args else None
            if _called_name(node.func) in ("import_module", "__import__") and isinstance(target, ast.Constant) \
                    and isinstance(target.value, str) and not target.value.startswith("."):
                found.add(target.value)
            else:
                dynamic_sites.append(node.lineno)
    return {candidate for candidate in found if candidate.split(".")[0] in PROJECT_PACKAGES}, dynamic_sites


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name `from <level dots><module> import ...` refers to inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None
