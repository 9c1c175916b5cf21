"""``topk<1-99>``: keep the entries of largest magnitude (biased; Stich et al. 2018).

Unlike random sparsification the kept values are not rescaled, so the estimate
is biased: pair it with error feedback (``+ef``, Stich et al. 2018; Karimireddy
et al. 2019) so what is dropped is sent in later rounds. The positions depend on
the values, so they travel in the cheapest of the position layouts of
:mod:`~fedml_progfed.comm.codecs.sparsify` (never ``seed``).
"""

from __future__ import annotations

import torch

from fedml_progfed.comm.codecs.spec import register_part
from fedml_progfed.comm.codecs.stages import Sparsifier, register_sparsifier


class TopK(Sparsifier):
    """The k largest magnitudes, exact where kept; deterministic (the seed plays no part)."""

    name = "topk"
    code = 2

    def select(self, x: torch.Tensor, k: int, positions: torch.Generator) -> torch.Tensor:
        return torch.topk(x.abs(), k, sorted=False).indices.sort().values


register_sparsifier(TopK())
register_part(
    "topk<1-99>",
    r"topk([1-9][0-9]?)",
    "sparsifier",
    lambda m: {"sparsifier": "topk", "keep_percent": int(m[1])},
    lambda spec: f"topk{spec.keep_percent}" if spec.sparsifier == "topk" else "",
)
