"""Seeded client dropout through the standalone loop: the silent silos are the ones the seed picks,
and a silent silo changes nothing but its own row entries."""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.comm.messages import METRICS_KEY
from fedml_progfed.config import load_config
from fedml_progfed.engine.dropout import silent_clients
from fedml_progfed.report import read_metrics_csv
from fedml_progfed.report.metrics import is_missing, write_metrics_csv
from fedml_progfed.runners import standalone
from fedml_progfed.runners.federation import build_federation

ROUNDS, PER_ROUND, TOTAL, P, MIN = 4, 5, 10, 0.5, 3
TIMINGS = {"wall_s", "server_s", "client_compute_s"}
pytestmark = pytest.mark.slow


def _federation(small_config, dropout: float):
    sections, config = load_config(small_config, [
        f"train_args.comm_round={ROUNDS}", "train_args.epochs=1", "progfed_args.progfed_strategy=e2e",
        "progfed_args.progfed_schedule=null", f"progfed_args.progfed_client_dropout={dropout}",
        f"progfed_args.progfed_min_clients={MIN}",
    ])
    return build_federation(config, sections)


def _run(fed) -> tuple[list[dict], list[dict[str, torch.Tensor]], dict[tuple[int, int], dict]]:
    """Rows, the global model after every round (the initial one first) and every upload by (round, client)."""
    models = [{k: v.clone() for k, v in fed.server.model.state_dict().items()}]
    uploads = {}
    get = fed.trainer.get_model_params

    def recorded():
        wire = get()
        uploads[(fed.server.state.round, fed.trainer.client.client)] = wire
        return wire

    fed.trainer.get_model_params = recorded
    rows = standalone.run_rounds(fed, lambda row: models.append(
        {k: v.clone() for k, v in fed.server.model.state_dict().items()}))
    return rows, models, uploads


def _expected_silent(seed: int) -> list[list[int]]:
    return [silent_clients(seed, r, standalone.sample_clients(r, TOTAL, PER_ROUND), P) for r in range(ROUNDS)]


def _ids(cell) -> list[int]:
    return [] if is_missing(cell) else [int(c) for c in str(cell).split()]


def _untimed(row: dict) -> dict:
    """A row without its timings, NaN cells as None (NaN != NaN would fail any comparison)."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items() if k not in TIMINGS}


def _same_model(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_silent_silos_are_the_seeds_and_too_few_valid_skip_the_round(small_config, tmp_path):
    fed = _federation(small_config, P)
    rows, models, uploads = _run(fed)
    expected = _expected_silent(fed.config.random_seed)
    valid = [PER_ROUND - len(s) for s in expected]
    # the seed of the fixture gives rounds of both kinds: the test would be vacuous otherwise
    assert any(0 < len(s) and v >= MIN for s, v in zip(expected, valid)) and any(v < MIN for v in valid)
    write_metrics_csv(tmp_path / "metrics.csv", rows)
    on_disk = read_metrics_csv(tmp_path / "metrics.csv")
    assert [_ids(r["silent_clients"]) for r in on_disk] == expected
    assert [r["silent_clients"] for r in rows] == [" ".join(map(str, s)) for s in expected]
    for r, (row, silent, count) in enumerate(zip(rows, expected, valid)):
        assert row["dropped_clients"] == 0
        called = standalone.sample_clients(r, TOTAL, PER_ROUND)
        kinds = {c: uploads[(r, c)] for c in called}
        assert sorted(c for c, w in kinds.items() if METRICS_KEY not in w) == silent  # silent answers carry no metrics
        if count >= MIN:
            assert row["num_clients"] == count and not _same_model(models[r], models[r + 1])
        else:  # skipped: the global model kept
            assert row["num_clients"] == 0 and row["client_flops"] == 0 and _same_model(models[r], models[r + 1])
    per_client = fed.server.state.ledger.per_client()
    assert sorted((c["round"], c["client"]) for c in per_client if c.get("silent")) == sorted(
        (r, c) for r, s in enumerate(expected) for c in s)
    assert all(c["bytes_up"] == 0 and c["bytes_down"] > 0 for c in per_client if c.get("silent"))


def test_same_seed_same_model_and_silent_silos_weigh_as_much_as_unsampled_ones(small_config, monkeypatch):
    fed = _federation(small_config, P)
    first, models_a, uploads_a = _run(fed)
    second, models_b, _ = _run(_federation(small_config, P))
    assert all(_same_model(a, b) for a, b in zip(models_a, models_b))
    assert [_untimed(r) for r in first] == [_untimed(r) for r in second]

    # the same run without dropout, where the silent silos are simply not called
    expected = _expected_silent(fed.config.random_seed)
    sampled = standalone.called_clients
    monkeypatch.setattr(standalone, "called_clients", lambda fed, r: [c for c in sampled(fed, r) if c not in expected[r]])
    rows_c, models_c, uploads_c = _run(_federation(small_config, 0.0))
    assert all(_same_model(a, c) for a, c in zip(models_a, models_c))
    for a, c in zip(first, rows_c):
        assert (a["num_clients"], a["bytes_up"], a["client_flops"], a["test_metric"]) == (
            c["num_clients"], c["bytes_up"], c["client_flops"], c["test_metric"])
    # a silent silo was sent its round, and nothing else changes what the others were sent
    silent_down = [sum(c["bytes_down"] for c in fed.server.state.ledger.per_client() if c["round"] == r and c.get("silent"))
                   for r in range(ROUNDS)]
    assert [a["bytes_down"] for a in first] == [c["bytes_down"] + d for c, d in zip(rows_c, silent_down)]
    assert all(d > 0 for d, s in zip(silent_down, expected) if s)
    # and every update that was sent is the same, bit for bit (the metrics hold a timing)
    for key, wire in uploads_c.items():
        other = uploads_a[key]
        assert all(torch.equal(wire[n], other[n]) for n in wire if n != METRICS_KEY), key


def test_mpirun_silences_the_same_silos_as_the_standalone_loop(small_config, tmp_path):
    """Under FedML's cross-silo runtime the decision is taken in the same engine call: same silos, same model."""
    from test_mpi_cross_silo import run_both, write_config

    config = write_config(small_config, tmp_path, progfed_args={"progfed_client_dropout": P})
    rows = run_both(config, tmp_path)  # models within 1e-5 and the byte, FLOP and client counts equal
    standalone_rows = read_metrics_csv(tmp_path / "standalone" / "metrics.csv")
    seed = load_config(config)[1].random_seed
    expected = [silent_clients(seed, r, [0, 1], P) for r in range(len(rows))]
    assert any(len(s) == 1 for s in expected) and any(len(s) == 2 for s in expected) and [] in expected
    assert [_ids(r["silent_clients"]) for r in rows] == [_ids(r["silent_clients"]) for r in standalone_rows] == expected
    assert [r["num_clients"] for r in rows] == [2 - len(s) for s in expected]


def test_the_run_folder_names_the_silent_silos_and_counts_only_those_that_trained(small_config, tmp_path):
    import json

    from fedml_progfed.cli import main

    out = tmp_path / "run"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=3",
                 "train_args.epochs=1", "progfed_args.progfed_schedule=[1,1,1]", "progfed_args.progfed_stages=3",
                 f"progfed_args.progfed_client_dropout={P}"]) == 0
    expected = [silent_clients(0, r, standalone.sample_clients(r, TOTAL, PER_ROUND), P) for r in range(3)]
    rows = read_metrics_csv(out / "metrics.csv")
    assert [_ids(r["silent_clients"]) for r in rows] == expected
    trained = {c for r in range(3) for c in standalone.sample_clients(r, TOTAL, PER_ROUND) if c not in expected[r]}
    assert json.loads((out / "summary.json").read_text())["clients_trained"] == len(trained)
