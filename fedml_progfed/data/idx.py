"""Read and write IDX files (the MNIST / Fashion-MNIST container format).

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian ``uint32`` dimensions, then the data in row-major order.
Images are ``0x00000803`` (``uint8``, 3 dims: N x H x W) and labels
``0x00000801`` (``uint8``, 1 dim: N). Files may be gzip-compressed (``.gz``)
or raw; both are accepted.

Every problem raises one :class:`~fedml_progfed.errors.DataError` line that
names the file, says what is wrong and how to fix it (the fix text is given
by the caller, because only the data-set loader knows where the files come
from).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from fedml_progfed.data.checks import check_finite, check_labels
from fedml_progfed.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: Magic number of an IDX file of ``uint8`` images (N x H x W).
IMAGES_MAGIC = 0x00000803
#: Magic number of an IDX file of ``uint8`` labels (N).
LABELS_MAGIC = 0x00000801

#: Used when a caller does not say how to obtain a good copy of the file.
DEFAULT_FIX = "replace the file with an intact copy"

# IDX type byte -> numpy dtype; multi-byte types are big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_TO_IDX: dict[np.dtype, int] = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def _fail(path: Path, problem: str, fix: str) -> DataError:
    # One line: the CLI prints "error: <message>"; never let a newline in.
    return DataError(f"{path}: {problem}; {fix}".replace("\n", " "))


def find_idx_file(directory: PathLike, stem: str, *, fix: str = DEFAULT_FIX) -> Path:
    """Locate ``<directory>/<stem>.gz`` or, failing that, ``<directory>/<stem>``.

    Parameters
    ----------
    directory
        Folder expected to hold the file.
    stem
        File name without ``.gz``, e.g. ``"train-images-idx3-ubyte"``.
    fix
        What the user should do if the file is missing (ends the message).

    Returns
    -------
    Path
        The compressed file if present (the form data sets ship in), else the raw one.

    Raises
    ------
    DataError
        If the directory or both forms of the file are missing.
    """
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise _fail(folder, f"data directory {what}", fix)
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise _fail(folder / f"{stem}.gz", f"file not found (nor uncompressed {stem})", fix)


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "file not found", fix) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # EOFError: stream cut short; BadGzipFile: bad header/CRC; zlib.error: bad deflate data.
        raise _fail(path, f"gzip data is truncated or corrupt ({exc})", fix) from None
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})", fix) from None


def read_idx(path: PathLike, *, expected_magic: int | None = None, fix: str = DEFAULT_FIX) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a numpy array.

    Parameters
    ----------
    path
        The file; a ``.gz`` suffix means gzip-compressed.
    expected_magic
        If given, the file's magic number must equal it (e.g. :data:`IMAGES_MAGIC`).
    fix
        What the user should do if the file is bad (ends every error message).

    Returns
    -------
    numpy.ndarray
        Array of the header's shape, in native byte order, writable and owning
        its memory.

    Raises
    ------
    DataError
        Missing or unreadable file, truncated/corrupt gzip, wrong magic number,
        unknown type byte, or a data size that disagrees with the header.
    """
    path = Path(path).expanduser()
    raw = _read_bytes(path, fix)
    if len(raw) < 4:
        raise _fail(path, f"file holds {len(raw)} bytes, too short for an IDX header", fix)
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise _fail(path, f"wrong magic number 0x{magic:08x} (expected 0x{expected_magic:08x}); not this kind of IDX file", fix)
    zero, type_byte, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_byte not in _IDX_DTYPES or ndim == 0:
        raise _fail(path, f"not an IDX file (magic number 0x{magic:08x})", fix)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _fail(path, f"header announces {ndim} dimensions but the file ends after {len(raw)} bytes", fix)
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_byte]
    # Python ints: a forged header's dimensions must not overflow into a small or negative size.
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        shape = " x ".join(str(d) for d in dims)
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise _fail(path, f"header says {shape} = {expected} data bytes but the file holds {actual} (file {kind})", fix)
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and an owned, writable buffer (frombuffer on bytes is read-only).
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx_images(path: PathLike, *, fix: str = DEFAULT_FIX) -> np.ndarray:
    """Read an IDX image file (magic ``0x00000803``) as ``uint8`` of shape (N, H, W).

    Raises
    ------
    DataError
        See :func:`read_idx`; also if any dimension is zero-sized in H or W.
    """
    images = read_idx(path, expected_magic=IMAGES_MAGIC, fix=fix)
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise _fail(Path(path), f"images have an empty dimension {images.shape[1:]}", fix)
    check_finite(images, str(Path(path).expanduser()), fix)  # uint8 by the magic number: costs nothing, keeps the rule
    return images


def read_idx_labels(path: PathLike, *, num_classes: int | None = None, fix: str = DEFAULT_FIX) -> np.ndarray:
    """Read an IDX label file (magic ``0x00000801``) as ``int64`` of shape (N,).

    Parameters
    ----------
    num_classes
        If given, every label must lie in ``[0, num_classes)``.

    Raises
    ------
    DataError
        See :func:`read_idx`; also labels out of range (the data rule of
        :func:`~fedml_progfed.data.checks.check_labels`, naming the first bad index).
    """
    labels = read_idx(path, expected_magic=LABELS_MAGIC, fix=fix)
    if num_classes is None:
        return labels.astype(np.int64)
    return check_labels(labels, num_classes, str(Path(path).expanduser()), fix)


def read_idx_pair(
    images_path: PathLike,
    labels_path: PathLike,
    *,
    num_classes: int | None = None,
    image_shape: tuple[int, int] | None = None,
    fix: str = DEFAULT_FIX,
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching image and label files and check they agree.

    Parameters
    ----------
    image_shape
        If given, the (H, W) every image must have (e.g. ``(28, 28)``).

    Returns
    -------
    tuple of numpy.ndarray
        ``uint8`` images (N, H, W) and ``int64`` labels (N,).

    Raises
    ------
    DataError
        Any problem of either file, a wrong image size, or differing counts.
    """
    images = read_idx_images(images_path, fix=fix)
    labels = read_idx_labels(labels_path, num_classes=num_classes, fix=fix)
    if image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        raise _fail(Path(images_path), f"images are {images.shape[1]}x{images.shape[2]}, expected {image_shape[0]}x{image_shape[1]}", fix)
    if images.shape[0] != labels.shape[0]:
        raise _fail(
            Path(images_path),
            f"holds {images.shape[0]} images but {Path(labels_path).name} holds {labels.shape[0]} labels",
            fix,
        )
    return images, labels


def write_idx(path: PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (the inverse of :func:`read_idx`).

    Parameters
    ----------
    path
        Destination; parent folders are created.
    array
        Data of a dtype IDX supports (uint8, int8, int16, int32, float32, float64).
    compress
        Gzip the file; by default iff ``path`` ends in ``.gz``.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _DTYPE_TO_IDX or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX cannot store an array of dtype {array.dtype} with {array.ndim} dims")
    type_byte = _DTYPE_TO_IDX[native]
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[type_byte]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        # mtime=0: identical inputs give byte-identical files.
        with gzip.GzipFile(path, "wb", mtime=0) as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path
