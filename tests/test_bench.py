"""The benchmark's byte-count part (no timing asserted here: timings are printed by the benchmark)."""

import json

from fedml_progfed import bench


def test_wire_efficiency_of_real_uploads(tmp_path):
    assert bench.main(["--parts", "wire", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["spec"]: r for r in result["wire"]}
    assert rows["float"]["wire_efficiency"] <= 1.02  # dense float: values plus a few tags
    assert rows["lq8"]["encoded_bytes"] < 0.26 * rows["float"]["encoded_bytes"]
    assert rows["lq8+sp25"]["encoded_bytes"] < 0.07 * rows["float"]["encoded_bytes"]
    assert all(r["wire_efficiency"] >= 1.0 for r in rows.values())  # never below the information content
    assert "(d) wire efficiency" in (tmp_path / "bench.txt").read_text()


def test_protocol_bench_smoke_run_aggregates_over_seeds(tmp_path, small_config):
    assert bench.main(["--protocol", "--quick", "--cf", str(small_config), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "protocol.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["summary"]) == {"progfed", "progfed-extra-warmup", "progfed-lr-restart"}
    spread = result["summary"]["progfed"]["total_bytes_ratio"]
    ratios = [result["per_seed"][s]["progfed"]["total_bytes_ratio"] for s in ("0", "1")]
    assert spread["mean"] == sum(ratios) / 2 and spread["min"] == min(ratios) < 1.0
    assert "± " in (tmp_path / "protocol.txt").read_text()
    assert (tmp_path / "compare_metric_vs_bytes.png").stat().st_size > 0


def test_profl_bench_runs_every_method_per_seed_under_one_draw_of_budgets(tmp_path, small_config):
    import pytest
    import yaml

    sections = yaml.safe_load(small_config.read_text())
    sections["progfed_args"].update(progfed_strategy="profl", progfed_schedule=None)
    sections["profl_args"] = {"profl_em_window": 1, "profl_min_rounds_per_step": 1, "profl_max_rounds_per_step": 1}
    sections["memory_args"] = {"memory_budgets": "relative-uniform:0.3:1.1", "memory_estimator": "analytic"}
    cf = tmp_path / "profl.yaml"
    cf.write_text(yaml.safe_dump(sections))
    out = tmp_path / "bench"
    assert bench.main(["--profl", "--quick", "--cf", str(cf), "--profl-rounds", "12", "--seeds", "0,1",
                       "--out", str(out)]) == 0
    result = json.loads((out / "profl_bench.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["summary"]) == {
        "e2e", "e2e-exclusive", "allsmall", "heterofl", "depthfl", "progfed", "profl"}
    for seed in ("0", "1"):
        figures = result["per_seed"][seed]
        assert figures["e2e"]["peak_vs_full"] == 1.0 and figures["e2e"]["able_share"] == 1.0  # no budgets
        assert figures["e2e-exclusive"]["able_share"] < 1.0  # the same budgets leave some clients out
        assert figures["profl"]["peak_vs_full"] < 1.0  # no ProFL step needs the whole model
        for method in ("allsmall", "heterofl", "depthfl"):  # smaller sub-models let more clients train
            assert figures[method]["able_share"] > figures["e2e-exclusive"]["able_share"], method
        assert figures["profl"]["steps_em"] + figures["profl"]["steps_cap"] + figures["profl"]["steps_skipped"] == 9
        assert figures["e2e"]["mb_per_client_round"] == pytest.approx(
            figures["e2e"]["two_way_mb"] / figures["e2e"]["client_rounds"])
    finals = [result["per_seed"][s]["profl"]["final"] for s in ("0", "1")]
    assert result["summary"]["profl"]["final"]["mean"] == pytest.approx(sum(finals) / 2)
    assert "± " in (out / "profl_bench.txt").read_text()


def test_compression_bench_compresses_both_directions_and_reports_ratios_against_float_e2e(tmp_path, small_config):
    out = tmp_path / "bench"
    assert bench.main(["--compression", "--quick", "--cf", str(small_config), "--compression-rounds", "6",
                       "--seeds", "0", "--codecs", "lq8+sp25", "--out", str(out)]) == 0
    result = json.loads((out / "compression_bench.json").read_text())
    assert set(result["summary"]) == {"e2e-float", "progfed-float", "e2e-lq8+sp25", "progfed-lq8+sp25"}
    figures = result["per_seed"]["0"]
    assert figures["e2e-float"]["two_way_ratio"] == 1.0 and figures["e2e-float"]["final_diff"] == 0.0
    # both directions coded: well below the uplink-only share (about 0.5 of float for lq8+sp25)
    assert figures["e2e-lq8+sp25"]["two_way_ratio"] < 0.3
    assert figures["progfed-lq8+sp25"]["two_way_ratio"] < figures["progfed-float"]["two_way_ratio"]
    assert "to 98 %" in (out / "compression_bench.txt").read_text()
    assert (out / "compare_metric_vs_bytes.png").stat().st_size > 0


def test_privacy_bench_runs_progfed_and_e2e_at_the_same_epsilon(tmp_path, small_config):
    import yaml

    sections = yaml.safe_load(small_config.read_text())
    sections["dp_args"] = {"enable_dp": True, "dp_solution_type": "client", "clipping_norm": 0.5,
                           "noise_multiplier": 1.0, "delta": 1e-3, "progfed_dp_sampling": "poisson"}
    sections["progfed_args"]["progfed_aggregation_weights"] = "uniform"
    cf = tmp_path / "dp.yaml"
    cf.write_text(yaml.safe_dump(sections))
    out = tmp_path / "bench"
    assert bench.main(["--privacy", "--cf", str(cf), "--privacy-rounds", "4", "--seeds", "0", "--out", str(out)]) == 0
    result = json.loads((out / "privacy_bench.json").read_text())
    figures = result["per_seed"]["0"]
    assert figures["progfed-dp"]["epsilon"] == figures["e2e-dp"]["epsilon"] > 0
    assert figures["progfed"]["epsilon"] is None and figures["e2e"]["epsilon"] is None
    assert "epsilon" in (out / "privacy_bench.txt").read_text()
