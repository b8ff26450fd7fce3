"""The code's shape rules, checked on the source tree: no module over 600 lines, no function
over 80 lines without a `# reason:` comment on its def line or the line above, and the
package boundaries (client/ never imports server/ nor the reverse; shared/ imports neither
of them nor simulations/). Run as a script to print every offender."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulations")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
FORBIDDEN = {"client": {"server"}, "server": {"client"},
             "shared": {"client", "server", "simulations"}}


def _modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py"))


def long_modules(root: Path = ROOT) -> list[str]:
    out = []
    for path in _modules(root):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


def _has_reason(lines: list[str], node: ast.AST) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    around = [lines[node.lineno - 1], lines[first - 2] if first >= 2 else ""]
    return any("# reason:" in line for line in around)


def long_functions(root: Path = ROOT) -> list[str]:
    out = []
    for path in _modules(root):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and not _has_reason(lines, node):
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return out


def _imported_packages(path: Path, root: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) for each import of ours in `path`."""
    found = set()
    rel_parts = path.relative_to(root).parts
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = list(rel_parts[:-1])[: len(rel_parts) - node.level]
                names = [".".join([*base, node.module or ""]).strip(".")]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedinterest" and len(parts) > 1:
                parts = parts[1:]
            if parts[0] in PACKAGES:
                found.add((parts[0], node.lineno))
    return found


def boundary_violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in _modules(root):
        own = path.relative_to(root).parts[0]
        for pkg, line in sorted(_imported_packages(path, root)):
            if pkg in FORBIDDEN.get(own, ()):
                out.append(f"{path.relative_to(root)}:{line} imports {pkg}/")
    return out


def test_no_module_over_600_lines():
    assert long_modules() == []


def test_no_function_over_80_lines_without_a_reason():
    assert long_functions() == []


def test_package_boundaries():
    assert boundary_violations() == []


def test_the_checker_catches_each_rule(tmp_path):
    """The checks are real: a tree that breaks each rule is reported."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "shared" / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    body = "".join("    y = 1\n" for _ in range(MAX_FUNCTION_LINES))
    (tmp_path / "client" / "long.py").write_text(
        f"def long():\n{body}\n\n# reason: one table, splitting it hurts\ndef excused():\n{body}")
    (tmp_path / "client" / "bad.py").write_text("from fedinterest.server import x\n")
    (tmp_path / "server" / "bad.py").write_text("import fedinterest.client.device\n")
    (tmp_path / "shared" / "bad.py").write_text("from ..simulations import x\n")
    assert long_modules(tmp_path) == [f"shared/big.py: {MAX_MODULE_LINES + 1} lines"]
    assert long_functions(tmp_path) == [f"client/long.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
    assert boundary_violations(tmp_path) == ["client/bad.py:1 imports server/",
                                             "server/bad.py:1 imports client/",
                                             "shared/bad.py:1 imports simulations/"]


if __name__ == "__main__":
    for problem in long_modules() + long_functions() + boundary_violations():
        print(problem)
