"""The gRPC wire format: what a sender packs comes back exactly, and anything else is refused without running code."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from fedml_progfed.comm import envelope
from fedml_progfed.comm.envelope import MAGIC, RefusedMessage, decode, encode, message_limit
from fedml_progfed.comm.messages import HEADER_KEY, Header

LIMIT = 1 << 24


def _wire(round_: int = 3, client: int | None = 2) -> "OrderedDict[str, torch.Tensor]":
    header = Header(type="update", kind="delta", algorithm="progfed", round=round_, plan={"stage": 1}, client=client)
    g = torch.Generator().manual_seed(0)
    return OrderedDict([
        (HEADER_KEY, header.to_tensor()),
        ("blocks.0.weight", torch.randn(4, 3, generator=g)),
        ("blocks.0.bn.num_batches_tracked", torch.tensor(7)),
        ("head.bias", torch.randn(5, generator=g).to(torch.float16)),
    ])


def _params(**extra) -> dict:
    return {"msg_type": 3, "sender": 1, "receiver": 0, "model_params": _wire(), "num_samples": 600,
            "client_idx": "2", "loss": 0.25, "flag": True, "nothing": None, **extra}


def test_a_message_comes_back_exactly():
    params = _params()
    got = decode(encode(params, "job-7"), LIMIT)
    assert (got.type, got.sender, got.receiver, got.run) == (3, 1, 0, "job-7")
    assert (got.round, got.plan, got.client) == (3, {"stage": 1}, 2)
    assert {k: v for k, v in got.params.items() if k != "model_params"} == {k: v for k, v in params.items() if k != "model_params"}
    sent, back = params["model_params"], got.params["model_params"]
    assert list(back) == list(sent)  # order kept: FedML and our engine read names in order
    for name in sent:
        assert back[name].dtype == sent[name].dtype and back[name].shape == sent[name].shape
        assert torch.equal(back[name], sent[name])


def test_numpy_integers_travel_as_ints_and_a_message_without_tensors_has_no_round():
    import numpy as np

    got = decode(encode({"msg_type": 5, "sender": np.int64(2), "receiver": 0, "client_status": "ONLINE"}, "r"), LIMIT)
    assert got.sender == 2 and isinstance(got.sender, int)
    assert (got.round, got.plan, got.client) == (None, None, None)
    assert got.params["client_status"] == "ONLINE"


def test_tensors_sharing_storage_are_sent_as_copies():
    base = torch.arange(6.0)
    wire = OrderedDict([(HEADER_KEY, _wire()[HEADER_KEY]), ("a", base[:3]), ("b", base[3:])])
    got = decode(encode({"msg_type": 3, "sender": 1, "receiver": 0, "model_params": wire}, "r"), LIMIT)
    assert torch.equal(got.params["model_params"]["b"], torch.tensor([3.0, 4.0, 5.0]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1, 2], {"a": 1}, b"bytes", object()])
def test_the_sender_cannot_put_anything_but_scalars_and_tensor_dicts_on_the_wire(value):
    if isinstance(value, dict):
        value = {"a": 1}  # a dict of non-tensors
    with pytest.raises(TypeError, match="'extra'"):
        encode(_params(extra=value), "r")


class _Payload:
    """Unpickling this creates a marker file: what an attacker's request does to a pickle reader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    body = pickle.dumps(_Payload(marker))
    with pytest.raises(RefusedMessage, match="pickle"):
        decode(body, LIMIT)
    assert not marker.exists()


def _with_header(header: dict, tensors: dict | None = None) -> bytes:
    from safetensors.torch import save

    return MAGIC + save(tensors or {}, metadata={"progfed": json.dumps(header)})


GOOD = {"v": 1, "type": 5, "sender": 1, "receiver": 0, "run": "r", "round": None, "plan": None, "client": None,
        "params": {}, "tensors": {}}


@pytest.mark.parametrize(
    "data, reason",
    [
        (os.urandom(4096), "does not start"),
        (b"", "does not start"),
        (MAGIC, "too short"),
        (MAGIC + struct.pack("<Q", 1 << 40) + b"{}", "claims"),
        (MAGIC + struct.pack("<Q", 2) + b"{}", "not the JSON"),
        (_with_header({**GOOD, "v": 2}), "version"),
        (_with_header({**GOOD, "sender": "1"}), "'sender'"),
        (_with_header({**GOOD, "sender": True}), "'sender'"),
        (_with_header({**GOOD, "run": 5}), "'run'"),
        (_with_header({**GOOD, "type": [3]}), "'type'"),
        (_with_header({**GOOD, "params": []}), "JSON objects"),
        (_with_header({**GOOD, "params": {"a": [1]}}), "scalar"),
        (_with_header({**GOOD, "tensors": {"model_params": ["x"]}}), "not in the body"),
        (_with_header(GOOD, {"stray": torch.zeros(2)}), "holds 1 tensors"),
        (_with_header({**GOOD, "tensors": {"msg_type": []}}), "malformed"),
    ],
)
def test_anything_else_is_refused_with_a_reason(data, reason):
    with pytest.raises(RefusedMessage, match=reason):
        decode(data, LIMIT)


def test_a_truncated_or_corrupted_body_is_refused():
    data = encode(_params(), "r")
    with pytest.raises(RefusedMessage, match="malformed|not the JSON|claims"):
        decode(data[: len(data) // 2], LIMIT)
    (length,) = struct.unpack("<Q", data[4:12])
    broken = data[:12] + data[12:12 + length].replace(b'"F16"', b'"F99"') + data[12 + length:]
    with pytest.raises(RefusedMessage, match="malformed"):
        decode(broken, LIMIT)


def test_the_envelope_cannot_claim_another_round_or_client_than_the_message_inside():
    data = encode(_params(), "r")
    (length,) = struct.unpack("<Q", data[4:12])
    layout = json.loads(data[12:12 + length])
    header = json.loads(layout["__metadata__"]["progfed"])
    header["round"] = 4  # a replayed round-3 upload relabelled as fresh
    layout["__metadata__"]["progfed"] = json.dumps(header)
    text = json.dumps(layout).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    forged = MAGIC + struct.pack("<Q", len(text)) + text + data[12 + length:]
    with pytest.raises(RefusedMessage, match="differs"):
        decode(forged, LIMIT)


def test_an_oversized_message_is_refused_before_it_is_parsed():
    data = encode(_params(), "r")
    with pytest.raises(RefusedMessage, match="limit"):
        decode(data, len(data) - 1)
    assert decode(data, len(data)).sender == 1


def test_the_limit_holds_the_whole_model_once_and_a_half():
    state = {"w": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float64)}
    assert message_limit(state) == int(1.5 * (4000 + 80)) + (4 << 20)
    assert envelope.MAX_HEADER_BYTES < message_limit(state)
