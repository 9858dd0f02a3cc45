"""BraTS volumes as segmentation data: whole cases read with the site's own reader, training slices, test cases.

Reading reuses formats/brats.py (case discovery, 2018 vs 2023 names and labels, label checks, percentile
normalisation), so a synthetic tree written by `asyndgan generate` and a real one are read the same way. What
differs from the site's prepared cache: the site keeps tumour slices only, at the generator's size; segmentation
needs healthy slices too (training) and every slice on the original grid (evaluation).

Orientation: volumes stay in their voxel axes [X, Y, Z]; an axial slice is [X, Y] at one Z. The 2-D net never
needs to know which way is up, as long as training and evaluation slice the same way (they share these functions).
"""

from __future__ import annotations

import logging
import multiprocessing
import pathlib
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from asyndgan.common.errors import DataError
from asyndgan.segmentation.config import REGION_LABELS, Preprocessing, SegmentationRecipe
from asyndgan.formats import brats

log = logging.getLogger(__name__)

BRAIN = 1  # in CaseVolume.seg: brain without tumour (the tumour labels keep the site's values 2, 3, 4)


@dataclass
class CaseVolume:
    """One case on its original grid."""

    name: str
    images: np.ndarray  # float32 [C, X, Y, Z], each modality clipped and scaled to [-1, 1], background -1
    seg: np.ndarray  # uint8 [X, Y, Z]: 0 outside the brain, BRAIN, or a tumour label (2, 3, 4)
    spacing: tuple[float, float, float]  # mm per voxel along X, Y, Z (the NIfTI header's zooms)


def check_data_dir(path: pathlib.Path) -> None:
    """A one-line DataError unless `path` is a folder holding at least one BraTS case folder."""
    if not path.exists():
        raise DataError(f"data folder {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data folder {path} is not a folder")
    if not brats.is_brats_tree(path):
        raise DataError(f"{path} holds no BraTS case (a folder <case>/ with <case>_seg.nii[.gz] or "
                        f"<case>-seg.nii[.gz])")


def find_cases(root: pathlib.Path, modalities: list[str], strict: bool, missing: str = "skip") -> list[brats.Case]:
    """The complete cases under `root`; an incomplete one is skipped with a warning, or an error if `strict`.
    missing="zero": a case needs only its seg and at least one image; absent modalities are zero-filled later."""
    check_data_dir(root)
    if missing == "zero":
        cases, problems = brats.find_cases(root, [])
        usable = []
        for case in cases:
            found = {m: p for m, p in brats.case_image_files(case).items() if m in modalities}
            if not found:
                problems.append(f"{case.files['seg'].parent}: none of the modalities {modalities}")
                continue
            case.files.update(found)
            usable.append(case)
        cases = usable
    else:
        cases, problems = brats.find_cases(root, modalities)
    for problem in problems:
        if strict:
            raise DataError(problem)
        log.warning("skipping a case: %s", problem)
    if not cases:
        raise DataError(f"{root} holds no complete BraTS case with modalities {modalities}")
    return cases


def read_case(case: brats.Case, prep: Preprocessing) -> CaseVolume:
    """The case's modalities normalised as the site does, its labels, brain mask and voxel spacing."""
    seg = brats.read_seg(case)
    # A modality the case lacks (only with prep.missing = "zero") is a blank image: -1 everywhere once normalised.
    volumes = [brats.read_image(case, m, seg.shape) if m in case.files else np.zeros(seg.shape, np.float32)
               for m in prep.modalities]
    brain = np.any(np.stack([v > 0 for v in volumes]), axis=0)  # skull-stripped: the brain is where signal is
    images = np.stack([brats.normalise(v, *prep.clip_percentiles) for v in volumes])
    labelled = np.where(seg > 0, seg, np.where(brain, BRAIN, 0)).astype(np.uint8)
    try:
        zooms = nib.load(str(case.files["seg"])).header.get_zooms()[:3]
    except Exception as exc:  # nibabel raises many kinds; the volume itself was readable a moment ago
        raise DataError(f"cannot read the header of {case.files['seg']}: {exc}") from None
    spacing = tuple(float(z) for z in zooms)
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DataError(f"{case.files['seg']} has voxel spacing {spacing}; expected three positive sizes in mm")
    return CaseVolume(case.name, images, labelled, spacing)  # type: ignore[arg-type]


def region_mask(seg: np.ndarray, region: str) -> np.ndarray:
    """bool, same shape as `seg`: voxels of the region (whole tumour, tumour core or enhancing tumour)."""
    return np.isin(seg, REGION_LABELS[region])


# Margin around the brain's in-plane bounding box (voxels are about a millimetre in BraTS), so that a resize's
# border effects stay outside the brain.
CROP_MARGIN_MM = 4.0


def in_plane_box(seg: np.ndarray, prep: Preprocessing, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
                 ) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1): the part of every axial slice the network sees. `crop = "none"`: the whole slice;
    `"brain"`: the square around the brain's bounding box over the whole volume (the same for every slice of a
    case, so training and evaluation cut the same way), plus a margin, clipped to the slice. At 64 px the network
    then spends its pixels on the brain rather than on the empty field of view around it: about 1.3x finer for an
    adult brain in BraTS' 240 mm field, which small lesions need."""
    x, y = seg.shape[:2]
    if prep.crop == "none":
        return 0, x, 0, y
    hit_x = np.flatnonzero((seg > 0).any(axis=(1, 2)))
    hit_y = np.flatnonzero((seg > 0).any(axis=(0, 2)))
    if len(hit_x) == 0:
        return 0, x, 0, y
    margin = [int(np.ceil(CROP_MARGIN_MM / s)) for s in spacing[:2]]
    lo = [hit_x[0] - margin[0], hit_y[0] - margin[1]]
    hi = [hit_x[-1] + 1 + margin[0], hit_y[-1] + 1 + margin[1]]
    side = max(hi[0] - lo[0], hi[1] - lo[1])
    box = []
    for a, n in enumerate((x, y)):
        centre = (lo[a] + hi[a]) / 2.0
        start = int(round(centre - side / 2.0))
        start = min(max(start, 0), max(n - side, 0))
        box += [int(start), int(min(start + side, n))]
    return box[0], box[1], box[2], box[3]


def slices_to_net(images: np.ndarray, size: int) -> torch.Tensor:
    """float32 [k, C, size, size] from images [C, X, Y, k] (each slice resized in-plane, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(3, 0, 1, 2)))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(-1, 1)


def masks_to_net(mask: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [k, size, size] from a bool mask [X, Y, k] (nearest, as the site resizes label maps)."""
    m = torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1)).astype(np.float32))[:, None]
    if m.shape[-2:] != (size, size):
        m = F.interpolate(m, size=(size, size), mode="nearest-exact")
    return m[:, 0].to(torch.uint8)


def training_slice_indices(seg: np.ndarray, healthy_ratio: float, name: str) -> tuple[np.ndarray, int]:
    """(sorted axial indices, number of tumour slices): every slice with tumour, plus round(healthy_ratio x that
    many) brain slices without tumour drawn at random. The draw is seeded by the case's name only: a case keeps
    its slices whatever else is pooled with it, and the training seed (weights, batch order) can vary over one
    loaded SliceSet."""
    tumour = (seg > BRAIN).any(axis=(0, 1))
    brain = (seg > 0).any(axis=(0, 1))
    t_idx = np.flatnonzero(tumour)
    healthy = np.flatnonzero(brain & ~tumour)
    n = min(len(healthy), int(round(healthy_ratio * len(t_idx))))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    h_idx = rng.choice(healthy, size=n, replace=False) if n else np.zeros(0, np.int64)
    return np.sort(np.concatenate([t_idx, h_idx])), len(t_idx)


@dataclass
class SliceSet:
    """Training slices pooled from one or more trees, at the network's size."""

    images: torch.Tensor  # float16 [N, C, s, s]
    masks: torch.Tensor  # uint8 [N, s, s]: 1 inside the region
    preprocessing: Preprocessing  # what made them; a recipe that trains on them must agree (train_model checks)
    region: str
    healthy_ratio: float
    cases: list[str] = field(default_factory=list)  # "<tree>/<case>" per case used
    tumour_slices: int = 0
    healthy_slices: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])


def pool_slices(sets: list[SliceSet]) -> SliceSet:
    """One SliceSet holding every set's slices in order (sets read separately, e.g. one per site, pooled for one
    model without reading them again)."""
    first = sets[0]
    return SliceSet(torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]), first.preprocessing,
                    first.region, first.healthy_ratio, [c for s in sets for c in s.cases],
                    sum(s.tumour_slices for s in sets), sum(s.healthy_slices for s in sets))


def _map_cases(fn, cases: list, args: tuple, workers: int, desc: str, progress: bool):
    """fn(case, *args) for each case, in order, in `workers` processes when > 1 (reading and normalising a
    BraTS case is ~2 s of single-threaded numpy and gzip; a data set of 60 cases is worth spreading)."""
    if workers <= 1 or len(cases) <= 1:
        results = map(fn, cases, *(repeat(a) for a in args))
        return list(tqdm(results, total=len(cases), desc=desc, unit="case", disable=not progress))
    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang in them (as the site).
    with ProcessPoolExecutor(min(workers, len(cases)), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = pool.map(fn, cases, *(repeat(a) for a in args))
        return list(tqdm(results, total=len(cases), desc=desc, unit="case", disable=not progress))


def _training_slices_of(case: brats.Case, recipe: SegmentationRecipe):
    """(images float16 [k, C, s, s], masks uint8 [k, s, s], tumour slice count) as numpy, or a DataError's
    message (text crosses a process boundary where an exception object might not)."""
    try:
        vol = read_case(case, recipe.preprocessing)
    except DataError as exc:
        return str(exc)
    size = recipe.preprocessing.image_size
    idx, n_tumour = training_slice_indices(vol.seg, recipe.training.healthy_ratio, case.name)
    x0, x1, y0, y1 = in_plane_box(vol.seg, recipe.preprocessing, vol.spacing)
    images = slices_to_net(vol.images[:, x0:x1, y0:y1][..., idx], size).to(torch.float16).numpy()
    masks = masks_to_net(region_mask(vol.seg[x0:x1, y0:y1][..., idx], recipe.region), size).numpy()
    return images, masks, n_tumour


def load_training_slices(dirs: list[pathlib.Path], recipe: SegmentationRecipe, progress: bool = True,
                         workers: int = 1) -> SliceSet:
    """Every tumour slice of every case under `dirs`, plus healthy brain slices (recipe.training.healthy_ratio).
    A bad case is skipped with a warning naming its file; no usable case at all is an error."""
    prep = recipe.preprocessing
    found = [(root, c) for root in dirs for c in find_cases(root, prep.modalities, strict=False, missing=prep.missing)]
    results = _map_cases(_training_slices_of, [c for _, c in found], (recipe,), workers, "reading training cases",
                         progress)
    images, masks, names = [], [], []
    n_tumour = n_healthy = 0
    for (root, case), result in zip(found, results):
        if isinstance(result, str):
            log.warning("skipping a case: %s", result)
            continue
        case_images, case_masks, t = result
        if len(case_images) == 0:
            log.warning("skipping %s: no tumour slice", case.files["seg"])
            continue
        images.append(torch.from_numpy(case_images))
        masks.append(torch.from_numpy(case_masks))
        names.append(f"{root.name}/{case.name}")
        n_tumour, n_healthy = n_tumour + t, n_healthy + len(case_images) - t
    if not names:
        raise DataError(f"no usable training case in {', '.join(map(str, dirs))}")
    log.info("training slices: %d with tumour, %d healthy, from %d cases", n_tumour, n_healthy, len(names))
    return SliceSet(torch.cat(images), torch.cat(masks), recipe.preprocessing.model_copy(deep=True), recipe.region,
                    recipe.training.healthy_ratio, names, n_tumour, n_healthy)


@dataclass
class TestCase:
    """A case ready for 3-D evaluation: network inputs for every slice, and the truth on the original grid."""

    name: str
    inputs: torch.Tensor  # float16 [C, s, s, Z]: every axial slice (its in-plane box) at the network's size
    seg: np.ndarray  # uint8 [X, Y, Z] as CaseVolume.seg
    spacing: tuple[float, float, float]
    box: tuple[int, int, int, int] | None = None  # (x0, x1, y0, y1) the inputs were cut from; None: whole slices


@dataclass
class TestSet:
    root: pathlib.Path
    preprocessing: Preprocessing
    cases: list[TestCase]


def _test_case_of(case: brats.Case, prep: Preprocessing):
    """(name, inputs float16 [C, s, s, Z], seg, spacing, in-plane box) as numpy, or a DataError's message."""
    try:
        vol = read_case(case, prep)
    except DataError as exc:
        return str(exc)
    x0, x1, y0, y1 = box = in_plane_box(vol.seg, prep, vol.spacing)
    inputs = slices_to_net(vol.images[:, x0:x1, y0:y1], prep.image_size).to(torch.float16).permute(1, 2, 3, 0)
    return case.name, inputs.contiguous().numpy(), vol.seg, vol.spacing, box


def load_test_cases(root: pathlib.Path, prep: Preprocessing, progress: bool = True, workers: int = 1) -> TestSet:
    """Every case under `root`, every slice. Strict: an incomplete or unreadable case is an error naming its
    file, since silently dropping a test patient would change the numbers being compared."""
    cases = find_cases(root, prep.modalities, strict=True)
    out = []
    for result in _map_cases(_test_case_of, cases, (prep,), workers, "reading test cases", progress):
        if isinstance(result, str):
            raise DataError(result)
        name, inputs, seg, spacing, box = result
        out.append(TestCase(name, torch.from_numpy(inputs), seg, spacing, box))
    return TestSet(root, prep.model_copy(deep=True), out)
