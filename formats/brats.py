"""BraTS-style NIfTI trees: find cases, check them, and turn them into 2-D training slices.

Detected automatically, one folder per case:
- 2018-2021 names `<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]`, labels 0, 1 necrotic core, 2 edema, 4 enhancing;
- 2023+ names `<case>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]`, enhancing tumour = 3.
Preparation follows the published method: axial slices that contain tumour (at least `min_tumour_pixels`; with
`healthy_ratio` > 0 also that many healthy brain slices per tumour slice),
per-volume per-modality percentile clipping in the brain and scaling to [-1, 1] (background -1), and a label map
for the generator made of the tumour labels plus the brain outline, all resized to the server's size. Label
values are normalised to: 0 background, 1 brain outline, 2 necrotic core, 3 edema, 4 enhancing tumour.
A case with a missing file, shapes that disagree, an unreadable volume or unexpected labels is skipped with a
warning naming the file (or stops preparation, with `on_bad_case = "error"`); one bad case never stops a site.
"""

from __future__ import annotations

import logging
import multiprocessing
import pathlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from tqdm import tqdm

from asyndgan.common.config import BRATS_MODALITIES, DataPrepConfig
from asyndgan.common.errors import DataError
from asyndgan.formats import cache

log = logging.getLogger(__name__)

OUTLINE, NECROTIC, EDEMA, ENHANCING = 1, 2, 3, 4
NUM_CLASSES = 5


@dataclass(frozen=True)
class Scheme:
    name: str
    sep: str
    files: dict[str, str]  # our modality name (and "seg") -> file suffix
    labels: dict[int, int]  # file label -> our label


SCHEMES = (
    Scheme("brats2018-2021", "_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
           {1: NECROTIC, 2: EDEMA, 4: ENHANCING}),
    Scheme("brats2023", "-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
           {1: NECROTIC, 2: EDEMA, 3: ENHANCING}),
)


@dataclass
class Case:
    name: str
    scheme: Scheme
    files: dict[str, pathlib.Path] = field(default_factory=dict)  # modality / "seg" -> path


def _find_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _scheme_of(folder: pathlib.Path) -> Scheme | None:
    for scheme in SCHEMES:
        if _find_file(folder, f"{folder.name}{scheme.sep}seg") is not None:
            return scheme
    return None


def is_brats_tree(root: pathlib.Path) -> bool:
    return any(p.is_dir() and _scheme_of(p) is not None for p in root.iterdir())


def find_cases(root: pathlib.Path, modalities: list[str]) -> tuple[list[Case], list[str]]:
    """Complete cases, and one problem line per incomplete case folder (naming the missing file)."""
    cases, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        scheme = _scheme_of(folder)
        if scheme is None:
            problems.append(f"{folder}: no {folder.name}_seg.nii[.gz] or {folder.name}-seg.nii[.gz]")
            continue
        case = Case(folder.name, scheme)
        for key in [*modalities, "seg"]:
            stem = f"{folder.name}{scheme.sep}{scheme.files[key]}"
            path = _find_file(folder, stem)
            if path is None:
                problems.append(f"missing file {folder / stem}.nii.gz")
                break
            case.files[key] = path
        else:
            cases.append(case)
    return cases, problems


def held_modalities(root: pathlib.Path, prep: DataPrepConfig) -> list[str]:
    """The modalities this site will use: the setting, or every BraTS modality the first case has."""
    if prep.modalities:
        unknown = [m for m in prep.modalities if m not in BRATS_MODALITIES]
        if unknown:
            raise DataError(f"unknown modalities {unknown}; BraTS trees hold {list(BRATS_MODALITIES)}")
        return list(prep.modalities)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        scheme = _scheme_of(folder)
        if scheme is not None:
            found = [m for m in BRATS_MODALITIES
                     if _find_file(folder, f"{folder.name}{scheme.sep}{scheme.files[m]}") is not None]
            if found:
                return found
    raise DataError(f"{root} holds no BraTS case with an image")


def read_volume(path: pathlib.Path, dtype=np.float32) -> np.ndarray:
    """A NIfTI volume's voxels; DataError naming the file when it cannot be read."""
    try:
        return np.asarray(nib.load(str(path)).dataobj, dtype=dtype)  # type: ignore[attr-defined]
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, EOFError, zlib.error, ValueError)
        raise DataError(f"cannot read {path}: {exc}") from None


def read_seg(case: Case) -> np.ndarray:
    """Our labels (uint8, 0/2/3/4) from the case's seg file; unexpected values are an error naming it."""
    raw = read_volume(case.files["seg"], np.float32)
    if raw.ndim != 3:
        raise DataError(f"{case.files['seg']} is {raw.ndim}-D; expected a 3-D volume")
    values = set(np.unique(raw).tolist())
    unexpected = values - {0.0, *map(float, case.scheme.labels)}
    if unexpected:
        raise DataError(f"{case.files['seg']} has unexpected labels {sorted(unexpected)} for "
                        f"{case.scheme.name} (allowed 0, {', '.join(map(str, case.scheme.labels))})")
    out = np.zeros(raw.shape, np.uint8)
    for src, dst in case.scheme.labels.items():
        out[raw == src] = dst
    return out


def read_image(case: Case, modality: str, shape: tuple[int, ...]) -> np.ndarray:
    """One modality of the case (float32, raw intensities), checked to have the seg's `shape` and finite values."""
    v = read_volume(case.files[modality])
    if v.shape != shape:
        raise DataError(f"{case.files[modality]} has shape {v.shape} but {case.files['seg'].name} has {shape}")
    if not np.isfinite(v).all():
        raise DataError(f"{case.files[modality]} contains NaN or infinite values")
    return v


def tumour_slices(seg: np.ndarray, min_pixels: int) -> np.ndarray:
    """Axial (last-axis) indices with at least min_pixels tumour voxels (and at least one)."""
    counts = (seg > 0).sum(axis=(0, 1))
    return np.flatnonzero(counts >= max(1, min_pixels))


def normalise(volume: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """Clip to the brain's percentiles and scale to [-1, 1]; outside the brain (zero voxels) -1."""
    brain = volume > 0
    out = np.full(volume.shape, -1.0, np.float32)
    if not brain.any():
        return out
    lo, hi = np.percentile(volume[brain], [lo_pct, hi_pct])
    scaled = (np.clip(volume, lo, hi) - lo) / max(hi - lo, 1e-6) * 2 - 1
    out[brain] = scaled[brain]
    return out


def label_maps(seg_slices: np.ndarray, brain_slices: np.ndarray, size: int) -> np.ndarray:
    """uint8 [k, size, size]: brain outline (1) plus tumour labels, at the target size."""
    seg_t = torch.from_numpy(seg_slices[:, None].astype(np.float32))
    brain_t = torch.from_numpy(brain_slices[:, None].astype(np.float32))
    seg = F.interpolate(seg_t, size=(size, size), mode="nearest-exact")[:, 0].numpy().astype(np.uint8)
    brain = F.interpolate(brain_t, size=(size, size), mode="nearest-exact")[:, 0].numpy() > 0.5
    out = np.zeros_like(seg)
    for i in range(len(out)):
        filled = ndi.binary_fill_holes(brain[i])
        out[i][filled & ~ndi.binary_erosion(filled)] = OUTLINE
    out[seg > 0] = seg[seg > 0]
    return out


def healthy_budget(tumour: int, ratio: float) -> int:
    """The most healthy slices a case with `tumour` tumour slices adds (DataPrepConfig.healthy_ratio)."""
    return int(round(ratio * tumour))


def healthy_slices(seg: np.ndarray, volumes: list[np.ndarray], count: int) -> np.ndarray:
    """Up to `count` axial indices without any tumour voxel whose brain (any image above 0) covers at least half
    of the case's largest brain slice, evenly spaced among them (no random draw: the same slices every time)."""
    if count <= 0:
        return np.zeros(0, np.int64)
    brain = np.any(np.stack([v > 0 for v in volumes]), axis=0).sum(axis=(0, 1))  # brain pixels per slice
    free = (seg > 0).sum(axis=(0, 1)) == 0
    candidates = np.flatnonzero(free & (brain >= 0.5 * brain.max()) & (brain > 0))
    if len(candidates) <= count:
        return candidates
    return candidates[np.unique(np.round(np.linspace(0, len(candidates) - 1, count)).astype(int))]


def prepare_case(case: Case, modalities: list[str], prep: DataPrepConfig, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(images float16 [k, C, size, size], label maps uint8 [k, size, size]) for the case's tumour slices and,
    with prep.healthy_ratio, its healthy ones, in axial order."""
    seg = read_seg(case)
    idx = tumour_slices(seg, prep.min_tumour_pixels)
    vols = []
    for m in modalities:
        vols.append(read_image(case, m, seg.shape))
    if len(idx) and prep.healthy_ratio > 0:
        idx = np.sort(np.concatenate([idx, healthy_slices(seg, vols, healthy_budget(len(idx), prep.healthy_ratio))]))
    if len(idx) == 0:
        return np.zeros((0, len(modalities), size, size), np.float16), np.zeros((0, size, size), np.uint8)
    normed = np.stack([normalise(v, *prep.clip_percentiles)[..., idx] for v in vols])  # [C, X, Y, k]
    # Axial slice k as an image: rows run along Y (front to back), columns along X.
    slices = torch.from_numpy(np.ascontiguousarray(normed.transpose(3, 0, 2, 1)))  # [k, C, Y, X]
    slices = F.interpolate(slices, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = slices.clamp_(-1, 1).numpy().astype(np.float16)
    return images, slice_label_maps(seg, vols, idx, size)


def slice_label_maps(seg: np.ndarray, volumes: list[np.ndarray], idx: np.ndarray, size: int) -> np.ndarray:
    """uint8 [k, size, size]: the generator's label maps for axial slices `idx` of a case, seg [X, Y, Z] in our
    labels, the brain being wherever any of `volumes` (the case's images) is above 0. The one recipe for the
    site's upload and for `asyndgan generate`, so that a generator is fed maps made the way it was trained on."""
    brain = np.any(np.stack([v[..., idx] > 0 for v in volumes]), axis=0)  # [X, Y, k]
    # Axial slice k as an image: rows run along Y (front to back), columns along X.
    return label_maps(seg[..., idx].transpose(2, 1, 0), brain.transpose(2, 1, 0), size)


def case_image_files(case: Case) -> dict[str, pathlib.Path]:
    """The BraTS images (our modality names) the case's folder holds, whichever of the four are there."""
    folder = case.files["seg"].parent
    found = {}
    for m in BRATS_MODALITIES:
        path = _find_file(folder, f"{case.name}{case.scheme.sep}{case.scheme.files[m]}")
        if path is not None:
            found[m] = path
    return found


def _bad(prep: DataPrepConfig, message: str) -> None:
    if prep.on_bad_case == "error":
        raise DataError(message)
    log.warning("skipping a case: %s", message)


def prepare(root: pathlib.Path, modalities: list[str], prep: DataPrepConfig, size: int) -> cache.Prepared:
    """Prepared slices for the tree at `root`, from the cache when the sources and settings are unchanged."""
    cases, problems = find_cases(root, modalities)
    for p in problems:
        _bad(prep, p)
    if not cases:
        raise DataError(f"{root} holds no complete BraTS case with modalities {modalities}")
    settings = {"size": size, "modalities": modalities, "min_tumour_pixels": prep.min_tumour_pixels,
                "clip_percentiles": list(prep.clip_percentiles), "on_bad_case": prep.on_bad_case,
                **({"healthy_ratio": prep.healthy_ratio} if prep.healthy_ratio else {})}  # caches made before it hold
    files = [f for c in cases for f in c.files.values()]
    name = f"brats-{cache.cache_key('brats', files, settings)}"
    root_dir = cache.cache_root(prep.cache_dir)
    if (hit := cache.load(root_dir / name)) is not None:
        log.info("using prepared slices from %s (%d slices)", root_dir / name, hit.labels.shape[0])
        return hit

    log.info("preparing %d cases from %s (first start; cached in %s)", len(cases), root, root_dir)
    counts: dict[str, int] = {}  # tumour slices per case
    for case in tqdm(cases, desc="scanning labels", unit="case"):
        try:
            counts[case.name] = len(tumour_slices(read_seg(case), prep.min_tumour_pixels))
        except DataError as exc:
            _bad(prep, str(exc))
    good = [c for c in cases if counts.get(c.name)]
    # rows reserved per case: its tumour slices and at most its healthy budget (the rows it leaves unused are dropped)
    rows = {c.name: counts[c.name] + healthy_budget(counts[c.name], prep.healthy_ratio) for c in good}
    total = sum(rows.values())
    if total == 0:
        raise DataError(f"{root}: no axial slice has {prep.min_tumour_pixels} or more tumour pixels")
    writer = cache.EntryWriter(root_dir, name, total, len(modalities), size)
    keep = np.ones(total, bool)
    row, slice_cases = 0, []
    # spawn, not fork: a forked child inherits torch's thread pools mid-state and can hang in them.
    pool = (ProcessPoolExecutor(prep.workers, mp_context=multiprocessing.get_context("spawn"))
            if prep.workers > 1 else None)
    try:
        # Cases are prepared in order (in worker processes when prep.workers > 1) and written as they come.
        results = (pool.map(_prepare_or_error, good, repeat(modalities), repeat(prep), repeat(size))
                   if pool else map(_prepare_or_error, good, repeat(modalities), repeat(prep), repeat(size)))
        for case, result in tqdm(zip(good, results), total=len(good), desc="preparing slices", unit="case"):
            n = rows[case.name]
            try:
                if isinstance(result, str):
                    raise DataError(result)
                images, maps = result
                k = len(images)
                if not counts[case.name] <= k <= n:
                    raise DataError(f"{case.files['seg']} changed while it was being read")
                writer.images[row:row + k] = images
                writer.labels[row:row + k] = maps
                keep[row + k:row + n] = False
                slice_cases.append([case.name, k])  # the rows kept, in order: the patients of the slices
            except DataError as exc:
                _bad(prep, str(exc))
                keep[row:row + n] = False
            row += n
        return writer.commit(modalities, {"kind": "brats", "source": str(root), "cases": slice_cases,
                                          "num_classes": NUM_CLASSES}, keep)
    except BaseException:
        writer.discard()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _prepare_or_error(case: Case, modalities: list[str], prep: DataPrepConfig, size: int):
    """prepare_case, with a DataError turned into its message (so it crosses a process boundary as text)."""
    try:
        return prepare_case(case, modalities, prep, size)
    except DataError as exc:
        return str(exc)
