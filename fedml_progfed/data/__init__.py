"""Real-format data readers, partitioners and the one dataset registry.

Framework-free (numpy and torch only; nibabel, lazily, for BraTS). A run selects a
data set by its config's ``dataset``; the registry gives the loader, the task and
the input rank::

    from fedml_progfed.data import load_federated_data, task_for
    data = load_federated_data(config)      # FederatedData; data.as_list() goes to FedMLRunner
    task = task_for(config, data)           # its loss and scores

Importing this package registers every data set (``fashion_mnist``, ``brats``,
``cifar10``, ``cifar100``, ``fed_emnist``, ``fed_cifar100``). ``static_shape(config)``
and ``check_data(config)`` answer the input shape and the missing files without
reading data. Every reader applies one rule to what it reads (:mod:`.checks`): labels
are integers in ``[0, num_classes)`` and inputs are finite.
"""

from fedml_progfed.data.arrays import ArrayDataset
from fedml_progfed.data.batches import TensorBatches
from fedml_progfed.data.federated import FederatedData, federate_arrays
from fedml_progfed.data.registry import (
    DATASETS,
    DatasetSpec,
    check_data,
    dataset_spec,
    load_federated_data,
    register_dataset,
    static_shape,
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
from fedml_progfed.data.cifar import read_cifar  # noqa: E402  (registers cifar10, cifar100)
from fedml_progfed.data.tff_h5 import load_tff_federated  # noqa: E402  (registers fed_emnist, fed_cifar100)
from fedml_progfed.data.brats_demo import write_brats_demo
from fedml_progfed.data.fixtures import write_cifar_fixture, write_idx_fixture, write_tff_fixture
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
    "check_data",
    "dataset_spec",
    "federate_arrays",
    "load_brats_cases",
    "load_brats_federated",
    "load_federated_data",
    "load_tff_federated",
    "partition",
    "read_cifar",
    "read_fashion_mnist",
    "register_dataset",
    "register_partitioner",
    "static_shape",
    "task_for",
    "write_brats_demo",
    "write_cifar_fixture",
    "write_idx_fixture",
    "write_tff_fixture",
]
