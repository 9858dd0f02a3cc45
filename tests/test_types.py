"""The core is type-checked (mypy, with pydantic's plugin): the shared code, the site, the server and the in-process
simulation; among other things, that the gRPC and in-process sites, registries and label-map stores conform to
the trainer's ports (central_server/ports.py). The tools (segmentation, synthesis, experiments) are analysed only
for the types they export to these."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["common", "formats", "central_server", "site_agent", "simulation", "segmentation", "synthesis", "experiments",
            "demo_data"]
CHECKED = ["common", "formats", "site_agent", "central_server", "simulation"]


def test_the_core_type_checks(tmp_path):
    # The folders are installed as asyndgan.<name>: mypy needs that tree, so give it one made of links.
    tree = tmp_path / "asyndgan"
    tree.mkdir()
    for name in PACKAGES:
        (tree / name).symlink_to(ROOT / name, target_is_directory=True)
    args = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
            str(tmp_path / ".mypy_cache")]
    for name in CHECKED:
        args += ["-p", f"asyndgan.{name}"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
