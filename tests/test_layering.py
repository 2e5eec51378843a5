"""The package's layering, read from its source: every import of every module under custom_components/.

Layers, lowest first (README, "Layout"): schedulers (pure maths) -> networks, losses, data -> engines, metrics ->
pipelines (in memory) -> runs (write files) -> cli. A module may import its own layer and the ones below, never one above; imports inside functions
and under ``TYPE_CHECKING`` count too (a lazy import is still a dependency). ``errors.py`` and ``arguments.py`` are
the shared foundation (they import nothing of the package's layers); ``bundles.py`` (finds the bundles) sits with
the pipelines, ``packaging.py`` with the CLI.

"Writes files", as :func:`writes_files` decides it from a module's syntax tree: some code in the module (a function,
a method or module-level code) calls

- a file-writing primitive: ``open``/``Path.open``/``os.open`` with a mode or flags that write, ``os.replace``,
  ``os.rename``, ``os.makedirs``/``mkdir``, ``os.remove``/``unlink``, ``shutil`` copies, moves and removals,
  ``tempfile`` files and folders, ``torch.save``, ``nibabel.save``, ``numpy.save*``, ``json.dump``, a ``zipfile`` opened
  to write, MONAI's/ignite's checkpoint savers, or a method
  ``.save``, ``.savefig``, ``.write_text``, ``.write_bytes``, ``.mkdir``, ``.touch``, ``.to_filename``, ``.unlink``;
- or a function of the package that does (followed through ``from ... import`` and ``module.function`` calls, to a
  fixed point), e.g. :func:`custom_components.data.writers.save_nifti`.

Merely importing a writer module is what the pipelines check forbids: ``import custom_components.pipelines`` is run
in a fresh interpreter and every ``custom_components`` module it loads must not write files.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "custom_components"

RANKS = {
    "errors": 0, "arguments": 0, "__init__": 0,
    "schedulers": 0,
    "networks": 1, "losses": 1, "data": 1,
    "engines": 2, "metrics": 2,
    "pipelines": 3, "bundles": 3,
    "runs": 4,
    "cli": 5, "packaging": 5,
}  # fmt: skip
LOWER = ("schedulers", "networks", "losses", "data")
HIGHER = ("engines", "pipelines", "runs", "metrics", "cli")

# module-qualified calls that write: (module the name was imported from, attribute)
WRITING_FUNCTIONS = {
    ("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "makedirs"), ("os", "mkdir"), ("os", "remove"),
    ("os", "unlink"), ("os", "rmdir"), ("os", "removedirs"), ("os", "symlink"), ("os", "link"), ("os", "truncate"),
    ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"), ("shutil", "move"),
    ("shutil", "rmtree"), ("shutil", "make_archive"),
    ("tempfile", "mkstemp"), ("tempfile", "mkdtemp"), ("tempfile", "NamedTemporaryFile"),
    ("tempfile", "TemporaryFile"), ("tempfile", "TemporaryDirectory"),
    ("torch", "save"), ("nibabel", "save"), ("numpy", "save"), ("numpy", "savez"), ("numpy", "savez_compressed"),
    ("numpy", "savetxt"), ("json", "dump"),
    # savers of the training libraries (MONAI's CheckpointSaver wraps ignite's ModelCheckpoint and DiskSaver)
    ("monai.handlers", "CheckpointSaver"), ("ignite.handlers", "ModelCheckpoint"), ("ignite.handlers", "DiskSaver"),
    ("ignite.handlers", "Checkpoint"),
}  # fmt: skip
WRITING_METHODS = {"save", "savefig", "write_text", "write_bytes", "mkdir", "touch", "to_filename", "unlink"}
WRITING_OS_FLAGS = {"O_CREAT", "O_WRONLY", "O_RDWR", "O_APPEND", "O_TRUNC"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@lru_cache(maxsize=None)
def parsed(name: str) -> ast.Module:
    path = package_modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _absolute(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = name.split(".") if package_modules()[name].name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, tree: ast.Module | None = None) -> list[tuple[str, int]]:
    """Every package module that module ``name`` imports, with the line (``from pkg import submodule`` included)."""
    found = []
    for node in ast.walk(parsed(name) if tree is None else tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(name, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in package_modules() else source, node.lineno))
    return [(target, line) for target, line in found if target.split(".")[0] == "custom_components"]


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer() -> None:
    assert set(map(layer, package_modules())) <= set(RANKS), "a new top-level module or subpackage needs a layer in RANKS"


def test_no_module_imports_a_higher_layer() -> None:
    violations = [
        f"{name} (line {line}) imports {target}: {layer(name)} is below {layer(target)}"
        for name in package_modules()
        for target, line in imports(name)
        if RANKS[layer(target)] > RANKS[layer(name)]
    ]
    assert not violations, "\n".join(violations)


def test_the_acceptance_layers_in_particular() -> None:
    """The issue's wording: no module of schedulers, networks, losses or data imports engines, pipelines, metrics or cli."""
    upward = [(name, target) for name in package_modules() if layer(name) in LOWER
              for target, _ in imports(name) if layer(target) in HIGHER]
    assert upward == []


@pytest.mark.parametrize("source", [
    "from ..runs import generate\n",                                                          # relative
    "def f():\n    from custom_components.engines.trainer import GuideGenTrainer\n",         # inside a function
    "from custom_components import cli\n",                                                    # a submodule by name
    "import custom_components.metrics.evaluate\n",                                           # plain
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engines import checkpoints\n",  # typing only
])  # fmt: skip
def test_the_import_walk_sees_every_kind_of_upward_import(source: str) -> None:
    """The checker itself: an upward import planted in a data module is found (so the tests above can fail)."""
    targets = [target for target, _ in imports("custom_components.data.io", ast.parse(source))]
    assert targets and all(RANKS[layer(t)] > RANKS["data"] for t in targets), targets


# ------------------------------------------------------------------------------------------------- writes files


@dataclass
class _Writes:
    """Per module: its functions (qualified names) that write, and why (the first write found)."""

    functions: dict[str, str] = field(default_factory=dict)
    module_level: str | None = None


def _aliases(tree: ast.Module, name: str) -> dict[str, str]:
    """Local name -> what it refers to: 'os', 'numpy', 'custom_components.data.io.save_nifti', ..."""
    table: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                table[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(name, node)
            for alias in node.names:
                table[alias.asname or alias.name] = f"{source}.{alias.name}"
    return table


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _mode_writes(call: ast.Call, position: int) -> bool:
    mode = call.args[position] if len(call.args) > position else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def _primitive(call: ast.Call, aliases: dict[str, str]) -> str | None:
    """Why this call writes a file by itself, or None."""
    target = _dotted(call.func, aliases)
    canonical = {"np": "numpy", "nib": "nibabel"}
    if target:
        head, _, attr = target.rpartition(".")
        head = canonical.get(head, head)
        if target == "open" and _mode_writes(call, 1):
            return "open(..., write mode)"
        if (head, attr) == ("os", "open"):
            flags = {n.attr for n in ast.walk(call.args[1]) if isinstance(n, ast.Attribute)} if len(call.args) > 1 else set()
            return "os.open(O_CREAT/O_WRONLY/...)" if flags & WRITING_OS_FLAGS else None
        if (head, attr) in WRITING_FUNCTIONS:
            return f"{head}.{attr}"
        if (head, attr) == ("zipfile", "ZipFile") and _mode_writes(call, 1):
            return "zipfile.ZipFile(..., 'w')"
    if isinstance(call.func, ast.Attribute):
        if call.func.attr in WRITING_METHODS:
            return f".{call.func.attr}(...)"
        if call.func.attr == "open" and _mode_writes(call, 0):
            return ".open(write mode)"
    return None


def _scopes(tree: ast.Module) -> list[tuple[str | None, str | None, list[ast.AST]]]:
    """(qualified function name or None for module level, its class or None, the nodes that run in it). Nested code
    counts for its outermost function: a lambda or inner function writes when the function that makes it does."""
    scopes: list[tuple[str | None, str | None, list[ast.AST]]] = []
    module_level: list[ast.AST] = []
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scopes.append((statement.name, None, list(ast.walk(statement))))
        elif isinstance(statement, ast.ClassDef):
            for item in statement.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    scopes.append((f"{statement.name}.{item.name}", statement.name, list(ast.walk(item))))
                else:
                    module_level += list(ast.walk(item))
        else:
            module_level += list(ast.walk(statement))
    return [(None, None, module_level), *scopes]


def _resolve(dotted: str, depth: int = 0) -> tuple[str, str] | None:
    """'custom_components.data.io.save_nifti' -> ('custom_components.data.io', 'save_nifti'), following re-exports
    (``custom_components.runs.autoencoder.encode_file`` is ``custom_components.data.latents.encode_file``)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module, function = ".".join(parts[:cut]), ".".join(parts[cut:])
        if module in package_modules():
            break
    else:
        return None
    head, rest = function.split(".")[0], function.split(".")[1:]
    tree = parsed(module)
    if any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s.name == head for s in tree.body):
        return module, function
    target = _aliases(tree, module).get(head)
    if depth > 10 or not target or not target.startswith("custom_components."):
        return None
    resolved = _resolve(".".join([target, *rest]), depth + 1)
    return resolved


@lru_cache(maxsize=None)
def writers() -> dict[str, _Writes]:
    """Every package module's writing functions (and module-level writes), closed over calls between functions."""
    found = {name: _Writes() for name in package_modules()}
    calls: dict[tuple[str, str | None], set[tuple[str, str]]] = {}  # (module, scope) -> package functions it uses
    for name in package_modules():
        tree = parsed(name)
        aliases = _aliases(tree, name)
        local = {s.name for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for scope, cls, nodes in _scopes(tree):
            callees: set[tuple[str, str]] = set()
            for node in nodes:
                if not isinstance(node, ast.Call):
                    continue
                reason = _primitive(node, aliases)
                if reason and scope is None:
                    found[name].module_level = found[name].module_level or reason
                elif reason:
                    found[name].functions.setdefault(scope, reason)
                # package functions called in this scope, or handed to a call (atomic_write, a pool, ...) that may
                # call them; a function merely named (a command table) is not a call
                for used in (node.func, *node.args, *(k.value for k in node.keywords)):
                    if isinstance(used, ast.Name) and used.id in local:
                        callees.add((name, used.id))
                    elif isinstance(used, (ast.Name, ast.Attribute)):
                        target = _dotted(used, aliases)
                        resolved = _resolve(target) if target and target.startswith("custom_components.") else None
                        if resolved:
                            callees.add(resolved)
                        if cls and isinstance(used, ast.Attribute) and isinstance(used.value, ast.Name) and used.value.id == "self":
                            callees.add((name, f"{cls}.{used.attr}"))
            calls[(name, scope)] = callees
    changed = True
    while changed:
        changed = False
        for (name, scope), callees in calls.items():
            for module, function in sorted(callees):
                reasons = found[module].functions
                # a class writes when one of its methods does (using the class may lead to any of them)
                reason = reasons.get(function) or next((r for f, r in reasons.items() if f.startswith(f"{function}.")), None)
                if reason is None or (module, function) == (name, scope):
                    continue
                why = f"uses {module.removeprefix('custom_components.')}.{function}"
                if scope is None:
                    if found[name].module_level is None:
                        found[name].module_level, changed = why, True
                elif scope not in found[name].functions:
                    found[name].functions[scope], changed = why, True
    return found


def writes_files(name: str) -> str | None:
    """Why module ``name`` writes files (its first writing function and what it calls), or None."""
    entry = writers()[name]
    if entry.module_level:
        return f"module level: {entry.module_level}"
    if entry.functions:
        function, reason = next(iter(entry.functions.items()))
        more = len(entry.functions) - 1
        return f"{function}: {reason}" + (f" (+{more} more)" if more else "")
    return None


def test_the_writer_detection_knows_the_package_writers() -> None:
    """Known writers are found (directly and through package helpers); pure modules are not."""
    for name in ("custom_components.data.writers", "custom_components.runs.autoencoder", "custom_components.runs.tcss",
                 "custom_components.runs.latent_cache", "custom_components.runs.generate",
                 "custom_components.metrics.plots", "custom_components.engines.distributed"):
        assert writes_files(name), name
    assert "save_nifti" in writers()["custom_components.data.writers"].functions
    assert "encode_file" in writers()["custom_components.runs.autoencoder"].functions
    assert "save_masks" in writers()["custom_components.runs.tcss"].functions  # through data.writers.save_nifti
    for name in ("custom_components.schedulers.ddim", "custom_components.schedulers.categorical",
                 "custom_components.networks.slabs", "custom_components.data.intensity", "custom_components.errors",
                 "custom_components.data.io", "custom_components.data.preview", "custom_components.data.latents",
                 "custom_components.pipelines.ldm", "custom_components.pipelines.tcss"):
        assert writes_files(name) is None, (name, writes_files(name))


def _loaded_by_importing(module: str) -> list[str]:
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'custom_components' or m.startswith('custom_components.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_pipelines_loads_no_module_that_writes_files() -> None:
    loaded = _loaded_by_importing("custom_components.pipelines")
    assert "custom_components.pipelines" in loaded
    offenders = {name: writes_files(name) for name in loaded if name in package_modules() and writes_files(name)}
    assert not offenders, "modules that write files, loaded by `import custom_components.pipelines`:\n" + "\n".join(
        f"  {name}: {why}" for name, why in sorted(offenders.items()))
