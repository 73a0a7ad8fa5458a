"""The house rules that reviews forget: imports point one way (bench → jobs → pipelines →
trol), `trol` never imports Ray, every package under pipelines/ says what it holds, and no
Python file passes 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = ["trol", "pipelines", "jobs", "bench"]  # each may import only those before it
MAX_LINES = 400


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (REPO / top).rglob("*.py") if ".venv" not in p.parts)


def imported_tops(path: Path) -> set[str]:
    """Top-level names a module imports, anywhere in it (lazy imports inside functions too)."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_runs_back_up(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    if layer == "trol":
        above |= {"ray"}  # the model is plain PyTorch + transformers
    wrong = {str(p.relative_to(REPO)): sorted(imported_tops(p) & above) for p in python_files(layer)}
    assert not {k: v for k, v in wrong.items() if v}, f"{layer} may not import {sorted(above)}"


def test_the_rule_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\ndef f():\n    from jobs.caption import main\n    import ray.data\n"
                      "from . import sibling\n")
    assert imported_tops(module) == {"os", "jobs", "ray"}


def test_every_pipelines_package_says_what_it_holds() -> None:
    for init in sorted((REPO / "pipelines").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{init.relative_to(REPO)} needs a module docstring"
    stray = [p.name for p in (REPO / "pipelines").glob("*.py") if p.name not in {"__init__.py", "specs.py", "stall.py"}]
    assert not stray, f"modules belong in a component package under pipelines/: {stray}"


def test_no_python_file_passes_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in python_files(*LAYERS, "tests", "cluster")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"
