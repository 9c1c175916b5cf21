"""Client-level DP through the real CLI: bad settings are one line, a run clips, noises and accounts."""

from __future__ import annotations

import json

import pytest
import torch

from fedml_progfed.cli import main
from fedml_progfed.engine import client as engine_client
from fedml_progfed.privacy.clip import l2_norm
from fedml_progfed.report import read_metrics_csv

DP = ["dp_args.enable_dp=true", "dp_args.dp_solution_type=client", "dp_args.clipping_norm=0.5",
      "dp_args.noise_multiplier=1.0", "dp_args.delta=1e-4"]
SHORT = ["train_args.comm_round=4", "train_args.epochs=1", "train_args.client_num_per_round=3"]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["dp_args.dp_solution_type=cdp"], "dp_args.dp_solution_type: 'cdp': FedML's central DP frame spends an epsilon per round"),
        (["dp_args.dp_solution_type=dp_clip"], "divides its noise scale by qw"),
        (["dp_args.clipping_norm=0"], "dp_args.clipping_norm: 0.0 is not allowed"),
        (["dp_args.noise_multiplier=-1"], "dp_args.noise_multiplier: -1.0 is not allowed"),
        (["dp_args.delta=1"], "dp_args.delta: 1.0 is not allowed; use a number in (0, 1)"),
        (["dp_args.epsilon=0"], "dp_args.epsilon: 0.0 is not allowed"),
        (["progfed_args.progfed_strategy=heterofl"], "progfed_args.progfed_strategy: 'heterofl' is not allowed"),
        (["progfed_args.progfed_aggregation_weights=samples"], "progfed_args.progfed_aggregation_weights"),
        (["dp_args.progfed_dp_accountant=pld"], "dp_args.progfed_dp_accountant: 'pld' is not allowed"),
        (["dp_args.progfed_dp_sampling=shuffle"], "dp_args.progfed_dp_sampling: 'shuffle' is not allowed"),
        (["dp_args.epsilon=2"], "at most 0 rounds fit"),
    ],
)
def test_a_setting_that_cannot_give_its_guarantee_is_one_error_line(small_config, capsys, overrides, expected):
    assert main(["run", "--cf", str(small_config), "--quiet", "--set", *SHORT, *DP, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_a_model_whose_batch_norm_statistics_bypass_the_clip_is_refused():
    from fedml_progfed.config.schema import RunConfig
    from fedml_progfed.engine import build_server
    from fedml_progfed.errors import FieldError
    from fedml_progfed.models import build_model
    from fedml_progfed.tasks.classification import ClassificationTask

    config = RunConfig(model="vgg16", enable_dp=True, dp_solution_type="client", clipping_norm=1.0,
                       noise_multiplier=1.0, delta=1e-5, client_num_in_total=10, client_num_per_round=2, comm_round=10)
    config.validate()
    with pytest.raises(FieldError, match="vgg16 keeps running statistics .*group norm"):
        build_server(config, build_model("vgg16", (3, 32, 32), 10), ClassificationTask())


def test_the_target_refusal_names_the_rounds_and_the_noise_that_fit(small_config, capsys):
    assert main(["run", "--cf", str(small_config), "--quiet", "--set", *SHORT, *DP, "dp_args.epsilon=13"]) == 2
    err = capsys.readouterr().err
    assert "4 rounds of this schedule spend epsilon" in err and "at most 2 rounds fit" in err
    assert "dp_args.noise_multiplier of at least" in err and "dp_args.progfed_dp_on_budget: stop" in err


def test_a_private_run_clips_every_stage_accounts_every_round_and_stops_at_its_target(small_config, tmp_path, monkeypatch):
    seen: list[tuple[int, float]] = []
    clip = engine_client.clip_to_norm

    def recording(tensors, bound):
        clipped, norm = clip(tensors, bound)
        seen.append((len(tensors), l2_norm(clipped)))
        return clipped, norm

    monkeypatch.setattr(engine_client, "clip_to_norm", recording)
    out = tmp_path / "private"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", *DP,
                 "train_args.comm_round=8", "train_args.epochs=1", "train_args.client_num_per_round=3",
                 "dp_args.epsilon=20", "dp_args.progfed_dp_on_budget=stop"]) == 0
    assert len({count for count, _ in seen}) == 4  # every stage uploads another number of tensors
    assert all(norm <= 0.5 * (1 + 1e-5) for _, norm in seen)
    rows = read_metrics_csv(out / "metrics.csv")
    epsilons = [r["epsilon"] for r in rows]
    trained = [r for r in rows if r["num_clients"] > 0]
    assert 0 < len(trained) < len(rows)  # the target stopped training before the schedule's end
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 20
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["epsilon"] == epsilons[-1] and privacy["delta"] == 1e-4
    assert privacy["stopped_at_round"] == len(trained) and "replace-one" in privacy["accountant"]


def test_describe_prints_the_epsilon_a_config_will_spend_before_any_training(small_config, capsys):
    assert main(["describe", "--cf", str(small_config), "--set", *SHORT, *DP, "dp_args.epsilon=13"]) == 0
    out = capsys.readouterr().out
    assert "client-level DP: 4 rounds spend epsilon 17.35" in out and "replace-one client" in out
    assert "target epsilon 13: at most 2 rounds fit" in out


SAMPLE = ["dp_args.enable_dp=true", "dp_args.dp_solution_type=sample", "dp_args.clipping_norm=1.0",
          "dp_args.noise_multiplier=1.0", "dp_args.delta=1e-5", "train_args.momentum=0"]


def test_record_level_dp_sgd_trains_through_growth_and_the_server_accounts_each_client(small_config, tmp_path):
    out = tmp_path / "dpsgd"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", *SAMPLE,
                 "train_args.comm_round=4", "train_args.epochs=1", "train_args.client_num_per_round=3",
                 "dp_args.progfed_dp_noise_seed=9"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["stage"] for r in rows] == [1, 2, 3, 4] and all(r["num_clients"] == 3 for r in rows)
    assert all(r["dropped_clients"] == 0 for r in rows)
    epsilons = [r["epsilon"] for r in rows]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["level"] == "record" and privacy["epsilon"] == epsilons[-1]
    assert privacy["epsilon"] == max(privacy["epsilon_per_client"].values())
    assert len(privacy["epsilon_per_client"]) >= 3 and "per client" in privacy["accountant"]


def test_a_charged_round_releases_noise_even_when_fewer_than_min_clients_answer(small_config, tmp_path):
    from fedml_progfed.runners.checkpoint import read_checkpoint

    out = tmp_path / "sparse"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", *DP, *SHORT,
                 "train_args.comm_round=6", "dp_args.progfed_dp_sampling=poisson", "dp_args.progfed_dp_client_rate=0.15",
                 "progfed_args.progfed_min_clients=2", "progfed_args.progfed_checkpoint_keep=10",
                 "dp_args.progfed_dp_noise_seed=4"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    sparse = [r["round"] for r in rows if r["num_clients"] < 2 and r["round"] > 0]
    assert sparse, "the draw gave every round two clients; pick another seed"
    for round_idx in sparse:
        before = read_checkpoint(out / "checkpoints" / f"round-{round_idx:06d}")[0]
        after = read_checkpoint(out / "checkpoints" / f"round-{round_idx + 1:06d}")[0]
        moved = [k for k in after if k.startswith("model/") and not torch.equal(after[k], before[k])]
        assert moved, f"round {round_idx}: the model did not move"


def test_record_level_clients_whose_budget_is_spent_are_not_called_again(small_config, tmp_path):
    out = tmp_path / "spent"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", *SAMPLE,
                 "train_args.comm_round=4", "train_args.epochs=1", "train_args.client_num_per_round=10",
                 "dp_args.epsilon=8", "dp_args.progfed_dp_on_budget=stop", "dp_args.progfed_dp_noise_seed=2"]) == 0
    rows = read_metrics_csv(out / "metrics.csv")
    assert rows[0]["num_clients"] == 10 and rows[-1]["num_clients"] < 10
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["stopped_clients"] and max(privacy["epsilon_per_client"].values()) <= 8
