"""The package's import rules, read from the source (imports inside functions included).

* The library (extract, approx, compare, optim, distributed and the block/stats/sqrt/io modules)
  never imports the application (:mod:`curvlab.app`) or the deprecated aliases of its modules.
* Only ``curvlab.extract`` talks to BackPACK.
* ``approx`` is linear algebra: it imports neither ``extract``, ``compare`` nor ``optim``;
  ``compare`` and ``optim`` do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "curvlab"
APPLICATION = ("curvlab.app", "curvlab.data", "curvlab.models", "curvlab.cli", "curvlab.train", "curvlab.report")
DEPRECATED_ALIASES = {"data.py", "models.py", "cli.py", "layout.py", "_deprecated.py", "__main__.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of its code."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    return imports_of(path.read_text(encoding="utf-8"), package)


def imports_of(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, relative ones made absolute."""
    tree = ast.parse(source)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def library_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("app", "train", "report") or (len(rel.parts) == 1 and rel.name in DEPRECATED_ALIASES):
            continue
        files.append(path)
    return files


def uses(found: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in found if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_does_not_import_the_application(path: Path) -> None:
    assert uses(imports(path), APPLICATION) == []


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_extract_talks_to_backpack(path: Path) -> None:
    if path.relative_to(PACKAGE).parts[0] != "extract":
        assert uses(imports(path), ("backpack",)) == []


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("approx", ("curvlab.extract", "curvlab.compare", "curvlab.optim", "curvlab.distributed")),
        ("compare", ("curvlab.optim",)),
        ("optim", ("curvlab.compare",)),
        ("extract", ("curvlab.approx", "curvlab.compare", "curvlab.optim")),
    ],
)
def test_layers_depend_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    for path in sorted((PACKAGE / package).rglob("*.py")):
        assert uses(imports(path), forbidden) == [], path


def test_the_checks_see_imports_inside_functions() -> None:
    """The parser catches a lazy or relative import of the application in a library module."""
    source = "def f():\n    from curvlab.app.data import load_dataset\n    from ..app import cli\n    import backpack\n"
    found = imports_of(source, "curvlab.optim")
    assert uses(found, APPLICATION) == ["curvlab.app", "curvlab.app.cli", "curvlab.app.data", "curvlab.app.data.load_dataset"]
    assert uses(found, ("backpack",)) == ["backpack"]


def test_the_version_is_declared_once_and_not_below_what_the_code_names() -> None:
    """``curvlab.__version__`` is the version ``pyproject.toml`` declares, and no note in the code
    ("deprecated since curvlab 0.2", "moved in curvlab 0.2") names a release after it: outputs
    stamped with the version (``report.nc``'s ``curvlab_version``) would otherwise claim to come
    from the release the code treats as legacy."""
    import re
    import tomllib

    import curvlab

    declared = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert curvlab.__version__ == declared
    version = tuple(int(p) for p in declared.split(".")[:2])
    named = {m for path in PACKAGE.rglob("*.py")
             for m in re.findall(r"curvlab (\d+\.\d+)\b", path.read_text(encoding="utf-8"))}
    assert named and all(tuple(int(p) for p in m.split(".")) <= version for m in named), (declared, sorted(named))
