"""ProgFed Table 6's update strategies: what trains, which heads supervise, what is uploaded; and q_t."""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.algorithms import RoundPlan
from fedml_progfed.cli import main
from fedml_progfed.comm.messages import Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize, parameter_names
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.models import build_model
from fedml_progfed.report import read_metrics_csv
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

EXPECTED = {
    # strategy: (modules that train at stage 2 of 4, heads whose loss supervises, modules the forward runs)
    "progressive": ({"blocks.0", "blocks.1", "heads.1"}, {1}, {"blocks.0", "blocks.1", "heads.1"}),
    "layerwise": ({"blocks.1", "heads.3"}, {3}, {"blocks.0", "blocks.1", "blocks.2", "blocks.3", "heads.3"}),
    "partial": ({"blocks.0", "blocks.1", "heads.3"}, {3}, {"blocks.0", "blocks.1", "blocks.2", "blocks.3", "heads.3"}),
    "mixed": ({"blocks.0", "blocks.1", "heads.1", "heads.3"}, {1, 3},
              {"blocks.0", "blocks.1", "blocks.2", "blocks.3", "heads.1", "heads.3"}),
}


def module_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def one_update(update: str, stage: int = 2):
    config = RunConfig().replace(comm_round=8, client_num_in_total=1, client_num_per_round=1,
                                 progfed={"update": update, "schedule": (1, 1, 1, 5)})
    task = ClassificationTask()
    server = build_server(config, initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), task)
    client = build_client(config, initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), task)
    plan = RoundPlan(round=stage - 1, stage=stage, lr=0.1)
    layout = server.algorithm.layout(server.model, plan)
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))]
    server.state.round = stage - 1
    client.receive(broadcast(server))
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    client.train(batch, torch.device("cpu"), 0)
    upload = Message.unpack(client.upload(), "upload")
    return server, layout, before, client.model.state_dict(), upload


@pytest.mark.parametrize("update", list(EXPECTED))
def test_what_trains_what_supervises_and_what_is_uploaded(update):
    trains, heads, runs = EXPECTED[update]
    server, layout, before, after, upload = one_update(update)
    assert {module_of(n) for n in layout.trainable} == trains
    assert {module_of(n) for n in layout.active} == runs
    assert {module_of(n) for n in upload.tensors} == trains  # only what trained travels up
    assert {st - 1 for st, _ in server.algorithm.rule.supervision(2, 4)} == heads
    params = parameter_names(server.model)
    for name in params:
        moved = not torch.equal(before[name], after[name])
        if module_of(name) in trains and name.endswith("weight"):
            assert moved, (update, name)
        if module_of(name) not in trains:
            assert not moved, (update, name)
    # a supervising head is one whose loss reaches the model: it moved (the other stage's head did not)
    for head in heads:
        assert not torch.equal(before[f"heads.{head}.2.weight" if head < 3 else "heads.3.weight"],
                               after[f"heads.{head}.2.weight" if head < 3 else "heads.3.weight"])


def test_random_draws_a_seeded_sub_model_each_round():
    config = RunConfig().replace(comm_round=40, progfed={"update": "random"})
    server = build_server(config, initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), ClassificationTask())
    stages = [server.algorithm.plan_for_round(r).stage for r in range(40)]
    assert set(stages) == {1, 2, 3, 4} and stages == [server.algorithm.plan_for_round(r).stage for r in range(40)]
    plan = server.algorithm.plan_for_round(0)
    layout = server.algorithm.layout(server.model, plan)
    assert {module_of(n) for n in layout.trainable} == set(server.model.stage_modules(plan.stage))
    assert server.algorithm.scored(server.model, plan).stage == 4  # the full model is scored


def test_warm_up_belongs_to_progressive_only():
    from fedml_progfed.config import explain
    from fedml_progfed.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build_server(RunConfig().replace(comm_round=40, progfed={"update": "partial", "warmup_rounds": 2}),
                     initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), ClassificationTask())
    assert explain(err.value).startswith("progfed_args.progfed_warmup_rounds: warm-up belongs to")


def test_q_t_is_written_for_every_tested_round_and_is_one_in_the_last_stage(small_config, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=8",
                 "validation_args.frequency_of_the_test=2", "progfed_args.progfed_diagnostics=true"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    tested = [r for r in rows if r["test_metric"] == r["test_metric"]]
    assert [r["round"] for r in tested] == [0, 2, 4, 6, 7]
    assert all(r["q_alpha"] == r["q_alpha"] for r in tested)  # computed on every test round
    assert all(r["q_alpha"] != r["q_alpha"] for r in rows if r not in tested)  # and only there
    for row in tested:
        if row["stage"] == 4:
            assert row["q_t"] == pytest.approx(1.0) and row["q_alpha"] == pytest.approx(1.0)
