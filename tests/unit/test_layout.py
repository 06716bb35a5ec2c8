"""The layout's rule, read from the code's own imports: the source side and the target side
never import each other, and what both share (pages, wire, runtimes, the modules at the
top but the CLI and the API) imports neither."""

import ast
from pathlib import Path

import livemig

PACKAGE = Path(livemig.__file__).parent
SIDES = ("livemig.source", "livemig.target")
ABOVE_BOTH = ("livemig", "livemig.cli")      # the API and the CLI drive either side


def _module(path: Path) -> str:
    parts = ["livemig", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every livemig module path imports, at the top or inside a function."""
    mod, found = _module(path), set()
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "livemig" or m.startswith("livemig.")}


def _side(mod: str) -> str | None:
    return next((s for s in SIDES if mod == s or mod.startswith(s + ".")), None)


def test_the_source_and_the_target_never_import_each_other_and_what_they_share_imports_neither():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        mod = _module(path)
        if mod in ABOVE_BOTH:
            continue
        mine = _side(mod)
        for imported in _imports(path):
            theirs = _side(imported)
            if theirs is not None and theirs != mine:
                wrong.append(f"{mod} imports {imported}")
    assert wrong == []


def test_every_module_has_its_docstring():
    assert [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if not ast.get_docstring(ast.parse(p.read_text()))] == []
