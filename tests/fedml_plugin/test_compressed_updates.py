"""Compressed uplink/downlink through the real pair: exact byte counts, correct merging, rejection."""

import copy
from types import SimpleNamespace

import pytest
import torch

from fedml_progfed.config import ProgFedConfig, RunConfig
from fedml_progfed.core import wire
from fedml_progfed.core.staged_model import active_state, count_parameters, initialize
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.fedml_plugin import ProgFedClientTrainer, ProgFedServerAggregator
from fedml_progfed.models import build_model

META_BYTES = 8  # one int64/float64 tag


def pair(up="float", down="float"):
    config = RunConfig(
        comm_round=2, client_num_in_total=2, client_num_per_round=2,
        progfed=ProgFedConfig(strategy="e2e", compression_up=up, compression_down=down),
    )
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)  # noqa: E731
    return (
        ProgFedClientTrainer(make(), SimpleNamespace(), config),
        ProgFedServerAggregator(make(), SimpleNamespace(), config),
    )


def upload(trainer, broadcast, client, shift):
    trainer.set_model_params(broadcast)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(shift)
    trainer.client = client
    return trainer.get_model_params()


def sizes(model):
    return [t.numel() for t in active_state(model, 4).values()]


def test_lq8_uplink_bytes_are_a_quarter_plus_scales_and_downlink_is_unchanged():
    results = {}
    for spec in ("float", "lq8", "lq8+sp25"):
        trainer, agg = pair(up=spec)
        broadcast = agg.get_model_params()
        updates = [(10, upload(trainer, broadcast, c, 0.01 * (c + 1))) for c in range(2)]
        agg.aggregate(agg.on_before_aggregation(updates)[0])
        results[spec] = agg.ledger.rows[-1]
    n = sizes(trainer.model)
    # float: every value as float32 plus five tags (stage, round, train loss, FLOPs, compute seconds)
    assert results["float"]["bytes_up"] == 2 * (4 * sum(n) + 5 * META_BYTES)
    # lq8: 8-byte header + per tensor 8 bytes of scales + n codes, plus the tags and a client tag
    lq8_payload = 8 + sum(8 + k for k in n)
    assert results["lq8"]["bytes_up"] == 2 * (lq8_payload + 6 * META_BYTES)
    assert 0.25 < results["lq8"]["bytes_up"] / results["float"]["bytes_up"] < 0.26
    # lq8+sp25: shared-seed positions (1 tag byte, no indices), scales, ceil(n/4) kept codes
    sp_payload = 8 + sum(1 + 8 + -(-k // 4) for k in n)
    assert results["lq8+sp25"]["bytes_up"] == 2 * (sp_payload + 6 * META_BYTES)
    assert results["float"]["bytes_down"] == results["lq8"]["bytes_down"] == results["lq8+sp25"]["bytes_down"]


def test_compressed_updates_merge_to_the_mean_and_float_is_exact():
    for spec, tol in (("float", 1e-6), ("lq8", 2e-3)):
        trainer, agg = pair(up=spec)
        before = copy.deepcopy(agg.model.state_dict())
        broadcast = agg.get_model_params()
        updates = [(10, upload(trainer, broadcast, 0, 0.01)), (30, upload(trainer, broadcast, 1, -0.01))]
        agg.aggregate(agg.on_before_aggregation(updates)[0])
        after = agg.model.state_dict()
        for name in ("blocks.0.0.weight", "heads.3.bias"):
            assert torch.allclose(after[name], before[name] - 0.005, atol=tol), (spec, name)


def test_lossy_downlink_is_decoded_by_the_client():
    trainer, agg = pair(down="lq8")
    broadcast = agg.get_model_params()
    assert wire.PAYLOAD in broadcast
    assert wire.payload_nbytes(broadcast) < 0.26 * 4 * count_parameters(agg.model, 4) + 200
    trainer.set_model_params(broadcast)
    for name, value in active_state(agg.model, 4).items():
        assert torch.allclose(trainer.model.state_dict()[name], value, atol=0.01), name


def test_error_feedback_memory_is_kept_per_client():
    trainer, agg = pair(up="topk10+ef")
    broadcast = agg.get_model_params()
    upload(trainer, broadcast, 0, 0.01)
    upload(trainer, broadcast, 1, 0.02)
    assert set(trainer._memories) == {0, 1}
    r0 = trainer._memories[0].residuals
    assert r0 and all(torch.isfinite(t).all() for t in r0.values())


def test_corrupt_compressed_update_is_rejected_and_model_untouched():
    trainer, agg = pair(up="lq8")
    broadcast = agg.get_model_params()
    good = upload(trainer, broadcast, 0, 0.01)
    bad = copy.copy(good)
    bad[wire.PAYLOAD] = good[wire.PAYLOAD][:-5]
    before = copy.deepcopy(agg.model.state_dict())
    with pytest.raises(InvalidUpdateError):
        agg.aggregate([(10, good), (10, bad)])
    assert all(torch.equal(before[k], v) for k, v in agg.model.state_dict().items())
    untagged = copy.copy(good)
    untagged.pop(wire.CLIENT)
    with pytest.raises(InvalidUpdateError, match="client"):
        agg.aggregate([(10, untagged)])
