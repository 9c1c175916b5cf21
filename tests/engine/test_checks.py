"""The update checks on their own: a hand-built round, hand-built messages, one check at a time.

Every refusal is an :class:`InvalidUpdateError` whose message names the client and the problem;
each test has a passing twin, so a check that refused everything would fail too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedml_progfed.algorithms import build_algorithm
from fedml_progfed.algorithms.base import Assignment, Layout, RoundPlan
from fedml_progfed.comm.codecs import Codec, payload_to_tensor
from fedml_progfed.comm.messages import Header, Message, nbytes
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_server
from fedml_progfed.engine.checks import ABSURD_CHANGE, UpdateChecker, UpdatePolicy, claimed_client
from fedml_progfed.engine.round import Round
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask

CLIENTS = 3
CONFIG = RunConfig().replace(comm_round=4, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS)
ALGORITHM = "progfed"
PLAN = RoundPlan(round=0, stage=1, lr=0.05)
METRICS = {"samples": 999.0, "train_loss": 1.25, "flops": 4096.0, "compute_s": 0.5}
FIRST = "client 1's update in round 0"
HEAD = ("heads.0.2.weight", "heads.0.2.bias")


def make_model():
    model = initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)
    build_algorithm(CONFIG, model.num_stages, ClassificationTask()).prepare_model(model)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def layout(model):
    layout = build_algorithm(CONFIG, model.num_stages, ClassificationTask()).layout(model, PLAN)
    assert layout.upload == ("blocks.0.0.weight", "blocks.0.0.bias") + HEAD  # what the tests below assume
    return layout


def started(layout, plan=PLAN, **fields) -> Round:
    """A round as Server.start_round builds it: one default assignment, optional per-client ones."""
    return Round(plan=plan, layout=layout, default=Assignment(plan, layout), num_clients=CLIENTS, **fields)


def checker(**policy) -> UpdateChecker:
    return UpdateChecker(ALGORITHM, WireSettings.from_config(CONFIG), CLIENTS, UpdatePolicy(**policy))


def changes(model, names, value=0.01) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((n, torch.full_like(model.state_dict()[n], value)) for n in names)


def wire(tensors, *, client=1, type="update", kind="delta", algorithm=ALGORITHM, round=0, plan=PLAN, metrics=METRICS,
         payload=None):
    """The wire form of an update (what a runtime hands the server)."""
    tag = plan.tag() if isinstance(plan, RoundPlan) else plan
    header = Header(type=type, kind=kind, algorithm=algorithm, round=round, plan=tag, client=client, metrics=metrics)
    return Message(header, OrderedDict(tensors), payload).pack()


def unpack(packed) -> Message:
    return Message.unpack(packed, "update 1 of 1 in round 0", sender=lambda c: f"client {c}'s update in round 0")


def accept(model, layout, tensors, *, round_=None, client=1, samples=10, policy=None, **header):
    """Both checks, as Server._check runs them: header, then the update against the client's own assignment."""
    round_ = round_ or started(layout)
    check = checker(**(policy or {}))
    packed = wire(tensors, client=client, **header)
    message = unpack(packed)
    sender = check.header(message, round_, 0, 1)
    assert sender == client
    return check.update(model, message, sender, samples, round_.assignment(sender), nbytes(packed))


def refused(problem: str, call, *args, who: str = FIRST, **kwargs) -> str:
    with pytest.raises(InvalidUpdateError) as err:
        call(*args, **kwargs)
    text = str(err.value)
    assert text.startswith(who), text
    assert problem in text, text
    return text


# ---------------------------------------------------------------------------------------------- a good update


def test_a_good_update_is_decoded_into_changes_with_the_headers_measurements(model, layout):
    sent = changes(model, layout.upload, 0.01)
    packed = wire(sent)
    update = accept(model, layout, sent)
    assert update.client == 1 and list(update.deltas) == list(layout.upload)
    assert all(torch.equal(update.deltas[n], sent[n]) for n in layout.upload)
    assert (update.weight, update.samples) == (10.0, 10.0)  # the runtime's count, not the header's 999
    assert (update.train_samples, update.train_loss, update.flops, update.compute_s) == (999.0, 1.25, 4096, 0.5)
    assert update.nbytes == nbytes(packed)


def test_a_values_update_is_turned_into_changes_against_the_server_model(model, layout):
    current = model.state_dict()
    values = OrderedDict((n, current[n] + 0.5) for n in layout.upload)
    update = accept(model, layout, values, kind="values")
    for name in layout.upload:
        assert torch.allclose(update.deltas[name], torch.full_like(current[name], 0.5)), name


# ---------------------------------------------------------------------------------------------- the header


@pytest.mark.parametrize("client", [3, 99, -1, None])
def test_a_client_id_outside_the_run_is_refused(model, layout, client):
    message = unpack(wire(changes(model, layout.upload), client=client))
    refused(f"client id {client!r} is not in 0..2", checker().header, message, started(layout), 0, 1,
            who="update 1 of 1 in round 0")
    assert claimed_client(wire({}, client=client)) == client  # what a dropped update is recorded under


def test_a_broadcast_sent_by_a_client_is_refused(model, layout):
    message = unpack(wire(changes(model, layout.upload), type="broadcast", kind="values"))
    refused("a client sent a broadcast message", checker().header, message, started(layout), 0, 1)


def test_a_message_of_another_algorithm_is_refused(model, layout):
    message = unpack(wire(changes(model, layout.upload), algorithm="fedavg"))
    refused("algorithm 'fedavg', the server runs 'progfed'", checker().header, message, started(layout), 0, 1)


def test_an_update_from_a_client_the_round_maps_to_none_is_refused_and_its_skip_accepted(model, layout):
    round_ = started(layout, per_client=True)
    round_.assignments = {0: round_.default, 1: None, 2: round_.default}
    update = unpack(wire(changes(model, layout.upload)))
    refused("was not chosen to train this round", checker().header, update, round_, 0, 1)
    skip = unpack(wire({}, type="skip", kind="values", metrics={}))
    assert checker().header(skip, round_, 0, 1) == 1  # a skip is its answer
    assert checker().header(unpack(wire(changes(model, layout.upload), client=0)), round_, 0, 1) == 0


def test_an_update_from_a_client_the_plans_participants_leave_out_is_refused(model, layout):
    plan = replace(PLAN, participants=(0, 2))
    round_ = started(layout, plan=plan)  # no per-client entries: everyone the runtime calls gets the default
    message = unpack(wire(changes(model, layout.upload), plan=plan))  # the right tag: only participation is wrong
    refused("was not chosen to train this round", checker().header, message, round_, 0, 1)
    assert checker().header(unpack(wire(changes(model, layout.upload), client=2, plan=plan)), round_, 0, 1) == 2


@pytest.mark.parametrize(
    "claim",
    [
        {"round": 1},
        {"plan": replace(PLAN, stage=2)},
        {"plan": replace(PLAN, lr=0.1)},
        {"plan": replace(PLAN, warmup=True)},
        {"plan": replace(PLAN, details={"step": 1})},
        {"plan": {**PLAN.tag(), "extra": 1}},
    ],
    ids=["round", "stage", "lr", "warmup", "details", "extra key"],
)
def test_a_wrong_round_or_plan_tag_is_refused(model, layout, claim):
    message = unpack(wire(changes(model, layout.upload), **claim))
    refused("the client must train the model it was sent", checker().header, message, started(layout), 0, 1)


def test_the_plan_a_client_must_follow_is_its_own_assignments(model, layout):
    own = replace(PLAN, details={"width": 0.5})
    round_ = started(layout)
    round_.assignments = {2: Assignment(own, layout)}
    sent = changes(model, layout.upload)
    assert checker().header(unpack(wire(sent, client=2, plan=own)), round_, 0, 1) == 2
    refused("server's plan is round 0", checker().header, unpack(wire(sent, client=2)), round_, 0, 1,
            who="client 2's update in round 0")
    refused("server's plan is round 0", checker().header, unpack(wire(sent, client=0, plan=own)), round_, 0, 1,
            who="client 0's update in round 0")


# ---------------------------------------------------------------------------------------------- the tensors


def test_missing_or_unexpected_names_are_refused(model, layout):
    missing = changes(model, layout.upload[1:])
    refused("missing ['blocks.0.0.weight']", accept, model, layout, missing)
    inactive = changes(model, layout.upload + ("blocks.1.0.weight",))
    refused("unexpected ['blocks.1.0.weight']", accept, model, layout, inactive)
    unknown = {**changes(model, layout.upload), "not.in.the.model": torch.zeros(2)}
    refused("unexpected ['not.in.the.model']", accept, model, layout, unknown)


def test_a_wrong_shape_is_refused(model, layout):
    bad = {**changes(model, layout.upload), "blocks.0.0.weight": torch.zeros(3)}
    refused("blocks.0.0.weight has shape (3,), the model has (32, 1, 3, 3)", accept, model, layout, bad)
    flat = {**changes(model, layout.upload), "heads.0.2.bias": torch.zeros(1, 10)}  # same numel, other shape
    refused("heads.0.2.bias has shape (1, 10), the model has (10,)", accept, model, layout, flat)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_a_wrong_dtype_is_refused(model, layout, dtype):
    bad = {**changes(model, layout.upload), "heads.0.2.weight": torch.zeros(10, 32, dtype=dtype)}
    refused(f"heads.0.2.weight has dtype {dtype}, the model has torch.float32", accept, model, layout, bad)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_refused(model, layout, value):
    bad = changes(model, layout.upload)
    bad["heads.0.2.weight"][3, 4] = value  # one bad element is enough
    refused("heads.0.2.weight contains NaN or Inf", accept, model, layout, bad)


def test_float64_1e300_is_refused_although_it_is_finite_as_sent(model, layout):
    """Finite in float64, Inf as the model's float32: the dtype check refuses it before any cast."""
    huge = torch.full((10, 32), 1e300, dtype=torch.float64)
    assert bool(torch.isfinite(huge).all()) and not bool(torch.isfinite(huge.float()).all())
    refused("heads.0.2.weight has dtype torch.float64", accept, model, layout,
            {**changes(model, layout.upload), "heads.0.2.weight": huge})


def test_a_value_finite_as_decoded_but_not_in_the_models_dtype_is_refused_as_inf(layout):
    """The finite check runs after the cast: a float32 payload of 1e5 is Inf in a float16 model.

    Without that check the Inf would reach the absurd-change check and be refused for the wrong reason.
    """
    half = make_model().half()
    decoded = OrderedDict((n, torch.full(half.state_dict()[n].shape, 1e5)) for n in layout.upload)
    wire_settings = WireSettings.from_config(CONFIG)
    payload = payload_to_tensor(Codec("float").encode(decoded, list(layout.upload), wire_settings.up_seed(0, 1)))
    refused("blocks.0.0.weight contains NaN or Inf", accept, half, layout, {}, kind="encoded", payload=payload)
    small = OrderedDict((n, torch.full(half.state_dict()[n].shape, 0.5)) for n in layout.upload)
    payload = payload_to_tensor(Codec("float").encode(small, list(layout.upload), wire_settings.up_seed(0, 1)))
    update = accept(half, layout, {}, kind="encoded", payload=payload)
    assert all(bool((d == 0.5).all()) for d in update.deltas.values())


@pytest.mark.parametrize("kind", ["delta", "values"])
def test_a_change_beyond_absurd_change_is_refused(model, layout, kind):
    current = model.state_dict()

    def sent(change):
        tensors = changes(model, layout.upload, 0.0)
        tensors["heads.0.2.bias"][2] = change
        if kind == "values":
            tensors = OrderedDict((n, current[n] + t) for n, t in tensors.items())
        return tensors

    accept(model, layout, sent(ABSURD_CHANGE * 0.5), kind=kind)  # large, but a step could make it
    refused(f"heads.0.2.bias changes by 2e+06, beyond the {ABSURD_CHANGE:g}", accept, model, layout,
            sent(ABSURD_CHANGE * 2), kind=kind)
    refused("heads.0.2.bias changes by", accept, model, layout, sent(-ABSURD_CHANGE * 2), kind=kind)


def test_absurd_change_is_a_million():
    assert ABSURD_CHANGE == 1e6


# ---------------------------------------------------------------------------------------------- sample counts


@pytest.mark.parametrize("samples", [math.nan, math.inf, -math.inf, True, False, "10", None, 0, 0.0, -5, -0.5],
                         ids=lambda s: repr(s))
def test_a_sample_count_that_is_not_a_finite_positive_number_is_refused(model, layout, samples):
    refused(f"reports {samples!r} training samples; it must be a finite positive number", accept, model, layout,
            changes(model, layout.upload), samples=samples)


@pytest.mark.parametrize("samples,weight", [(7, 7.0), (2.5, 2.5), (np.int64(12), 12.0), (np.float32(3.0), 3.0)])
def test_a_good_sample_count_is_the_weight(model, layout, samples, weight):
    update = accept(model, layout, changes(model, layout.upload), samples=samples)
    assert (update.weight, update.samples) == (weight, weight) and type(update.weight) is float


@pytest.mark.parametrize("samples,counted", [(1e18, 10.0), (10, 10.0), (4, 4.0)])
def test_max_samples_caps_the_count(model, layout, samples, counted):
    update = accept(model, layout, changes(model, layout.upload), samples=samples, policy={"max_samples": 10})
    assert (update.weight, update.samples) == (counted, counted)


def test_uniform_weights_every_update_one_and_keeps_its_count(model, layout):
    update = accept(model, layout, changes(model, layout.upload), samples=300, policy={"uniform": True})
    assert (update.weight, update.samples) == (1.0, 300.0)
    update = accept(model, layout, changes(model, layout.upload), samples=300, policy={"uniform": False})
    assert (update.weight, update.samples) == (300.0, 300.0)


# ---------------------------------------------------------------------------------------------- the norm bound


def norm(deltas) -> float:
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values()))


def test_the_norm_bound_rejects_or_clips_to_exactly_the_bound(model, layout):
    sent = changes(model, layout.upload, 0.01)
    size = norm(sent)  # 0.01 * sqrt(330)
    bound = size / 4
    refused(f"its L2 norm {size:.4g} exceeds progfed_max_update_norm ({bound:g})", accept, model, layout, sent,
            policy={"max_update_norm": bound, "norm_policy": "reject"})
    clipped = accept(model, layout, sent, policy={"max_update_norm": bound, "norm_policy": "clip"})
    assert norm(clipped.deltas) == pytest.approx(bound, rel=1e-6)
    for name in layout.upload:  # the direction is kept: every change scaled by the same factor
        assert torch.allclose(clipped.deltas[name], sent[name] / 4, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("norm_policy", ["reject", "clip"])
def test_an_update_within_the_bound_is_left_as_it_is(model, layout, norm_policy):
    sent = changes(model, layout.upload, 0.01)
    kept = accept(model, layout, sent, policy={"max_update_norm": norm(sent) * 1.001, "norm_policy": norm_policy})
    assert all(torch.equal(kept.deltas[n], sent[n]) for n in layout.upload)


def test_the_bound_is_sharp(model, layout):
    sent = changes(model, layout.upload, 0.01)
    bound = norm(sent) * 0.999  # just under the update's norm
    refused("exceeds progfed_max_update_norm", accept, model, layout, sent, policy={"max_update_norm": bound})
    clipped = accept(model, layout, sent, policy={"max_update_norm": bound, "norm_policy": "clip"})
    assert norm(clipped.deltas) == pytest.approx(bound, rel=1e-6)


# ---------------------------------------------------------------------------------------------- the assignment decides


def test_the_assignments_upload_names_decide_what_is_expected(model, layout):
    """A client whose assignment uploads only the head must send exactly the head; the default client, all four."""
    head_only = Layout(label="head only", modules=layout.modules, active=layout.active, trainable=HEAD, upload=HEAD)
    round_ = started(layout)
    round_.assignments = {1: Assignment(PLAN, head_only)}
    update = accept(model, layout, changes(model, HEAD), round_=round_)
    assert tuple(update.deltas) == HEAD
    refused("unexpected ['blocks.0.0.weight', 'blocks.0.0.bias']", accept, model, layout,
            changes(model, layout.upload), round_=round_)
    refused("missing ['blocks.0.0.weight', 'blocks.0.0.bias']", accept, model, layout, changes(model, HEAD),
            round_=round_, client=0, who="client 0's update in round 0")
    assert tuple(accept(model, layout, changes(model, layout.upload), round_=round_, client=0).deltas) == layout.upload


def test_the_server_checks_each_upload_against_that_clients_assignment_without_recomputing_a_layout():
    server = build_server(CONFIG, make_model(), ClassificationTask())
    real = server.start_round()
    head_only = Layout(label="head only", modules=real.layout.modules, active=real.layout.active, trainable=HEAD,
                       upload=HEAD)
    round_ = Round(plan=real.plan, layout=real.layout, default=real.default, num_clients=CLIENTS,
                   default_message=real.default_message, assignments={1: Assignment(real.plan, head_only)})
    calls = []
    server.algorithm.layout = lambda *args: calls.append(args)
    model = server.model
    uploads = [(10, wire(changes(model, real.layout.upload), client=0, plan=real.plan)),
               (10, wire(changes(model, HEAD), client=1, plan=real.plan)),
               (10, wire(changes(model, HEAD), client=2, plan=real.plan))]
    updates, others = server._check(round_, uploads)
    assert [(u.client, tuple(u.deltas)) for u in updates] == [(0, real.layout.upload), (1, HEAD)]
    assert [o["client"] for o in others] == [2] and "client 2's update in round 0" in others[0]["dropped"]
    assert "missing ['blocks.0.0.weight', 'blocks.0.0.bias']" in others[0]["dropped"]
    assert calls == []


# ---------------------------------------------------------------------------------------------- known gap


def test_an_update_without_its_measurements_is_refused(model, layout):
    # without it the row's and the run's client_compute_s would be NaN
    refused("measurements", accept, model, layout, changes(model, layout.upload), metrics={})
