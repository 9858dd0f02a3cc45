"""Tissue physics: T1/T2/PD per tissue and the spin-echo and inversion-recovery equations that turn tissue
fractions into T1, T1ce, T2 and FLAIR signal (with the contrast dose acting on enhancing tumour)."""

from __future__ import annotations

import dataclasses

import numpy as np

from asyndgan.common.config import BRATS_MODALITIES

@dataclasses.dataclass(frozen=True)
class Tissue:
    t1: float  # ms
    t2: float  # ms
    pd: float  # relative proton density


# Typical 1.5 T relaxation times from the MR literature, except that GM/WM T2 are set apart (95 / 75 ms;
# Stanisz et al. 2005 at 1.5 T report 95 / 72): with both at 85 ms white matter would come out brighter than grey
# matter in FLAIR and T2, the opposite of every real scan.
TISSUES = {
    "csf": Tissue(3000.0, 2500.0, 1.00),
    "gm": Tissue(1050.0, 95.0, 0.80),
    "wm": Tissue(700.0, 75.0, 0.70),
    "edema": Tissue(1400.0, 180.0, 0.90),
    "necrosis": Tissue(2200.0, 250.0, 0.95),
    "enhancing": Tissue(1300.0, 110.0, 0.85),
    # Solid non-enhancing tumour of low-grade gliomas (label 1 there): long T1 and T2, below edema.
    "non_enhancing": Tissue(1500.0, 140.0, 0.90),
    # Meningioma: about isointense to grey matter before contrast, strongly and evenly enhancing after it.
    "meningioma": Tissue(1100.0, 100.0, 0.85),
}
ENHANCING_T1_POST_MS = 350.0  # at contrast dose 1; the dose scales the change in R1 = 1/T1
# Tissues that take up gadolinium, and their T1 after it at dose 1 (meningiomas enhance more than a glioma's rim).
POST_CONTRAST_T1_MS = {"enhancing": ENHANCING_T1_POST_MS, "meningioma": 280.0}
# Field dependence about the 1.5 T values above: tissue T1 grows roughly as B0^0.45 between 1.5 and 3 T (white
# matter ~790 -> ~1080 ms), T2 shortens by about a tenth; CSF, being nearly free water, barely changes.
T1_FIELD_EXPONENT, T2_AT_3T = 0.45, 0.9

SE_T1 = {"tr": 500.0, "te": 12.0}
SE_T2 = {"tr": 4000.0, "te": 100.0}
IR_FLAIR = {"tr": 9000.0, "te": 120.0, "ti": 1930.0}  # TI ~ T1_csf * ln 2 nulls CSF


def spin_echo(t1, t2, pd, tr: float, te: float):
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(t1, t2, pd, tr: float, te: float, ti: float):
    # Magnitude reconstruction, as FLAIR images are stored: tissue with T1 below the null point stays
    # positive.
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def post_contrast_t1(t1_pre: float, dose: float, tissue: str = "enhancing") -> float:
    """T1 of an enhancing tissue after gadolinium; dose 1 at 1.5 T gives POST_CONTRAST_T1_MS[tissue]."""
    delta_r1 = 1.0 / POST_CONTRAST_T1_MS[tissue] - 1.0 / TISSUES[tissue].t1
    return 1.0 / (1.0 / t1_pre + dose * delta_r1)


def at_field(t: Tissue, name: str, field_t: float) -> Tissue:
    """The tissue's relaxation times at `field_t` tesla (the table holds 1.5 T values)."""
    if field_t == 1.5 or name == "csf":
        return t
    t2_factor = T2_AT_3T ** (np.log(field_t / 1.5) / np.log(2.0))
    return Tissue(t.t1 * (field_t / 1.5) ** T1_FIELD_EXPONENT, t.t2 * t2_factor, t.pd)


def tissue_signals(dose: float, field_t: float = 1.5) -> dict[str, dict[str, float]]:
    """Noise-free signal per modality and tissue (arbitrary units, before the modality scale)."""
    out: dict[str, dict[str, float]] = {m: {} for m in BRATS_MODALITIES}
    for name, t in TISSUES.items():
        t = at_field(t, name, field_t)
        t1_post = post_contrast_t1(t.t1, dose, name) if name in POST_CONTRAST_T1_MS else t.t1
        out["t1"][name] = float(spin_echo(t.t1, t.t2, t.pd, **SE_T1))
        out["t1ce"][name] = float(spin_echo(t1_post, t.t2, t.pd, **SE_T1))
        out["t2"][name] = float(spin_echo(t.t1, t.t2, t.pd, **SE_T2))
        out["flair"][name] = float(inversion_recovery(t.t1, t.t2, t.pd, **IR_FLAIR))
    return out


_NOMINAL = tissue_signals(1.0)
# Receiver scale per modality: the brightest normal tissue maps to 1000, so gain, bias and enhancement land in
# a BraTS-like 0..~2500 range. Fixed (not recomputed per dose) so that the dose changes the image.
MODALITY_SCALE = {m: 1000.0 / max(_NOMINAL[m][k] for k in ("csf", "gm", "wm")) for m in BRATS_MODALITIES}
