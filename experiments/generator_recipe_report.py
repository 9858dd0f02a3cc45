"""results.json, report.md, the lever figure and the sample grid of the generator-recipe experiment."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np

from asyndgan.experiments.pieces import write_json
from asyndgan.experiments.recipe import LEVERS, lever_parts

log = logging.getLogger(__name__)

ADOPT_RULE = ("a lever is adopted when its paired per-patient difference against the baseline on the validation "
              "patients has its 95% interval above zero")
PRIVATE_RULE = ("a lever goes into the shipped default only when, pulled together with no_l1 (as private sites "
                "must train), it beats no_l1 alone on the validation patients with its 95% interval above zero")

WHAT = {
    "baseline": "the papers' recipe (ResNet generator, PatchGAN, L1 100, tumour slices)",
    "ema": "moving average of the generator's weights (decay 0.999)",
    "spade": "SPADE generator (the label map in every block)",
    "multiscale": "multi-scale discriminator (2 scales)",
    "diffaug": "differentiable augmentation at the discriminator (translation, cutout)",
    "healthy": "healthy brain slices beside the tumour slices (0.5 per tumour slice)",
    "samples3": "three synthetic cases per label-map case (label maps moved; the baseline's GANs)",
    "longer": "twice the generator steps",
    "appearance": "appearance augmentation when segmenting (bias field, gamma, noise, blur; the same synthetic data)",
    "no_l1": "no L1 term (what a private site requires: the system's default)",
    "ema_warmup": "the moving average with its decay warmed up (min(0.999, (1 + n) / (10 + n)))",
}


def what(lever: str) -> str:
    """What a lever changes, in words (levers pulled together: each part's)."""
    return " + ".join(WHAT.get(part, part) for part in lever_parts(lever))


def write_all(cfg, levers: dict, timings: dict) -> dict:
    results = {"settings": json.loads(cfg.model_dump_json(exclude={"out"})), "levers": levers, "timings_s": timings}
    write_json(cfg.out / "results.json", results)
    plot(cfg.out / "levers.png", levers)
    sample_grid(cfg, cfg.out / "samples.png", list(levers))
    (cfg.out / "report.md").write_text(markdown(cfg, levers, timings))
    return results


def markdown(cfg, levers: dict, timings: dict) -> str:
    lines = [f"# Generator recipe levers ({cfg.preset} preset)", "",
             f"Command: `asyndgan experiment generator-recipe --preset {cfg.preset} --out OUT`; "
             f"{sum(timings.values()) / 60:.0f} min of pieces in all.", "",
             "## Protocol", "",
             f"- Data: the phantom's sites pooled ({', '.join(map(str, cfg.phantom.cases_per_site))} training cases, "
             f"{cfg.phantom.preset} layout), {cfg.phantom.test_cases} real test patients; one GAN in one process "
             "(Syn-All), so a lever's effect is the recipe's, not the distribution's.",
             f"- GAN: {cfg.gan.image_size} px, ResNet-{cfg.gan.n_blocks} ({cfg.gan.ngf} filters), PatchGAN "
             f"({cfg.gan.ndf} filters, {cfg.gan.d_layers} layers), {cfg.gan.steps} steps, L1 weight "
             f"{cfg.gan.lambda_l1:g}; each lever changes one thing. {cfg.gan_seeds} GAN seeds x "
             f"{cfg.segmentation_seeds} segmentation seeds per lever.",
             "- Checkpoint: each GAN's last (its weights' moving average where the lever keeps one), a rule fixed "
             "before any run; no checkpoint was chosen by a score on the test patients.",
             f"- Segmentation: {cfg.segmentation.preprocessing.image_size} px, {cfg.segmentation.training.steps} "
             "steps; whole-tumour Dice in 3-D per test patient. Minus baseline: per patient, Dice averaged over all "
             "GAN and segmentation seeds, mean difference with a 95% t-interval. GAN spread: the SD of the GAN "
             "seeds' mean Dice. Every setting was fixed before any run; nothing was tuned on the test patients.",
             f"- Choice: every segmentation model is also scored on {cfg.validation_cases} validation patients (the "
             "same layout and scanners, a cohort of its own: no training or test patient); "
             f"{ADOPT_RULE}. The test patients' columns report; they choose nothing.",
             *(["- `ema_warmup` was added after `ema`'s first GAN had scored below the baseline on the test "
                "patients (diagnosis: a constant decay keeps 0.999^2000 = 13.5% of the first step's weights); its "
                "rule is TensorFlow's standard one, nothing in it was tuned, and whether it is adopted is decided on "
                "the validation patients like every lever's."] if any("ema_warmup" in lever_parts(x) for x in levers) else []),
             "", "## Levers", "",
             "| lever | what | Dice (test) | per GAN seed | minus baseline, test (95% interval) | "
             "minus baseline, validation (95% interval) | adopted | steps | s per GAN |",
             "|---|---|---|---|---|---|---|---|---|"]

    def gap_text(gap):
        return "-" if gap is None else f"{gap['mean']:+.3f} ({gap['low']:+.3f} to {gap['high']:+.3f})"

    for lever, r in levers.items():
        adopted = "-" if "adopted" not in r else ("**yes**" if r["adopted"] else "no")
        lines.append(f"| {lever} | {what(lever)} | {r['dice']:.3f} ± {r['gan_sd']:.3f} | "
                     f"{', '.join(f'{d:.3f}' for d in r['dice_per_gan'])} | {gap_text(r.get('minus_baseline'))} | "
                     f"{gap_text(r.get('validation_minus_baseline'))} | {adopted} | {r['steps']} | "
                     f"{r['gan_seconds']:.0f} |")
    chosen = [lever for lever, r in levers.items() if r.get("adopted")]
    lines += ["", f"Adopted by the rule: {', '.join(chosen) if chosen else 'none'}."]
    combined = {lever: r["minus_parts"] for lever, r in levers.items() if r.get("minus_parts")}
    if combined:
        lines += ["", "## Levers pulled together, against their parts", "",
                  f"Each row: the combination minus one measured lever it contains (the lever it adds to), per "
                  f"patient, as above. The shipped default: {PRIVATE_RULE}.", "",
                  "| combination | minus | test (95% interval) | validation (95% interval) |", "|---|---|---|---|"]
        for lever, against in combined.items():
            for other, gaps in against.items():
                lines.append(f"| {lever} | {other} | {gap_text(gaps['test'])} | {gap_text(gaps['validation'])} |")
        private = [lever for lever, r in levers.items() if r.get("private_default")]
        lines += ["", f"Into the shipped default by that rule: {', '.join(private) if private else 'none'}."]
    measured = {part for lever in levers for part in lever_parts(lever)}
    unmeasured = [lever for lever in LEVERS if lever not in measured]
    if unmeasured:
        lines += ["", f"Not measured in this run (`--levers` chose the others): {', '.join(unmeasured)}."]
    lines += ["", "Figures: `levers.png` (Dice per lever, GAN seeds as dots); `samples.png` (the same label maps "
              "through each lever's first generator: label map, then FLAIR).", ""]
    return "\n".join(lines)


def plot(path: pathlib.Path, levers: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(levers)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.8))
    for i, name in enumerate(names):
        r = levers[name]
        ax.bar(i, r["dice"], color="tab:blue" if name != "baseline" else "tab:grey", alpha=0.7)
        ax.scatter([i] * len(r["dice_per_gan"]), r["dice_per_gan"], color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("whole-tumour Dice (real test patients)")
    ax.set_title("Synthetic-only Dice per generator lever (dots: GAN seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(cfg, path: pathlib.Path, levers: list[str], count: int = 4) -> None:
    """The same pooled label maps (the most tumour-laden of the data) through each lever's first generator."""
    import torch
    from PIL import Image

    from asyndgan.central_server.samples import image_to_rgb, label_to_rgb
    from asyndgan.formats.generator_file import load_from_checkpoint
    from asyndgan.synthesis.generate import synthesise

    rows, drawn = [], []
    maps = None
    for lever in levers:
        record = cfg.out / "gan" / lever / f"seed{cfg.seed}" / "gan.json"
        checkpoint = pathlib.Path(json.loads(record.read_text())["checkpoint"]) if record.is_file() else None
        if checkpoint is None or not checkpoint.is_file():  # its scores came from an earlier machine's run
            log.info("sample grid: no generator of %s on this machine, left out", lever)
            continue
        loaded = load_from_checkpoint(checkpoint)
        if maps is None:
            bank = _pooled_maps(cfg, loaded)
            order = np.argsort(-(bank >= 2).reshape(len(bank), -1).sum(1), kind="stable")
            maps = bank[np.sort(order[:: max(1, len(order) // (4 * count))][:count])]
        fake = synthesise(loaded, maps, torch.device("cpu"), 16)
        channel = loaded.model.image2d.modalities.index("flair") if "flair" in loaded.model.image2d.modalities else 0
        tiles = [np.concatenate([label_to_rgb(m), image_to_rgb(f[channel])], axis=1) for m, f in zip(maps, fake)]
        rows.append(np.concatenate(tiles, axis=1))
        drawn.append(lever)
    if rows:
        from PIL import ImageDraw

        grid = Image.fromarray(np.concatenate(rows, axis=0))
        draw = ImageDraw.Draw(grid)  # only to measure the names: the label column fits the longest
        margin = 12 + max(int(draw.textlength(lever)) for lever in drawn)
        named = Image.new("RGB", (grid.width + margin, grid.height), "white")
        named.paste(grid, (margin, 0))
        draw, height = ImageDraw.Draw(named), grid.height // len(rows)
        for i, lever in enumerate(drawn):
            draw.text((4, i * height + height // 2 - 5), lever, fill="black")
        named.save(path)


def _pooled_maps(cfg, loaded) -> np.ndarray:
    """Every training label map of the pooled data, as the generator was fed them, uint8 [n, S, S]."""
    from asyndgan.common.config import DataPrepConfig, SiteFacingConfig
    from asyndgan.formats.datasets import open_dataset

    data = open_dataset(cfg.out / "pooled", SiteFacingConfig(model=loaded.model),
                        DataPrepConfig(cache_dir=cfg.out / "cache"))
    return data.label_maps().numpy()
