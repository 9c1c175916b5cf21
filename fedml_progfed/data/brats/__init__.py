"""BraTS brain-tumour segmentation: real NIfTI layout -> patch loaders -> FedML's 8-element list.

One job per module:

- :mod:`.nifti`: finds the challenge's case folders, reads and checks the volumes,
  z-scores the modalities and builds the three region masks (the array conventions
  are written there);
- :mod:`.patches`: the training loader (random patches) and the evaluation loader;
- :mod:`.federation`: the seeded IID split over clients and FedML's data list;
- :mod:`.spec`: the entry of the one dataset registry (importing this package registers ``brats``).
"""

from fedml_progfed.data.brats.federation import load_brats_federated, split_brats_cases
from fedml_progfed.data.brats.nifti import (
    BRATS_LABELS,
    MODALITIES,
    REGION_LABELS,
    REGIONS,
    BratsCase,
    find_brats_cases,
    load_brats_case,
    load_brats_cases,
)
from fedml_progfed.data.brats.patches import EvalBatches, PatchBatches
from fedml_progfed.data.brats.spec import BRATS, BRATS_SOURCE, DEFAULT_PATCH_SIZE, brats_shape, load_brats, missing_brats

__all__ = [
    "BRATS",
    "BRATS_LABELS",
    "BRATS_SOURCE",
    "DEFAULT_PATCH_SIZE",
    "MODALITIES",
    "REGIONS",
    "REGION_LABELS",
    "BratsCase",
    "EvalBatches",
    "PatchBatches",
    "brats_shape",
    "find_brats_cases",
    "load_brats",
    "load_brats_case",
    "load_brats_cases",
    "load_brats_federated",
    "missing_brats",
    "split_brats_cases",
]
