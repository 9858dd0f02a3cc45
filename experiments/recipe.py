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

    def with_lever(self, lever: Lever) -> "GANRecipe":
        """This recipe with one lever pulled (`baseline`, and `longer` and `no_l1`, matters of the schedule and the
        loss that experiments set themselves, change nothing here)."""
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
