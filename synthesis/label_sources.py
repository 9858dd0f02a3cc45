"""The label maps a generator is fed, made exactly as the sites made them for training.

Three sources:
- the run's own bank (no `--label-maps`): the maps every site uploaded, pooled; `count` maps drawn uniformly
  from the pool without replacement (so each site contributes in proportion to its size), or every map once.
  Files are verified against the checkpoint's digests (formats/label_map_bank.py `restore`).
- a BraTS tree (`_seg` / `-seg` case folders): 3-D cases. Every axial slice gets a label map from
  formats/brats.py `slice_label_maps` (tumour labels + brain outline, resized to the run's stored size).
  The brain outline needs a brain mask, taken as the site takes it: wherever any of the case's images is above
  0. A case folder with a segmentation but no image (t1, t1ce, t2 or flair) is refused with a one-line error:
  guessing the brain's extent from the tumour alone would feed the generator maps unlike any it was trained on.
- 2-D mask files (PNG or TIFF): `masks/` of an image folder, `<name>_mask.<ext>` files, or a folder of mask
  files; read and resized as formats/image_folders.py does.
Any label value the generator was not trained for (>= its num_classes) is an error naming the file or site.
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from asyndgan.formats.label_map_bank import LabelMapBank
from asyndgan.common.errors import DataError
from asyndgan.formats import brats, image_folders

log = logging.getLogger(__name__)


@dataclass
class Volume:
    """One BraTS case to generate, read: seg in our labels, the source images (for the brain and the header)."""

    case: brats.Case
    seg: np.ndarray  # uint8 [X, Y, Z], our labels 0/2/3/4
    images: dict[str, nib.Nifti1Image]  # modality -> source image (data read as needed)
    brain: np.ndarray  # bool [X, Y, Z]: any image above 0
    maps: np.ndarray  # uint8 [Z, S, S]: the generator's label map of every axial slice


@dataclass
class Map2D:
    name: str  # output file stem
    label_map: np.ndarray  # uint8 [S, S]
    origin: dict  # provenance of the label map (site and key, or source file)
    mask_file: pathlib.Path | None = None  # a user's mask file, copied beside the synthetic image
    shape: tuple[int, int] | None = None  # (H, W) of that mask: the image is put back at this size
    extra: dict = field(default_factory=dict)


def check_labels(maps: np.ndarray | torch.Tensor, num_classes: int, where: str) -> None:
    arr = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    top = int(arr.max()) if arr.size else 0
    if top >= num_classes:
        raise DataError(f"{where} has label {top}; the generator was trained for labels 0..{num_classes - 1}")


def describe(source: pathlib.Path) -> str:
    """'brats' or 'masks' for a user's folder, or a DataError saying what was expected."""
    if not source.exists():
        raise DataError(f"label-map source {source} does not exist")
    if source.is_dir() and brats.is_brats_tree(source):
        return "brats"
    if mask_files(source):
        return "masks"
    raise DataError(f"{source} holds no label maps: expected BraTS case folders (<case>/<case>_seg.nii.gz or "
                    "<case>/<case>-seg.nii.gz) or 2-D mask files (masks/, <name>_mask.png, or PNG/TIFF masks)")


# ---- BraTS trees ----------------------------------------------------------------------------------------------
def brats_cases(root: pathlib.Path) -> list[brats.Case]:
    cases, problems = brats.find_cases(root, [])  # only the seg is required here; images are looked up per case
    for problem in problems:
        log.warning("not a case, left out: %s", problem)
    if not cases:
        raise DataError(f"{root} holds no BraTS case with a segmentation")
    return cases


def read_volume(case: brats.Case, size: int, num_classes: int) -> Volume:
    """A case's segmentation and source images, and the label map of every axial slice at `size`."""
    seg = brats.read_seg(case)  # unexpected label values are a DataError naming the file
    files = brats.case_image_files(case)
    if not files:
        raise DataError(f"case {case.name} has a segmentation but no image (t1, t1ce, t2 or flair) to take the "
                        "brain outline from; generation needs at least one, as training did")
    images, vols = {}, []
    for m, path in files.items():
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # nibabel raises many kinds for a damaged file
            raise DataError(f"cannot read {path}: {exc}") from None
        if data.shape != seg.shape:
            raise DataError(f"{path} has shape {data.shape} but {case.files['seg'].name} has {seg.shape}")
        images[m] = img
        vols.append(data)
    maps = brats.slice_label_maps(seg, vols, np.arange(seg.shape[2]), size)
    check_labels(maps, num_classes, f"{case.files['seg']} (as label maps)")
    brain = np.any(np.stack([v > 0 for v in vols]), axis=0)
    return Volume(case, seg, images, brain, maps)


@dataclass(frozen=True)
class Move:
    """An in-plane change of a case's label maps (`asyndgan generate --samples`): the same for every axial slice."""

    angle_deg: float
    scale: float
    flip: bool  # left-right

    def as_dict(self) -> dict:
        return {"angle_deg": round(self.angle_deg, 3), "scale": round(self.scale, 4), "flip": self.flip}

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """volume [X, Y, Z] moved in the X-Y plane about its centre; nearest neighbour (labels and masks stay
        labels and masks), 0 where the moved plane leaves the source."""
        theta = np.deg2rad(self.angle_deg)
        rotate_back = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        flip = np.diag([-1.0 if self.flip else 1.0, 1.0])
        inverse = np.eye(3)
        inverse[:2, :2] = flip @ rotate_back / self.scale  # output voxel -> source voxel
        centre = (np.array(volume.shape, float) - 1) / 2
        return ndi.affine_transform(volume, inverse, offset=centre - inverse @ centre, order=0, mode="constant",
                                    cval=0)


def draw_move(rng: np.random.Generator) -> Move:
    return Move(angle_deg=float(rng.uniform(-10, 10)), scale=float(rng.uniform(0.9, 1.1)), flip=bool(rng.random() < 0.5))


def moved_volume(vol: Volume, move: Move, size: int, num_classes: int) -> Volume:
    """The case with its segmentation and brain moved (its images are not: only their header is used)."""
    seg, brain = move.apply(vol.seg), move.apply(vol.brain.astype(np.uint8)).astype(bool)
    maps = brats.slice_label_maps(seg, [brain.astype(np.float32)], np.arange(seg.shape[2]), size)
    check_labels(maps, num_classes, f"{vol.case.files['seg']} (moved, as label maps)")
    return Volume(vol.case, seg, vol.images, brain, maps)


def moved_seg_file(case: brats.Case, move: Move) -> np.ndarray:
    """The case's segmentation file's own values (its labelling convention), moved."""
    return move.apply(np.rint(brats.read_volume(case.files["seg"], np.float32)).astype(np.uint8))


# ---- 2-D mask files -------------------------------------------------------------------------------------------
def mask_files(source: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(output stem, mask file) pairs; empty when the folder holds none."""
    def images_in(folder: pathlib.Path):
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in image_folders.EXTENSIONS)

    if source.is_file():
        return [(source.stem, source)] if source.suffix.lower() in image_folders.EXTENSIONS else []
    if (source / "masks").is_dir():
        return [(p.stem, p) for p in images_in(source / "masks")]
    files = images_in(source)
    marked = [(p.stem[: -len("_mask")], p) for p in files if p.stem.endswith("_mask")]
    return marked or [(p.stem, p) for p in files]


def read_mask_map(name: str, path: pathlib.Path, size: int, num_classes: int) -> Map2D:
    m = image_folders.read_mask(path)
    check_labels(m, num_classes, str(path))
    return Map2D(name, image_folders.resize_mask(m, size), {"mask_file": str(path)}, path, tuple(m.shape))


# ---- the run's bank -------------------------------------------------------------------------------------------
class BankSource:
    """The pooled label maps of a run's sites, verified against the checkpoint's digests."""

    def __init__(self, bank_dir: pathlib.Path | None, state: str | None, num_classes: int):
        if bank_dir is None or state is None:
            raise DataError("this generator carries no label-map bank (an export, or a checkpoint outside its run "
                            "folder); pass --label-maps with a BraTS tree or mask files")
        if not bank_dir.is_dir():
            raise DataError(f"the run's label-map bank {bank_dir} is missing; pass --label-maps instead")
        self.bank = LabelMapBank(bank_dir)
        problems = self.bank.restore(state)
        if problems:
            raise DataError(problems[0])
        self.sites = [s for s in self.bank.sites() if self.bank.size(s) > 0]
        if not self.sites:
            raise DataError(f"the checkpoint's bank lists no site with label maps ({bank_dir})")
        self.num_classes = num_classes
        self.sizes = [self.bank.size(s) for s in self.sites]
        self.total = sum(self.sizes)

    def draw(self, count: int | None, seed: int) -> list[tuple[str, int]]:
        """(site, key) for `count` maps drawn uniformly from the pool (each site in proportion to its size),
        without replacement while the pool lasts; every map once, in order, when count is None."""
        pooled = [(s, k) for s, n in zip(self.sites, self.sizes) for k in range(n)]
        if count is None:
            return pooled
        rng = np.random.default_rng(seed)
        picks = rng.permutation(self.total) if count <= self.total else rng.integers(0, self.total, count)
        return [pooled[i] for i in picks[:count]]

    def read(self, picks: list[tuple[str, int]], start: int = 0) -> list[Map2D]:
        out = []
        for i, (site, key) in enumerate(picks, start):
            m = self.bank.maps(site, torch.tensor([key]))[0].numpy()
            check_labels(m, self.num_classes, f"label map {key} of site {site}")
            # Named by draw index, not by site id: a name in the output never comes from the checkpoint's text.
            out.append(Map2D(f"bank{i:07d}", m, {"bank_site": site, "bank_key": key}))
        return out
