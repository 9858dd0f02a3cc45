"""What privacy costs downstream: the synthetic-learning experiment's AsynDGAN row again under privacy settings.

Takes a synthetic-learning run folder (its phantom, settings, real test cases and rows are reused) and adds, for
each setting, one GAN trained with the same generator, discriminators, steps and images per step, then a
synthetic data set from the training cases' label maps, then the same segmentation recipe and seeds:

    off          the run's own `asyndgan` row: lambda_L1 100, no DP (the papers'; gradients give pixels away)
    l1-off       lambda_L1 0, no DP (what the L1 term buys)
    dp-<s>       lambda_L1 0, each site's discriminators trained with DP-SGD at noise multiplier s
                 (site_agent/privacy.py)
    dp-<s>-ndf<k>  the same with k discriminator filters (fewer parameters: less DP noise in all)

The privacy GANs run their three sites in this process (simulation/local_sites.py: the same SiteWorker code as a
site process, no transport), which is the same arithmetic as the distributed run. Each site's epsilon is read
from its own ledger. Results go to RUN/privacy/: report.md, results.json, and per-setting folders.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import threading
import time

from asyndgan.central_server.trainer import Trainer
from asyndgan.common.config import PrivacyConfig
from asyndgan.common.errors import ConfigError
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

from asyndgan.experiments.synthetic_learning_report import plus_minus
from asyndgan.experiments.synthetic_learning import (
    SyntheticLearningConfig, make_phantom, segment_rows, server_config, synthetic_set,
)
from asyndgan.formats.datasets import open_dataset
from asyndgan.experiments.pieces import write_json, finished_checkpoint

log = logging.getLogger(__name__)
DEFAULT_SETTINGS = ("l1-off", "dp-1.0", "dp-0.6")
BUDGET_FOR_MEASURING = 100.0  # the experiment measures the epsilon a whole run spends; it does not stop at 10


def parse_setting(name: str) -> tuple[float, float | None, int | None]:
    """'l1-off' -> (0, None, None); 'dp-<noise>[-ndf<k>]' -> (0, noise, k): k discriminator filters instead of
    the run's (DP-SGD's noise grows with the square root of the discriminators' parameter count; the clipped
    signal does not)."""
    base, _, ndf_part = name.partition("-ndf")
    ndf = None
    if ndf_part:
        if not ndf_part.isdigit() or not 4 <= int(ndf_part) <= 256:
            raise ConfigError(f"privacy setting {name!r}: -ndf<k> needs 4 <= k <= 256")
        ndf = int(ndf_part)
    if base == "l1-off":
        return 0.0, None, ndf
    if base.startswith("dp-"):
        try:
            noise = float(base[3:])
        except ValueError:
            noise = -1.0
        if 0.3 <= noise <= 20:
            return 0.0, noise, ndf
    raise ConfigError(f"unknown privacy setting {name!r}: use l1-off or dp-<noise multiplier 0.3..20>, "
                      "optionally with -ndf<k>")


def load_run(run: pathlib.Path) -> SyntheticLearningConfig:
    path = run / "settings.json"
    if not path.is_file():
        raise ConfigError(f"{run} holds no synthetic-learning run ({path} is missing); run "
                          "`asyndgan experiment synthetic-learning` first")
    return SyntheticLearningConfig.model_validate({**json.loads(path.read_text()), "out": run})


def train_private_gan(cfg: SyntheticLearningConfig, sites: list[pathlib.Path], name: str, folder: pathlib.Path) -> dict:
    """One GAN under a privacy setting, sites in process; {checkpoint, epsilon per site, seconds}. Kept when done."""
    lambda_l1, noise, ndf = parse_setting(name)
    run_dir = folder / "gan"
    record = folder / "gan.json"
    if record.is_file() and finished_checkpoint(run_dir, cfg.gan.steps):
        return json.loads(record.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # a cut run (and its experiment-only ledgers) starts again
    scfg = server_config(cfg, run_dir, len(sites), cfg.gan.batch_per_site)
    scfg.site.loss.lambda_l1 = lambda_l1
    if ndf is not None:
        scfg.site.model.image2d.ndf = ndf
    prep = cfg.gan.recipe.prep(cfg.out / "cache")
    # The earlier slice-level mechanism this experiment measured (rate 0.01 of slices, fixed noise); the
    # patient-level one is measured by `asyndgan experiment privacy-utility`.
    privacy = None if noise is None else PrivacyConfig(epsilon=BUDGET_FOR_MEASURING, noise_multiplier=noise,
                                                       unit="slice", sample_rate=0.01)
    sessions = [LocalSession(f"site{i + 1}", open_dataset(path, scfg.site, prep), scfg.site, device=cfg.device,
                             privacy=privacy, ledger_path=run_dir / "ledgers" / f"site{i + 1}.json")
                for i, path in enumerate(sites)]
    started = time.monotonic()
    Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), run_dir).run(threading.Event())
    result = {
        "setting": name, "lambda_l1": lambda_l1, "noise_multiplier": noise,
        "ndf": scfg.site.model.image2d.ndf,
        "checkpoint": str(finished_checkpoint(run_dir, cfg.gan.steps)),
        "seconds": round(time.monotonic() - started, 1),
        "sites": {s.site_id: {"samples": s.num_samples, "epsilon": s.worker.epsilon_spent,
                              "delta": None if privacy is None else privacy.delta,
                              "sample_rate": getattr(s.worker.learner, "sample_rate", None)}
                  for s in sessions},
    }
    write_json(record, result)
    log.info("%s: %d steps in %.0f s; epsilon per site %s", name, cfg.gan.steps, result["seconds"],
             {k: v["epsilon"] for k, v in result["sites"].items()})
    return result


def run(run_folder: pathlib.Path, settings: list[str], audit: pathlib.Path | None = None,
        threads: int | None = None) -> dict:
    """threads: torch CPU threads (default: the run's); 1 when other jobs share the cores, since idle OpenMP
    threads spinning at barriers on an oversubscribed machine slow a step by orders of magnitude."""
    import torch

    from asyndgan.experiments.synthetic_learning_report import summarise_rows

    cfg = load_run(run_folder)
    torch.set_num_threads(threads or cfg.threads)
    for name in settings:
        parse_setting(name)
    sites, test_dir = make_phantom(cfg)  # the run's own (kept)
    out = cfg.out / "privacy"
    gans, evals = {}, {}
    for i, name in enumerate(settings):
        log.info("[%d/%d] %s: GAN, synthetic data, segmentation", i + 1, len(settings), name)
        folder = out / name
        gans[name] = train_private_gan(cfg, sites, name, folder)
        synthetic = synthetic_set(cfg, pathlib.Path(gans[name]["checkpoint"]), cfg.out / "pooled",
                               folder / "synthetic" / "train")
        evals.update(segment_rows(cfg, {f"privacy_{name}": [synthetic]}, test_dir))
    # The reference rows come from the synthetic-learning run itself (computed there if missing).
    smallest = f"real_site{min(range(len(sites)), key=lambda k: (cfg.phantom.cases_per_site[k], k)) + 1}"
    refs = segment_rows(cfg, {"asyndgan": [cfg.out / "synthetic" / "asyndgan" / "train"], "real_all": sites,
                              smallest: [sites[int(smallest[-1]) - 1]]}, test_dir)
    rows = summarise_rows({**refs, **evals})
    attacks = _audit_results(audit)
    results = {"run": str(cfg.out), "settings": settings, "gans": gans, "rows": rows, "audit": attacks,
               "segmentation_seeds": [cfg.seed + k for k in range(cfg.segmentation_seeds)]}
    write_json(out / "results.json", results)
    (out / "report.md").write_text(_report(cfg, settings, gans, rows, attacks, smallest))
    return results


def _audit_results(audit: pathlib.Path | None) -> dict | None:
    if audit is None:
        return None
    path = audit / "results.json"
    if not path.is_file():
        raise ConfigError(f"--audit {audit}: no results.json there (run `asyndgan audit privacy` first)")
    return json.loads(path.read_text())


def _report(cfg, settings, gans, rows, attacks, smallest) -> str:
    off = rows["asyndgan"]["dice"]["mean"]
    lines = [
        "# What privacy costs: segmentation Dice against epsilon",
        "",
        f"Synthetic-learning run `{cfg.out}` (preset {cfg.preset}, seed {cfg.seed}): same phantom, generator, "
        f"{cfg.gan.steps} generator steps, {cfg.gan.batch_per_site} images per site per step, segmentation recipe "
        f"and {cfg.segmentation_seeds} seeds per row, scored on the same {cfg.phantom.test_cases} real test "
        "cases (whole tumour, 3-D per patient).",
        "`off` is the run's distributed AsynDGAN row (three site processes, mutual TLS); the other GANs ran their "
        "three sites in one process (the same site code, no transport). Epsilon: each site's own ledger (Opacus "
        "RDP accountant) after the whole run, at delta 1e-5; the unit protected is one training slice.",
        "",
        "| setting | lambda_L1 | noise | D filters | epsilon per site (max) | Dice | vs off | HD95 (mm) |",
        "|---|---|---|---|---|---|---|---|",
        f"| off (papers') | 100 | - | {cfg.gan.ndf} | unbounded (see the audit) | {plus_minus(rows['asyndgan']['dice'])} | - | "
        f"{plus_minus(rows['asyndgan']['hd95_mm'], 1)} |",
    ]
    for name in settings:
        g, r = gans[name], rows[f"privacy_{name}"]
        eps = [v["epsilon"] for v in g["sites"].values() if v["epsilon"] is not None]
        eps_text = f"{max(eps):.2f}" if eps else "unbounded"
        lines.append(f"| {name} | {g['lambda_l1']:g} | {g['noise_multiplier'] or '-'} | {g['ndf']} | {eps_text} | "
                     f"{plus_minus(r['dice'])} | {r['dice']['mean'] - off:+.3f} | {plus_minus(r['hd95_mm'], 1)} |")
    lines += ["", f"References: real_all {plus_minus(rows['real_all']['dice'])}, {smallest} (the smallest site) "
              f"{plus_minus(rows[smallest]['dice'])}.", ""]
    if attacks is not None:
        lines += ["## Attacks (from `asyndgan audit privacy`)", "",
                  f"See {attacks.get('report', 'the audit folder')}: reconstruction PSNR per setting and attack "
                  "against the mean-image baseline.", ""]
    lines += ["## Epsilon per site", ""]
    for name in settings:
        for site, v in gans[name]["sites"].items():
            if v["epsilon"] is not None:
                lines.append(f"- {name} {site}: {v['samples']} training slices, sampling rate "
                             f"{v['sample_rate']:.4f}, epsilon {v['epsilon']:.2f}")
    return "\n".join(lines) + "\n"


