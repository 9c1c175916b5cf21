"""BraTS cases from the challenge's NIfTI folders: finding them, reading and checking them, normalising them.

ProgFed (Sec. 4.1, 4.3) trains a 3D U-Net on BraTS (Menze et al., 2014; Bakas et al.,
2017; 2018) split IID over 10 clients and reports Dice. This module reads the
training folders exactly as the challenge ships them (2018-2021)::

    ROOT/<case>/<case>_flair.nii.gz
    ROOT/<case>/<case>_t1.nii.gz
    ROOT/<case>/<case>_t1ce.nii.gz
    ROOT/<case>/<case>_t2.nii.gz
    ROOT/<case>/<case>_seg.nii.gz        (``.nii`` is accepted too)

BraTS 2018/2019 put cases one level deeper (``ROOT/HGG/<case>``, ``ROOT/LGG/<case>``);
both depths are searched.

Array conventions
-----------------
Arrays are channel-first ``(C, D, H, W)`` where ``(D, H, W)`` is nibabel's voxel
order ``(X, Y, Z)`` *unchanged* (no transpose): ``D`` indexes the first NIfTI axis
(i, left-right for BraTS), ``H`` the second (j, posterior-anterior) and ``W`` the
third (k, the axial slice index; 155 slices in BraTS). This is the order MONAI's
``LoadImage`` uses too, so patches and ``sliding_window_inference`` agree with
MONAI tooling.

* image: float32 ``(4, D, H, W)``, modalities in the order FLAIR, T1, T1ce, T2, each
  z-scored over brain voxels (voxels where any modality is non-zero); background stays 0.
* label: float32 ``(3, D, H, W)`` binary region channels of the BraTS evaluation
  (Menze et al., 2014; Bakas et al., 2018): whole tumour WT = {1, 2, 4}, tumour core
  TC = {1, 4}, enhancing tumour ET = {4}.

``nibabel`` is imported lazily, so ``import fedml_progfed.data`` stays cheap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from fedml_progfed.data.checks import check_finite
from fedml_progfed.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: Input channel order (FLAIR first, as in the Medical Segmentation Decathlon's BraTS task).
MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
#: Output channel order: the three nested regions scored by the BraTS challenge.
REGIONS: tuple[str, ...] = ("wt", "tc", "et")
#: Label values of the 2018-2021 annotations: 0 background, 1 necrotic/non-enhancing core,
#: 2 peritumoural oedema, 4 enhancing tumour (3 was retired after 2016).
BRATS_LABELS: frozenset[int] = frozenset({0, 1, 2, 4})
#: Label values that make up each region of ``REGIONS``.
REGION_LABELS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)}

#: File endings of a case's volumes, in the order they are looked for.
SUFFIXES = (".nii.gz", ".nii")
#: How to fix a folder without cases (ends those errors).
EMPTY_FIX = (
    "point data_args.data_cache_dir at a BraTS training folder or create demo data with "
    "`fedml-progfed make-brats-demo --out DIR --cases N`"
)

#: A spatial shape ``(D, H, W)``.
Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class BratsCase:
    """One subject: the four co-registered modalities and the three region masks.

    Attributes
    ----------
    name : str
        Case folder name, e.g. ``BraTS2021_00000``.
    image : numpy.ndarray
        float32 ``(4, D, H, W)``: FLAIR, T1, T1ce, T2, z-scored over brain voxels.
    label : numpy.ndarray
        float32 ``(3, D, H, W)`` in {0, 1}: WT, TC, ET.
    """

    name: str
    image: np.ndarray
    label: np.ndarray

    @property
    def spatial_shape(self) -> Shape3:
        """``(D, H, W)``."""
        d, h, w = self.image.shape[1:]
        return int(d), int(h), int(w)


# --------------------------------------------------------------------------- reading


def _case_file(case_dir: Path, case: str, kind: str) -> Path | None:
    for suffix in SUFFIXES:
        path = case_dir / f"{case}_{kind}{suffix}"
        if path.is_file():
            return path
    return None


def _is_case_dir(path: Path) -> bool:
    # A case folder holds at least one "<folder name>_<kind>.nii[.gz]" file; anything else
    # (HGG/LGG group folders, stray folders) is not a case.
    if not path.is_dir() or path.name.startswith("."):
        return False
    pattern = re.compile(re.escape(path.name) + r"_[A-Za-z0-9]+\.nii(\.gz)?$")
    return any(pattern.match(child.name) for child in path.iterdir())


def find_brats_cases(root: PathLike) -> list[Path]:
    """Case folders under ``root`` (depth 1, or depth 2 for the HGG/LGG layout), sorted by name.

    Raises
    ------
    DataError
        ``root`` is missing or holds no case folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"BraTS folder {root} does not exist; {EMPTY_FIX}")
    cases: list[Path] = []
    for child in sorted(root.iterdir()):
        if _is_case_dir(child):
            cases.append(child)
        elif child.is_dir() and not child.name.startswith("."):
            cases.extend(sub for sub in sorted(child.iterdir()) if _is_case_dir(sub))
    if not cases:
        raise DataError(f"no BraTS cases under {root}; {EMPTY_FIX}")
    # Sort by case name (not path) so HGG/LGG cases interleave the same way on every machine.
    return sorted(cases, key=lambda p: (p.name, str(p)))


def _read_volume(path: Path, case: str) -> np.ndarray:
    """A 3D volume as float32; any reader failure becomes one DataError naming the file."""
    import nibabel as nib  # lazy: ~0.2 s, only paid when BraTS is used

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
    except Exception as exc:  # noqa: BLE001 - nibabel/gzip/zlib raise many types for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"case {case}: cannot read {path.name} ({type(exc).__name__}: {reason}); "
            f"the file is corrupt or truncated, re-download or re-extract the case"
        ) from None
    # Some exports carry trailing singleton axes (X, Y, Z, 1); real 4D data is an error.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"case {case}: {path.name} has shape {data.shape}, expected a 3D volume (X, Y, Z)")
    check_finite(data, f"case {case}: {path.name}", "repair or remove the case", unit="voxels")
    return data


def _zscore_brain(image: np.ndarray, brain: np.ndarray) -> None:
    """Z-score each modality over brain voxels in place; background is set to 0.

    BraTS volumes are skull-stripped with exact zeros outside the brain, so the
    statistics must ignore the background (it is >50 % of the volume and would
    dominate the mean); leaving it at 0 keeps "outside the brain" recognisable.
    """
    for c in range(image.shape[0]):
        values = image[c][brain]
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        # A constant modality (std 0) is only centred, not blown up.
        scale = 1.0 / std if std > 1e-8 else 1.0
        channel = image[c]
        channel -= mean
        channel *= scale
        channel[~brain] = 0.0


def _regions(seg: np.ndarray, case: str, seg_name: str) -> np.ndarray:
    labels = np.rint(seg)
    if not np.allclose(labels, seg, atol=1e-3):
        bad = np.unique(seg[np.abs(labels - seg) > 1e-3])[:5]
        raise DataError(
            f"case {case}: {seg_name} has non-integer label values {bad.tolist()}; "
            f"expected BraTS labels {{0, 1, 2, 4}} (is this a probability map rather than a segmentation?)"
        )
    labels = labels.astype(np.int16)
    present = np.unique(labels)
    unknown = sorted(int(v) for v in present if int(v) not in BRATS_LABELS)
    if unknown:
        hint = " (BraTS 2023+ labels enhancing tumour 3: relabel 3 to 4)" if unknown == [3] else ""
        raise DataError(
            f"case {case}: {seg_name} has label values {unknown} outside the BraTS labels {{0, 1, 2, 4}}; "
            f"fix or remove the case{hint}"
        )
    out = np.empty((len(REGIONS), *labels.shape), dtype=np.float32)
    for i, region in enumerate(REGIONS):
        out[i] = np.isin(labels, REGION_LABELS[region])
    return out


def _foreground_box(brain: np.ndarray, tumour: np.ndarray) -> tuple[slice, slice, slice]:
    mask = brain | tumour
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return box[0], box[1], box[2]


def load_brats_case(case_dir: PathLike, crop_foreground: bool = True) -> BratsCase:
    """Read one case folder; see the module docstring for the array conventions.

    Parameters
    ----------
    case_dir
        ``.../<case>`` holding ``<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]``.
    crop_foreground
        Crop all arrays to the bounding box of the brain (non-zero voxels of any
        modality, plus any labelled voxel). This is nnU-Net's "crop to non-zero"
        step: it saves ~2/3 of the memory of a 240x240x155 volume and, because the
        cut-away voxels are background in every modality and in the label, Dice
        on the crop equals Dice on the full volume when predictions outside the
        brain are background.

    Raises
    ------
    DataError
        A file is missing, unreadable, of a different shape, all zero, or the
        segmentation holds values other than {0, 1, 2, 4}. One line naming the case.
    """
    case_dir = Path(case_dir)
    case = case_dir.name
    paths: dict[str, Path] = {}
    for kind in (*MODALITIES, "seg"):
        path = _case_file(case_dir, case, kind)
        if path is None:
            raise DataError(
                f"case {case}: missing {case}_{kind}.nii.gz (or .nii) in {case_dir}; every case needs "
                f"{', '.join(MODALITIES)} and seg files named <case>_<kind>.nii.gz (BraTS 2018-2021 layout): "
                f"add or rename the file, or remove the case folder"
            )
        paths[kind] = path

    volumes: list[np.ndarray] = []
    ref_shape: tuple[int, ...] | None = None
    for kind in (*MODALITIES, "seg"):
        vol = _read_volume(paths[kind], case)
        if ref_shape is None:
            ref_shape = vol.shape
        elif vol.shape != ref_shape:
            raise DataError(
                f"case {case}: {paths[kind].name} has shape {vol.shape} but {paths[MODALITIES[0]].name} has "
                f"{ref_shape}; all modalities and the seg must share one voxel grid (re-extract or resample the case)"
            )
        volumes.append(vol)

    image = np.stack(volumes[: len(MODALITIES)])  # (4, X, Y, Z) float32, nibabel's axis order
    label = _regions(volumes[-1], case, paths["seg"].name)
    del volumes
    brain = (image != 0).any(axis=0)
    if not brain.any():
        raise DataError(f"case {case}: every modality is zero everywhere; re-download or remove the case")
    if crop_foreground:
        box = (slice(None), *_foreground_box(brain, label[0] > 0))
        image, label, brain = image[box].copy(), label[box].copy(), brain[box[1:]]
    _zscore_brain(image, brain)
    return BratsCase(name=case, image=image, label=label)


def load_brats_cases(root: PathLike, crop_foreground: bool = True) -> list[BratsCase]:
    """Every case under ``root`` in sorted case order.

    Memory: a full 240x240x155 case is ~143 MB of image and ~107 MB of label
    (float32); ``crop_foreground`` (default) cuts that to roughly a third.

    Raises
    ------
    DataError
        Empty or missing ``root``, or any bad case (see :func:`load_brats_case`).
    """
    return [load_brats_case(path, crop_foreground=crop_foreground) for path in find_brats_cases(root)]
