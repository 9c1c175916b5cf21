"""ProFL against our spec's test plan (section 5): EM, step order, freezing, no graph, output modules, budgets."""

from __future__ import annotations

import logging

import pytest
import torch

from fedml_progfed.algorithms import ProFL, ProFLState, RoundPlan, effective_movement
from fedml_progfed.algorithms.profl import Path, build_steps
from fedml_progfed.config import RunConfig, explain
from fedml_progfed.core.staged_model import initialize, names_under
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import ConfigError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast


def profl_for(config: RunConfig, stages: int = 4) -> ProFL:
    """ProFL with its own section and the run's shared training settings."""
    from fedml_progfed.algorithms import training_settings

    return ProFL(config.profl, training_settings(config), stages, ClassificationTask())

CPU = torch.device("cpu")
CLIENTS = 3


# --------------------------------------------------------------------------- effective movement


def test_effective_movement_of_a_straight_line_is_one_and_of_a_back_and_forth_is_zero():
    line = [torch.full((5,), 0.1 * i) for i in range(7)]
    assert effective_movement(line, window=6) == pytest.approx(1.0)
    zigzag = [torch.full((5,), 0.1 * (i % 2)) for i in range(7)]
    assert effective_movement(zigzag, window=6) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    walk = [torch.randn(100, generator=g).cumsum(0) * 0 + torch.randn(100, generator=g) for _ in range(7)]
    assert 0.0 <= effective_movement(walk, window=6) <= 1.0
    # only the last W+1 points count
    assert effective_movement([torch.zeros(5), *zigzag], window=6) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="needs 7 points"):
        effective_movement(line[:6], window=6)


# --------------------------------------------------------------------------- steps


def test_step_order_shrinks_back_to_front_then_grows_front_to_back():
    steps = build_steps(4)
    assert [(s.phase, s.block, s.objective) for s in steps] == [
        ("shrink", 4, "ce"), ("shrink", 4, "mse"), ("shrink", 3, "ce"), ("shrink", 3, "mse"),
        ("shrink", 2, "ce"), ("shrink", 2, "mse"),
        ("grow", 1, "ce"), ("grow", 2, "ce"), ("grow", 3, "ce"), ("grow", 4, "ce"),
    ]
    shrink3, distil3, grow2 = steps[2], steps[3], steps[7]
    # shrink 3: real frozen E_1, E_2, then E_3 and O_3 = B_4 + head trainable
    assert shrink3.path == ("blocks.0", "blocks.1", "blocks.2", "basic.3", "heads.3") and shrink3.frozen_prefix == 2
    assert shrink3.trained == ("blocks.2", "basic.3", "heads.3")
    # its distillation: B_3 replaces E_3 and learns to imitate the model with E_3
    assert distil3.trained == ("basic.2",) and distil3.teacher == shrink3.path
    # grow 2: E_1 frozen, E_2 + O_2 = B_3 + B_4 + head trainable
    assert grow2.path == ("blocks.0", "blocks.1", "basic.2", "basic.3", "heads.3") and grow2.frozen_prefix == 1
    assert [(s.phase, s.block, s.trained) for s in build_steps(1)] == [("grow", 1, ("blocks.0", "heads.0"))]
    basic = build_steps(3, shrink_prefix="basic")[0]
    assert basic.path[:2] == ("basic.0", "basic.1") and basic.frozen_prefix == 0 and "basic.0" in basic.trained


def test_no_graph_through_the_frozen_prefix():
    model = initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)
    profl_for(RunConfig().replace(comm_round=200)).prepare_model(model)
    step = build_steps(4)[8]  # grow 3: E_1, E_2 frozen
    x = torch.randn(4, 1, 28, 28)
    saved = []

    def count(names, frozen):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = Path(model, names, frozen)(x)
        return out, len(saved)

    prefix_out, prefix_saved = count(step.path[: step.frozen_prefix], step.frozen_prefix)
    assert not prefix_out.requires_grad and prefix_saved == 0
    full_out, full_saved = count(step.path, step.frozen_prefix)
    assert full_out.requires_grad and full_saved > 0
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved.clear()
        Path(model, step.path[step.frozen_prefix:], 0)(prefix_out)
    assert len(saved) == full_saved  # everything saved for backward belongs to the trained part


def test_profl_refuses_models_it_cannot_split_naming_the_ones_it_supports():
    model = build_model("unet3d", (4, 32, 32, 32), 3, 4, base_width=2)
    with pytest.raises(ConfigError) as err:
        profl_for(RunConfig().replace(comm_round=200)).prepare_model(model)
    assert explain(err.value).startswith("model_args.model: ProFL") and "resnet18" in str(err.value)


def test_too_few_rounds_for_the_steps_is_one_error():
    with pytest.raises(ConfigError) as err:
        profl_for(RunConfig().replace(comm_round=40))
    assert explain(err.value).startswith("train_args.comm_round: 40 rounds give each of ProFL's 10 steps at most 4 rounds")


# --------------------------------------------------------------------------- whole runs through the protocol


def _data():
    g = torch.Generator().manual_seed(0)
    return {c: [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
            for c in range(CLIENTS)}


def run(config: RunConfig, stages: int = 4):
    task = ClassificationTask()
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, stages), config.random_seed)  # noqa: E731
    server, client = build_server(config, make(), task), build_client(config, make(), task)
    data, snapshots, trained = _data(), [], []
    for _ in range(server.algorithm.total_rounds):
        message = broadcast(server)
        uploads = []
        for c in range(CLIENTS):
            client.receive(message[c] if type(message) is dict else message)
            client.train(data[c], CPU, c)
            uploads.append((16, client.upload()))
            if client.result is not None:
                frozen = [n for n, p in client.model.named_parameters() if n not in client.result.tensors]
                trained.append((server.state.round, c, set(client.result.tensors), frozen))
        aggregate(server, uploads)
        snapshots.append({k: v.clone() for k, v in server.model.state_dict().items()})
    return server, snapshots, trained


def profl(**profl_args) -> RunConfig:
    return RunConfig().replace(
        comm_round=24, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, learning_rate=0.05,
        progfed={"strategy": "profl"},
        profl={"em_window": 2, "min_rounds_per_step": 1, "max_rounds_per_step": 2, **profl_args},
    )


def test_a_frozen_block_is_bit_identical_in_every_later_round_and_never_uploaded():
    server, snapshots, trained = run(profl())
    rows = server.state.ledger.rows
    grow1_end = max(r["round"] for r in rows if r["phase"] == "grow" and r["block"] == 1)
    for later in snapshots[grow1_end:]:
        for name in names_under(server.model, ("blocks.0",)):
            assert torch.equal(later[name], snapshots[grow1_end][name]), name
    for round_idx, _, uploaded, _ in trained:
        if round_idx > grow1_end:
            assert not any(n.startswith("blocks.0.") for n in uploaded)
    steps = [(r["phase"], r["block"], r["objective"]) for r in rows]
    assert steps[0] == ("shrink", 4, "ce") and steps[-1] == ("grow", 4, "ce")
    order = list(dict.fromkeys(steps))
    assert len(order) == 10  # every step ran, in the order of build_steps
    log = server.state.algorithm.log
    assert [e["step"] for e in log] == list(range(9)) and all(e["rounds"] <= 2 for e in log)


def test_an_effective_movement_freeze_ends_a_step_early():
    server, _, _ = run(profl(em_threshold=0.999, em_patience=1, max_rounds_per_step=2, min_rounds_per_step=2))
    reasons = [e["reason"] for e in server.state.algorithm.log]
    assert any(r.startswith("EM below 0.999") for r in reasons), reasons
    assert all(0.0 <= r["em"] <= 1.0 for r in server.state.ledger.rows if r["em"] == r["em"])


def test_growing_starts_from_the_shrinking_products():
    server, snapshots, _ = run(profl())
    rows = server.state.ledger.rows
    last_of = lambda phase, block, objective: max(  # noqa: E731
        r["round"] for r in rows if (r["phase"], r["block"], r["objective"]) == (phase, block, objective))
    first_grow3 = min(r["round"] for r in rows if (r["phase"], r["block"]) == ("grow", 3))
    before_grow3 = snapshots[first_grow3 - 1]
    trained_in_shrink3 = snapshots[last_of("shrink", 3, "ce")]
    # E_3 trained in shrink 3 is what grow 3 starts from (nothing touched it in between) ...
    for name in names_under(server.model, ("blocks.2",)):
        assert torch.equal(before_grow3[name], trained_in_shrink3[name]), name
    # ... and grow 1's output module O_1 = B_2 + B_3 + B_4 + head comes from the distillations
    first_grow1 = min(r["round"] for r in rows if (r["phase"], r["block"]) == ("grow", 1))
    distilled = snapshots[last_of("shrink", 2, "mse")]
    for name in names_under(server.model, ("basic.1",)):
        assert torch.equal(snapshots[first_grow1 - 1][name], distilled[name]), name


def test_the_final_model_is_the_original_architecture():
    server, _, _ = run(profl())
    final = server.algorithm.final_state(server.model)
    e2e = initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)
    assert list(final) == list(e2e.state_dict())
    assert any(k.startswith("basic.") for k in server.model.state_dict())  # the output modules were there


def test_a_single_block_is_fedavg_on_the_full_model():
    """With one block ProFL is FedAvg (its constant rate, unweighted mean) on the whole model."""
    single, _, _ = run(profl(lr=0.05), stages=1)
    e2e, _, _ = run(RunConfig().replace(
        comm_round=24, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, learning_rate=0.05,
        progfed={"strategy": "e2e", "aggregation_weights": "uniform"}), stages=1)
    ours, theirs = single.algorithm.final_state(single.model), e2e.model.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def _budgets(tmp_path, mb):
    path = tmp_path / "budgets.csv"
    path.write_text("client,mb\n" + "".join(f"{c},{m}\n" for c, m in enumerate(mb)))
    return str(path)


def test_no_client_is_ever_assigned_a_step_above_its_budget(tmp_path):
    config = profl().replace(memory={"budgets": _budgets(tmp_path, [1000, 5.0, 3.7]), "estimator": "analytic"})
    server, _, _ = run(config)
    budgets = server.memory.budgets(server.model)
    need = {r.key: r.estimated_bytes for r in server.memory.reports.values()}
    rows = server.state.ledger.rows
    for row in rows:
        key = f"{row['phase']} {row['block']}" + (" (distil B)" if row["objective"] == "mse" else "")
        for entry in server.state.ledger.records[row["round"]].clients:
            if not entry.get("skipped"):
                assert budgets[entry["client"]] >= need[key], (row["round"], entry)
    skips = [c for r in server.state.ledger.records for c in r.clients if c.get("skipped")]
    assert skips and all(c["bytes_down"] < 1000 for c in skips)  # a skip notice, not the model
    assert {r["eligible_clients"] for r in rows} >= {1, 3}


def test_a_step_no_client_fits_is_skipped_with_a_warning(tmp_path, caplog):
    config = profl().replace(memory={"budgets": _budgets(tmp_path, [5.0, 5.0, 5.0]), "estimator": "analytic"})
    with caplog.at_level(logging.WARNING, logger="fedml_progfed"):
        server, _, _ = run(config)
    assert "no client's memory budget fits grow 1" in caplog.text
    assert "grow 1" in [f"{e['phase']} {e['block']}" for e in server.state.algorithm.log if "no client" in e["reason"]]
    assert not any(r["phase"] == "grow" and r["block"] == 1 for r in server.state.ledger.rows)


# --------------------------------------------------------------------------- the authors' settings (issue 16)


def test_every_cross_entropy_step_runs_at_the_constant_profl_rate_and_distillation_at_its_own():
    server, _, _ = run(profl(lr=0.02, distill_lr=3e-4))
    rows = server.state.ledger.rows
    assert {r["lr"] for r in rows if r["objective"] == "ce"} == {0.02}  # no run-wide decay
    assert {r["lr"] for r in rows if r["objective"] == "mse"} == {3e-4}


def test_each_step_says_how_it_ended():
    server, _, _ = run(profl())
    log = server.state.algorithm.log
    assert log and all(e["ended"] in ("em", "cap", "skipped") for e in log)
    assert all((e["ended"] == "cap") == e["reason"].startswith("reached") for e in log)
    assert all((e["ended"] == "em") == e["reason"].startswith("EM below") for e in log)


def test_grow_t_starts_its_output_module_from_the_one_shrink_t_produced():
    server, snapshots, _ = run(profl())
    own, log = server.state.algorithm, server.state.algorithm.log
    steps = server.algorithm.steps
    for entry in log:
        step = steps[entry["step"]]
        if step.phase != "grow" or step.block == 1:
            continue
        # the round before grow t's first round ended the previous step; O_t was then loaded from shrink t
        first = entry["start"]
        saved = own.outputs[step.block]
        before_first_round = snapshots[first - 1]
        for name, value in saved.items():
            assert torch.equal(before_first_round[name], value), name
    assert set(own.outputs) == {2, 3, 4}  # shrink S..2 each left its O_k


def test_output_modules_are_checkpointed_with_the_state():
    server, _, _ = run(profl())
    tensors, meta = server.state.state_dict()
    restored = ProFLState()
    restored.load_state_dict({k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}, meta["extra"])
    assert set(restored.outputs) == set(server.state.algorithm.outputs)
    for k, module in server.state.algorithm.outputs.items():
        assert all(torch.equal(restored.outputs[k][n], t) for n, t in module.items())


@pytest.mark.parametrize("frozen_norm", ["train", "eval"])
def test_frozen_blocks_normalisation_follows_the_data_and_travels_up_only_in_train_mode(frozen_norm):
    config = profl(frozen_norm=frozen_norm)
    model = initialize(build_model("vgg16", (3, 32, 32), 10, 4), 0)
    algorithm = profl_for(config)
    algorithm.prepare_model(model)
    grow = next(i for i, s in enumerate(algorithm.steps) if s.phase == "grow" and s.block == 3)
    layout = algorithm.layout(model, RoundPlan(round=0, stage=4, lr=0.1, details={"step": grow}))
    statistics = [n for n in layout.active if n.startswith("blocks.0.") and "running_mean" in n]
    assert statistics, "vgg16's first block has BatchNorm statistics"
    weights = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.")]
    assert not set(weights) & set(layout.upload) and not set(weights) & set(layout.trainable)  # frozen weights stay
    if frozen_norm == "train":
        assert set(statistics) <= set(layout.upload) and layout.frozen_modules == ()
    else:
        assert not set(statistics) & set(layout.upload) and "blocks.0" in layout.frozen_modules


def test_profl_averages_without_weights_by_default_and_progfed_by_samples():
    assert RunConfig().replace(progfed={"strategy": "profl"}).progfed.resolved_aggregation_weights == "uniform"
    assert RunConfig().progfed.resolved_aggregation_weights == "samples"
    explicit = RunConfig().replace(progfed={"strategy": "profl", "aggregation_weights": "samples"})
    assert explicit.progfed.resolved_aggregation_weights == "samples"


def test_the_frozen_prefix_is_sent_once_and_not_again_while_it_stays_frozen():
    config = profl()
    task = ClassificationTask()
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)  # noqa: E731
    server, client = build_server(config, make(), task), build_client(config, make(), task)
    data, sent = _data(), []
    for _ in range(server.algorithm.total_rounds):
        started = server.start_round()
        sent.append((started.plan.details, set(started.message(0))))
        uploads = []
        for c in range(CLIENTS):
            client.receive(started.message(c))
            client.train(data[c], CPU, c)
            uploads.append((16, client.upload()))
        server.finish_round(uploads)
    grow2 = [names for details, names in sent if details["phase"] == "grow" and details["block"] == 2]
    assert len(grow2) >= 2
    frozen = "blocks.0.0.weight"  # E_1, frozen for good once grow 1 ended
    assert frozen in grow2[0]  # it changed during grow 1: sent when grow 2 starts
    assert all(frozen not in names for names in grow2[1:])  # every client holds it since: never sent again
