"""Compressed uplink/downlink through the engine: exact byte counts, correct merging, exact buffers, rejection."""

from __future__ import annotations

import copy

import pytest
import torch

from fedml_progfed.comm.messages import HEADER_KEY, METRICS_KEY, PAYLOAD_KEY, Message, nbytes
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import active_names, count_parameters, initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CPU = torch.device("cpu")
CODEC_HEADER = 13


def pair(up="float", down="float", model=("convnet", (1, 28, 28), 10, 4), weights="float"):
    config = RunConfig().replace(
        comm_round=2, client_num_in_total=2, client_num_per_round=2,
        progfed={"strategy": "e2e", "compression_up": up, "compression_down": down, "invalid_update": "abort",
                 "compression_down_weights": weights},
    )
    make = lambda: initialize(build_model(*model), 0)  # noqa: E731
    task = ClassificationTask()
    return build_server(config, make(), task), build_client(config, make(), task)


def batches(seed, shape=(1, 28, 28)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, *shape, generator=g), torch.randint(0, 10, (4,), generator=g))]


def uploads(server, client, shape=(1, 28, 28)):
    out = []
    for c in range(2):
        client.receive(broadcast(server, c))
        client.train(batches(c, shape), CPU, c)
        out.append((10 * (c + 1), client.upload()))
    return out


def test_uplink_bytes_are_exactly_header_plus_payload_and_downlink_is_unchanged():
    rows, header_bytes = {}, {}
    for spec in ("float", "lq8", "lq8+sp25"):
        server, client = pair(up=spec)
        sent = uploads(server, client)
        header_bytes[spec] = [m[HEADER_KEY].numel() + 8 * m[METRICS_KEY].numel() for _, m in sent]
        aggregate(server, sent)
        rows[spec] = server.state.ledger.rows[-1]
    n = [t.numel() for name, t in server.model.state_dict().items() if name in active_names(server.model, 4)]
    assert rows["float"]["bytes_up"] == sum(header_bytes["float"]) + 2 * 4 * sum(n)
    assert rows["lq8"]["bytes_up"] == sum(header_bytes["lq8"]) + 2 * (CODEC_HEADER + sum(8 + k for k in n))
    assert 0.25 < rows["lq8"]["bytes_up"] / rows["float"]["bytes_up"] < 0.26
    # shared-seed positions (1 tag byte, no indices), scales, ceil(k/4) kept codes
    sparse = CODEC_HEADER + sum(1 + 8 + -(-k // 4) for k in n)
    assert rows["lq8+sp25"]["bytes_up"] == sum(header_bytes["lq8+sp25"]) + 2 * sparse
    assert rows["float"]["bytes_down"] == rows["lq8"]["bytes_down"] == rows["lq8+sp25"]["bytes_down"]


def test_compressed_updates_merge_to_the_weighted_mean():
    merged = {}
    for spec in ("float", "lq8"):
        server, client = pair(up=spec)
        aggregate(server, uploads(server, client))
        merged[spec] = server.model.state_dict()
    for name, value in merged["float"].items():
        assert torch.allclose(merged["lq8"][name], value, atol=2e-3), name


def test_buffers_travel_exact_under_a_lossy_codec():
    """BatchNorm statistics never go through sp10: the merged running_var equals the float run's."""
    vgg = ("vgg16", (3, 32, 32), 10, 4)
    merged = {}
    for spec in ("float", "sp10"):
        server, client = pair(up=spec, model=vgg)
        sent = uploads(server, client, shape=(3, 32, 32))
        if spec == "sp10":
            plain = Message.unpack(sent[0][1], "t").tensors
            assert plain and all("running" in n or "num_batches" in n for n in plain)
        aggregate(server, sent)
        merged[spec] = server.model.state_dict()
    stats = [n for n in merged["float"] if "running_var" in n or "running_mean" in n]
    assert stats
    for name in stats:
        assert torch.allclose(merged["sp10"][name], merged["float"][name], atol=1e-6), name
        if "running_var" in name:
            assert bool((merged["sp10"][name] > 0).all()), name


def test_lossy_weights_broadcast_is_decoded_by_the_client():
    server, client = pair(weights="lq8")
    message = broadcast(server)
    assert PAYLOAD_KEY in message and Message.unpack(message, "b").header.kind == "encoded"
    assert nbytes(message) < 0.26 * 4 * count_parameters(server.model, 4) + 300
    client.receive(message)
    for name, value in server.model.state_dict().items():
        assert torch.allclose(client.model.state_dict()[name], value, atol=0.01), name


def test_error_feedback_memory_is_kept_per_client():
    server, client = pair(up="topk10+ef")
    uploads(server, client)
    memories = client.memory_state()
    assert set(memories) == {0, 1}
    assert memories[0] and all(torch.isfinite(t).all() for t in memories[0].values())
    assert any(not torch.equal(memories[0][n], memories[1][n]) for n in memories[0])


def test_corrupt_compressed_update_is_rejected_and_model_untouched():
    server, client = pair(up="lq8")
    good, other = uploads(server, client)
    truncated = dict(other[1])
    truncated[PAYLOAD_KEY] = other[1][PAYLOAD_KEY][:-5]
    flipped = dict(other[1])
    flipped[PAYLOAD_KEY] = other[1][PAYLOAD_KEY].clone()
    flipped[PAYLOAD_KEY][40] ^= 0xFF
    before = copy.deepcopy(server.model.state_dict())
    for bad, reason in ((truncated, "CRC|truncated|length"), (flipped, "CRC")):
        with pytest.raises(InvalidUpdateError, match=reason):
            aggregate(server, [good, (20, bad)])
        assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
