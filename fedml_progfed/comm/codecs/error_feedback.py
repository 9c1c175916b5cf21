"""``ef``: error feedback (Stich et al. 2018; Karimireddy et al. 2019).

A lossy compressor C drops part of every message. Error feedback keeps what was
dropped, e = (x + e) - D(C(x + e)), and adds it to the next message, so a biased
compressor such as top-k still delivers every coordinate eventually: the sum of
decoded messages tracks the sum of inputs up to the current residual. ``ef``
changes what is sent, not the wire format.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch

from fedml_progfed.comm.codecs.pipeline import decode, encode
from fedml_progfed.comm.codecs.spec import CompressionSpec, as_spec, register_part, register_rule


class ErrorFeedback:
    """Error-feedback memory, one residual per tensor name.

    Keep one instance per sender: per client on the uplink (or per server on the
    downlink). It is sender state, so checkpoint it with :meth:`state_dict`.

    A round updates the residuals of the names it sends and keeps every other one:
    during ProgFed's warm-up a client uploads only some names, and what the others
    still owe must reach the server when they are sent again. New names start from a
    zero residual, and so does a name whose shape changed (a new parameter). Memory
    is bounded by one float32 copy of every name ever sent.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def compress(
        self, tensors: Mapping[str, torch.Tensor], names: Sequence[str], spec: CompressionSpec | str, seed: int
    ) -> bytes:
        """Encode ``tensors + residual`` for ``names`` and update their residuals from the locally decoded payload.

        Parameters
        ----------
        tensors, names, spec, seed
            As for :func:`~fedml_progfed.comm.codecs.encode`.

        Returns
        -------
        bytes
            The payload, in the same format as without error feedback.
        """
        spec = as_spec(spec)
        corrected: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in names:
            if name not in tensors:
                raise ValueError(f"cannot encode: tensor {name!r} is listed in names but missing from the tensors")
            x = tensors[name].detach().to("cpu", torch.float32)
            residual = self.residuals.get(name)
            # a reshaped tensor of the same name is a new parameter: start it fresh
            corrected[name] = x + residual if residual is not None and residual.shape == x.shape else x
        payload = encode(corrected, names, spec, seed)
        # decode the real payload (not an encoder by-product) so the residual is what the receiver missed
        decoded = decode(payload, {name: tuple(t.shape) for name, t in corrected.items()}, names, spec, seed)
        # only the names sent have a new residual; the others keep theirs for a later round
        self.residuals.update((name, corrected[name] - decoded[name]) for name in names)
        return payload

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the residuals by name."""
        return {name: r.clone() for name, r in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the residuals (float32 CPU copies)."""
        self.residuals = {name: r.detach().to("cpu", torch.float32).clone() for name, r in state.items()}


register_part("ef", r"ef", "memory", lambda m: {"error_feedback": True}, lambda spec: "ef" if spec.error_feedback else "")
register_rule(
    "ef needs a lossy part",
    lambda spec: spec.error_feedback and spec.lossless,
    "'ef' needs a lossy part (lq*, sp*, topk*); float is already exact",
)
