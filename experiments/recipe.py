"""The generator recipe an experiment trains with, as one typed setting: which generator and discriminator, the
moving average of the generator's weights, augmentation at the discriminators, healthy slices, synthetic cases per
label map. Each field is a lever `asyndgan experiment generator-recipe` measures; each maps onto the system's own
configuration (the server's ServerConfig, the sites' DataPrepConfig, generate's --samples), so a recipe chosen here
is one a consortium runs with the same settings.

PAPERS is the papers' pix2pix recipe. An experiment's settings name their recipe explicitly, so that a run made
with one recipe is never resumed or re-read as another; the experiments whose settings hold no recipe train the
papers' (they pin it), so that their committed reports stay reproducible whatever the system ships (SHIPPED).
"""

from __future__ import annotations

import pathlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from asyndgan.common.config import DataPrepConfig, ServerConfig, SiteFacingConfig

Lever = Literal["baseline", "ema", "spade", "multiscale", "diffaug", "healthy", "samples3", "longer", "ema_warmup",
                "appearance", "no_l1"]
LEVERS: tuple[Lever, ...] = ("baseline", "ema", "spade", "multiscale", "diffaug", "healthy", "samples3", "longer",
                             "ema_warmup", "appearance", "no_l1")
# Levers of the segmentation recipe, not of the generator's: the baseline's GANs and synthetic data, segmented with
# this change of SegmentationRecipe.training (adopted, it holds for every row of every table, real rows included).
SEGMENTATION_LEVERS: dict[str, dict] = {"appearance": {"appearance": True}}
# Levers that change nothing in how the GAN trains: a lever made of these and others trains as the others do.
NOT_TRAINING: frozenset[str] = frozenset({"samples3", *SEGMENTATION_LEVERS})


def lever_parts(name: str) -> tuple[Lever, ...]:
    """The single levers a measured lever pulls: `spade`, or several pulled together, `spade+no_l1` (how a lever
    chosen with L1 is confirmed as private sites must train it). Raises ValueError naming what is wrong."""
    parts = tuple(p.strip() for p in name.split("+"))
    unknown = [p for p in parts if p not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever {unknown[0]!r} in {name!r} (known: {', '.join(LEVERS)}; join several "
                         "with +)")
    if len(parts) > 1 and "baseline" in parts:
        raise ValueError(f"{name!r}: baseline is no lever to combine (it is what every lever changes)")
    if len(set(parts)) != len(parts):
        raise ValueError(f"{name!r} names a lever twice")
    return parts  # type: ignore[return-value]


def lever_name(parts) -> str:
    """The canonical name of levers pulled together (`baseline` for none), in LEVERS' order."""
    pulled = set(parts)
    chosen = [lever for lever in LEVERS if lever in pulled and lever != "baseline"]
    return "+".join(chosen) or "baseline"


def training_lever(name: str) -> str:
    """The lever whose GAN `name` trains as: `name` without the parts that change only the synthesis or the
    segmentation (`appearance+no_l1` trains as `no_l1`, `samples3` as `baseline`)."""
    return lever_name(p for p in lever_parts(name) if p not in NOT_TRAINING)


def synthesis_lever(name: str) -> str:
    """The lever whose synthetic data `name` segments: `name` without its segmentation parts."""
    return lever_name(p for p in lever_parts(name) if p not in SEGMENTATION_LEVERS)


class GANRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generator: Literal["resnet", "spade"] = Field("resnet", description="Image2DConfig.generator")
    d_scales: int = Field(1, ge=1, le=3, description="Image2DConfig.d_scales: PatchGANs per discriminator")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="TrainConfig.ema_decay (None: off)")
    ema_warmup: bool = Field(False, description="TrainConfig.ema_warmup")
    diff_augment: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=list, description="SiteFacingConfig.diff_augment at every site's discriminators")
    healthy_ratio: float = Field(0.0, ge=0, le=4, description="DataPrepConfig.healthy_ratio at every site")
    samples: int = Field(1, ge=1, le=16, description="synthetic cases per label-map case (generate --samples)")

    def with_lever(self, lever: str) -> "GANRecipe":
        """This recipe with a lever pulled, or several (`spade+diffaug`; `baseline`, and `longer` and `no_l1`,
        matters of the schedule and the loss that experiments set themselves, change nothing here)."""
        parts = lever_parts(lever)
        if len(parts) > 1:
            recipe = self
            for part in parts:
                recipe = recipe.with_lever(part)
            return recipe
        change = {"ema": {"ema_decay": 0.999}, "ema_warmup": {"ema_decay": 0.999, "ema_warmup": True},
                  "spade": {"generator": "spade"}, "multiscale": {"d_scales": 2},
                  "diffaug": {"diff_augment": ["translation", "cutout"]}, "healthy": {"healthy_ratio": 0.5},
                  "samples3": {"samples": 3}}.get(lever, {})
        return self.model_copy(update=change)

    def apply(self, scfg: ServerConfig) -> None:
        """Set the server's part of the recipe in `scfg` (in place)."""
        scfg.train.ema_decay = self.ema_decay
        scfg.train.ema_warmup = self.ema_warmup
        self.apply_site(scfg.site)

    def apply_site(self, site: SiteFacingConfig) -> None:
        """Set what the server tells the sites (the networks, the discriminators' augmentation) in place."""
        site.model.image2d.generator = self.generator
        site.model.image2d.d_scales = self.d_scales
        site.diff_augment = list(self.diff_augment)

    def prep(self, cache_dir: pathlib.Path) -> DataPrepConfig:
        """A site's data preparation under this recipe (in-process sites)."""
        return DataPrepConfig(cache_dir=cache_dir, healthy_ratio=self.healthy_ratio)

    def site_options(self) -> list[str]:
        """`asyndgan-site join` options for the sites' part of the recipe (site processes): always explicit, so
        that a site's own default never decides it."""
        return ["--set", f"prep.healthy_ratio={self.healthy_ratio:g}"]


PAPERS = GANRecipe()
# The recipe the system ships: every field is the default of the setting it maps to (ServerConfig, DataPrepConfig,
# `asyndgan generate --samples`), which tests/test_generator_recipe.py holds them to. Chosen by the
# generator-recipe measurement's rule (docs/experiments.md); the papers' until a lever passes it.
SHIPPED = PAPERS
