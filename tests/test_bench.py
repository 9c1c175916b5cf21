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
