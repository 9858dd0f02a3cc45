"""A multi-site brain-tumour phantom in BraTS layout, built on the real MNI ICBM152 2009a template.

Data for demos and tests, not the generator's synthetic output and not part of what runs at a hospital. The
package is split by concern:
    config.py       the recipe (sites, case counts, shape, seed) and per-site scanner/population profiles
    anatomy.py      the template in the BraTS 240 x 240 x 155 grid (from the nilearn wheel's data files,
                    without importing nilearn) and per-case head-size variation
    tumour.py       the tumour: lobulated core (necrotic / non-enhancing inside an enhancing rim), edema along
                    white matter, mass effect, BraTS labels
    mr_signal.py    tissue T1/T2/PD and the spin-echo / inversion-recovery equations (T1, T1ce, T2, FLAIR)
    acquisition.py  one case through one site's scanner: gain, bias field, slice thickness, misregistration,
                    Rician noise
    writer.py       the folders, partition.csv, config.json, the template's NOTICE and a preview figure

Layout written by `write_phantom` (BraTS 2018-2021 names and labels 0, 1 necrotic/non-enhancing core, 2 edema,
4 enhancing):
    out/site<k>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   training cases of site k (1-based)
    out/test/<case>/...              pooled test cases; partition.csv names the site whose scanner made each
    out/partition.csv (case,site,split), out/config.json (the resolved config), out/NOTICE, out/preview.png
Volumes are stored like BraTS: voxel axes run to patient Left, Posterior, Superior (affine diag(-1, -1, 1)),
1 mm at full size, with world coordinates equal to MNI millimetres.

Every case draws from its own generator seeded by (seed, stream, index), so a case does not change when the
number of cases or sites around it changes, and the same seed gives byte-identical arrays.
"""

from asyndgan.demo_data.phantom.acquisition import make_case
from asyndgan.demo_data.phantom.anatomy import Template, load_template, template_dir
from asyndgan.demo_data.phantom.config import (
    BRATS_SHAPE, FETS_2021_PARTITION_SIZES, PhantomConfig, PhantomSummary, SiteProfile, default_cases_per_site,
    default_profiles)
from asyndgan.demo_data.phantom.mr_signal import (
    IR_FLAIR, MODALITY_SCALE, SE_T1, SE_T2, TISSUES, Tissue, inversion_recovery, spin_echo, tissue_signals)
from asyndgan.demo_data.phantom.writer import NOTICE_TEXT, write_phantom, write_preview

__all__ = [
    "BRATS_SHAPE", "FETS_2021_PARTITION_SIZES", "IR_FLAIR", "MODALITY_SCALE", "NOTICE_TEXT", "SE_T1", "SE_T2",
    "TISSUES", "PhantomConfig", "PhantomSummary", "SiteProfile", "Template", "Tissue", "default_cases_per_site",
    "default_profiles", "inversion_recovery", "load_template", "make_case", "spin_echo", "template_dir",
    "tissue_signals", "write_phantom", "write_preview",
]
