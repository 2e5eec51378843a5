"""README's "Layout" section against the tree: the listing names every tracked file, and the equation table points
at files and symbols that exist (parsed with ast, nothing imported), covering the paper's Eq. 1-11.

Fast and import-free, so it runs before anything heavy and fails as soon as a file is moved without the README.
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPER_EQUATIONS = set(range(1, 12))
ENTRY = re.compile(r"^(?P<indent> *)(?P<name>\S+)(?: {2,}(?P<description>\S.*))?$")


def _layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## Layout\n" in text, "README has no '## Layout' section"
    return text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]


def _listing() -> dict[str, bool]:
    """The layout section's first code block as {path relative to the root: expanded}; a folder path ends in '/',
    and ``expanded`` says whether the listing names any of its children (an unexpanded folder stands for all of its
    files)."""
    match = re.search(r"```[a-z]*\n(.*?)```", _layout_section(), flags=re.S)
    assert match, "the Layout section has no code block with the tree"
    entries: dict[str, bool] = {}
    parents: list[tuple[int, str]] = []  # (indent, folder path) of the folders enclosing the current line
    for number, line in enumerate(match.group(1).splitlines(), 1):
        if not line.strip():
            continue
        entry = ENTRY.match(line)
        assert entry, f"tree line {number} is not 'name  description': {line!r}"
        indent = len(entry["indent"])
        assert indent % 2 == 0, f"tree line {number}: indent by 2 spaces per level: {line!r}"
        while parents and parents[-1][0] >= indent:
            parents.pop()
        assert indent == (parents[-1][0] + 2 if parents else 0), f"tree line {number}: indent skips a level: {line!r}"
        path = (parents[-1][1] if parents else "") + entry["name"]
        assert path not in entries, f"tree line {number}: {path} is listed twice"
        if parents:
            entries[parents[-1][1]] = True
        entries[path] = False
        if path.endswith("/"):
            parents.append((indent, path))
    return entries


def _tracked_files() -> list[str]:
    """Files git tracks that are present in the working tree (a move in progress counts as done)."""
    try:
        result = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: no list of tracked files to compare the listing with")
    return [path for path in result.stdout.decode().split("\0") if path and (ROOT / path).is_file()]


def test_every_listed_path_exists():
    missing = [path for path in _listing() if not (ROOT / path).exists()
               or path.endswith("/") != (ROOT / path).is_dir()]
    assert not missing, f"README's layout lists paths that are not in the tree (or a folder as a file): {missing}"


def test_every_tracked_file_is_listed():
    """A tracked file is listed itself or lies in a listed folder that is described as a whole (no children listed);
    inside an expanded folder every file needs its own line."""
    listing = _listing()
    unlisted = []
    for path in _tracked_files():
        if path in listing:
            continue
        folders = ["/".join(path.split("/")[:depth]) + "/" for depth in range(1, path.count("/") + 1)]
        # listed folders may span several levels in one name ("bundles/x/", "models/model.pt"), so test every prefix
        covered = [folder for folder in folders if folder in listing]
        if not covered or listing[covered[-1]]:
            unlisted.append(path)
    assert not unlisted, f"tracked files missing from README's layout listing: {unlisted}"


def _table_rows() -> list[list[str]]:
    """Rows of the equation table (header 'equation | what | file | function / class'), cells split on unescaped '|'."""
    rows, in_table = [], False
    for line in _layout_section().splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        cells = [cell.strip().replace(r"\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if not in_table:
            if cells and cells[0].lower() == "equation":
                in_table = True
                assert len(cells) == 4, f"equation table header should have 4 columns: {cells}"
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the delimiter row
        rows.append(cells)
    assert rows, "the Layout section has no table whose first column is 'equation'"
    return rows


def _equations(cell: str) -> set[int]:
    match = re.fullmatch(r"Eqs?\. (\d+)(?:\s*[–-]\s*(\d+))?", cell)
    assert match, f"equation cell should read 'Eq. N' or 'Eq. N–M': {cell!r}"
    first = int(match[1])
    last = int(match[2] or first)
    assert first <= last, cell
    return set(range(first, last + 1))


def _defines(tree: ast.Module, symbol: str) -> bool:
    """Whether ``symbol`` ('name' or 'Class.member', any depth) is defined at module level of ``tree``."""
    scope: list[ast.stmt] = tree.body
    for part in symbol.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(target, ast.Name) and target.id == part for target in targets):
                    found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def test_equation_table_names_existing_files_and_symbols():
    problems = []
    for equation, _what, file_cell, symbols_cell in _table_rows():
        _equations(equation)
        link = re.fullmatch(r"\[([^\]]+)\]\(([^)]+)\)", file_cell)
        if not link or link[1] != link[2]:
            problems.append(f"{equation}: file cell should be [path](path) relative to the root: {file_cell!r}")
            continue
        path = ROOT / link[2]
        if not path.is_file() or path.suffix != ".py":
            problems.append(f"{equation}: {link[2]} is not a Python file in the tree")
            continue
        symbols = re.findall(r"`([^`]+)`", symbols_cell)
        if not symbols:
            problems.append(f"{equation}: no `symbol` named in {symbols_cell!r}")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += [f"{equation}: {link[2]} defines no {symbol}" for symbol in symbols if not _defines(tree, symbol)]
    assert not problems, "\n".join(problems)


def test_equation_table_covers_every_paper_equation():
    covered = set().union(*(_equations(row[0]) for row in _table_rows()))
    assert PAPER_EQUATIONS <= covered, f"equations missing from README's table: {sorted(PAPER_EQUATIONS - covered)}"
    assert covered <= PAPER_EQUATIONS, f"the paper has Eq. 1-11 only, the table names {sorted(covered - PAPER_EQUATIONS)}"


def test_the_checks_can_fail():
    """The parsers reject what they should: a missing symbol or member, a malformed equation cell."""
    tree = ast.parse("class A:\n    def f(self):\n        pass\nB = 1\n")
    assert _defines(tree, "A.f") and _defines(tree, "B") and not _defines(tree, "A.g") and not _defines(tree, "f")
    assert _equations("Eq. 10–11") == {10, 11} and _equations("Eq. 7") == {7}
    with pytest.raises(AssertionError):
        _equations("Equation seven")
