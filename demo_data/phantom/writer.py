"""Writing the phantom: every case in BraTS layout (NIfTI), partition.csv, the resolved config, the template's
licence NOTICE and preview figures (layout in the package docstring)."""

from __future__ import annotations

import collections
import csv
import logging
import pathlib
import time

import nibabel as nib
import numpy as np
from tqdm import tqdm

from asyndgan.common.config import BRATS_MODALITIES
from asyndgan.demo_data.phantom.acquisition import make_case_described
from asyndgan.demo_data.phantom.anatomy import load_template
from asyndgan.demo_data.phantom.config import LESION_TYPES, TEST_STREAM, PhantomConfig, PhantomSummary

log = logging.getLogger(__name__)

NOTICE_TEXT = """\
This phantom data set is derived from the MNI ICBM152 non-linear symmetric 2009a template
(T1 image and grey/white matter probability maps, as shipped in the nilearn package).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its documentation for any purpose and
without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors
and McGill University make no representations about the suitability of this software for any purpose.
It is provided "as is" without express or implied warranty. The authors are not responsible for any data
loss, equipment damage, property loss, or injury to subjects or patients resulting from the use or misuse
of this software package.

References: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins, "Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood", NeuroImage 47 (2009) S102; V. Fonov et al.,
"Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54 (2011) 313-327.

The tumours, image contrasts and scanner effects are synthetic (asyndgan.demo_data.phantom). No patient
data is contained.
"""



def write_phantom(out: pathlib.Path, cfg: PhantomConfig, progress: bool = True) -> PhantomSummary:
    """Generate every case of `cfg` into `out` (layout in the module docstring); existing files are
    replaced."""
    out = pathlib.Path(out)
    started = time.perf_counter()
    log.info("phantom config: %s", cfg.model_dump_json())
    template = load_template(cfg.shape)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    (out / "NOTICE").write_text(NOTICE_TEXT)

    jobs = []  # (case id, site name, split, folder, profile index, rng stream, index in stream)
    prefix = cfg.case_prefix
    for k, n in enumerate(cfg.cases_per_site):
        name = cfg.site_names[k]
        for i in range(n):
            jobs.append((f"{prefix}_S{k + 1}_{i:04d}", name, "train", out / name, k, k + 1, i))
    for i in range(cfg.test_cases):
        k = cfg.test_profile(i)  # the pooled test set draws on every site's scanner and population in turn
        jobs.append((f"{prefix}_TEST_{i:04d}", cfg.site_names[k], "test", out / "test", k, TEST_STREAM, i))

    preview: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    by_lesion: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    rows = []
    bar = tqdm(jobs, desc="phantom cases", unit="case", disable=not progress)
    for case, site, split, folder, k, stream, i in bar:
        images, seg, info = make_case_described(template, cfg.profiles[k], np.random.default_rng(
            cfg.case_seed(stream, i)), cfg.shape)
        case_dir = folder / case
        case_dir.mkdir(parents=True, exist_ok=True)
        dropped = set(cfg.missing.get(site, [])) if split == "train" else set()
        for name, arr in [*images.items(), ("seg", seg)]:
            if name in dropped:
                continue  # this site never acquired it: the case has no such file, as in a real export
            _save_nifti(case_dir / f"{case}_{name}.nii.gz", arr, template.affine)
        rows.append((case, site, split, info.lesion, info.lesions, info.atrophy, info.field_strength_t))
        z = _tumour_slice(seg)
        if split == "train" and site not in preview:
            preview[site] = ({m: a[:, :, z].copy() for m, a in images.items()}, seg[:, :, z].copy())
        if info.lesion not in by_lesion:
            by_lesion[info.lesion] = ({m: a[:, :, z].copy() for m, a in images.items()}, seg[:, :, z].copy())

    with open(out / "partition.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PARTITION_COLUMNS)
        writer.writerows(rows)
    write_preview(out / "preview.png", preview)
    if len(by_lesion) > 1:
        write_preview(out / "preview_lesions.png", {k: by_lesion[k] for k in LESION_TYPES if k in by_lesion})

    seconds = time.perf_counter() - started
    summary = PhantomSummary(
        out=out, cases_per_site=dict(zip(cfg.site_names, cfg.cases_per_site)),
        test_cases=cfg.test_cases, lesions=dict(collections.Counter(row[3] for row in rows)),
        seconds=round(seconds, 2),
        seconds_per_case=round(seconds / max(len(jobs), 1), 2))
    log.info("wrote %d cases to %s in %.1f s", len(jobs), out, seconds)
    return summary


def _tumour_slice(seg: np.ndarray) -> int:
    """Axial slice with the most tumour core (1 or 4), or the most tumour if there is no core."""
    core = np.isin(seg, (1, 4)).sum(axis=(0, 1))
    return int(np.argmax(core if core.any() else (seg > 0).sum(axis=(0, 1))))


def _save_nifti(path: pathlib.Path, arr: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner-anatomical, as BraTS files carry
    img.set_sform(affine, code=1)
    nib.save(img, path)


# partition.csv: the case, the site whose scanner and population made it, its split, and what it was drawn as
# (lesion type, number of lesions, atrophy 0-1, field strength), so that results can be broken down by them.
PARTITION_COLUMNS = ("case", "site", "split", "lesion", "lesions", "atrophy", "field_strength_t")


def read_partition(root: pathlib.Path) -> dict[str, dict[str, str]]:
    """case id -> its partition.csv row (phantoms written before the lesion columns lack them)."""
    with open(pathlib.Path(root) / "partition.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


_SEG_COLOURS = {1: (0.9, 0.15, 0.15), 2: (0.2, 0.8, 0.2), 4: (1.0, 0.85, 0.1)}


def write_preview(path: pathlib.Path, slices: dict[str, tuple[dict[str, np.ndarray], np.ndarray]]) -> None:
    """One row per entry (a site, or a lesion type): the four modalities and FLAIR with the labels over it, at the
    slice of most tumour core."""
    import matplotlib  # deferred: only the preview needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not slices:
        return
    cols = [*BRATS_MODALITIES, "seg"]
    fig, axes = plt.subplots(len(slices), len(cols), figsize=(2.2 * len(cols), 2.4 * len(slices)),
                             squeeze=False)
    for row, (site, (images, seg)) in enumerate(slices.items()):
        for col, name in enumerate(cols):
            ax = axes[row, col]
            # Array axes are (patient left, posterior): transposed, that is the radiological view.
            base = images["flair" if name == "seg" else name].T
            ax.imshow(base, cmap="gray", vmin=0, vmax=max(float(np.percentile(base, 99.5)), 1e-6))
            if name == "seg":
                rgba = np.zeros((*base.shape, 4), np.float32)
                for label, colour in _SEG_COLOURS.items():
                    rgba[seg.T == label] = (*colour, 0.45)
                ax.imshow(rgba)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
            if col == 0:
                ax.set_ylabel(site)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
