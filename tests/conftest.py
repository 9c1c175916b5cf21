"""Shared fixtures: a tiny Fashion-MNIST-format data folder and a small quickstart-like config."""

from pathlib import Path

import pytest
import yaml

from fedml_progfed.data import write_idx_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fmnist_fixture(tmp_path_factory) -> Path:
    """600 training and 200 test images in the real idx format (gzip), learnable per class."""
    return write_idx_fixture(tmp_path_factory.mktemp("fmnist"), num_train=600, num_test=200, seed=0)


@pytest.fixture
def small_config(tmp_path, fmnist_fixture) -> Path:
    """config/quickstart.yaml shrunk to 10 clients, 5 per round, 8 rounds on the fixture data."""
    sections = yaml.safe_load((ROOT / "config" / "quickstart.yaml").read_text())
    sections["data_args"]["data_cache_dir"] = str(fmnist_fixture)
    sections["train_args"].update(client_num_in_total=10, client_num_per_round=5, comm_round=8, learning_rate=0.05, epochs=2, batch_size=32)
    sections["validation_args"]["frequency_of_the_test"] = 1
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path
