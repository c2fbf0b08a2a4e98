"""The package's layers, read from the source: which modules import which (top-level and lazy
imports alike), so that the tree keeps the shape docs/ARCHITECTURE.md describes."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "modlm"
# What each layer may import from modlm (besides itself). The data layer needs only the user-error
# type, the model's default sizes and how a model's folders keep its chat template and special tokens.
ALLOWED = {
    "model": set(),
    "analysis": {"model"},
    "data": {"model.errors", "model.config", "model.chat_template", "model.hf_format"},
    "saved": {"model", "analysis", "data"},
    "training": {"model", "analysis", "data", "saved"},
    "cli": {"model", "analysis", "data", "saved", "training"},
    # beside cli: a server reads models, never trains; it reads its command line as the others do
    "serve": {"model", "analysis", "data", "saved", "cli.usage"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modlm modules ``path`` imports, anywhere in the file, as dotted names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "modlm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "modlm":
                continue
            found.add(target)
            if node.module is None or node.level:  # from . import x: x may be a module
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {name for name in found if name in modules} - {here}


GRAPH = {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_circle():
    """No module reaches itself through imports, lazy ones included (a package's ``__init__``
    re-exporting its modules is not a circle: nothing below imports the package back)."""

    def reach(start):
        seen, todo = set(), list(GRAPH[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH.get(m, ()))
        return seen

    circles = [m for m in GRAPH if m in reach(m)]
    assert not circles, circles


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_layers_import_only_the_layers_below(name):
    for module, targets in GRAPH.items():
        if layer(module) != name:
            continue
        for target in targets:
            other = layer(target)
            if other == name or other == "":
                assert other == name, f"{module} imports the package root {target}"
                continue
            allowed = ALLOWED[name]
            assert other in allowed or ".".join(target.split(".")[1:3]) in allowed, f"{module} imports {target}"


def test_the_model_imports_no_framework():
    for path in (SRC / "model").glob("*.py"):
        text = path.read_text()
        assert "lightning" not in text.replace("Lightning", ""), path.name
