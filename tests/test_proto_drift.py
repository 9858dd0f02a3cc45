"""The committed generated code must be exactly what scripts/generate_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_proto", ROOT / "scripts" / "generate_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    committed = ROOT / "common" / "_generated"
    fresh = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".py", ".pyi"))
    assert fresh == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    for name in fresh:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"common/_generated/{name} is stale: run python scripts/generate_proto.py")
