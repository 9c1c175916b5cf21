"""BraTS brain-tumour segmentation: real NIfTI layout -> patch loaders -> FedML's 8-element list.

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
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.data.federated import FederatedData
from fedml_progfed.data.registry import DatasetSpec, register_dataset
from fedml_progfed.errors import DataError, FieldError
from fedml_progfed.tasks.segmentation import SegmentationTask

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

_SUFFIXES = (".nii.gz", ".nii")
_EMPTY_FIX = (
    "point data_args.data_cache_dir at a BraTS training folder or create demo data with "
    "`fedml-progfed make-brats-demo --out DIR --cases N`"
)

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
    for suffix in _SUFFIXES:
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
        raise DataError(f"BraTS folder {root} does not exist; {_EMPTY_FIX}")
    cases: list[Path] = []
    for child in sorted(root.iterdir()):
        if _is_case_dir(child):
            cases.append(child)
        elif child.is_dir() and not child.name.startswith("."):
            cases.extend(sub for sub in sorted(child.iterdir()) if _is_case_dir(sub))
    if not cases:
        raise DataError(f"no BraTS cases under {root}; {_EMPTY_FIX}")
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
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(
            f"case {case}: {path.name} has {bad} NaN or infinite voxels; training on it would make every loss NaN; "
            f"repair or remove the case"
        )
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


# --------------------------------------------------------------------------- patches and loaders


def _window(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[:, s0:s0+p0, s1:s1+p1, s2:s2+p2]`` with zeros wherever the window leaves the volume.

    Negative starts or windows larger than the volume are how volumes smaller than
    the patch get zero-padded (0 is the background value after normalisation).
    """
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for s, p, n in zip(start, size, array.shape[1:]):
        lo, hi = max(s, 0), min(s + p, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _check_shape3(value: Any, field: str) -> Shape3:
    """``value`` as a 3D shape; the config types it only as a tuple of ints, so the rank and sign are checked here."""
    try:
        shape = tuple(int(v) for v in value)
        ok = len(shape) == 3 and all(v >= 1 for v in shape) and all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FieldError(field, f"{value!r} is not three positive integers (D, H, W); write e.g. [128, 128, 128]")
    return shape  # type: ignore[return-value]


class PatchBatches:
    """Training loader: one random patch per case per pass, batched.

    Each pass (epoch) visits every case once in a random order and crops one
    ``patch_size`` patch from it, the usual 3D U-Net recipe for volumes too big
    for a whole-volume batch (ProgFed Sec. 4.1 follows Sheller et al., 2020).

    All randomness comes from the *global* torch RNG and is drawn when ``iter()``
    is called (order, foreground coin, tumour voxel and offsets: a fixed five
    numbers per case), like :class:`~fedml_progfed.data.batches.TensorBatches`:
    the trainer seeds torch per round and client, so every runtime sees the same
    patches, and RNG consumption does not depend on the data.

    Parameters
    ----------
    cases
        The client's cases.
    patch_size
        ``(pd, ph, pw)``, positive; volumes smaller than this are zero-padded.
    batch_size
        Patches per batch, at least 1; the last batch may be smaller.
    fg_prob
        Probability of centring a patch on a random tumour voxel (when the case
        has tumour) instead of a uniformly random position. Oversampling
        foreground counters the extreme class imbalance (tumour is ~1 % of the
        brain), as in nnU-Net; 0 gives purely uniform patches.
    client_index
        Whose data this is (``None`` for the global loader).

    Attributes
    ----------
    dataset : tuple of BratsCase
        The cases (``len(loader.dataset)`` is the number of cases).
    batch_size : int
    client_index : int or None
    """

    shuffle = True

    def __init__(
        self,
        cases: Sequence[BratsCase],
        patch_size: Sequence[int],
        batch_size: int,
        fg_prob: float = 0.5,
        client_index: int | None = None,
    ) -> None:
        # batch_size and patch_size come validated from the config (load_brats_federated checks the shape).
        self.batch_size = int(batch_size)
        self.patch_size: Shape3 = tuple(int(v) for v in patch_size)  # type: ignore[assignment]
        if not 0.0 <= float(fg_prob) <= 1.0:
            raise ValueError(f"fg_prob {fg_prob!r} is not a probability in [0, 1]")
        self.fg_prob = float(fg_prob)
        self.dataset: tuple[BratsCase, ...] = tuple(cases)
        self.client_index = client_index
        # Flat indices of tumour (WT) voxels, computed once: foreground sampling per
        # patch is then one lookup instead of a scan of the whole volume.
        self._tumour = [np.flatnonzero(case.label[0].reshape(-1) > 0) for case in self.dataset]

    @property
    def num_samples(self) -> int:
        """Number of cases = patches per pass."""
        return len(self.dataset)

    def __len__(self) -> int:
        """Number of batches per pass (the last one may be partial)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        order = torch.randperm(n)
        # Per case: [foreground coin, tumour voxel, offset D, offset H, offset W].
        draws = torch.rand(n, 5, dtype=torch.float64)
        return self._batches(order.tolist(), draws.numpy())

    def _start(self, index: int, u: np.ndarray) -> list[int]:
        case, patch = self.dataset[index], self.patch_size
        shape = case.spatial_shape
        tumour = self._tumour[index]
        if tumour.size and u[0] < self.fg_prob:
            voxel = int(tumour[min(int(u[1] * tumour.size), tumour.size - 1)])
            centre = np.unravel_index(voxel, shape)
            # Centre on the voxel, then slide the window back inside the volume.
            return [
                min(max(int(c) - p // 2, 0), n - p) if n >= p else (n - p) // 2
                for c, p, n in zip(centre, patch, shape)
            ]
        # Uniform position; a volume smaller than the patch sits centred in the zero padding.
        return [min(int(v * (n - p + 1)), n - p) if n >= p else (n - p) // 2 for v, p, n in zip(u[2:], patch, shape)]

    def _batches(self, order: list[int], draws: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, len(order), self.batch_size):
            xs, ys = [], []
            for index in order[first : first + self.batch_size]:
                start = self._start(index, draws[index])
                xs.append(_window(self.dataset[index].image, start, self.patch_size))
                ys.append(_window(self.dataset[index].label, start, self.patch_size))
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def __repr__(self) -> str:
        return (
            f"PatchBatches(cases={self.num_samples}, patch_size={self.patch_size}, batch_size={self.batch_size}, "
            f"fg_prob={self.fg_prob}, client_index={self.client_index})"
        )


class EvalBatches:
    """Evaluation loader: one ``(x, y)`` pair per case, batch size 1, fixed order.

    Parameters
    ----------
    cases
        Cases to evaluate.
    mode
        ``"full"``: the whole (foreground-cropped) volume; the task runs MONAI's
        sliding-window inference over it, which is how BraTS is scored.
        ``"center_crop"``: a centred ``eval_size`` crop (zero-padded where the
        volume is smaller), a cheap proxy for frequent validation. The config
        allows only these two (``eval_mode``).
    eval_size
        Positive crop size for ``center_crop``; ignored for ``full``.
    client_index
        Whose data this is (``None`` for the global test set).
    """

    batch_size = 1
    shuffle = False

    def __init__(
        self,
        cases: Sequence[BratsCase],
        mode: str = "full",
        eval_size: Sequence[int] | None = None,
        client_index: int | None = None,
    ) -> None:
        if mode == "center_crop" and eval_size is None:
            raise ValueError("EvalBatches: mode 'center_crop' needs an eval_size")
        self.mode = mode
        self.eval_size: Shape3 | None = tuple(int(v) for v in eval_size) if eval_size is not None else None  # type: ignore[assignment]
        self.dataset: tuple[BratsCase, ...] = tuple(cases)
        self.client_index = client_index

    @property
    def num_samples(self) -> int:
        """Number of cases."""
        return len(self.dataset)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for case in self.dataset:
            if self.mode == "full":
                # Views, no copy: the task moves them to the device.
                x, y = case.image, case.label
            else:
                size = self.eval_size
                assert size is not None
                start = [(n - p) // 2 for n, p in zip(case.spatial_shape, size)]
                x, y = _window(case.image, start, size), _window(case.label, start, size)
            yield torch.from_numpy(x).unsqueeze(0), torch.from_numpy(y).unsqueeze(0)

    def __repr__(self) -> str:
        return f"EvalBatches(cases={self.num_samples}, mode={self.mode!r}, eval_size={self.eval_size}, client_index={self.client_index})"


# --------------------------------------------------------------------------- federated split


def split_brats_cases(
    num_cases: int, num_clients: int, test_fraction: float, seed: int, where: str = "the BraTS folder"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Seeded IID split of case indices: (global test, one array per client), each sorted.

    ``where`` names the data in error messages. ``num_clients >= 1`` and
    ``0 < test_fraction < 1`` are config rules, validated by the config.

    Raises
    ------
    FieldError
        ``client_num_in_total``: fewer training cases than clients.
    """
    # At least one held-out case, so the server always has a global test set.
    num_test = max(1, int(round(float(test_fraction) * num_cases)))
    num_train = num_cases - num_test
    if num_train < num_clients:
        raise FieldError(
            "client_num_in_total",
            f"{num_clients} clients but {where} has {num_cases} cases ({num_train} after holding out {num_test} "
            f"for the global test set), so some client would get no case; lower client_num_in_total or "
            f"test_fraction, or add cases",
        )
    perm = np.random.default_rng(seed).permutation(num_cases)
    test = np.sort(perm[:num_test])
    # array_split: client sizes differ by at most one case (IID, as in ProgFed Sec. 4.1).
    clients = [np.sort(part) for part in np.array_split(perm[num_test:], int(num_clients))]
    return test, clients


def load_brats_federated(
    data_dir: PathLike,
    num_clients: int,
    batch_size: int,
    seed: int,
    patch_size: Sequence[int] = (128, 128, 128),
    eval_size: Sequence[int] | None = None,
    eval_mode: str = "full",
    test_fraction: float = 0.2,
    fg_prob: float = 0.5,
    crop_foreground: bool = True,
) -> FederatedData:
    """Load a BraTS training folder and split it over clients, as FedML's 8-element list.

    ProgFed Sec. 4.1: BraTS over 10 clients, IID; a held-out set scores the global model.

    The rules of :meth:`~fedml_progfed.config.RunConfig.validate` (batch size and
    client count at least 1, ``eval_mode``, ``test_fraction``) are assumed.

    Parameters
    ----------
    data_dir
        ``data_cache_dir``: a BraTS training folder (see the module docstring).
    num_clients
        ``client_num_in_total`` (at least 1).
    batch_size
        ``batch_size``: patches per training batch, at least 1 (evaluation uses 1).
    seed
        Seed of the case split.
    patch_size
        Training patch ``(D, H, W)``; also the model's input shape and the
        sliding-window ROI of :class:`~fedml_progfed.tasks.SegmentationTask`.
    eval_size
        Crop for ``eval_mode="center_crop"``; defaults to ``patch_size``.
    eval_mode
        ``"full"`` (whole volumes, sliding window) or ``"center_crop"``.
    test_fraction
        Share of cases in (0, 1) held out as the global test set (at least one case).
    fg_prob
        Foreground oversampling probability of the training patches.
    crop_foreground
        Crop each case to its brain bounding box (see :func:`load_brats_case`).

    Returns
    -------
    FederatedData
        ``train_data_num``/``test_data_num`` count cases; training loaders are
        :class:`PatchBatches` (one patch per case per epoch); the global test
        loader and each client's local test loader (its own training cases) are
        :class:`EvalBatches`. ``input_shape = (4, *patch_size)``, ``num_classes = 3``
        (WT, TC, ET), ``name = "brats"``.

    Raises
    ------
    FieldError
        ``patch_size`` / ``eval_size`` not three positive integers, or
        ``client_num_in_total`` larger than the training cases.
    DataError
        Missing, empty or malformed data (one line naming the case).
    """
    # Check what the data-independent config rules cannot before reading gigabytes of NIfTI.
    patch = _check_shape3(patch_size, "patch_size")
    eval_shape = _check_shape3(eval_size if eval_size is not None else patch, "eval_size")
    case_dirs = find_brats_cases(data_dir)
    test_idx, client_idx = split_brats_cases(len(case_dirs), num_clients, test_fraction, seed, f"BraTS folder {data_dir}")

    cases = [load_brats_case(path, crop_foreground=crop_foreground) for path in case_dirs]
    test_cases = [cases[i] for i in test_idx]
    train_local_num: dict[int, int] = {}
    train_local: dict[int, PatchBatches] = {}
    test_local: dict[int, EvalBatches] = {}
    train_cases: list[BratsCase] = []
    for client, idx in enumerate(client_idx):
        own = [cases[i] for i in idx]
        train_cases.extend(own)
        train_local_num[client] = len(own)
        train_local[client] = PatchBatches(own, patch, batch_size, fg_prob=fg_prob, client_index=client)
        test_local[client] = EvalBatches(own, eval_mode, eval_shape, client_index=client)

    fedml_dataset: list[Any] = [
        len(train_cases),
        len(test_cases),
        PatchBatches(train_cases, patch, batch_size, fg_prob=fg_prob),
        EvalBatches(test_cases, eval_mode, eval_shape),
        train_local_num,
        train_local,
        test_local,
        len(REGIONS),
    ]
    return FederatedData(
        fedml_dataset=fedml_dataset,
        input_shape=(len(MODALITIES), *patch),  # type: ignore[arg-type]  # (C, D, H, W) for 3D data
        num_classes=len(REGIONS),
        name="brats",
    )


# --------------------------------------------------------------------------- registration

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
    patch = _check_shape3(config.patch_size or DEFAULT_PATCH_SIZE, "patch_size")
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
            if not any((case / f"{case.name}_{kind}{suffix}").is_file() for suffix in _SUFFIXES):
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
