"""Static checks on the whole tree (undefined names, unused imports, syntax errors)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    r = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_module_defines_a_top_level_name_twice():
    """A second `def f` in a module silently replaces the first for every caller (ruff misses it when the first
    one is used inside a function body)."""
    import ast
    import collections

    ours = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") or part in ("_generated", "build")
                                                       for part in p.relative_to(ROOT).parts)]
    twice = {}
    for path in ours:
        tree = ast.parse(path.read_text())
        names = collections.Counter(n.name for n in tree.body
                                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        if repeated := [name for name, count in names.items() if count > 1]:
            twice[str(path.relative_to(ROOT))] = repeated
    assert not twice, twice
