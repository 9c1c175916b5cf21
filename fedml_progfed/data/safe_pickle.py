"""Read data pickles (CIFAR's python batches) without executing pickled code.

``pickle.load`` calls whatever global a file names (``os.system``, ``builtins.eval``,
...), so a tampered download could run code the moment it is read. A CIFAR batch
holds only a dict of bytes keys, lists, strings, ints and numpy arrays; rebuilding
those needs no global but numpy's array and dtype reconstruction. :class:`DataUnpickler`
admits exactly those (:data:`ALLOWED_GLOBALS`) and refuses any other before it is
called, so nothing in a refused file runs.

Files are read with ``encoding="bytes"``: the CIFAR batches were pickled by Python 2,
so their ``str`` keys and strings come back as ``bytes`` (``b"data"``, ``b"labels"``),
as on the CIFAR page's own snippet.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Union

from fedml_progfed.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: ``(module, name)`` of every global a data pickle may name. Dicts, lists, tuples,
#: strings, bytes and numbers need none (they are pickle opcodes); ``set``/``frozenset``/
#: ``bytearray`` appear as globals in older protocols, and Python 3 writes ``bytes`` in
#: protocol 2 as ``_codecs.encode(text, "latin1")`` (resolved to a latin-1-only
#: stand-in). numpy 2 renamed ``numpy.core`` to ``numpy._core``; both spellings are
#: admitted and resolved to whatever this numpy has.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("_codecs", "encode"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }
)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED_GLOBALS`; nothing was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refused global {module}.{name}")
        self.qualified = f"{module}.{name}"


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """What ``_codecs.encode`` does for pickled ``bytes``, and nothing else (no other codec)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text")
    return text.encode("latin1")


def _numpy_global(module: str, name: str) -> Any:
    import numpy as np

    if module == "numpy":
        return getattr(np, name)
    # numpy.core.multiarray (numpy 1) or numpy._core.multiarray (numpy 2): the same functions.
    try:
        from numpy._core import multiarray  # type: ignore[import-not-found]  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray
    return getattr(multiarray, name)


class DataUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :data:`ALLOWED_GLOBALS`.

    Any other global raises :class:`RefusedGlobal` before it is imported or called;
    persistent ids are refused by the base class (no ``persistent_load``).
    """

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented on the class
        if module == "__builtin__":  # Python 2's name, which protocols < 3 write for builtins
            module = "builtins"
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedGlobal(module, name)
        if module == "builtins":
            return {"set": set, "frozenset": frozenset, "bytearray": bytearray}[name]
        if module == "_codecs":
            return _latin1_encode
        return _numpy_global(module, name)


def load_data_pickle(path: PathLike, fix: str) -> Any:
    """Unpickle ``path`` with :class:`DataUnpickler` (``encoding="bytes"``).

    Parameters
    ----------
    path
        The pickle file.
    fix
        Where a good copy comes from; ends every error message.

    Raises
    ------
    DataError
        One line naming the file: it is missing, unreadable, truncated or not a
        pickle, or it names a global outside :data:`ALLOWED_GLOBALS` (the message
        names that global; nothing from the file was executed).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return DataUnpickler(handle, encoding="bytes").load()
    except RefusedGlobal as exc:
        raise DataError(
            f"{path}: refused to unpickle: it calls {exc.qualified}, which a data file has no reason to "
            f"(only containers and numpy arrays are read; nothing was executed); {fix}"
        ) from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {fix}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or type(exc).__name__}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - truncated/garbled pickles raise many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {reason}); {fix}") from None
