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
