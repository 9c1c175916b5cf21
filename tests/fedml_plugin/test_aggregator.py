"""The server merges by name and rejects bad client updates without touching the global model."""

import copy
from types import SimpleNamespace

import pytest
import torch

from fedml_progfed.config import ProgFedConfig, RunConfig
from fedml_progfed.core import wire
from fedml_progfed.core.staged_model import active_state, initialize, upload_names
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.fedml_plugin.aggregator import ProgFedServerAggregator
from fedml_progfed.models import build_model

CONFIG = RunConfig(comm_round=8, client_num_in_total=4, client_num_per_round=2, progfed=ProgFedConfig(stages=4))


def make_aggregator(config: RunConfig = CONFIG) -> ProgFedServerAggregator:
    model = initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)
    return ProgFedServerAggregator(model, SimpleNamespace(), config)


def client_update(agg: ProgFedServerAggregator, shift: float, stage=None, round_idx=None):
    stage = stage or agg.schedule.stage(agg.round_idx)
    state = active_state(agg.model, agg.model.stage)
    names = upload_names(agg.model, agg.model.stage, agg.schedule.is_warmup(agg.round_idx))
    tensors = {k: state[k] + shift if state[k].is_floating_point() else state[k] for k in names}
    return wire.pack(tensors, stage=stage, round=agg.round_idx if round_idx is None else round_idx, train_loss=1.0, flops=10)


def run_round(agg, updates):
    checked, _ = agg.on_before_aggregation(updates)
    out = agg.on_after_aggregation(agg.aggregate(checked))
    agg.set_model_params(out)
    return out


def test_fedavg_merges_sample_weighted_by_name_and_counts_bytes():
    agg = make_aggregator()
    before = copy.deepcopy(agg.model.state_dict())
    broadcast = agg.get_model_params()
    out = run_round(agg, [(100, client_update(agg, 1.0)), (300, client_update(agg, -1.0))])
    after = agg.model.state_dict()
    for name in ("blocks.0.0.weight", "heads.0.2.bias"):
        assert torch.allclose(after[name], before[name] - 0.5)  # 0.25*(+1) + 0.75*(-1)
    assert torch.equal(after["blocks.1.0.weight"], before["blocks.1.0.weight"])  # inactive: untouched
    row = agg.ledger.rows[-1]
    assert row["bytes_down"] == 2 * wire.payload_nbytes(broadcast)
    assert row["bytes_up"] == 2 * wire.payload_nbytes(client_update(agg, 0.0, round_idx=0))
    assert row["client_flops"] == 20 and row["stage"] == 1
    tensors, meta = wire.unpack(out, "broadcast")
    assert meta == {"stage": 1, "round": 1}


def test_growth_happens_on_the_server_at_the_schedule_boundary():
    agg = make_aggregator()
    agg.get_model_params()
    run_round(agg, [(10, client_update(agg, 0.0))])
    assert agg.model.stage == 1
    update = client_update(agg, 0.0)  # built before the server grows: stage-1 keys, stage-2 tag
    with pytest.raises(InvalidUpdateError, match="keys do not match"):
        agg.on_before_aggregation([(10, update)])
    assert agg.model.stage == 2  # grown deterministically; a stage-2 update is now accepted
    run_round(agg, [(10, client_update(agg, 0.0))])
    assert agg.ledger.rows[-1]["stage"] == 2


def _bad_updates(agg):
    good = client_update(agg, 0.5)
    wrong_stage = client_update(agg, 0.5, stage=2)
    wrong_round = client_update(agg, 0.5, round_idx=3)
    missing = copy.copy(good)
    missing.pop("blocks.0.0.weight")
    extra = copy.copy(good)
    extra["blocks.1.0.weight"] = torch.zeros(64, 32, 3, 3)
    shape = copy.copy(good)
    shape["blocks.0.0.weight"] = torch.zeros(3)
    nan = copy.copy(good)
    nan["heads.0.2.weight"] = torch.full_like(good["heads.0.2.weight"], float("nan"))
    untagged = {k: v for k, v in good.items() if not k.startswith(wire.META_PREFIX)}
    return {
        "claims stage 2": wrong_stage,
        "round 3": wrong_round,
        "missing": missing,
        "unexpected": extra,
        "shape": shape,
        "NaN": nan,
        "no stage/round tag": untagged,
    }


@pytest.mark.parametrize("problem", list(_bad_updates(make_aggregator())))
def test_bad_update_is_rejected_and_global_model_untouched(problem):
    agg = make_aggregator()
    agg.get_model_params()
    before = copy.deepcopy(agg.model.state_dict())
    bad = _bad_updates(agg)[problem]
    with pytest.raises(InvalidUpdateError, match=problem.split()[0]) as err:
        # a good update first: it must not be half-merged either
        agg.aggregate([(10, client_update(agg, 0.5)), (10, bad)])
    assert "client update 2 of 2" in str(err.value) or "tag" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in agg.model.state_dict().items())
    assert agg.ledger.rows == [] and agg.round_idx == 0
