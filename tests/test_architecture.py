"""The package's architecture, read from its source: a folder per stage, imports running one way
(data <- learn <- infer <- report <- sweep <- serve <- cli), and inference and serving without the training engine.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import medseg

PACKAGE = Path(medseg.__file__).parent
STAGES = ("data", "learn", "infer", "report", "sweep", "serve")
# The modules at the top that every stage may read; they import no stage.
SHARED = {"errors", "files", "config", "progress", "devices", "ranks", "runs", "__init__"}
ALIASES = {"io", "rle", "datasets", "splits"}  # the README's Python API names of medseg.data's modules
APP = {"cli", "demo", "__main__"}  # the command line (also as python -m medseg) and the workflow that strings the stages together
RANK = {"data": 0, "learn": 1, "infer": 2, "report": 3, "sweep": 4, "serve": 5, "app": 6}
INFERENCE = [
    *(f"medseg.infer.{name}" for name in ("predict", "heldout", "tune", "export", "outputs", "pseudo")),
    *(f"medseg.serve.{name}" for name in ("app", "model", "server", "batcher", "uploads")),
]


def layer(module: str) -> str:
    """``shared``, ``alias``, a stage's name, or ``app`` for a dotted module name of the package."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in SHARED:
        return "shared"
    if parts[0] in STAGES:
        return parts[0]
    if parts[0] in APP:
        return "app"
    assert parts[0] in ALIASES, f"{module}: a module at the top that is neither shared nor the app; put it in a stage's folder"
    return "alias"


def medseg_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``medseg`` module a source file imports (also inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medseg" and node.level == 0:
            found += [
                (node.lineno, f"{node.module}.{alias.name}" if _is_module(f"{node.module}.{alias.name}") else node.module)
                for alias in node.names
            ]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "medseg"]
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).is_dir() or (PACKAGE / relative).with_suffix(".py").is_file()


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(["medseg", *relative.parts])


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_stage_has_its_folder():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top <= SHARED | ALIASES | APP, f"modules at the top outside the shared ones and the app: {sorted(top - SHARED - ALIASES - APP)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    importer = module_name(path)
    own = layer(importer)
    for line, imported in medseg_imports(path):
        target = layer(imported)
        where = f"{path.relative_to(PACKAGE)}:{line} imports {imported}"
        assert target != "app" or own == "app", f"{where}: no stage imports the command line or the demo"
        assert target != "alias", f"{where}: import the module from its stage's folder (medseg.data.*), not by its README alias"
        if own == "shared":
            assert target == "shared", f"{where}: the shared modules import no stage"
        elif own == "alias":
            assert target == "data", f"{where}: an alias names a module of medseg.data"
        elif target != "shared":
            assert RANK[target] <= RANK[own], (
                f"{where}: {own} must not import {target} (data <- learn <- infer <- report <- sweep <- serve <- cli)"
            )


def test_the_import_check_sees_a_wrong_way_import(tmp_path):
    """The check itself: an import from a lower stage to a higher one is found."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from medseg.infer.predict import PostProcess\n")
    assert medseg_imports(source) == [(2, "medseg.infer.predict")]
    assert RANK[layer("medseg.infer.predict")] > RANK[layer("medseg.data.samples")]


def test_inference_does_not_import_lightning():
    engine = "('lightning', 'pytorch_lightning')"
    code = f"import sys; import {', '.join(INFERENCE)}; print(sorted(m for m in sys.modules if m.split('.')[0] in {engine}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"inference imported the training engine: {result.stdout}"


def test_the_command_line_starts_without_pytorch():
    code = "import sys; import medseg.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing the command line imported {result.stdout}: --help would wait for it"


def test_the_readme_python_api_names_keep_working():
    from medseg import datasets, io, rle, splits
    from medseg.data import datasets as data_datasets
    from medseg.errors import ImageReadError

    assert rle.decode(rle.encode(rle.decode("1 3", (2, 2))), (2, 2)).sum() == 3
    assert isinstance(rle.RLEError("x"), ValueError)
    assert io.read_image.__module__ == "medseg.data.io" and issubclass(ImageReadError, Exception)
    assert datasets is data_datasets and callable(datasets.load_dataset) and callable(splits.grouped_kfold)
