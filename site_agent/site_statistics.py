"""A one-shot, patient-level DP release of a private site's appearance statistics (privacy.statistics_share).

What is released (once per site, at its first join; later joins send the same numbers again, at no further cost):
for every modality the site holds and two regions of its label maps (the brain outside the tumour, and the whole
tumour), the mean and the standard deviation of the normalised intensity (common/intensity_statistics.py): 4
numbers per modality. They are what a scanner and a population change most and what a segmentation model trained
on synthetic data is most sensitive to (the contrast of the tumour against the brain, the spread within each), and
they are few, so little noise protects them. The server pulls its generator's images for this site's label maps
towards them (central_server/trainer.py).

The mechanism (the Gaussian mechanism, zero-out neighbouring as for DP-SGD, see privacy.py):
    each patient's vector v_p (its slices pooled; a region the patient lacks contributes zeros) is clipped to L2
    norm C = privacy.statistics_clip; S = sum_p clip(v_p) + N(0, (sigma C)^2 I); the released value is S / n, with
    n the number of patients that have the region (from the label maps: public).
One patient moves S by at most C, so the release is one Gaussian step at rate 1: the ledger records it as such
before it is computed, and the site's DP-SGD noise is computed for what remains of the budget. sigma is chosen so
that the release alone costs privacy.statistics_share of epsilon. The noise's standard deviation on each released
number (sigma C / n) is public and sent along, so the server weights each number by how much it can be trusted.
"""

from __future__ import annotations

import json
import math
import pathlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from asyndgan.common.atomic import atomic_write_text
from asyndgan.common.errors import AsynDGANError
from asyndgan.common.intensity_statistics import names, region_moments

RELEASE_FORMAT = 1


def statistics_path(state_dir: pathlib.Path, site_id: str) -> pathlib.Path:
    """Where a site keeps its release (beside its privacy ledger)."""
    return state_dir / f"{site_id}.statistics.json"


@dataclass(frozen=True)
class Statistics:
    """Released numbers by name ("<modality>/<region>/<moment>") with the std of the noise on each."""

    values: dict[str, float]
    noise_std: dict[str, float]

    def as_pairs(self) -> dict[str, tuple[float, float]]:
        return {k: (v, self.noise_std[k]) for k, v in self.values.items()}


def patient_vectors(dataset, label_maps: torch.Tensor, members: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [P, d] in names(modalities) order, has [P, d] bool: the patient has the number's region)."""
    modalities = list(dataset.modalities)
    keys = names(modalities)
    vectors = np.zeros((len(members), len(keys)), dtype=np.float64)
    has = np.zeros_like(vectors, dtype=bool)
    for p, rows in enumerate(members):
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        moments = region_moments(dataset.real(index).float(), label_maps[index])
        for j, key in enumerate(keys):
            modality, region, moment = key.split("/")
            value = float(moments[f"{region}/{moment}"][modalities.index(modality)])
            if math.isfinite(value):
                vectors[p, j], has[p, j] = value, True
    return vectors, has


def clipped_sum(vectors: np.ndarray, clip: float) -> np.ndarray:
    """sum_p v_p * min(1, C / |v_p|): one patient moves it by at most C (zero-out)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors * np.minimum(1.0, clip / np.maximum(norms, 1e-12))).sum(axis=0)


def release(dataset, label_maps: torch.Tensor, members: list[np.ndarray], noise_multiplier: float,
            clip: float) -> Statistics:
    """The noisy release (module docstring); a number whose region no patient has is not released."""
    vectors, has = patient_vectors(dataset, label_maps, members)
    rng = np.random.default_rng(secrets.randbits(63))  # a secret source: the server must not predict the noise
    noisy = clipped_sum(vectors, clip) + rng.normal(0.0, noise_multiplier * clip, size=vectors.shape[1])
    counts = has.sum(axis=0)
    values, noise = {}, {}
    for j, key in enumerate(names(list(dataset.modalities))):
        if counts[j] > 0:
            values[key] = float(noisy[j] / counts[j])
            noise[key] = float(noise_multiplier * clip / counts[j])
    return Statistics(values, noise)


def save(path: pathlib.Path, stats: Statistics, digest: str) -> None:
    record = {"format": RELEASE_FORMAT, "data_digest": digest, "values": stats.values, "noise_std": stats.noise_std}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def load(path: pathlib.Path, digest: str) -> Statistics | None:
    """The release made earlier for the same data and settings (`digest`), or None when there is none."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != RELEASE_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        stats = Statistics({str(k): float(v) for k, v in record["values"].items()},
                           {str(k): float(v) for k, v in record["noise_std"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AsynDGANError(f"the released statistics {path} cannot be read ({exc}); restore it from a backup (a new "
                            "release would spend privacy again)") from None
    if record.get("data_digest") != digest:
        raise AsynDGANError(f"the released statistics {path} were made from other data or settings than this site "
                            "now has; move the file aside to release statistics again (spending privacy on them)")
    return stats
