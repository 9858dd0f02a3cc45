"""A hospital's site needs only the core dependencies: with every optional extra's packages made unimportable, the
site's modules import, a site answers a batch under patient-level DP, and a command that does need an extra says
which one to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from asyndgan.common.cli_support import OPTIONAL_MODULES

BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {sorted(OPTIONAL_MODULES)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Block())
""")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)


def test_a_site_runs_without_the_optional_extras(toy_patient_site, tmp_path):
    r = _run(f"""
        import pathlib, pkgutil, importlib, torch
        import asyndgan.site_agent as pkg
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"asyndgan.site_agent.{{m.name}}")
        from asyndgan.common import serde
        from asyndgan.common.conditions import draw_augmentation
        from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
        from asyndgan.formats.datasets import open_dataset
        from asyndgan.site_agent.worker import SiteWorker
        cfg = SiteFacingConfig.model_validate({{"model": {{"image2d": {{"image_size": 16, "load_size": 20, "ndf": 4,
            "d_layers": 1, "modalities": ["t1", "t1ce", "t2", "flair"]}}}}, "schedule": {{"steps": 10}}}})
        worker = SiteWorker(cfg, open_dataset(pathlib.Path(r"{toy_patient_site}"), cfg),
                            privacy=PrivacyConfig(delta=1e-3, epsilon=4.0, statistics_share=0.25),
                            ledger_path=pathlib.Path(r"{tmp_path / "ledger.json"}"), site_id="s")
        rng = torch.Generator().manual_seed(0)
        keys = torch.randint(len(worker.dataset), (2,), generator=rng)
        fake = torch.rand(2, 4, 16, 16, generator=rng) * 2 - 1
        answer = worker.answer(serde.SyntheticBatch(0, 0, keys, fake, draw_augmentation(2, False, 20, 16, rng)))
        assert torch.isfinite(answer.gradient).all() and worker.epsilon_spent > 0
        blocked = {sorted(OPTIONAL_MODULES)!r}
        assert not [m for m in sys.modules if m.split(".")[0] in blocked]
        print("site ok", round(worker.epsilon_spent, 3))
    """, tmp_path)
    assert r.returncode == 0 and "site ok" in r.stdout, r.stdout + r.stderr


def test_a_command_that_needs_an_extra_names_it(tmp_path):
    r = _run("""
        import sys
        from asyndgan.cli.main import main
        sys.argv = ["asyndgan", "data", "phantom", "--out", "ph", "--sites", "1", "--train-cases", "1", "--test-cases", "0"]
        main()
    """, tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pip install 'asyndgan[research]'" in r.stderr and "Traceback" not in r.stderr
