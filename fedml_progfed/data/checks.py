"""The one rule every data reader applies to what it read: integer labels in range, finite inputs.

Readers (IDX, CIFAR pickles, TFF h5, BraTS NIfTI) call these on the arrays they
read, so a corrupt file is one :class:`~fedml_progfed.errors.DataError` line at
load, naming the file (and the client, where the file has clients) and the first
bad index, instead of a ``ValueError`` traceback, silently truncated labels, or a
run whose every update is dropped as NaN.

Both checks are vectorised numpy: the common case (good data) costs one pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedml_progfed.errors import DataError


def _fail(where: str, problem: str, fix: str) -> DataError:
    # One line: the CLI prints "error: <message>"; a value's repr must not bring a newline.
    return DataError(f"{where}: {problem}; {fix}".replace("\n", " "))


def _rule(num_classes: int) -> str:
    return f"labels must be whole numbers in [0, {num_classes})"


def _numbers_from_objects(values: np.ndarray, where: str, num_classes: int, fix: str) -> np.ndarray:
    """An object array (e.g. a pickled list) as float64; the first non-number is the error."""
    for index, value in enumerate(values):  # a Python loop only for object arrays, which are rare
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise _fail(where, f"index {index}: label {value!r} is not an integer; {_rule(num_classes)}", fix)
    return values.astype(np.float64)


def check_labels(labels: Any, num_classes: int, where: str, fix: str) -> np.ndarray:
    """``labels`` flattened to int64 when every one is a whole number in ``[0, num_classes)``.

    Parameters
    ----------
    labels
        Array or sequence of labels as read (any shape; ``(n, 1)`` is flattened).
    num_classes
        Classes of the data set.
    where
        The file, and the client where the file has clients, e.g. ``"f.h5: client 'w1'"``.
    fix
        How to get good data; ends the message.

    Returns
    -------
    numpy.ndarray
        int64 labels of shape ``(n,)``.

    Raises
    ------
    DataError
        Strings, booleans or other non-numbers; floats that are not whole numbers (no
        silent truncation); values outside the range. One line naming ``where`` and the
        first bad index.
    """
    values = np.asarray(labels).reshape(-1)
    if values.dtype.kind == "O":
        values = _numbers_from_objects(values, where, num_classes, fix)
    if values.dtype.kind not in "iuf":  # strings, bytes, booleans, complex: no label is an integer class
        value = values[0].item() if values.size else None
        raise _fail(where, f"index 0: label {value!r} is not an integer ({values.dtype} labels); {_rule(num_classes)}", fix)
    if values.dtype.kind == "f":
        not_whole = ~np.isfinite(values) | (values != np.floor(values))
        if not_whole.any():
            index = int(np.flatnonzero(not_whole)[0])
            raise _fail(where, f"index {index}: label {values[index].item()!r} is not a whole number; "
                               f"{_rule(num_classes)}", fix)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        index = int(np.flatnonzero((values < 0) | (values >= num_classes))[0])
        value = values[index].item()
        shown = int(value) if isinstance(value, float) else value
        raise _fail(where, f"index {index}: label {shown} out of range [0, {num_classes}); {_rule(num_classes)}", fix)
    return values.astype(np.int64, copy=False)


def check_finite(values: np.ndarray, where: str, fix: str, unit: str = "pixels") -> None:
    """Refuse NaN or infinite inputs: training on them makes every loss, and every update, NaN.

    Parameters
    ----------
    values
        Inputs as read; integer arrays are finite by construction and not scanned.
    where
        The file, and the client where the file has clients.
    fix
        How to get good data; ends the message.
    unit
        What a value is called in the message (``pixels``, ``voxels``).

    Raises
    ------
    DataError
        One line naming ``where``, how many values are not finite and the first one's index.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = int(finite.size - np.count_nonzero(finite))
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), values.shape))
    raise _fail(where, f"{bad} NaN or infinite {unit} (the first at index {first}); training on them would make "
                       f"every update NaN", fix)
