"""Choosing the anchor weight (TrainConfig.anchor_weight) for the private fine-tunes, on public data only.

Why: every private fine-tune from the public start collapsed into checkerboard images within 75 steps (privacy-utility
report), with or without noise: a discriminator that cannot adapt (frozen, or only its last layer trained) is
exploited by the generator once the pretraining's L1 term is gone. The anchor term pulls the generator's output
towards the public generator's output on the same label maps; too weak and the collapse returns, too strong and
nothing of the sites' data gets through. The weight is chosen here, never on the experiment's private sites or test
patients.

Protocol: a stand-in for a private site, built from a second, differently seeded phantom cohort ("tuning"; one of
the heterogeneous profiles, so it differs from the public cohort as the private sites do), with its own test
patients. From the experiment's public pretraining, the stand-in fine-tunes the generator with the private rows'
cheapest recipe (frozen public discriminators, the whole epsilon on the statistics release) for the experiment's
fine-tune steps, once per candidate weight. Each generator makes one synthetic volume per stand-in training case;
a segmentation model (the experiment's recipe, `seeds` seeds) trained on it is scored on the stand-in's test
patients (whole tumour Dice, 3-D). The public generator's own synthetic data is the reference. The chosen weight
is the candidate with the highest mean Dice; its margin over the others is reported with paired 95% intervals.

`asyndgan experiment anchor-tuning --preset cpu --out DIR --pretraining PU_OUT/gan/public_pretrain`; resumable.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.formats import public_start
from asyndgan.demo_data.phantom import PhantomConfig, write_phantom
from asyndgan.demo_data.phantom.presets import HETEROGENEOUS_PROFILES
from asyndgan.experiments import privacy_utility as pu

from asyndgan.experiments.statistics import paired
from asyndgan.experiments.pieces import write_json

log = logging.getLogger(__name__)


class AnchorTuningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment: pu.PrivacyUtilityConfig = Field(description="the privacy-utility settings the weight is chosen for")
    out: pathlib.Path
    pretraining: pathlib.Path = Field(description="the experiment's public pretraining folder")
    weights: list[float] = Field(default_factory=lambda: [0.0, 10.0, 100.0])
    steer_weights: list[float] = Field(default_factory=lambda: [10.0, 100.0],
                                       description="anchor weights of the steered candidates (the sites' gradients "
                                                   "left out: the release and the anchor only)")
    epsilon: float = Field(10.0, gt=0)
    profile: int = Field(2, ge=0, description="the heterogeneous profile the stand-in site is drawn from")
    cases: int = Field(30, ge=2)
    test_cases: int = Field(20, ge=2)
    seed_offset: int = Field(1000, description="the stand-in cohort's seed: the experiment's plus this")


def tuning_config(preset: pu.Preset, out: pathlib.Path, pretraining: pathlib.Path, seed: int = 0
                  ) -> AnchorTuningConfig:
    experiment = pu.preset_config(preset, out / "experiment", seed)
    if preset == "smoke":
        return AnchorTuningConfig(experiment=experiment, out=out, pretraining=pretraining, weights=[0.0, 10.0],
                                  steer_weights=[10.0], cases=3, test_cases=2)
    return AnchorTuningConfig(experiment=experiment, out=out, pretraining=pretraining)


def stand_in(cfg: AnchorTuningConfig) -> pathlib.Path:
    """The stand-in cohort (one site 'standin' and its test patients); written once."""
    root, done = cfg.out / "phantom", cfg.out / "phantom.done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        e = cfg.experiment
        write_phantom(root, PhantomConfig(sites=1, cases_per_site=[cfg.cases], test_cases=cfg.test_cases,
                                          seed=e.seed + cfg.seed_offset, shape=e.shape, cohort="tuning",
                                          profiles=[HETEROGENEOUS_PROFILES[cfg.profile].model_copy()],
                                          site_names=["standin"]))
        done.write_text("complete\n")
    return root


def _dice(cfg: AnchorTuningConfig, name: str, synthetic: pathlib.Path, test_dir: pathlib.Path) -> dict:
    e = cfg.experiment.model_copy(update={"out": cfg.out})
    evals = pu.summarise_rows(pu.segment(e, {name: [synthetic]}, test_dir))
    return evals[name]


def run(cfg: AnchorTuningConfig) -> dict:
    import torch

    e = cfg.experiment.model_copy(update={"out": cfg.out})
    torch.set_num_threads(e.threads)
    info, _ = public_start.read_folder(cfg.pretraining)  # refuses a missing or changed pretraining
    root = stand_in(cfg)
    site, test_dir = root / "standin", root / "test"
    frozen = e.dp.model_copy(update={"trainable": "none"}).privacy(cfg.epsilon, 1.0)
    rows: dict[str, dict] = {}
    started = time.monotonic()
    reference = cfg.out / "synthetic" / "public_only"
    if not (reference / ".done").is_file():
        pu.synthetic_set(e, "public_only", cfg.pretraining / info["checkpoint"], site)
    rows["public_only"] = {"anchor_weight": None, **_dice(cfg, "public_only", reference, test_dir)}
    candidates = [(f"anchor{w:g}", w, 1.0) for w in cfg.weights] + [(f"steer{w:g}", w, 0.0) for w in cfg.steer_weights]
    for name, weight, adversarial in candidates:
        settings = pu.GANRow(True, frozen, e.gan.finetune_steps, 0.0, weight, adversarial)
        gan = pu.fit_gan(e, name, cfg.out / "gan" / name, settings, [site], cfg.pretraining)
        synthetic = cfg.out / "synthetic" / name
        if not (synthetic / ".done").is_file():
            pu.synthetic_set(e, name, pathlib.Path(gan["checkpoint"]), site)
        rows[name] = {"anchor_weight": weight, "adversarial_weight": adversarial,
                      **_dice(cfg, name, synthetic, test_dir)}
        log.info("%s: stand-in test Dice %.3f", name, rows[name]["dice"])
    tuned = [n for n in rows if n.startswith("anchor")]
    chosen = max(tuned, key=lambda n: rows[n]["dice"])
    steered = [n for n in rows if n.startswith("steer")]
    chosen_steer = max(steered, key=lambda n: rows[n]["dice"]) if steered else None
    comparisons = {n: paired(rows[chosen]["patients"], rows[n]["patients"]) for n in rows if n != chosen}
    result = {"protocol": __doc__.split("Protocol: ")[1].split("\n\n")[0].replace("\n", " "),
              "settings": json.loads(cfg.model_dump_json(exclude={"experiment"})),
              "finetune_steps": e.gan.finetune_steps, "seeds": e.seeds,
              "rows": {n: {k: v for k, v in r.items() if k != "patients"} for n, r in rows.items()},
              "chosen": rows[chosen]["anchor_weight"], "chosen_minus": comparisons,
              "chosen_steer": rows[chosen_steer]["anchor_weight"] if chosen_steer else None,
              "steer_minus_public": {n: paired(rows[n]["patients"], rows["public_only"]["patients"]) for n in steered},
              "seconds": round(time.monotonic() - started, 1)}
    write_json(cfg.out / "results.json", result)
    _write_report(cfg, result)
    return result


def _write_report(cfg: AnchorTuningConfig, result: dict) -> None:
    lines = ["# Anchor weight, chosen on public data (a differently seeded stand-in cohort)", "",
             f"Protocol: {result['protocol']}", "",
             f"Fine-tune steps {result['finetune_steps']}, {result['seeds']} segmentation seed(s), stand-in: "
             f"heterogeneous profile {cfg.profile}, {cfg.cases} training cases, {cfg.test_cases} test patients, "
             f"epsilon {cfg.epsilon:g} (all on the statistics release, frozen public discriminators).", "",
             "Rows `steer*`: the same release and anchor with the sites' gradients left out (adversarial weight 0).",
             "", "| generator | anchor weight | Dice (stand-in test) | chosen minus row (95% CI) |",
             "|---|---|---|---|"]
    for name, row in result["rows"].items():
        diff = result["chosen_minus"].get(name)
        ci = "-" if diff is None else f"{diff['mean']:+.3f} ({diff['low']:+.3f} to {diff['high']:+.3f})"
        weight = "public generator" if row["anchor_weight"] is None else f"{row['anchor_weight']:g}"
        lines.append(f"| {name} | {weight} | {row['dice']:.3f} ± {row['dice_sd']:.3f} | {ci} |")
    lines += ["", f"Chosen: anchor weight {result['chosen']:g} (highest mean Dice among the `anchor*` candidates)."]
    if result.get("chosen_steer") is not None:
        lines.append(f"Chosen for the steered rows: {result['chosen_steer']:g}. Steered minus the public generator: "
                     + "; ".join(f"{n} {d['mean']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})"
                                 for n, d in result["steer_minus_public"].items()) + ".")
    lines.append(f"Wall time {result['seconds'] / 60:.0f} min.")
    (cfg.out / "report.md").write_text("\n".join(lines) + "\n")


def summary_line(result: dict) -> str:
    steer = "" if result.get("chosen_steer") is None else f", steered {result['chosen_steer']:g}"
    return ", ".join(f"{n} {r['dice']:.3f}" for n, r in result["rows"].items()) + f"; chosen {result['chosen']:g}{steer}"
