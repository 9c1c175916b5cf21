"""Short end-to-end runs on a small Fashion-MNIST-format fixture through the real CLI."""

import json

import pytest

from fedml_progfed.cli import main
from fedml_progfed.comm.messages import nbytes
from fedml_progfed.config import load_config
from fedml_progfed.runners.federation import build_federation
from fedml_progfed.runners.standalone import run_rounds
from fedml_progfed.report import METRIC_COLUMNS, read_metrics_csv

pytestmark = pytest.mark.slow


def _run(config, out, *overrides):
    assert main(["run", "--cf", str(config), "--out", str(out), "--quiet", "--set", *overrides]) == 0
    return read_metrics_csv(out / "metrics.csv")


def test_run_writes_results_folder_and_grows_through_all_stages(small_config, tmp_path):
    rows = _run(small_config, tmp_path / "run", "train_args.comm_round=8")
    for name in ("config.yaml", "metrics.csv", "summary.json", "metric_vs_rounds.png", "metric_vs_bytes.png", "metric_vs_flops.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert list(rows[0])[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    assert [r["round"] for r in rows] == list(range(8))
    assert [r["stage"] for r in rows] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert all(a["active_params"] < b["active_params"] for a, b in zip(rows[:3], rows[1:4]))
    running = 0
    for row in rows:
        running += row["bytes_down"] + row["bytes_up"]
        assert row["cum_bytes"] == running and row["client_flops"] > 0
    # 5 clients each way, every tensor of the active sub-model (4 bytes a value) plus a few tags
    assert rows[-1]["bytes_up"] >= 5 * 4 * rows[-1]["active_params"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total_bytes"] == rows[-1]["cum_bytes"]
    assert summary["final_metric"] > 0.3  # well above chance (0.1) on the learnable fixture


def test_same_seed_same_numbers(small_config, tmp_path):
    a = _run(small_config, tmp_path / "a", "train_args.comm_round=4", "progfed_args.progfed_schedule=[1,1,1,1]", "progfed_args.progfed_optimizer=fedadam",
             "progfed_args.progfed_server_lr=0.01")
    b = _run(small_config, tmp_path / "b", "train_args.comm_round=4", "progfed_args.progfed_schedule=[1,1,1,1]", "progfed_args.progfed_optimizer=fedadam",
             "progfed_args.progfed_server_lr=0.01")
    timings = {"wall_s", "server_s", "client_compute_s"}
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in timings} == pytest.approx(
            {k: v for k, v in rb.items() if k not in timings}, nan_ok=True
        )


def test_compare_prints_table_and_progfed_sends_less(small_config, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=8"]) == 0
    printed = capsys.readouterr().out
    assert "e2e" in printed and "progfed" in printed and "99.95 %" in printed
    result = json.loads((out / "comparison.json").read_text())
    runs = {(r["method"], r["variant"]): r for r in result["runs"]}
    prog, e2e = runs[("progfed", "float")], runs[("e2e", "float")]
    assert prog["total_bytes_up"] < e2e["total_bytes_up"] and prog["total_bytes_down"] < e2e["total_bytes_down"]
    assert prog["total_flops"] < e2e["total_flops"]
    assert result["baseline"] == "e2e-float"
    assert [t["fraction"] for t in result["cost_to_target"]["progfed-float"]] == [0.5, 0.8, 0.9, 0.98, 0.99, 0.9995, 1.0]
    prog_rows = read_metrics_csv(out / "progfed-float" / "metrics.csv")
    e2e_rows = read_metrics_csv(out / "e2e-float" / "metrics.csv")
    assert [r["num_clients"] for r in prog_rows] == [r["num_clients"] for r in e2e_rows]
    assert {r["stage"] for r in e2e_rows} == {4}


def test_ledger_bytes_equal_the_messages_that_left_each_end(small_config):
    """Measured at the FedML boundary, independently of the ledger: every upload and broadcast's tensor bytes."""
    sections, config = load_config(small_config, ["progfed_args.progfed_compression_up=lq8+sp25", "train_args.comm_round=6"])
    fed = build_federation(config, sections)
    sent_up, sent_down = [], []
    upload, aggregate = fed.trainer.get_model_params, fed.aggregator.aggregate
    fed.trainer.get_model_params = lambda: sent_up.append(upload()) or sent_up[-1]
    first = fed.aggregator.get_model_params()
    fed.aggregator.aggregate = lambda updates: sent_down.append(aggregate(updates)) or sent_down[-1]
    rows = run_rounds(fed)
    per_client = fed.server.state.ledger.per_client()
    assert [c["bytes_up"] for c in per_client] == [nbytes(m) for m in sent_up]
    broadcasts = [first, *sent_down[:-1]]
    assert [r["bytes_down"] for r in rows] == [r["num_clients"] * nbytes(b) for r, b in zip(rows, broadcasts)]
    assert rows[-1]["cum_bytes"] == sum(nbytes(m) for m in sent_up) + sum(r["bytes_down"] for r in rows)


def test_totals_repeat_exactly_and_match_the_csv(small_config, tmp_path):
    totals = []
    for name in ("x", "y"):
        rows = _run(small_config, tmp_path / name, "progfed_args.progfed_compression_up=lq8+sp25")
        ledger = json.loads((tmp_path / name / "ledger.json").read_text())
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert ledger["totals"]["total_bytes"] == rows[-1]["cum_bytes"] == summary["total_bytes"]
        assert [m["key"] for m in summary["memory"]] == ["stage 1", "stage 2", "stage 3", "stage 4"]
        t = ledger["totals"]
        totals.append({k: t[k] for k in ("total_bytes_up", "total_bytes_down", "total_flops", "client_messages")})
    assert totals[0] == totals[1]


def test_compare_puts_every_memory_method_in_one_table_under_the_same_budgets(small_config, tmp_path, capsys):
    out = tmp_path / "memory"
    methods = "e2e,e2e-exclusive,allsmall,heterofl,depthfl,progfed"
    assert main(["compare", "--cf", str(small_config), "--out", str(out), "--quiet", "--methods", methods, "--set",
                 "train_args.comm_round=4", "memory_args.memory_budgets=relative-uniform:0.3:1.1",
                 "progfed_args.progfed_schedule=[1,1,1,1]"]) == 0
    printed = capsys.readouterr().out
    assert "client-rnds" in printed and "MB/client-rnd" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["baseline"] == "e2e-exclusive-float"  # costs are compared with ExclusiveFL when it runs
    runs = {r["method"]: r for r in result["runs"]}
    assert list(runs) == methods.split(",")
    assert runs["e2e"]["eligible_share_min"] == 1.0 and 0 < runs["e2e-exclusive"]["eligible_share_min"] < 1.0
    assert runs["e2e-exclusive"]["clients_trained"] > 0
    for method in ("allsmall", "heterofl", "depthfl"):
        assert runs[method]["eligible_share_min"] > runs["e2e-exclusive"]["eligible_share_min"], method
    hetero = read_metrics_csv(out / "heterofl-float" / "metrics.csv")
    assert "test_metric_w0.5" in hetero[0] and "test_metric_ensemble" in read_metrics_csv(out / "depthfl-float" / "metrics.csv")[0]
    for method in ("allsmall", "heterofl", "depthfl"):
        assert (out / f"{method}-float" / "model.safetensors").stat().st_size > 0


def test_e2e_exclusive_without_budgets_is_one_error(small_config, tmp_path, capsys):
    assert main(["compare", "--cf", str(small_config), "--out", str(tmp_path / "x"), "--quiet",
                 "--methods", "e2e-exclusive,progfed"]) != 0
    assert "e2e-exclusive trains end to end under the memory budgets, and the config sets none" in capsys.readouterr().err
