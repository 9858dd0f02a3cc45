"""What the phantom generates: the recipe (sites, case counts, shape, seed) and each site's scanner and population
profile. A validated `PhantomConfig` is the full recipe; it is saved beside the data as config.json."""

from __future__ import annotations

import pathlib
import re
import zlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from asyndgan.common.config import BRATS_MODALITIES

BRATS_SHAPE = (240, 240, 155)
# Institution sizes of the FeTS 2021 challenge's partition (Federated Tumour Segmentation); the default split takes
# the largest few, so that a 3-site run is as uneven as real institutions without leaving a site with one case.
FETS_2021_PARTITION_SIZES = (129, 14, 5, 9, 22, 34, 12, 8, 4, 8, 6, 9, 27, 3, 11, 34, 6)

# What a case's lesion can be. glioma: high or low grade as `high_grade_fraction` draws (one lobulated tumour in
# cerebral white matter, edema along it); low_grade_glioma: always low grade (solid, non-enhancing, little edema);
# metastases: several small ring-enhancing lesions at the grey-white junction anywhere in the brain, with edema out
# of proportion to their size; meningioma: one extra-axial, dural-based, homogeneously enhancing mass at the brain
# surface that pushes the brain in, with little or no edema.
LesionType = Literal["glioma", "low_grade_glioma", "metastases", "meningioma"]
LESION_TYPES: tuple[str, ...] = ("glioma", "low_grade_glioma", "metastases", "meningioma")


# Bounds of the (low, high) ranges of a SiteProfile.
_RANGES = {"tumour_radius_mm": (2.0, 40.0), "metastasis_radius_mm": (1.5, 15.0), "meningioma_radius_mm": (4.0, 30.0),
           "metastasis_count": (1, 15), "atrophy": (0.0, 1.0), "contrast_timing": (0.0, 2.0)}


class SiteProfile(BaseModel):
    """Scanner, protocol and population effects of one site. Defaults are a clean 1 mm 3D protocol at 1.5 T with
    gliomas only and the template's anatomy up to head size: the layout every earlier phantom used (a profile that
    leaves the newer fields at their defaults draws the same random numbers and gives byte-identical cases)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=80, description="a label for reports (e.g. 'community hospital, 1.5 T')")
    # Population: which lesions, how large.
    lesions: dict[LesionType, float] = Field(
        default_factory=lambda: {"glioma": 1.0},
        description="relative frequency of each lesion type among this site's patients")
    tumour_radius_mm: tuple[float, float] = Field((8.0, 20.0), description="range of a glioma's core radius")
    high_grade_fraction: float = Field(0.75, ge=0, le=1, description="share of gliomas with necrosis + enhancing rim")
    metastasis_count: tuple[int, int] = Field((2, 5), description="range of the number of metastases per patient")
    metastasis_radius_mm: tuple[float, float] = Field((2.5, 6.0), description="range of one metastasis' radius")
    meningioma_radius_mm: tuple[float, float] = Field((9.0, 18.0), description="range of a meningioma's radius")
    mass_effect: float = Field(0.5, ge=0, le=1, description="displaced-tissue radius / core radius")
    # Anatomy.
    head_scale_mean: float = Field(1.0, ge=0.8, le=1.2, description="mean head size / template, per axis")
    head_scale_sd: float = Field(0.03, ge=0, le=0.1, description="std of per-axis head size / template")
    atrophy: tuple[float, float] = Field(
        (0.0, 0.0), description="range of a patient's atrophy, 0 none to 1 severe: ventricles widened by up to "
        "6 mm and cortical grey matter thinned (older populations)")
    deformation_mm: float = Field(0.0, ge=0, le=8, description="amplitude of a smooth random warp of the "
                                  "template (about 25 mm wavelength): each patient's own folds and shape")
    # Protocol.
    field_strength_t: float = Field(1.5, ge=0.5, le=7, description="B0; tissue T1 lengthens (x (B0/1.5)^0.45) "
                                    "and T2 shortens a little at higher field, so contrasts differ")
    gain: float = Field(1.0, gt=0, le=10, description="global intensity multiplier (receiver gain)")
    bias_strength: float = Field(0.12, ge=0, le=1, description="std of the log of the smooth bias field")
    noise: float = Field(0.02, ge=0, le=0.5, description="Rician sigma / brightest normal tissue")
    contrast_dose: float = Field(1.0, ge=0, le=3, description="gadolinium effect; 1: enhancing T1 350 ms")
    contrast_timing: tuple[float, float] = Field(
        (0.85, 1.15), description="range of the per-patient factor on the dose's effect (injection-to-scan "
        "delay: early scans enhance less)")
    slice_thickness_mm: float = Field(1.0, gt=0, le=10, description="acquired thickness; >1 blurs along z")
    inplane_mm: float = Field(1.0, gt=0, le=5, description="acquired in-plane resolution; >1 blurs in-plane")
    misregistration_mm: float = Field(0.0, ge=0, le=5, description="max shift of t1/t2/flair vs t1ce and seg")

    @field_validator(*_RANGES)
    @classmethod
    def _ranges(cls, v: tuple[float, float], info) -> tuple[float, float]:
        lo_min, hi_max = _RANGES[info.field_name]
        lo, hi = v
        if not (lo_min <= lo <= hi <= hi_max):
            raise ValueError(f"need {lo_min:g} <= low <= high <= {hi_max:g}, got {tuple(v)}")
        return v

    @field_validator("lesions")
    @classmethod
    def _lesions(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"need at least one lesion type with a positive weight, got {v}")
        return v


class PhantomConfig(BaseModel):
    """What to generate. Unset `cases_per_site` and `profiles` are filled in at validation, so the validated
    config is the full recipe (it is saved as out/config.json)."""

    model_config = ConfigDict(extra="forbid")

    sites: int = Field(3, ge=1, le=64)
    cases_per_site: list[int] | None = None
    train_cases: int = Field(60, ge=1, description="total training cases when cases_per_site is not given")
    test_cases: int = Field(12, ge=0)
    seed: int = Field(0, ge=0)
    shape: tuple[int, int, int] = BRATS_SHAPE
    profiles: list[SiteProfile] | None = None
    missing: dict[str, list[str]] = Field(
        default_factory=dict, description="site name -> modalities its cases are written without, as a hospital "
        "that never acquired them would export (the test cases keep every modality)")
    cohort: str = Field("", pattern=r"^[a-z0-9_]{0,32}$", description="a name that gives the cohort its own "
                        "random streams and case ids (two cohorts with one seed share no case); empty: the "
                        "original phantom's streams and ids")
    site_names: list[str] | None = Field(None, description="folder names of the sites (default site1, site2, ...)")
    test_profiles: list[int] | None = Field(
        None, description="site index (0-based) whose scanner and population make each test case, cycled; "
        "default: every site in turn")

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 24 <= n <= 512 for n in v):
            raise ValueError(f"each dimension must be in 24..512, got {v}")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> PhantomConfig:
        if self.cases_per_site is None:
            self.cases_per_site = default_cases_per_site(self.sites, self.train_cases)
        if len(self.cases_per_site) != self.sites or any(n < 1 for n in self.cases_per_site):
            raise ValueError(f"cases_per_site needs {self.sites} positive counts, got {self.cases_per_site}")
        if self.profiles is None:
            self.profiles = default_profiles(self.sites, self.seed)
        if len(self.profiles) != self.sites:
            raise ValueError(f"profiles needs {self.sites} entries, got {len(self.profiles)}")
        if self.site_names is None:
            self.site_names = [f"site{k + 1}" for k in range(self.sites)]
        names = self.site_names
        if len(names) != self.sites or len(set(names)) != len(names) or "test" in names or not all(
                re.fullmatch(r"[A-Za-z0-9_-]{1,64}", n) for n in names):
            raise ValueError(f"site_names needs {self.sites} distinct folder names (letters, digits, _ -; not "
                             f"'test'), got {names}")
        if self.test_profiles is not None and (not self.test_profiles or any(
                not 0 <= k < self.sites for k in self.test_profiles)):
            raise ValueError(f"test_profiles must list site indices 0..{self.sites - 1}, got {self.test_profiles}")
        for site, mods in self.missing.items():
            if site not in names:
                raise ValueError(f"missing: no site {site!r}; the sites are {', '.join(names)}")
            unknown = [m for m in mods if m not in BRATS_MODALITIES]
            if unknown:
                raise ValueError(f"missing: unknown modalities {unknown} for {site}; BraTS cases hold "
                                 f"{', '.join(BRATS_MODALITIES)}")
            if set(BRATS_MODALITIES) <= set(mods):
                raise ValueError(f"missing: {site} would keep no image (a case needs at least one modality)")
        return self


    @property
    def case_prefix(self) -> str:
        return f"PHANTOM_{self.cohort.upper()}" if self.cohort else "PHANTOM"

    def case_seed(self, stream: int, index: int) -> np.random.SeedSequence:
        """The seed of one case: (seed, stream, index), salted by the cohort's name when it has one."""
        key = [self.seed, stream, index]
        if self.cohort:
            key.append(zlib.crc32(self.cohort.encode()))
        return np.random.SeedSequence(key)

    def test_profile(self, index: int) -> int:
        order = self.test_profiles or list(range(self.sites))
        return order[index % len(order)]


class PhantomSummary(BaseModel):
    out: pathlib.Path
    cases_per_site: dict[str, int]
    test_cases: int
    lesions: dict[str, int] = Field(default_factory=dict, description="cases per lesion type, all splits")
    seconds: float
    seconds_per_case: float


def default_cases_per_site(sites: int, total: int) -> list[int]:
    """Split `total` in proportion to the largest FeTS 2021 institutions (at least 2 per site)."""
    ranked = sorted(FETS_2021_PARTITION_SIZES, reverse=True)
    weights = np.array([ranked[i % len(ranked)] for i in range(sites)], float)
    share = weights / weights.sum() * max(total, 2 * sites)
    counts = np.maximum(np.floor(share).astype(int), 2)
    # Largest remainder for what is left, so the counts add up to the total where the minimum allows.
    for i in np.argsort(-(share - np.floor(share)))[: max(0, int(total - counts.sum()))]:
        counts[i] += 1
    return [int(n) for n in counts]


def default_profiles(sites: int, seed: int) -> list[SiteProfile]:
    """Deterministically different scanners and populations, one per site."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, PROFILE_STREAM]))
    out = []
    for k in range(sites):
        lo = float(rng.uniform(6.0, 12.0))
        out.append(SiteProfile(
            gain=round(float(rng.uniform(0.7, 1.4)), 3),
            bias_strength=round(float(rng.uniform(0.05, 0.3)), 3),
            noise=round(float(rng.uniform(0.01, 0.05)), 4),
            contrast_dose=round(float(rng.uniform(0.6, 1.3)), 3),
            # A third of sites acquire thick slices, as older 2D protocols in the BraTS collections did.
            slice_thickness_mm=round(float(rng.uniform(3.0, 5.0)), 2) if k % 3 == 2 else 1.0,
            tumour_radius_mm=(round(lo, 1), round(lo + float(rng.uniform(6.0, 14.0)), 1)),
            high_grade_fraction=round(float(rng.uniform(0.5, 0.95)), 3),
            misregistration_mm=round(float(rng.uniform(0.5, 1.5)), 2) if k % 3 == 1 else 0.0,
        ))
    return out


PROFILE_STREAM = 7919
TEST_STREAM = 0  # training cases of site k use stream k (1-based)


def parse_missing(text: str | None) -> dict[str, list[str]]:
    """`site1=t2,site2=flair+t1` (or the same site repeated) -> {"site1": ["t2"], "site2": ["flair", "t1"]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        site, sep, mods = part.partition("=")
        if not sep or not site.strip() or not mods.strip():
            raise ValueError(f"--missing entry {part!r} must look like site1=t2 (several: site1=t2+flair)")
        bucket = out.setdefault(site.strip(), [])
        bucket.extend(m.strip() for m in mods.split("+") if m.strip() and m.strip() not in bucket)
    return out
