"""The privacy audit: how much of a site's images a server can rebuild from the gradients the site returns.

The site under attack is the real site code (`SiteWorker.answer`) in this process, on a small data set written
into the run folder; the "server" is this module, which sees only what a server sees: keys, label maps, the
fakes it sends and the gradients that come back. The harness alone also holds the real images, to score.

Attacks (every one scored by PSNR and SSIM of its reconstruction against the real images, per query count, where
one query is one answered batch that holds the key):
- bisection (malicious): per key and pixel an interval [lo, hi], first [-1, 1]; the server sends the midpoint
  as the fake, and the sign of the returned gradient says on which side the real pixel lies (with an L1 term,
  dL_G/dfake = lambda/numel * sign(fake - real) + a smaller adversarial part).
- honest (honest-but-curious): the server trains a small generator as it normally would and records every
  (key, fake, gradient); per key, the recorded signs imply bounds on each real pixel, and the estimate is the
  middle of those bounds (or the generator's last fake, moved inside them, where only one side is bounded).
  The generator's own output for the key is scored too (`honest-generator`: what G memorised).
- oracle (malicious): the server runs signed gradient descent on one fake per key with the site's answer as the
  gradient oracle and a decaying step: it pulls out whatever L_G holds about the key's real image, through the
  L1 term or through the discriminator.
- oracle-adam (malicious, persistent): the same keys asked many times, the fake moved by Adam with the site's
  answer as its gradient. Without the L1 term the site's discriminator still trains on those keys' real images
  at every query (the server picks the keys), and its gradient leads the fake towards what it learnt of them:
  with lambda_L1 = 0 and no DP this beats the mean image after a few hundred queries (though, on the toy data,
  not the label-map baseline below). DP-SGD on batches the site draws itself cuts that path.
Baselines: the data set's mean image (per pixel, over all the site's samples) scored the same way; an attack that
does not beat it has learnt nothing about the individual image that the population does not already give. And a
stronger one, the label-map baseline: per pixel, the mean of the site's *other* images that have the key's label
there; the server holds the label maps by design, so beating the mean image but not this one shows what the
label maps give, not a leak of the image.

Defence settings: `off` (the papers' loss, lambda_L1 100), `l1-off` (lambda_L1 0) and `dp*` (lambda_L1 0 and the
site's own differential privacy, DP-SGD on its discriminators, at a noise multiplier; its epsilon is reported).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from asyndgan.common import serde
from asyndgan.common.conditions import Augmentation
from asyndgan.common.config import (
    Image2DConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    SiteFacingConfig,
    make_optimizer,
)
from asyndgan.common.families import get_family
from asyndgan.formats.datasets import SiteDataset, open_dataset
from asyndgan.site_agent.worker import SiteWorker
from asyndgan.experiments.recipe import PAPERS

log = logging.getLogger(__name__)

ATTACKS = ("bisection", "honest", "honest-generator", "oracle", "oracle-adam")
PSNR_CAP_DB = 100.0  # an exact reconstruction has infinite PSNR; JSON and tables want a number
DATA_RANGE = 2.0  # images live in [-1, 1]


class DefenceSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=32)
    lambda_l1: float = Field(100.0, ge=0)
    noise_multiplier: float | None = Field(None, ge=0.3, le=20, description="DP-SGD noise at the site; None: no DP")


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: pathlib.Path
    seed: int = 0
    image_size: int = Field(32, ge=16, le=256)
    modalities: list[str] = Field(default_factory=lambda: ["t1", "t2"], min_length=1)
    samples: int = Field(16, ge=2, le=10_000, description="images the site holds")
    attacked_keys: int = Field(4, ge=1, description="keys whose images the attacks try to rebuild")
    bisection_rounds: int = Field(8, ge=1, le=64)
    oracle_steps: int = Field(12, ge=1, le=1000)
    oracle_step0: float = Field(0.5, gt=0, le=2, description="first signed step of the oracle descent")
    oracle_decay: float = Field(0.75, gt=0, lt=1, description="step size factor per query (0.5 would be bisection)")
    adam_queries: int = Field(40, ge=1, le=100_000, description="queries of the persistent Adam oracle")
    adam_lr: float = Field(0.05, gt=0, le=1)
    adam_evals: int = Field(4, ge=1, le=100, description="points on the persistent oracle's curve")
    honest_steps: int = Field(50, ge=1, description="generator steps of the honest-but-curious server")
    honest_batch: int = Field(8, ge=1, le=256)
    honest_evals: int = Field(5, ge=1, le=100, description="points on the honest attack's curve")
    ngf: int = Field(16, ge=1, le=128)
    ndf: int = Field(16, ge=1, le=128)
    d_layers: int = Field(3, ge=1, le=6)
    dp_epsilon_budget: float = Field(100.0, gt=0, le=100, description="large, so the attacks run to the end")
    dp_delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 x samples)")
    dp_sample_rate: float = Field(0.25, gt=0, le=1, description="the sites' privacy.sample_rate: 4 real "
                                  "images per step of the smoke preset's 16, of the cpu preset's 64 at 0.0625")
    settings: list[DefenceSetting] = Field(default_factory=lambda: [
        DefenceSetting(name="off", lambda_l1=100.0),
        DefenceSetting(name="l1-off", lambda_l1=0.0),
        DefenceSetting(name="dp", lambda_l1=0.0, noise_multiplier=1.0),
    ])
    figure_keys: int = Field(3, ge=1, le=16)
    threads: int = Field(1, ge=1, le=64)
    progress: bool = True


def preset_config(preset: Literal["smoke", "cpu"], out: pathlib.Path, seed: int = 0) -> AuditConfig:
    """smoke: 32 px, 16 images, a few queries (under a minute: the tests' setting); cpu: 64 px, 64 images,
    more queries and a second DP noise level (a few minutes on 2 cores)."""
    if preset == "smoke":
        return AuditConfig(out=out, seed=seed)
    if preset == "cpu":
        return AuditConfig(
            out=out, seed=seed, image_size=64, samples=64, attacked_keys=8, bisection_rounds=12, oracle_steps=24,
            honest_steps=200, honest_batch=16, honest_evals=5, adam_queries=300, adam_evals=6, ngf=16, ndf=16, threads=1, dp_sample_rate=0.0625,
            settings=[DefenceSetting(name="off", lambda_l1=100.0), DefenceSetting(name="l1-off", lambda_l1=0.0),
                      DefenceSetting(name="dp", lambda_l1=0.0, noise_multiplier=1.0),
                      DefenceSetting(name="dp-0.6", lambda_l1=0.0, noise_multiplier=0.6)])
    raise ValueError(f"unknown preset {preset!r}; choose smoke or cpu")


# ---- scoring -------------------------------------------------------------------------------------------------
def psnr(estimate: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over images of PSNR (dB, range [-1, 1]) of estimate vs real, both [n, C, H, W]; capped at 100 dB."""
    mse = ((estimate.float() - real.float()) ** 2).flatten(1).mean(1)
    db = 10 * torch.log10(DATA_RANGE**2 / mse.clamp_min(DATA_RANGE**2 * 10 ** (-PSNR_CAP_DB / 10)))
    return float(db.mean())


def ssim(estimate: torch.Tensor, real: torch.Tensor) -> float:
    """Mean SSIM (MONAI, 7x7 Gaussian window, range 2) of estimate vs real, both [n, C, H, W]."""
    from monai.metrics import SSIMMetric

    win = 7 if min(real.shape[-2:]) >= 7 else 3
    value = SSIMMetric(spatial_dims=2, data_range=DATA_RANGE, win_size=win)(estimate.float(), real.float())
    return float(value.mean())


def score(estimate: torch.Tensor, real: torch.Tensor, queries: float, **extra) -> dict:
    return {"queries": queries, "psnr": round(psnr(estimate, real), 3), "ssim": round(ssim(estimate, real), 4),
            **extra}


# ---- what the signs of returned gradients imply -------------------------------------------------------------
def tighten(lo: torch.Tensor, hi: torch.Tensor, fake: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Bounds on the real pixels after one answer, if the gradient's sign is sign(fake - real): a positive
    gradient says real < fake (hi <- min(hi, fake)), a negative one real > fake. All tensors share one shape."""
    hi = torch.where(grad > 0, torch.minimum(hi, fake), hi)
    lo = torch.where(grad < 0, torch.maximum(lo, fake), lo)
    return lo, hi


def bounded_estimate(lo: torch.Tensor, hi: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The middle of [lo, hi] where both bounds moved off [-1, 1]'s ends, else `prior` moved inside the bounds;
    where the bounds crossed (answers that contradict each other) the middle of the two."""
    both = (lo > -1) & (hi < 1)
    crossed = lo > hi
    inside = torch.minimum(torch.maximum(prior, lo), hi)
    return torch.where(both | crossed, (lo + hi) / 2, inside)


# ---- the site --------------------------------------------------------------------------------------------------
def label_mean_image(images: torch.Tensor, maps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per key, pixel and channel: the mean intensity over the site's *other* images whose label map has the
    key's label at that pixel (their plain per-pixel mean where none has): what a server could know from the
    label maps it holds by design plus population statistics, without the image itself.
    images [N, C, H, W], maps uint8 [N, H, W] -> [len(keys), C, H, W]."""
    labels = maps.long()
    one_hot = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).permute(0, 3, 1, 2).float()  # [N, K, H, W]
    totals = torch.einsum("nchw,nkhw->ckhw", images, one_hot)
    counts = one_hot.sum(0)  # [K, H, W]
    n = images.shape[0]
    out = []
    for key in keys.tolist():
        own = one_hot[key]  # [K, H, W]
        t = totals - images[key][:, None] * own  # leave the key's own image out
        c = counts - own
        others = (images.sum(0) - images[key]) / max(n - 1, 1)  # [C, H, W]
        means = torch.where(c > 0, t / c.clamp_min(1), others[:, None])  # [C, K, H, W]
        out.append(torch.einsum("ckhw,khw->chw", means, own))
    return torch.stack(out)


def site_config(cfg: AuditConfig, setting: DefenceSetting) -> SiteFacingConfig:
    model = ModelConfig(family="image2d", image2d=Image2DConfig(
        image_size=cfg.image_size, modalities=list(cfg.modalities), num_classes=5, generator="resnet", ngf=cfg.ngf,
        n_blocks=3, ndf=cfg.ndf, d_layers=cfg.d_layers))
    # A schedule far longer than the audit: the discriminator's learning rate stays at its start value.
    site = SiteFacingConfig(model=model, loss=LossConfig(lambda_l1=setting.lambda_l1),
                            schedule=ScheduleConfig(steps=1_000_000), seed=cfg.seed)
    PAPERS.apply_site(site)  # the reports' recipe, whatever the system ships
    return site


def make_worker(cfg: AuditConfig, setting: DefenceSetting, dataset: SiteDataset, ledger: pathlib.Path) -> SiteWorker:
    """A fresh site (new discriminators; with DP, a new ledger) for one attack under one setting."""
    site_cfg = site_config(cfg, setting)
    if setting.noise_multiplier is None:
        return SiteWorker(site_cfg, dataset, "cpu")
    from asyndgan.common.config import PrivacyConfig

    # Each image is its own patient in the audit's data: slice and patient units coincide; the attacks measure a
    # fixed noise, so the site does not compute its own.
    privacy = PrivacyConfig(enabled=True, epsilon=cfg.dp_epsilon_budget, delta=dp_delta(cfg), unit="slice",
                            noise_multiplier=setting.noise_multiplier, sample_rate=cfg.dp_sample_rate)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.unlink(missing_ok=True)  # each attack starts from a site that has spent nothing
    return SiteWorker(site_cfg, dataset, "cpu", privacy=privacy, ledger_path=ledger)


def dp_delta(cfg: AuditConfig) -> float:
    return cfg.dp_delta if cfg.dp_delta is not None else 1.0 / (10 * cfg.samples)


class Oracle:
    """The server's side of one site: send fakes for keys, get d(L_G)/d(fake) back; counts the queries and
    stops (returns None) once the site's privacy budget is spent."""

    def __init__(self, worker: SiteWorker):
        self.worker = worker
        self.step = 0
        self.exhausted = False

    def ask(self, keys: torch.Tensor, fake: torch.Tensor) -> torch.Tensor | None:
        """keys int64 [n], fake [n, C, H, W] -> gradient [n, C, H, W], or None when the site stopped answering."""
        from asyndgan.common import errors

        exhausted = getattr(errors, "PrivacyBudgetExhausted", None)
        try:
            answer = self.worker.answer(serde.SyntheticBatch(self.step, self.step, keys, fake.detach().float(),
                                                             Augmentation.none(len(keys))))
        except Exception as exc:
            if exhausted is not None and isinstance(exc, exhausted):
                log.warning("the site's privacy budget is spent after %d answers: %s", self.step, exc)
                self.exhausted = True
                return None
            raise
        self.step += 1
        return answer.gradient.float()

    @property
    def epsilon(self) -> float | None:
        spent = getattr(self.worker, "epsilon_spent", None)
        return None if spent is None else float(spent)


# ---- attacks ---------------------------------------------------------------------------------------------------
def bisection(oracle: Oracle, keys: torch.Tensor, real: torch.Tensor, rounds: int) -> tuple[list[dict], torch.Tensor]:
    """Malicious bisection of every pixel of every key; (curve, final estimate [n, C, H, W])."""
    lo, hi = torch.full_like(real, -1.0), torch.full_like(real, 1.0)
    curve = [score((lo + hi) / 2, real, 0)]
    for r in range(1, rounds + 1):
        mid = (lo + hi) / 2
        grad = oracle.ask(keys, mid)
        if grad is None:
            break
        # How often the answer's sign is the L1 term's, sign(fake - real): 1.0 means every pixel answered truly.
        agree = float(((grad > 0) == (mid > real)).float().mean())
        lo, hi = tighten(lo, hi, mid, grad)
        curve.append(score((lo + hi) / 2, real, r, sign_agreement=round(agree, 4)))
    return curve, (lo + hi) / 2


def oracle_descent(oracle: Oracle, keys: torch.Tensor, real: torch.Tensor, steps: int, step0: float,
                   decay: float) -> tuple[list[dict], torch.Tensor]:
    """Signed gradient descent on L_G w.r.t. one fake per key, from mid-grey, with step step0 * decay**t."""
    fake = torch.zeros_like(real)
    curve = [score(fake, real, 0)]
    for t in range(steps):
        grad = oracle.ask(keys, fake)
        if grad is None:
            break
        fake = (fake - step0 * decay**t * torch.sign(grad)).clamp(-1, 1)
        curve.append(score(fake, real, t + 1))
    return curve, fake


def adam_oracle(oracle: Oracle, keys: torch.Tensor, real: torch.Tensor, queries: int, lr: float,
                evals: int) -> tuple[list[dict], torch.Tensor]:
    """Persistent oracle: Adam (betas 0.5, 0.999) on one fake per key from mid-grey, the site's answer as the
    gradient, kept in [-1, 1]; scored at `evals` evenly spaced query counts."""
    fake = torch.zeros_like(real, requires_grad=True)
    optimizer = torch.optim.Adam([fake], lr=lr, betas=(0.5, 0.999))
    marks = {round(queries * (i + 1) / evals) for i in range(evals)}
    curve = [score(fake.detach(), real, 0)]
    for q in range(1, queries + 1):
        grad = oracle.ask(keys, fake.detach())
        if grad is None:
            break
        optimizer.zero_grad(set_to_none=True)
        fake.grad = grad
        optimizer.step()
        with torch.no_grad():
            fake.clamp_(-1, 1)
        if q in marks:
            curve.append(score(fake.detach(), real, q))
    if curve[-1]["queries"] != oracle.step:
        curve.append(score(fake.detach(), real, oracle.step))
    return curve, fake.detach()


def honest_but_curious(oracle: Oracle, cfg: AuditConfig, site_cfg: SiteFacingConfig, maps: torch.Tensor,
                       keys: torch.Tensor, real: torch.Tensor, progress: Callable = lambda it: it) -> dict:
    """Train a generator as the server normally would (batches drawn over all the site's keys, Adam, no
    augmentation) and record every answer for the attacked `keys`; per key, bound the real pixels by the recorded
    signs. Returns the curves and final estimates of 'honest' (the bounds) and 'honest-generator' (G's output)."""
    family = get_family("image2d")
    torch.manual_seed(cfg.seed + 1)
    generator = family.build_generator(site_cfg.model)
    optimizer = make_optimizer(generator.parameters(), OptimizerConfig())
    rng = torch.Generator().manual_seed(cfg.seed + 2)
    n_all = maps.shape[0]
    slot = {int(k): i for i, k in enumerate(keys)}
    lo, hi = torch.full_like(real, -1.0), torch.full_like(real, 1.0)
    last = torch.zeros_like(real)
    seen = torch.zeros(len(keys))
    curves: dict[str, list[dict]] = {"honest": [], "honest-generator": []}
    x_attacked = family.condition(site_cfg.model, maps[keys], len(keys))
    evals = {round(cfg.honest_steps * (i + 1) / cfg.honest_evals) for i in range(cfg.honest_evals)}

    def record(step_queries: float) -> torch.Tensor:
        with torch.no_grad():
            own = generator(x_attacked).clamp(-1, 1)
        curves["honest-generator"].append(score(own, real, step_queries))
        curves["honest"].append(score(bounded_estimate(lo, hi, last), real, step_queries))
        return own

    own = record(0.0)
    for step in progress(range(1, cfg.honest_steps + 1)):
        batch = torch.randperm(n_all, generator=rng)[: cfg.honest_batch]
        generator.train()
        fake = generator(family.condition(site_cfg.model, maps[batch], len(batch)))
        grad = oracle.ask(batch, fake)
        if grad is None:
            break
        for row, k in enumerate(batch.tolist()):
            if k in slot:
                i = slot[k]
                f = fake[row].detach()
                lo[i], hi[i] = tighten(lo[i], hi[i], f, grad[row])
                last[i] = f
                seen[i] += 1
        optimizer.zero_grad(set_to_none=True)
        fake.backward(gradient=grad)
        optimizer.step()
        if step in evals:
            own = record(float(seen.mean()))
    if not evals or oracle.exhausted:
        own = record(float(seen.mean()))
    return {"curves": curves, "estimates": {"honest": bounded_estimate(lo, hi, last), "honest-generator": own}}


# ---- the run ---------------------------------------------------------------------------------------------------
def make_site_data(cfg: AuditConfig) -> pathlib.Path:
    """One site of toy images (arrays layout) holding exactly cfg.modalities, in OUT/data/site, written once."""
    from asyndgan.common.config import BRATS_MODALITIES
    from asyndgan.demo_data.toy import toy_sample

    folder = cfg.out / "data" / "site"
    if (folder / "meta.json").is_file():
        return folder
    unknown = [m for m in cfg.modalities if m not in BRATS_MODALITIES]
    if unknown:
        raise ValueError(f"the toy data set has no modalities {unknown}; choose from {list(BRATS_MODALITIES)}")
    rng = np.random.default_rng(cfg.seed)
    pairs = [toy_sample(cfg.image_size, rng, gain=1.0, noise=0.05) for _ in range(cfg.samples)]
    channels = [list(BRATS_MODALITIES).index(m) for m in cfg.modalities]
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", np.stack([p[0][channels] for p in pairs]))
    np.save(folder / "labels.npy", np.stack([p[1] for p in pairs]))
    (folder / "meta.json").write_text(json.dumps({"kind": "arrays", "modalities": list(cfg.modalities),
                                                  "source": "asyndgan privacy audit (toy)", "seed": cfg.seed}))
    return folder


def run(cfg: AuditConfig) -> dict:
    """Every attack against every defence setting; writes results.json, report.md and figure.png into cfg.out."""
    started = time.monotonic()
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    folder = make_site_data(cfg)
    # The data set is opened once per setting's site config; the images do not depend on the loss.
    dataset = open_dataset(folder, site_config(cfg, cfg.settings[0]), PAPERS.prep(cfg.out / "cache"))
    if cfg.attacked_keys > len(dataset):
        raise ValueError(f"attacked_keys {cfg.attacked_keys} is more than the site's {len(dataset)} images")
    all_real = dataset.real(torch.arange(len(dataset))).float()  # [N, C, H, W]
    maps = dataset.label_maps()
    keys = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.attacked_keys]
    keys = keys.sort().values
    real = all_real[keys]
    mean_image = all_real.mean(0, keepdim=True).expand_as(real)
    baseline = score(mean_image, real, 0)
    by_label = score(label_mean_image(all_real, maps, keys), real, 0)
    log.info("site: %d images of %s at %d px; attacked keys %s; mean-image baseline PSNR %.2f dB, SSIM %.3f "
             "(label-map baseline %.2f dB, %.3f)", len(dataset), cfg.modalities, cfg.image_size, keys.tolist(),
             baseline["psnr"], baseline["ssim"], by_label["psnr"], by_label["ssim"])

    results: dict = {"config": json.loads(cfg.model_dump_json()), "keys": keys.tolist(), "baseline": baseline,
                     "baseline_label_map": by_label, "settings": {}}
    estimates: dict[str, dict[str, torch.Tensor]] = {}
    for setting in cfg.settings:
        results["settings"][setting.name], estimates[setting.name] = run_setting(cfg, setting, dataset, maps, keys,
                                                                                 real, baseline, by_label)
    results["seconds"] = round(time.monotonic() - started, 1)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    (cfg.out / "report.md").write_text(report_markdown(results))
    draw_figure(cfg.out / "figure.png", real, mean_image, estimates, cfg.figure_keys)
    log.info("privacy audit done in %.0f s: %s", results["seconds"], cfg.out)
    return results


def run_setting(cfg: AuditConfig, setting: DefenceSetting, dataset: SiteDataset, maps: torch.Tensor,
                keys: torch.Tensor, real: torch.Tensor, baseline: dict,
                by_label: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every attack against fresh sites under one defence setting: (results, final estimates by attack)."""
    site_cfg = site_config(cfg, setting)
    ledgers = cfg.out / "ledgers" / setting.name
    out: dict = {"lambda_l1": setting.lambda_l1, "noise_multiplier": setting.noise_multiplier,
                 "dp_delta": dp_delta(cfg) if setting.noise_multiplier is not None else None, "attacks": {}}
    est: dict[str, torch.Tensor] = {}

    def bar(it, desc):
        return tqdm(it, desc=f"{setting.name} {desc}", disable=not cfg.progress, leave=False)

    def finish(name: str, curve: list[dict], oracle: Oracle, estimate: torch.Tensor) -> None:
        final = curve[-1]
        out["attacks"][name] = {"curve": curve, "final": final, "queries_answered": oracle.step,
                                "epsilon": oracle.epsilon, "budget_exhausted": oracle.exhausted,
                                "beats_baseline_db": round(final["psnr"] - baseline["psnr"], 3),
                                "beats_label_map_baseline_db": round(final["psnr"] - by_label["psnr"], 3)}
        est[name] = estimate
        eps = "" if oracle.epsilon is None else f", epsilon {oracle.epsilon:.2f}"
        log.info("%s / %s: PSNR %.2f dB (baseline %.2f), SSIM %.3f after %s queries per key%s", setting.name, name,
                 final["psnr"], baseline["psnr"], final["ssim"], final["queries"], eps)

    oracle = Oracle(make_worker(cfg, setting, dataset, ledgers / "bisection.json"))
    curve, estimate = bisection(oracle, keys, real, cfg.bisection_rounds)
    finish("bisection", curve, oracle, estimate)

    oracle = Oracle(make_worker(cfg, setting, dataset, ledgers / "honest.json"))
    honest = honest_but_curious(oracle, cfg, site_cfg, maps, keys, real, lambda it: bar(it, "honest"))
    for name in ("honest", "honest-generator"):
        finish(name, honest["curves"][name], oracle, honest["estimates"][name])

    oracle = Oracle(make_worker(cfg, setting, dataset, ledgers / "oracle.json"))
    curve, estimate = oracle_descent(oracle, keys, real, cfg.oracle_steps, cfg.oracle_step0, cfg.oracle_decay)
    finish("oracle", curve, oracle, estimate)

    oracle = Oracle(make_worker(cfg, setting, dataset, ledgers / "oracle-adam.json"))
    curve, estimate = adam_oracle(oracle, keys, real, cfg.adam_queries, cfg.adam_lr, cfg.adam_evals)
    finish("oracle-adam", curve, oracle, estimate)
    return out, est


# ---- outputs ---------------------------------------------------------------------------------------------------
def report_markdown(results: dict) -> str:
    b = results["baseline"]
    cfg = results["config"]
    lines = [
        "# Privacy audit: what a server rebuilds of a site's images from the gradients it returns",
        "",
        f"Site: {cfg['samples']} toy images, {', '.join(cfg['modalities'])}, {cfg['image_size']} px; attacked keys "
        f"{results['keys']}. Baseline (the data set's mean image against each attacked image): "
        f"**PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.3f}**. An attack at or below it has learnt nothing about "
        "the individual image beyond what the population gives. A second, stronger baseline uses what the server "
        "holds by design, the key's label map: per pixel, the mean of the site's other images with the same label "
        "there: "
        f"PSNR {results['baseline_label_map']['psnr']:.2f} dB, SSIM {results['baseline_label_map']['ssim']:.3f}.",
        "",
        "| setting | attack | queries per key | PSNR (dB) | SSIM | PSNR - mean image (dB) | PSNR - label-map "
        "baseline (dB) | epsilon spent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results["settings"].items():
        for attack, a in s["attacks"].items():
            f = a["final"]
            eps = "-" if a["epsilon"] is None else f"{a['epsilon']:.2f}"
            if a["budget_exhausted"]:
                eps += " (budget spent)"
            lines.append(f"| {name} | {attack} | {f['queries']:.4g} | {f['psnr']:.2f} | {f['ssim']:.3f} | "
                         f"{a['beats_baseline_db']:+.2f} | {a['beats_label_map_baseline_db']:+.2f} | {eps} |")
    lines += ["", "## Verdict per setting (its strongest attack against both baselines)", ""]
    for name, s in results["settings"].items():
        best_name, best = max(s["attacks"].items(), key=lambda kv: kv[1]["final"]["psnr"])
        eps = [a["epsilon"] for a in s["attacks"].values() if a["epsilon"] is not None]
        spent = (f"; DP noise {s['noise_multiplier']:g}, epsilon per attacked site up to {max(eps):.2f} at delta "
                 f"{s['dp_delta']:.3g}" if eps else "")
        if best["beats_label_map_baseline_db"] > 0:
            verdict = "LEAKS the individual images"
        elif best["beats_baseline_db"] > 0:
            verdict = ("beats the mean image, but not what the label maps (shared by design) and the population "
                       "give")
        else:
            verdict = "nothing better than the mean image"
        lines.append(f"- `{name}`: {verdict} (best: {best_name}, {best['final']['psnr']:.2f} dB, "
                     f"{best['beats_baseline_db']:+.2f} dB against the mean image, "
                     f"{best['beats_label_map_baseline_db']:+.2f} dB against the label-map baseline){spent}.")
    lines += [
        "",
        "Settings: `off` = the papers' loss (lambda_L1 100, no DP); `l1-off` = lambda_L1 0, no DP; `dp*` = "
        "lambda_L1 0 and DP-SGD on the site's discriminators at the noise multiplier shown in results.json "
        "(epsilon is what each attack's fresh site spent, at the delta in results.json).",
        "",
        "Attacks: `bisection` (malicious: the fake is the midpoint of per-pixel bounds, the gradient's sign halves "
        "them); `honest` (honest-but-curious: bounds from the signs recorded while training a generator normally); "
        "`honest-generator` (that generator's own output for the key: memorisation); `oracle` (malicious: signed "
        "gradient descent on the fake with the site's answer as the oracle, decaying step); `oracle-adam` (malicious "
        "and persistent: Adam on the fake over many queries of the same keys, following what the site's "
        "discriminator learns from those keys' real images). One query = one answered "
        "batch holding the key. Per-query curves: results.json; reconstructions: figure.png.",
        "",
        f"Run time: {results['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


def draw_figure(path: pathlib.Path, real: torch.Tensor, mean_image: torch.Tensor,
                estimates: dict[str, dict[str, torch.Tensor]], n_keys: int) -> None:
    """Rows: real | mean image | each (setting, attack)'s reconstruction; columns: the first keys, channel 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n_keys, real.shape[0])
    rows = [("real", real), ("mean image", mean_image)]
    rows += [(f"{s}: {a}", e) for s, by_attack in estimates.items() for a, e in by_attack.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.6, 1.5 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_lines(results: dict) -> list[str]:
    """One line per (setting, attack) for the CLI."""
    b = results["baseline"]
    lm = results["baseline_label_map"]
    lines = [f"mean-image baseline: PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.3f}  (label-map baseline: "
             f"{lm['psnr']:.2f} dB, {lm['ssim']:.3f})"]
    for name, s in results["settings"].items():
        for attack, a in s["attacks"].items():
            f = a["final"]
            eps = "" if a["epsilon"] is None else f"  epsilon {a['epsilon']:.2f}"
            lines.append(f"{name:<8} {attack:<17} PSNR {f['psnr']:6.2f} dB ({a['beats_baseline_db']:+6.2f})  "
                         f"SSIM {f['ssim']:.3f}{eps}")
    return lines

