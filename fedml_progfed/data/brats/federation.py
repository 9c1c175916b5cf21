"""BraTS over clients: a seeded IID split of the cases and FedML's 8-element data list (ProgFed Sec. 4.1)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fedml_progfed.data.brats.nifti import MODALITIES, REGIONS, BratsCase, PathLike, find_brats_cases, load_brats_case
from fedml_progfed.data.brats.patches import EvalBatches, PatchBatches, check_shape3
from fedml_progfed.data.federated import FederatedData
from fedml_progfed.errors import FieldError


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
    patch = check_shape3(patch_size, "patch_size")
    eval_shape = check_shape3(eval_size if eval_size is not None else patch, "eval_size")
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
