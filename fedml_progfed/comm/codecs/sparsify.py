"""``sp<1-99>``: random sparsification, and the position layouts every sparsifier shares.

Random sparsification (Konečný et al. 2016, Sec. 3.1; ProgFed SP-X) keeps k of
n entries drawn uniformly without replacement and scales them by n/k, so the
estimate is unbiased. The positions come from a stream both sides derive from
the message seed, so they need not travel at all.

A sparsified tensor starts with a 1-byte tag naming how its positions travel;
the encoder picks the cheapest layout that can carry them (ties: lowest tag):

========  ===  ==========================================  ===============
layout    tag  bytes                                       usable when
========  ===  ==========================================  ===============
seed      0    0 (the decoder redraws them)                k < n, positions derivable from the seed
mask      1    ceil(n/8), bit i set when i is kept         k < n
delta16   2    2k, uint16 gaps between kept positions      k < n, every gap <= 65535
index32   3    4k, uint32 positions                        k < n, n <= 2**32
all       4    0 (every entry kept)                        k == n
========  ===  ==========================================  ===============
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedml_progfed.comm.codecs.spec import register_part
from fedml_progfed.comm.codecs.stages import Sparsifier, register_sparsifier
from fedml_progfed.comm.codecs.wire_format import ByteReader
from fedml_progfed.core.registry import Registry

TAG_NBYTES = 1


@dataclass(frozen=True)
class PositionLayout:
    """One way the kept positions of a tensor travel.

    Attributes
    ----------
    name, tag
        Its name (for :func:`~fedml_progfed.comm.codecs.payload_layouts`) and its tag byte.
    usable
        ``usable(n, k, sparsifier)``: may a payload carry ``k`` of ``n`` positions this way?
    cost
        ``cost(positions, n, k)``: bytes it needs, or ``None`` when it cannot carry these positions.
    write
        ``write(positions, n)``: its bytes (sorted int64 positions).
    read
        ``read(reader, n, k, redraw)``: the sorted positions, ``None`` for all of them;
        ``redraw()`` gives the sparsifier's seed-derived positions.
    """

    name: str
    tag: int
    usable: Callable[[int, int, Sparsifier], bool]
    cost: Callable[[np.ndarray, int, int], int | None]
    write: Callable[[np.ndarray, int], bytes]
    read: Callable[[ByteReader, int, int, Callable[[], torch.Tensor]], torch.Tensor | None]


POSITION_LAYOUTS: Registry[PositionLayout] = Registry("position layout")


def _mask_nbytes(n: int) -> int:
    return -(-n // 8)


def _write_mask(idx: np.ndarray, n: int) -> bytes:
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return np.packbits(mask, bitorder="little").tobytes()


def _read_mask(r: ByteReader, n: int, k: int, redraw: Callable[[], torch.Tensor]) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(r.take(_mask_nbytes(n)), dtype=np.uint8), count=n, bitorder="little")
    idx = np.flatnonzero(bits)
    if idx.size != k:
        raise r.error(f"position mask has {idx.size} bits set, expected {k}")
    return torch.from_numpy(idx)


def _checked(r: ByteReader, idx: np.ndarray, n: int, layout: str) -> torch.Tensor:
    if idx.size and (idx[-1] >= n or idx[0] < 0 or np.any(np.diff(idx) <= 0)):
        raise r.error(f"{layout} positions are not strictly increasing below {n}")
    return torch.from_numpy(idx)


def _max_gap(idx: np.ndarray) -> int:
    return int(np.diff(idx, prepend=0).max())  # k >= 1 here: k == 0 only when n == 0, which is 'all'


def _read_delta16(r: ByteReader, n: int, k: int, redraw: Callable[[], torch.Tensor]) -> torch.Tensor:
    return _checked(r, np.cumsum(np.frombuffer(r.take(2 * k), dtype="<u2").astype(np.int64)), n, "delta16")


def _read_index32(r: ByteReader, n: int, k: int, redraw: Callable[[], torch.Tensor]) -> torch.Tensor:
    return _checked(r, np.frombuffer(r.take(4 * k), dtype="<u4").astype(np.int64), n, "index32")


def _register_layout(layout: PositionLayout) -> None:
    """Add a layout; its name and its tag must both be new (caught at import)."""
    if any(other.tag == layout.tag for _, other in POSITION_LAYOUTS.items()):
        raise ValueError(f"position layout {layout.name!r}: tag {layout.tag} is taken")
    POSITION_LAYOUTS.add(layout.name, layout)


_register_layout(PositionLayout(
    "seed", 0,
    usable=lambda n, k, s: k < n and s.positions_from_seed,
    cost=lambda idx, n, k: 0,
    write=lambda idx, n: b"",
    read=lambda r, n, k, redraw: redraw(),
))
_register_layout(PositionLayout(
    "mask", 1,
    usable=lambda n, k, s: k < n,
    cost=lambda idx, n, k: _mask_nbytes(n),
    write=_write_mask,
    read=_read_mask,
))
_register_layout(PositionLayout(
    "delta16", 2,
    usable=lambda n, k, s: k < n,
    cost=lambda idx, n, k: 2 * k if _max_gap(idx) <= 0xFFFF else None,
    write=lambda idx, n: np.diff(idx, prepend=0).astype("<u2").tobytes(),
    read=_read_delta16,
))
_register_layout(PositionLayout(
    "index32", 3,
    usable=lambda n, k, s: k < n,
    cost=lambda idx, n, k: 4 * k if n <= 1 << 32 else None,
    write=lambda idx, n: idx.astype("<u4").tobytes(),
    read=_read_index32,
))
_register_layout(PositionLayout(
    "all", 4,
    usable=lambda n, k, s: k == n,
    cost=lambda idx, n, k: 0,
    write=lambda idx, n: b"",
    read=lambda r, n, k, redraw: None,  # every entry kept: the values are dense
))


def _layouts() -> list[PositionLayout]:
    return [layout for _, layout in POSITION_LAYOUTS.items()]


def write_positions(idx: np.ndarray, n: int, k: int, sparsifier: Sparsifier) -> bytes:
    """Tag byte plus the positions ``idx`` (sorted int64) in the cheapest usable layout."""
    costs = []
    for layout in _layouts():
        if layout.usable(n, k, sparsifier) and (cost := layout.cost(idx, n, k)) is not None:
            costs.append((cost, layout.tag, layout))
    _, tag, layout = min(costs, key=lambda c: c[:2])
    return bytes([tag]) + layout.write(idx, n)


def read_positions(
    reader: ByteReader, n: int, k: int, sparsifier: Sparsifier, positions: torch.Generator
) -> tuple[torch.Tensor | None, str]:
    """Read a tag and its positions: (sorted positions or ``None`` for all, layout name).

    ``positions`` is the tensor's positions stream, used only by the seed layout.
    """
    tag = reader.take(TAG_NBYTES)[0]
    layout = next((layout for layout in _layouts() if layout.tag == tag), None)
    name = layout.name if layout is not None else f"unknown tag {tag}"
    if layout is None or not layout.usable(n, k, sparsifier):
        raise reader.error(
            f"has position layout {name!r}, which is not valid for sparsifier {sparsifier.name!r} with {k} of {n} values kept"
        )
    return layout.read(reader, n, k, lambda: sparsifier.redraw(n, k, positions)), name


class RandomSparsifier(Sparsifier):
    """k of n entries uniformly without replacement, scaled by n/k (unbiased; Konečný et al. 2016)."""

    name = "random"
    code = 1
    positions_from_seed = True

    def select(self, x: torch.Tensor, k: int, positions: torch.Generator) -> torch.Tensor:
        return self.redraw(x.numel(), k, positions)

    def scale(self, n: int, k: int) -> float:
        return n / k  # inclusion probability k/n

    def redraw(self, n: int, k: int, positions: torch.Generator) -> torch.Tensor:
        # the decoder repeats the encoder's draw: same derived seed, same generator call
        return torch.randperm(n, generator=positions)[:k].sort().values


register_sparsifier(RandomSparsifier())
register_part(
    "sp<1-99>",
    r"sp([1-9][0-9]?)",
    "sparsifier",
    lambda m: {"sparsifier": "random", "keep_percent": int(m[1])},
    lambda spec: f"sp{spec.keep_percent}" if spec.sparsifier == "random" else "",
)
