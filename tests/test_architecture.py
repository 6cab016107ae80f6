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


# 0.1's module paths: in a fresh interpreter (a module warns once, when first imported)
_OLD_PATHS = """
import importlib, sys, warnings
warnings.simplefilter("error", DeprecationWarning)
out = {}
for old, new in [("curvlab.data", "curvlab.app.data"), ("curvlab.models", "curvlab.app.models"),
                 ("curvlab.cli", "curvlab.app.cli"), ("curvlab.train", "curvlab.app.train"),
                 ("curvlab.layout", "curvlab.block"), ("curvlab.report", None)]:
    try:
        importlib.import_module(old)
        out[old] = "no warning"
    except DeprecationWarning as w:
        out[old] = "deprecated since curvlab 0.2" in str(w)
warnings.simplefilter("ignore", DeprecationWarning)
for old, new in [("curvlab.data", "curvlab.app.data"), ("curvlab.train", "curvlab.app.train"),
                 ("curvlab.layout", "curvlab.block"), ("curvlab.train.parallel", "curvlab.app.train.parallel"),
                 ("curvlab.train.loop", "curvlab.app.train.loop"), ("curvlab.models.user", "curvlab.app.models.user"),
                 ("curvlab.report.summary", "curvlab.app.report.summary"), ("curvlab.report.run", "curvlab.app.report.run")]:
    module = importlib.import_module(old)
    out[old + " is " + new] = module is importlib.import_module(new) and module.__spec__.name == new
import curvlab.report.files as files
from curvlab.report import PALETTE, read_netcdf, figures
out["report.files"] = files.read_netcdf is read_netcdf and files.__name__ == "curvlab.report.files"
print(repr(out))
"""


def test_old_module_paths_warn_and_are_the_new_modules() -> None:
    """Each 0.1 path imports with a DeprecationWarning and gives the new module itself, its
    submodules too: ``curvlab.train.parallel`` used to load a second copy of the module (its
    state apart from the real one's), and ``curvlab.report.summary`` did not import."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _OLD_PATHS], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    out = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr of bools)
    assert all(v is True for v in out.values()), out


def test_the_public_subpackages_are_reached_from_import_curvlab_without_importing_torch_first() -> None:
    """After ``import curvlab`` alone, ``curvlab.optim.KFAC`` raised AttributeError unless something
    had imported ``curvlab.optim`` before (QA26); ``import curvlab`` still imports no torch."""
    import subprocess
    import sys

    code = ("import sys, curvlab; assert 'torch' not in sys.modules; "
            "print(curvlab.optim.KFAC.__name__, curvlab.approx.EKFAC.__name__, curvlab.io.__name__, "
            "curvlab.distributed.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["KFAC", "EKFAC", "curvlab.io", "curvlab.distributed"]


def test_training_with_the_optimizers_loads_none_of_the_comparisons_libraries() -> None:
    """``curvlab.optim`` reaches ``curvlab.distributed``'s reduction, and the package's
    ``__init__`` imported its comparison with it: xarray, pandas and scipy (~1.3 s) in every
    script that only trains, and in every ``curvlab train`` without probes.  Its steps —
    statistics and a refresh among them — load none of them; the comparison still imports
    on first use (and scipy where Lanczos runs)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, curvlab.optim\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))\n"
        "loss_fn = torch.nn.CrossEntropyLoss()\n"
        "opt = curvlab.optim.TEKFAC(model, lr=0.1, stats_interval=2, eigen_interval=3, scale_interval=2)\n"
        "x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))\n"
        "for _ in range(4):\n"
        "    opt.zero_grad()\n"
        "    with opt.track(loss_fn):\n"
        "        loss_fn(model(x), y).backward()\n"
        "    opt.step()\n"
        "heavy = ('xarray', 'pandas', 'scipy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "curvlab.distributed.compare\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[]", "['pandas', 'xarray']"], done.stdout


def test_the_optimizers_train_and_checkpoint_without_loading_the_compiler() -> None:
    """torch wraps ``Optimizer.add_param_group``, ``state_dict``, ``load_state_dict`` and
    ``zero_grad`` in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo``:
    1.2–2.6 s in every process that built a curvlab optimizer, as long as importing torch.
    Building one, its steps (statistics, a refresh, a norm layer's first-order update), a
    checkpoint and its loading, a new param group: none loads it.  Taken again with the compiler loaded (torch's wrappers then
    run), every step and state is the same to the bit."""
    import subprocess
    import sys

    code = (
        "import sys, torch, curvlab.optim\n"
        "def run():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 3))\n"
        "    extra = torch.nn.Parameter(torch.ones(2))\n"
        "    loss_fn = torch.nn.CrossEntropyLoss()\n"
        "    opt = curvlab.optim.TEKFAC(model, lr=0.1, momentum=0.9, stats_interval=2, eigen_interval=3)\n"
        "    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))\n"
        "    for k in range(5):\n"
        "        opt.zero_grad(set_to_none=k % 2 == 0)\n"
        "        with opt.track(loss_fn):\n"
        "            (loss_fn(model(x), y) + extra.square().sum() * (k > 2)).backward()\n"
        "        opt.step()\n"
        "        if k == 2:\n"
        "            opt.add_param_group({'params': [extra]})\n"
        "    again = curvlab.optim.TEKFAC(model, lr=0.1)\n"
        "    again.add_param_group({'params': [extra]})\n"
        "    again.load_state_dict(opt.state_dict())\n"
        "    state = again.state_dict()\n"
        "    flat = [p.detach().flatten() for p in model.parameters()] + [extra.detach()]\n"
        "    flat += [t.flatten().float() for b in state['curvlab']['blocks'].values() for t in b.values() if torch.is_tensor(t)]\n"
        "    flat += [s['momentum_buffer'].flatten() for s in state['state'].values() if 'momentum_buffer' in s]\n"
        "    return torch.cat(flat)\n"
        "alone = run()\n"
        "print('torch._dynamo' in sys.modules)\n"
        "import torch._dynamo\n"
        "print(torch.equal(alone, run()), alone.numel())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert lines[:2] == ["False", "True"] and int(lines[2]) > 50, done.stdout
