"""`fedml build` produces Octopus server and client packages; the client entry starts and parses its config."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedml_progfed.data import write_brats_demo

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_build_unpack_and_start_client(tmp_path):
    dest = tmp_path / "dist"
    built = subprocess.run(
        ["bash", str(ROOT / "run_scripts" / "build_octopus_packages.sh"), str(dest)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    packages = dest / "dist-packages"
    for role in ("server", "client"):
        with zipfile.ZipFile(packages / f"{role}-package.zip") as archive:
            names = set(archive.namelist())
        assert f"{role}-package/fedml/main.py" in names
        assert f"{role}-package/fedml/config/fedml_config.yaml" in names
        assert f"{role}-package/conf/fedml.yaml" in names
        assert f"{role}-package/fedml/fedml_progfed/fedml_plugin/aggregator.py" in names

    started = dry_run_unpacked_client(packages / "client-package.zip", tmp_path, rank=1)
    assert "config OK: role client rank 1" in started.stdout
    assert "model unet3d" in started.stdout and "cross_silo/MQTT_S3" in started.stdout
    assert "transport MQTT_S3: MQTT broker and S3 bucket from FedML's platform" in started.stdout


def dry_run_unpacked_client(package_zip: Path, tmp_path: Path, rank: int) -> subprocess.CompletedProcess:
    """Unpack a client package and dry-run it as a hospital would, on tiny BraTS-format data."""
    with zipfile.ZipFile(package_zip) as archive:
        archive.extractall(tmp_path / "unpacked")
    data = tmp_path / "brats"
    write_brats_demo(data, cases=4, shape=(32, 32, 32))
    started = subprocess.run(
        [sys.executable, "main.py", "--cf", "config/fedml_config.yaml", "--rank", str(rank), "--role", "client",
         "--dry-run", "--set", f"data_args.data_cache_dir={data}", "data_args.patch_size=[32,32,32]",
         "model_args.base_width=4", "train_args.client_num_in_total=2", "train_args.client_num_per_round=2"],
        cwd=tmp_path / "unpacked" / "client-package" / "fedml", capture_output=True, text=True, timeout=300,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    return started


def test_grpc_packages_carry_the_ip_config_and_the_dry_run_names_the_endpoints(tmp_path):
    ipconfig = tmp_path / "hospitals.csv"
    ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n0,0,10.0.0.1,8890\n1,1,10.0.0.2,8891\n2,2,10.0.0.3,8892\n")
    dest = tmp_path / "dist"
    missing = subprocess.run(["bash", str(ROOT / "run_scripts" / "build_octopus_packages.sh"), str(dest), "--backend", "GRPC"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--backend GRPC needs --ipconfig" in missing.stderr
    built = subprocess.run(
        ["bash", str(ROOT / "run_scripts" / "build_octopus_packages.sh"), str(dest), "--backend", "GRPC", "--ipconfig", str(ipconfig)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(dest / "dist-packages" / "client-package.zip") as archive:
        assert "client-package/fedml/config/grpc_ipconfig.csv" in archive.namelist()
    started = dry_run_unpacked_client(dest / "dist-packages" / "client-package.zip", tmp_path, rank=2)
    assert "cross_silo/GRPC" in started.stdout
    assert "transport GRPC: rank 2 listens on 10.0.0.3:8892, peers 0=10.0.0.1:8890, 1=10.0.0.2:8891" in started.stdout
