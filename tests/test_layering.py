"""The shape of the tree: dependencies point one way (kimi_ops -> pipelines -> flows), no
import circle anywhere, no module of the pipeline or flow layers over 500 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kimi_ops", "pipelines", "flows")
FORBIDDEN = {"kimi_ops": ("ray", "prefect", "pipelines", "flows"), "pipelines": ("prefect", "flows")}
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project's modules `path` imports, anywhere in it (a function's import too): `from
    a.b import c` counts as a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def test_packages_import_only_downstream():
    offenders = []
    for package, banned in FORBIDDEN.items():
        pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(banned)})\b", re.MULTILINE)
        for path in (ROOT / package).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_no_import_circle():
    """No module reaches itself through the imports of the project's modules, module-level or
    inside functions (a package's `__init__` re-exporting its modules counts too)."""
    found = modules()
    graph = {name: imports(path, name, set(found)) for name, path in found.items()}
    circles = []

    def visit(name: str, trail: list[str], done: set[str]) -> None:
        if name in trail:
            circles.append(trail[trail.index(name):] + [name])
            return
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, trail + [name], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert circles == [], "\n".join(" -> ".join(c) for c in circles[:10])


def test_no_module_of_the_pipeline_or_flow_layers_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for package in ("pipelines", "flows")
            for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
