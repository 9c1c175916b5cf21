"""BraTS-format demo data through the staged 3D U-Net, and `describe` for the U-Net."""

import json

import pytest
import yaml

from fedml_progfed.cli import main
from fedml_progfed.report import read_metrics_csv

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_standalone_brats_demo_grows_the_unet_and_scores_dice(tmp_path):
    data = tmp_path / "brats"
    assert main(["make-brats-demo", "--out", str(data), "--cases", "6", "--shape", "40,40,40"]) == 0
    assert (data / "SYNTHETIC_README.txt").exists()
    sections = yaml.safe_load((ROOT / "config" / "brats_unet3d_mpi_demo.yaml").read_text())
    sections["common_args"]["training_type"] = "simulation"
    sections["data_args"].update(data_cache_dir=str(data), eval_size=[40, 40, 40])
    sections["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=4)
    sections["progfed_args"]["progfed_schedule"] = [1, 1, 1, 1]
    config = tmp_path / "brats.yaml"
    config.write_text(yaml.safe_dump(sections))
    assert main(["run", "--cf", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [r["stage"] for r in rows] == [1, 2, 3, 4]
    assert all(a["bytes_up"] < b["bytes_up"] for a, b in zip(rows, rows[1:]))
    for row in rows:
        assert 0.0 <= row["test_metric"] <= 1.0
        assert {"dice_wt", "dice_tc", "dice_et"} <= set(row)


@pytest.mark.parametrize("growth,low,high", [("symmetric", 0.25, 0.40), ("asymmetric", 0.94, 0.98)])
def test_describe_unet_full_width_paper_schedule(capsys, growth, low, high):
    assert main(["describe", "--model", "unet3d", "--input-shape", "4,32,32,32", "--num-classes", "3", "--stages", "4",
                 "--rounds", "100", "--schedule", "25,25,25,25", "--growth", growth, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["full_params"] == 9_727_035
    assert low < info["comm_ratio_vs_e2e"] < high  # a ratio: ProgFed bytes / e2e bytes
    assert info["comm_change_vs_e2e"] == pytest.approx(info["comm_ratio_vs_e2e"] - 1.0)
    assert [s["rounds"] for s in info["schedule"]] == [25, 25, 25, 25]
