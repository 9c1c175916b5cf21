"""Real-format data loaders and partitioners -> FedML's 8-element data set list.

Framework-free (numpy and torch only; nibabel, lazily, for BraTS). Typical use::

    from fedml_progfed.data import load_federated
    fed = load_federated("fashion_mnist", None, num_clients=100, partition_method="hetero",
                         partition_alpha=0.5, batch_size=32, seed=0)
    dataset = fed.as_list()  # hand to FedMLRunner
"""

from fedml_progfed.data.batches import TensorBatches
from fedml_progfed.data.brats import BratsCase, EvalBatches, PatchBatches, load_brats_cases, load_brats_federated
from fedml_progfed.data.brats_demo import write_brats_demo
from fedml_progfed.data.datasets import ArrayDataset, available_datasets, load_dataset, register_dataset
from fedml_progfed.data.federated import FederatedData, load_federated
from fedml_progfed.data.fixtures import write_idx_fixture
from fedml_progfed.data.partition import available_partitioners, partition, register_partitioner

__all__ = [
    "ArrayDataset",
    "BratsCase",
    "EvalBatches",
    "FederatedData",
    "PatchBatches",
    "TensorBatches",
    "available_datasets",
    "available_partitioners",
    "load_brats_cases",
    "load_brats_federated",
    "load_dataset",
    "load_federated",
    "partition",
    "register_dataset",
    "register_partitioner",
    "write_brats_demo",
    "write_idx_fixture",
]
