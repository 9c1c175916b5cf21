"""AllSmall, HeteroFL and DepthFL through the engine: who trains what, how slices merge, what is handed over."""

from __future__ import annotations

import logging

import pytest
import torch

from fedml_progfed.algorithms import ClientUpdate, training_settings
from fedml_progfed.algorithms.base import ServerState
from fedml_progfed.algorithms.depthfl import mutual_distillation, prefix_logits
from fedml_progfed.config import RunConfig, explain
from fedml_progfed.core.server_optim import ServerOptimizerSettings, build_server_optimizer
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import FieldError, InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CPU = torch.device("cpu")
CLIENTS = 4
METHODS = ("allsmall", "heterofl", "depthfl")


def _data():
    g = torch.Generator().manual_seed(0)
    return {c: [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
            for c in range(CLIENTS)}


def config_for(method: str, tmp_path=None, budgets_mb=None, **width) -> RunConfig:
    memory = {}
    if budgets_mb is not None:
        path = tmp_path / "budgets.csv"
        path.write_text("client,mb\n" + "".join(f"{c},{m}\n" for c, m in enumerate(budgets_mb)))
        memory = {"budgets": str(path), "estimator": "analytic"}
    return RunConfig().replace(
        comm_round=3, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, learning_rate=0.05, batch_size=8,
        progfed={"strategy": method, "aggregation_weights": "uniform"}, memory=memory, width=width or {},
    )


def make_model(config: RunConfig):
    return initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)


def run(config: RunConfig, data=None):
    """A whole run through the engine, as the FedML adapter chains it; returns the server, client and assignments."""
    task = ClassificationTask()
    server, client = build_server(config, make_model(config), task), build_client(config, make_model(config), task)
    data, assigned = data or _data(), []
    test = [batch for batches in data.values() for batch in batches][:2]
    for _ in range(server.algorithm.total_rounds):
        message = broadcast(server)
        round_ = server.current
        uploads = []
        for c in range(CLIENTS):
            client.receive(message[c] if type(message) is dict else message)
            client.train(data[c], CPU, c)
            uploads.append((16, client.upload()))
            if client.result is not None:
                assigned.append((round_.plan.round, c, client.assignment.layout.label,
                                 {n: tuple(t.shape) for n, t in client.result.tensors.items()}))
        aggregate(server, uploads, test, CPU)
    return server, client, assigned


def _measured_needs(server) -> dict[str, int]:
    return {key: report.estimated_bytes for key, report in server.memory.reports.items()}


# --------------------------------------------------------------------------- who trains what


@pytest.mark.parametrize("method", ["heterofl", "depthfl"])
def test_each_client_trains_the_costliest_variant_its_budget_fits(tmp_path, method):
    probe, _, _ = run(config_for(method, tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    needs = _measured_needs(probe)
    labels = sorted((k for k in needs if k != "full model"), key=needs.get, reverse=True)
    # budgets between the variants' needs: client c fits the c-th costliest variant and nothing above it
    between = [1000.0] + [(needs[labels[i]] + needs[labels[i - 1]]) / 2 / 1e6 for i in range(1, CLIENTS)]
    server, _, assigned = run(config_for(method, tmp_path, between))
    for _, client, label, _ in assigned:
        assert label == labels[client], (client, label)
    assert {c for _, c, _, _ in assigned} == set(range(CLIENTS))


def test_heterofl_clients_send_and_train_leading_slices(tmp_path):
    server, _, assigned = run(config_for("heterofl", tmp_path, [1000.0, 1000.0, 1000.0, 1000.0]).replace(comm_round=1))
    needs = _measured_needs(server)
    half = (needs["width 1"] + needs["width 0.5"]) / 2 / 1e6  # fits width 0.5, not the full width
    server, client, assigned = run(config_for("heterofl", tmp_path, [1000.0, half, half, 1000.0]).replace(comm_round=1))
    shapes = {c: s for _, c, _, s in assigned}
    full = {n: tuple(t.shape) for n, t in server.model.state_dict().items()}
    assert shapes[0]["blocks.0.0.weight"] == full["blocks.0.0.weight"] == (32, 1, 3, 3)
    assert shapes[1]["blocks.0.0.weight"] == (16, 1, 3, 3) and shapes[1]["blocks.1.0.weight"] == (32, 16, 3, 3)
    assert shapes[1]["heads.3.weight"] == (10, 32)  # classes never shrink
    sent = {e["client"]: e["bytes_down"] for e in server.state.ledger.records[0].clients}
    assert sent[1] == sent[2] < sent[0] / 3  # about a quarter of the parameters, one shared message


def test_allsmall_gives_everyone_the_widest_width_every_client_fits(tmp_path):
    probe, _, _ = run(config_for("allsmall", tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    needs = _measured_needs(probe)
    smallest_budget = (needs["width 0.5"] + needs["width 0.25"]) / 2 / 1e6  # fits 0.25, not 0.5
    server, client, assigned = run(config_for("allsmall", tmp_path, [1000.0, 1000.0, smallest_budget, 1000.0]))
    assert {label for _, _, label, _ in assigned} == {"width 0.25"}
    assert {c for _, c, _, _ in assigned} == set(range(CLIENTS))
    final = server.algorithm.final_state(server.model)
    assert list(final) == list(server.model.state_dict())
    assert final["blocks.0.0.weight"].shape == (8, 1, 3, 3)


def test_a_client_that_fits_nothing_never_trains_and_it_is_said_once(tmp_path, caplog):
    probe, _, _ = run(config_for("depthfl", tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    below_everything = probe.memory.reports["depth 1"].estimated_bytes / 2 / 1e6
    with caplog.at_level(logging.WARNING, logger="fedml_progfed"):
        server, _, assigned = run(config_for("depthfl", tmp_path, [1000.0, below_everything, 1000.0, 1000.0]))
    assert 1 not in {c for _, c, _, _ in assigned}
    assert {0, 2, 3} <= {c for _, c, _, _ in assigned}
    assert caplog.text.count("1 of 4 clients fit no sub-model of depthfl") == 1
    skipped = [e for r in server.state.ledger.records for e in r.clients if e["client"] == 1]
    assert skipped and all(e.get("skipped") for e in skipped)


# --------------------------------------------------------------------------- aggregation


def test_overlapping_slices_merge_per_element_over_the_clients_that_trained_them():
    config = config_for("heterofl")
    model = make_model(config)
    server = build_server(config, model, ClassificationTask())
    state: ServerState = server.state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["blocks.0.0.weight", "blocks.0.0.bias"]
    full, half = torch.ones(32, 1, 3, 3), torch.full((16, 1, 3, 3), 3.0)
    updates = [
        ClientUpdate(client=0, weight=1.0, deltas={"blocks.0.0.weight": full, "blocks.0.0.bias": torch.ones(32)},
                     samples=1, train_loss=0.0, flops=0, compute_s=0.0, nbytes=0),
        ClientUpdate(client=1, weight=1.0, deltas={"blocks.0.0.weight": half, "blocks.0.0.bias": torch.full((16,), 3.0)},
                     samples=1, train_loss=0.0, flops=0, compute_s=0.0, nbytes=0),
    ]
    from fedml_progfed.algorithms.base import merge_covered

    merge_covered(state, names, updates)
    after = model.state_dict()
    change = after["blocks.0.0.weight"] - before["blocks.0.0.weight"]
    assert torch.allclose(change[:16], torch.full_like(change[:16], 2.0))  # (1 + 3) / 2 where both trained
    assert torch.allclose(change[16:], torch.ones_like(change[16:]))  # client 0's change alone, not (1 + 0) / 2
    bias = after["blocks.0.0.bias"] - before["blocks.0.0.bias"]
    assert torch.allclose(bias, torch.tensor([2.0] * 16 + [1.0] * 16))


def test_depthfl_blocks_no_client_reached_keep_their_values(tmp_path):
    probe, _, _ = run(config_for("depthfl", tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    needs = _measured_needs(probe)
    shallow = (needs["depth 2"] + needs["depth 3"]) / 2 / 1e6  # everyone at depth 2
    config = config_for("depthfl", tmp_path, [shallow] * CLIENTS).replace(comm_round=2)
    initial = make_model(config).state_dict()
    server, _, assigned = run(config)
    assert {label for _, _, label, _ in assigned} == {"depth 2"}
    after = server.model.state_dict()
    for name in after:
        unchanged = torch.equal(after[name], initial[name])
        assert unchanged == (name.startswith(("blocks.2", "blocks.3", "heads.2", "heads.3"))), name


# --------------------------------------------------------------------------- objective and scores


def test_depthfl_loss_adds_mutual_distillation_only_when_asked():
    config = config_for("depthfl")
    model = make_model(config)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    from fedml_progfed.algorithms import DepthFL

    task = ClassificationTask()
    plan = type("P", (), {"stage": 3})()
    with_kl = DepthFL(config.depthfl, training_settings(config), 4, task).objective(model, plan)(model, x, y)
    plain = DepthFL(config.replace(depthfl={"self_distill": False}).depthfl, training_settings(config), 4, task)
    without = plain.objective(model, plan)(model, x, y)
    outputs = prefix_logits(model, x, 3)
    assert float(without.detach()) == pytest.approx(float(sum(task.loss(z, y) for z in outputs).detach()), rel=1e-6)
    assert float((with_kl - without).detach()) == pytest.approx(float(mutual_distillation(outputs).detach()), rel=1e-5)
    same = torch.randn(8, 10)
    assert float(mutual_distillation([same, same.clone()])) == pytest.approx(0.0, abs=1e-6)


def test_every_method_reports_its_extra_scores_and_hands_over_the_original_keys(tmp_path):
    for method, columns in (("depthfl", {"test_metric_ensemble"}), ("heterofl", {"test_metric_w0.5", "test_metric_w0.0625"}),
                            ("allsmall", set())):
        server, _, _ = run(config_for(method).replace(comm_round=2))
        row = server.state.ledger.rows[-1]
        assert columns <= set(row), (method, sorted(row))
        assert all(0.0 <= row[c] <= 1.0 for c in columns)
        assert list(server.algorithm.final_state(server.model)) == list(make_model(config_for(method)).state_dict())


def test_a_narrow_update_with_full_width_tensors_is_refused(tmp_path):
    probe, _, _ = run(config_for("heterofl", tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    needs = _measured_needs(probe)
    half = (needs["width 1"] + needs["width 0.5"]) / 2 / 1e6
    config = config_for("heterofl", tmp_path, [half] * CLIENTS).replace(progfed={"strategy": "heterofl",
                                                                             "invalid_update": "abort"})
    task = ClassificationTask()
    server = build_server(config, make_model(config), task)
    message = broadcast(server)
    narrow_header_client = build_client(config, make_model(config), task)
    narrow_header_client.receive(message[0] if type(message) is dict else message)
    narrow_header_client.train(_data()[0], CPU, 0)
    upload = narrow_header_client.upload()
    weight = "blocks.0.0.weight"
    upload[weight] = torch.zeros(32, 1, 3, 3)  # the full width's shape, where the client was given 0.5
    with pytest.raises(InvalidUpdateError, match=r"blocks.0.0.weight has shape \(32, 1, 3, 3\), its narrow assignment has \(16, 1, 3, 3\)"):
        server.finish_round([(16, upload)])


def test_a_model_without_width_scaling_is_one_error():
    config = config_for("heterofl")
    model = build_model("unet3d", (1, 32, 32, 32), 2, 4, base_width=4)
    with pytest.raises(FieldError) as err:
        build_server(config, model, ClassificationTask())
    assert "heterofl needs a model whose widths scale; unet3d has no width scaling" in str(err.value)


@pytest.mark.parametrize("method", ["allsmall", "heterofl"])
def test_without_budgets_the_width_methods_are_end_to_end_fedavg(method):
    ours, _, _ = run(config_for(method).replace(progfed={"strategy": method, "aggregation_weights": "uniform"}))
    e2e, _, _ = run(config_for("e2e"))
    theirs = e2e.model.state_dict()
    for name, value in ours.model.state_dict().items():
        assert torch.allclose(value, theirs[name], atol=1e-6), name


def test_the_scaler_goes_on_models_that_normalise_and_off_the_convnets_unless_asked():
    from fedml_progfed.algorithms.narrow import scaler_applies

    convnet, resnet = build_model("convnet", (1, 28, 28), 10, 4), build_model("resnet34_small", (1, 28, 28), 10, 4)
    assert not scaler_applies(convnet, "auto") and scaler_applies(resnet, "auto")
    assert scaler_applies(convnet, "on") and not scaler_applies(resnet, "off")
    with pytest.raises(FieldError) as err:
        RunConfig().replace(width={"scaler": "yes"})
    assert explain(err.value) == "width_args.width_scaler: 'yes' is not allowed; use auto | on | off"


def test_width_ratios_must_be_widest_first_in_zero_one():
    with pytest.raises(FieldError) as err:
        RunConfig().replace(width={"ratios": (0.5, 1.0)})
    assert explain(err.value).startswith("width_args.width_ratios: [0.5, 1.0] is not allowed; use width multipliers in (0, 1]")


def test_depthfl_scores_the_deepest_classifier_a_client_trained(tmp_path):
    probe, _, _ = run(config_for("depthfl", tmp_path, [1000.0] * CLIENTS).replace(comm_round=1))
    needs = _measured_needs(probe)
    shallow = (needs["depth 2"] + needs["depth 3"]) / 2 / 1e6  # nobody reaches depths 3 and 4
    server, _, _ = run(config_for("depthfl", tmp_path, [shallow] * CLIENTS).replace(comm_round=2))
    assert server.state.algorithm.deepest == 2
    assert server.algorithm.scored(server.model, server.current.plan).stage == 2
    assert {row["scored_depth"] for row in server.state.ledger.rows} == {2}


def test_uncovered_elements_keep_their_value_under_fedadam():
    config = config_for("heterofl").replace(progfed={"strategy": "heterofl", "optimizer": "fedadam"})
    model = make_model(config)
    server = build_server(config, model, ClassificationTask())
    before = model.state_dict()["blocks.0.0.weight"].clone()
    from fedml_progfed.algorithms.base import merge_covered

    update = ClientUpdate(client=0, weight=1.0, deltas={"blocks.0.0.weight": torch.ones(16, 1, 3, 3)}, samples=1,
                          train_loss=0.0, flops=0, compute_s=0.0, nbytes=0)
    merge_covered(server.state, ["blocks.0.0.weight"], [update])
    after = model.state_dict()["blocks.0.0.weight"]
    assert torch.equal(after[16:], before[16:]) and not torch.equal(after[:16], before[:16])
