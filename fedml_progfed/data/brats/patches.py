"""BraTS loaders: random training patches (one per case per pass) and evaluation volumes or crops.

Both yield channel-first float32 batches ``(B, C, D, H, W)`` (see :mod:`~fedml_progfed.data.brats.nifti`
for the axis order) and carry what FedML's trainers read off a loader (``dataset``,
``batch_size``, ``client_index``).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fedml_progfed.data.brats.nifti import BratsCase, Shape3
from fedml_progfed.errors import FieldError


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


def check_shape3(value: Any, field: str) -> Shape3:
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
