"""Real-format data readers, partitioners and the one dataset registry.

Framework-free (numpy and torch only; nibabel, lazily, for BraTS). A run selects a
data set by its config's ``dataset``; the registry gives the loader, the task and
the input rank::

    from fedml_progfed.data import load_federated_data, task_for
    data = load_federated_data(config)      # FederatedData; data.as_list() goes to FedMLRunner
    task = task_for(config, data)           # its loss and scores

Importing this package registers every data set (``fashion_mnist``, ``brats``).
"""

from fedml_progfed.data.arrays import ArrayDataset
from fedml_progfed.data.batches import TensorBatches
from fedml_progfed.data.federated import FederatedData, federate_arrays
from fedml_progfed.data.registry import (
    DATASETS,
    DatasetSpec,
    dataset_spec,
    load_federated_data,
    register_dataset,
    task_for,
)

# Registrations live next to their readers; importing them fills DATASETS.
from fedml_progfed.data.fashion_mnist import read_fashion_mnist  # noqa: E402  (registers fashion_mnist)
from fedml_progfed.data.brats import (  # noqa: E402  (registers brats)
    BratsCase,
    EvalBatches,
    PatchBatches,
    load_brats_cases,
    load_brats_federated,
)
from fedml_progfed.data.brats_demo import write_brats_demo
from fedml_progfed.data.fixtures import write_idx_fixture
from fedml_progfed.data.partition import PARTITIONERS, available_partitioners, partition, register_partitioner

__all__ = [
    "ArrayDataset",
    "BratsCase",
    "DATASETS",
    "DatasetSpec",
    "EvalBatches",
    "FederatedData",
    "PARTITIONERS",
    "PatchBatches",
    "TensorBatches",
    "available_partitioners",
    "dataset_spec",
    "federate_arrays",
    "load_brats_cases",
    "load_brats_federated",
    "load_federated_data",
    "partition",
    "read_fashion_mnist",
    "register_dataset",
    "register_partitioner",
    "task_for",
    "write_brats_demo",
    "write_idx_fixture",
]
