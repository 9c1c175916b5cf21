"""The server end checks every update against the round's plan before anything is merged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fedml_progfed.comm.messages import HEADER_KEY, Message, nbytes
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CONFIG = RunConfig().replace(comm_round=8, client_num_in_total=4, client_num_per_round=2, progfed={"stages": 4})
ABORT = CONFIG.replace(progfed={"invalid_update": "abort"})
CPU = torch.device("cpu")


def make(config: RunConfig = CONFIG):
    task = ClassificationTask()
    model = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)  # noqa: E731
    return build_server(config, model(), task), build_client(config, model(), task)


def batches(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))]


def upload(server, client, client_id: int):
    client.receive(broadcast(server, client_id))
    client.train(batches(client_id), CPU, client_id)
    return client.upload()


def forge_header(wire, **changes):
    message = Message.unpack(wire, "test")
    message.header = dataclasses.replace(message.header, **changes)
    return message.pack()


def test_sample_weighted_merge_by_name_and_byte_counts():
    server, client = make()
    before = copy.deepcopy(server.model.state_dict())
    sent = broadcast(server)
    first, second = upload(server, client, 0), upload(server, client, 1)
    deltas = [
        {n: Message.unpack(w, "t").tensors[n] for n in ("blocks.0.0.weight", "heads.0.2.bias")} for w in (first, second)
    ]
    aggregate(server, [(100, first), (300, second)])
    after = server.model.state_dict()
    for name in ("blocks.0.0.weight", "heads.0.2.bias"):
        expected = before[name] + 0.25 * deltas[0][name] + 0.75 * deltas[1][name]
        assert torch.allclose(after[name], expected, atol=1e-7), name
    assert torch.equal(after["blocks.1.0.weight"], before["blocks.1.0.weight"])  # inactive: untouched
    row = server.state.ledger.rows[-1]
    assert row["bytes_down"] == 2 * nbytes(sent)
    assert row["bytes_up"] == nbytes(first) + nbytes(second)
    assert row["stage"] == 1 and row["client_flops"] > 0 and row["num_clients"] == 2
    header = Message.unpack(broadcast(server), "next").header
    assert (header.type, header.kind, header.round, header.plan["stage"]) == ("broadcast", "values", 1, 2)


def test_the_growth_round_broadcasts_the_grown_sub_model():
    server, client = make()
    aggregate(server, [(10, upload(server, client, 0))])
    message = Message.unpack(broadcast(server), "round 1")
    assert message.header.plan["stage"] == 2
    assert {"blocks.1.0.weight", "heads.1.2.weight"} <= set(message.tensors)  # entering block and head travel
    assert not any(n.startswith("heads.0") for n in message.tensors)  # the old head stays home


def _bad_uploads(server, client):
    good = upload(server, client, 1)
    tensors = lambda: {k: v for k, v in good.items()}  # noqa: E731
    missing, extra, shape, nan, dtype, huge = (tensors() for _ in range(6))
    missing.pop("blocks.0.0.weight")
    extra["blocks.1.0.weight"] = torch.zeros(64, 32, 3, 3)
    shape["blocks.0.0.weight"] = torch.zeros(3)
    nan["heads.0.2.weight"] = torch.full_like(good["heads.0.2.weight"], float("nan"))
    dtype["heads.0.2.weight"] = good["heads.0.2.weight"].double()
    huge["heads.0.2.weight"] = torch.full_like(good["heads.0.2.weight"], float("inf"))
    header = Message.unpack(good, "t").header
    return {
        "claims round 3": (10, forge_header(good, round=3)),
        "plan is round 0": (10, forge_header(good, plan={**header.plan, "stage": 2})),
        "algorithm 'other'": (10, forge_header(good, algorithm="other")),
        "missing ['blocks.0.0.weight']": (10, missing),
        "unexpected ['blocks.1.0.weight']": (10, extra),
        "has shape (3,)": (10, shape),
        "contains NaN or Inf": (10, nan),
        "dtype torch.float64": (10, dtype),
        "heads.0.2.weight contains NaN or Inf": (10, huge),
        "reports 0 training samples": (0, good),
        "reports -5 training samples": (-5, good),
        "reports nan training samples": (float("nan"), good),
        "reports inf training samples": (float("inf"), good),
        "reports '10' training samples": ("10", good),
        "reports True training samples": (True, good),
        "header metric flops = inf": (10, forge_header(good, metrics={**header.metrics, "flops": float("inf")})),
    }


@pytest.mark.parametrize("problem", list(_bad_uploads(*make())))
def test_under_abort_a_bad_update_ends_the_round_naming_client_and_problem_and_nothing_is_merged(problem):
    server, client = make(ABORT)
    broadcast(server)
    before = copy.deepcopy(server.model.state_dict())
    good = upload(server, client, 0)
    samples, bad = _bad_uploads(server, client)[problem]
    with pytest.raises(InvalidUpdateError) as err:
        aggregate(server, [(10, good), (samples, bad)])
    assert str(err.value).startswith("client 1's update in round 0"), str(err.value)
    assert problem in str(err.value), str(err.value)
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    assert server.state.ledger.rows == [] and server.state.round == 0


@pytest.mark.parametrize(
    "forge,message",
    [
        (lambda good: {k: v for k, v in good.items() if k != HEADER_KEY}, "no fedml_progfed header"),
        (lambda good: {**good, HEADER_KEY: torch.tensor([1, 2, 3], dtype=torch.uint8)}, "header is not valid JSON"),
        (lambda good: forge_header(good, client=99), "client id 99 is not in 0..3"),
        (lambda good: forge_header(good, client=None), "client id None"),
    ],
)
def test_unattributable_updates_are_rejected(forge, message):
    server, client = make(ABORT)
    with pytest.raises(InvalidUpdateError, match=message):
        aggregate(server, [(10, forge(upload(server, client, 0)))])
    assert server.state.round == 0


@pytest.mark.parametrize("problem", list(_bad_uploads(*make())))
def test_under_drop_a_bad_update_is_recorded_and_the_round_merges_the_rest(problem):
    """The global model equals the one the good update alone gives: nothing of the bad one leaks in."""
    alone, alone_client = make()
    aggregate(alone, [(10, upload(alone, alone_client, 0))])
    server, client = make()
    good = upload(server, client, 0)
    samples, bad = _bad_uploads(server, client)[problem]
    aggregate(server, [(10, good), (samples, bad)])
    for name, value in alone.model.state_dict().items():
        assert torch.equal(server.model.state_dict()[name], value), name
    row = server.state.ledger.rows[-1]
    assert row["dropped_clients"] == 1 and row["num_clients"] == 1
    dropped = [c for c in server.state.ledger.per_client() if "dropped" in c]
    assert dropped[0]["client"] == 1 and problem in dropped[0]["dropped"]


def test_too_few_valid_updates_skip_the_round_and_keep_the_model():
    server, client = make(CONFIG.replace(progfed={"min_clients": 2}))
    before = copy.deepcopy(server.model.state_dict())
    good = upload(server, client, 0)
    _, nan = _bad_uploads(server, client)["contains NaN or Inf"]
    aggregate(server, [(10, good), (10, nan)])
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    row = server.state.ledger.rows[-1]
    assert row["num_clients"] == 0 and row["dropped_clients"] == 1 and server.state.round == 1


def test_norm_bound_rejects_or_clips():
    server, client = make(CONFIG.replace(progfed={"max_update_norm": 1e-6, "invalid_update": "abort"}))
    with pytest.raises(InvalidUpdateError, match="exceeds progfed_max_update_norm"):
        aggregate(server, [(10, upload(server, client, 0))])
    server, client = make(CONFIG.replace(progfed={"max_update_norm": 1e-3, "norm_policy": "clip"}))
    before = copy.deepcopy(server.model.state_dict())
    aggregate(server, [(10, upload(server, client, 0))])
    after = server.model.state_dict()
    moved = sum(float((after[n] - before[n]).double().pow(2).sum()) for n in after) ** 0.5
    assert moved == pytest.approx(1e-3, rel=1e-3)


def test_sample_count_is_capped():
    capped, c1 = make(CONFIG.replace(progfed={"max_samples": 10}))
    equal, c2 = make()
    aggregate(capped, [(10, upload(capped, c1, 0)), (1e18, upload(capped, c1, 1))])
    aggregate(equal, [(10, upload(equal, c2, 0)), (10, upload(equal, c2, 1))])
    for name, value in equal.model.state_dict().items():
        assert torch.equal(capped.model.state_dict()[name], value), name


def test_a_merge_that_would_leave_a_non_finite_model_is_undone(monkeypatch):
    server, client = make(CONFIG.replace(progfed={"optimizer": "fedadam", "fedadam_tau": 1e-30}))
    before = copy.deepcopy(server.model.state_dict())
    moments = server.state.optimizer.state_dict()
    good = upload(server, client, 0)
    step = server.state.optimizer.step
    monkeypatch.setattr(server.state.optimizer, "step", lambda p, g: {k: v * float("inf") for k, v in step(p, g).items()})
    aggregate(server, [(10, good)])
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())
    assert server.state.optimizer.state_dict()[0].keys() == moments[0].keys()  # moments rolled back too
    row = server.state.ledger.rows[-1]
    assert row["num_clients"] == 0 and row["dropped_clients"] == 1
