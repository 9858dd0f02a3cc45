"""How far can one hostile site move the generator? Attacks on the server's step, with and without its guard.

Three sites of the toy data train a small image generator in this process (the trainer and site workers of a
real run, without the network); one of them answers every batch with a gradient of its choosing:

    targeted        100 x (fake - target), the target being the fake with a bright square painted inside the
                    brain: descending it paints the square into every synthetic image
    targeted_quiet  the same direction, scaled to 3.9 x the RMS of the site's own honest answer: the largest push
                    that passes a guard with clip_factor 4 unclipped, by an attacker who knows the setting
    flipped         its honest gradient, sign-flipped and x 10
    huge            its honest gradient x 1e6
    huge30          its honest gradient x 1e30

Measured after `steps` steps, on fixed label maps of the honest sites: the square's contrast (mean inside the
square minus mean over the rest of the brain, all channels) against an honest run with the same seeds, as a
fraction of the value range (2), and whether the generator is finite. For scale: the same distance between two
honest runs that differ only in their seed. Every attack runs with the guard (the default settings: `on`),
without it (clip and reject off, shares uncapped: `off`), and, with `--guard median`, with the default settings
plus the coordinate-wise median of the sites' parameter gradients (`train.guard.robust`).
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading

import torch
from pydantic import BaseModel, ConfigDict, Field

from asyndgan.central_server.trainer import Trainer
from asyndgan.common import serde
from asyndgan.common.conditions import brain_region, one_hot
from asyndgan.common.config import GuardConfig, ServerConfig
from asyndgan.demo_data.toy import write_toy_sites
from asyndgan.simulation.local_sites import CountingBank, LocalRegistry, LocalSession

from asyndgan.formats.datasets import open_dataset
from asyndgan.experiments.pieces import write_json
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)
ATTACKS = ("targeted", "targeted_quiet", "flipped", "huge", "huge30")
GUARDS = {"on": GuardConfig(), "off": GuardConfig.off(), "median": GuardConfig(robust="median")}


class PoisoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: pathlib.Path
    steps: int = Field(150, ge=1)
    image_size: int = 32
    samples_per_site: int = 40
    batch_per_site: int = 4
    seed: int = 0
    attacks: list[str] = Field(default_factory=lambda: list(ATTACKS))
    seed_spread: bool = Field(True, description="also train an honest run with the next seed, for scale")
    guards: list[str] = Field(default_factory=lambda: ["on", "off"], description="guard modes: on, off, median")


def square(size: int) -> tuple[slice, slice]:
    """The attacker's square: a quarter of the side, at the centre (inside the toy brains)."""
    lo = size * 3 // 8
    return slice(lo, lo + size // 4), slice(lo, lo + size // 4)


class HostileSession(LocalSession):
    """A site that computes its honest answer, then sends what its attack says instead."""

    def __init__(self, attack: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack = attack

    def send_batch(self, batch: serde.SyntheticBatch) -> None:
        super().send_batch(batch)
        answer = self._answers[batch.round]
        honest = answer.gradient
        ys, xs = square(batch.fake.shape[-1])
        if self.attack.startswith("targeted"):
            target = batch.fake.clone()
            target[..., ys, xs] = 1.0
            if batch.region is not None:  # only the brain crosses the wire: so does the attack
                target = torch.where(batch.region[:, None], target, batch.fake)
            evil = 100.0 * (batch.fake - target)
            if self.attack == "targeted_quiet":
                rms = lambda g: g.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (g.dim() - 1)))  # noqa: E731
                evil = evil / rms(evil).clamp_min(1e-30) * 3.9 * rms(honest)
        elif self.attack == "flipped":
            evil = -10.0 * honest
        elif self.attack == "huge":
            evil = 1e6 * honest
        elif self.attack == "huge30":
            evil = 1e30 * honest
        else:
            raise ValueError(f"unknown attack {self.attack!r}; choose one of {', '.join(ATTACKS)}")
        self._answers[batch.round] = serde.ImageGradient(answer.step, answer.round, evil, answer.losses)


def _server_config(cfg: PoisoningConfig, run_dir: pathlib.Path, guard: GuardConfig, seed: int) -> ServerConfig:
    scfg = ServerConfig.model_validate({
        "run_dir": str(run_dir), "tensorboard": False, "checkpoint_every": 10**6, "sample_every": 10**6,
        "train": {"batch_size": cfg.batch_per_site, "min_sites": 3, "seed": seed, "guard": guard.model_dump()},
        "site": {"model": {"image2d": {"image_size": cfg.image_size, "load_size": cfg.image_size, "ngf": 8,
                                       "n_blocks": 2, "ndf": 8, "d_layers": 2}},
                 "schedule": {"steps": cfg.steps}, "seed": seed}})
    PAPERS.apply(scfg)  # the reports' recipe, whatever the system ships
    return scfg


def run_once(cfg: PoisoningConfig, sites: list[pathlib.Path], attack: str | None, guard: str, seed: int) -> dict:
    """One training run; its generator's square contrast on the evaluation maps, finiteness and guard counts."""
    scfg = _server_config(cfg, cfg.out / "runs" / f"{attack or 'honest'}-{guard}-{seed}", GUARDS[guard], seed)
    torch.manual_seed(seed)
    sessions = [LocalSession(f"site{i + 1}", open_dataset(p, scfg.site), scfg.site) for i, p in enumerate(sites[:2])]
    third = open_dataset(sites[2], scfg.site)
    sessions.append(HostileSession(attack, "site3", third, scfg.site) if attack else
                    LocalSession("site3", third, scfg.site))
    trainer = Trainer(scfg, LocalRegistry(sessions), CountingBank(sessions), scfg.run_dir)
    trainer.run(threading.Event())
    maps = torch.cat([s.worker.label_maps[:16] for s in sessions[:2]])
    with torch.no_grad():
        fake = trainer.generator.eval()(one_hot(maps, scfg.site.model.image2d.num_classes))
    brain = brain_region(maps)[:, None].expand_as(fake)
    in_square = torch.zeros_like(brain)
    ys, xs = square(cfg.image_size)
    in_square[..., ys, xs] = True
    finite = bool(torch.isfinite(fake).all())
    contrast = float(fake[brain & in_square].mean() - fake[brain & ~in_square].mean()) if finite else float("nan")
    hostile = sessions[2]
    return {"_images": torch.where(brain, fake, torch.zeros_like(fake)), "_brain": brain, "attack": attack, "guard": guard, "seed": seed, "steps": trainer.step, "finite": finite,
            "square_contrast": contrast, "rejected": hostile.stats.gradients_rejected,
            "rows_clipped": hostile.stats.rows_clipped, "removed": hostile.left is not None,
            "honest_rows_clipped": sum(s.stats.rows_clipped for s in sessions[:2]),
            "rows": trainer.step * cfg.batch_per_site * len(sessions)}


def run(cfg: PoisoningConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    sites = write_toy_sites(cfg.out / "data", sites=3, per_site=[cfg.samples_per_site] * 3, size=cfg.image_size,
                            seed=cfg.seed)
    honest = {g: run_once(cfg, sites, None, g, cfg.seed) for g in cfg.guards}
    spread = run_once(cfg, sites, None, cfg.guards[0], cfg.seed + 1) if cfg.seed_spread else None
    rows = []
    for attack in cfg.attacks:
        for guard in cfg.guards:
            r = run_once(cfg, sites, attack, guard, cfg.seed)
            base = honest[guard]["square_contrast"]
            r["distance"] = abs(r["square_contrast"] - base) / 2 if r["finite"] else float("inf")
            rows.append(r)
            log.info("%s, guard %s: square contrast moved by %.3f of the range; rejected %d, clipped rows %d%s",
                     attack, guard, r["distance"], r["rejected"], r["rows_clipped"],
                     ", removed" if r["removed"] else "")
    first = honest[cfg.guards[0]]

    def image_distance(a: dict, b: dict) -> float:  # mean |difference| inside the brain, as a fraction of the range
        return float((a["_images"] - b["_images"]).abs()[a["_brain"]].mean()) / 2

    # What each guard costs an honest run: how far its generator's images are from the first guard's, beside how
    # far two honest seeds are from each other (same images, same measure).
    honest_cost = {"image_distance_to_" + cfg.guards[0]: {g: image_distance(honest[g], first) for g in cfg.guards},
                   "seed_spread_image_distance": image_distance(spread, first) if spread else None}
    for r in [*honest.values(), *rows, *([spread] if spread else [])]:
        r.pop("_images", None)
        r.pop("_brain", None)
    result = {"settings": json.loads(cfg.model_dump_json()), "honest": honest, "rows": rows,
              "seed_spread": abs(spread["square_contrast"] - first["square_contrast"]) / 2 if spread else None,
              "honest_cost": honest_cost}
    write_json(cfg.out / "results.json", result)
    (cfg.out / "report.md").write_text(markdown(result))
    return result


def _f(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.3f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    first = result["honest"][s["guards"][0]]
    clipped = first["honest_rows_clipped"] + first["rows_clipped"]
    lines = ["# One hostile site of three: how far it moves the generator", "",
             f"Command: `asyndgan bench poisoning --out OUT` ({s['steps']} steps, {s['image_size']} px, toy data, "
             f"{s['batch_per_site']} images per site per step, seed {s['seed']}). Distance: the bright square's "
             "contrast in the generator's images against an honest run with the same seeds, as a fraction of the "
             f"value range. Two honest runs with different seeds differ by **{_f(result['seed_spread'])}**. In the "
             f"honest run with the guard `{s['guards'][0]}`, {clipped} of {first['rows']} honest rows were clipped.",
             "",
             "| attack | guard | distance | finite | answers rejected | rows clipped | removed |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['attack']} | {r['guard']} | {r['distance']:.3f} | "
                     f"{'yes' if r['finite'] else '**no**'} | {r['rejected']} | {r['rows_clipped']} | "
                     f"{'yes' if r['removed'] else 'no'} |")
    cost = result.get("honest_cost")
    if cost and len(s["guards"]) > 1:
        (key, per_guard), = ((k, v) for k, v in cost.items() if k.startswith("image_distance_to_"))
        lines += ["", f"What each guard costs an honest run (all three sites honest): mean |difference| of the "
                  f"generator's images inside the brain against the honest run with guard `{s['guards'][0]}`, as "
                  "a fraction of the value range; two honest seeds differ by "
                  f"**{_f(cost['seed_spread_image_distance'])}** in the same measure.", "",
                  "| guard | image distance to the first guard's honest run |", "|---|---|"]
        lines += [f"| {g} | {d:.3f} |" for g, d in per_guard.items()]
    return "\n".join(lines) + "\n"
