"""BraTS in the one dataset registry: load from the config, shape and missing files without reading any."""

from __future__ import annotations

from pathlib import Path

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.data.brats.federation import load_brats_federated
from fedml_progfed.data.brats.nifti import MODALITIES, REGIONS, SUFFIXES, Shape3, find_brats_cases
from fedml_progfed.data.brats.patches import check_shape3
from fedml_progfed.data.federated import FederatedData
from fedml_progfed.data.registry import DatasetSpec, register_dataset
from fedml_progfed.errors import DataError, FieldError
from fedml_progfed.tasks.segmentation import SegmentationTask

#: Training patch (and sliding-window ROI) when the config leaves ``patch_size`` empty.
DEFAULT_PATCH_SIZE: Shape3 = (128, 128, 128)


def load_brats(config: RunConfig) -> FederatedData:
    """The BraTS folder named by ``config.data_cache_dir``, split as the config says.

    Raises
    ------
    FieldError
        ``data_cache_dir`` empty (BraTS has no default location), a bad
        ``patch_size``/``eval_size``, or more clients than training cases.
    DataError
        Missing, empty or malformed case files.
    """
    if not config.data_cache_dir:
        raise FieldError(
            "data_cache_dir",
            "BraTS has no default folder; point it at a BraTS training folder, or create synthetic demo data "
            "with `fedml-progfed make-brats-demo --out DIR --cases N`",
        )
    return load_brats_federated(
        data_dir=config.data_cache_dir,
        num_clients=config.client_num_in_total,
        batch_size=config.batch_size,
        seed=config.random_seed,
        patch_size=config.patch_size or DEFAULT_PATCH_SIZE,
        eval_size=config.eval_size,
        eval_mode=config.eval_mode,
        test_fraction=config.test_fraction,
    )


def brats_shape(config: RunConfig) -> tuple[tuple[int, ...], int]:
    """``((4, *patch_size), 3)``: four modalities in, the three BraTS regions out; reads nothing."""
    patch = check_shape3(config.patch_size or DEFAULT_PATCH_SIZE, "patch_size")
    return (len(MODALITIES), *patch), len(REGIONS)


#: Where BraTS comes from (it cannot be redistributed, so no package ships it).
BRATS_SOURCE = (
    "request the BraTS 2018-2021 training data from the challenge (https://www.med.upenn.edu/cbica/brats/) and point "
    "data_args.data_cache_dir at the folder of case folders, or create synthetic demo data with "
    "`fedml-progfed make-brats-demo --out DIR --cases N`"
)


def missing_brats(config: RunConfig) -> list[str]:
    """The BraTS folder, or the case files missing in it (by name, nothing opened).

    Raises
    ------
    FieldError
        ``data_cache_dir`` is empty (BraTS has no default folder).
    """
    if not config.data_cache_dir:
        raise FieldError("data_cache_dir", f"empty, and BraTS has no default folder; {BRATS_SOURCE}")
    root = Path(config.data_cache_dir).expanduser()
    if not root.is_dir():
        return [str(root)]
    try:
        cases = find_brats_cases(root)
    except DataError:
        return [f"a BraTS case folder (<case>/<case>_flair.nii.gz, ...) under {root}"]
    missing = []
    for case in cases:
        for kind in (*MODALITIES, "seg"):
            if not any((case / f"{case.name}_{kind}{suffix}").is_file() for suffix in SUFFIXES):
                missing.append(str(case / f"{case.name}_{kind}.nii.gz"))
    return missing


BRATS = register_dataset(
    DatasetSpec(
        name="brats",
        load=load_brats,
        # The sliding-window ROI is the training patch, so the model only ever sees that shape.
        task=lambda data: SegmentationTask(roi_size=data.input_shape[1:]),
        spatial_dims=3,
        description="BraTS 2018-2021 NIfTI training folder at data_cache_dir, 3D volumes",
        shape=brats_shape,
        check=missing_brats,
        source=BRATS_SOURCE,
    )
)
