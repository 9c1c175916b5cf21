"""Which torch device a process trains on, from FedML's ``device_args``.

``using_gpu`` and ``gpu_id`` place every process on one GPU. For several GPUs,
FedML's ``gpu_mapping_file`` is a YAML of named layouts; the layout named by
``gpu_mapping_key`` maps hosts to process counts per GPU, and processes take
the slots in order (``fedml/device/gpu_mapping_mpi.py``, ``gpu_mapping_cross_silo.py``)::

    mapping_config1_3:      # 3 processes: rank 0 and 1 on GPU 0, rank 2 on GPU 1
      host1: [2, 1]

Rank ``r`` gets the ``r``-th slot (host1 GPU 0, host1 GPU 0, host1 GPU 1, then the
next host). Unlike FedML's cross-silo path, where a set ``gpu_id`` silently wins
over the file, a mapping file, when given, decides: every config here carries a
``gpu_id``.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import torch
import yaml

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.errors import FieldError

log = logging.getLogger("fedml_progfed")


def gpu_slots(layout: Any, key: str = "gpu_mapping_key") -> list[tuple[str, int]]:
    """Expand one layout (``{host: [processes on GPU 0, on GPU 1, ...]}``) into a slot per process, in rank order."""
    if not isinstance(layout, dict) or not layout:
        raise FieldError(key, f"the layout must map host names to lists of process counts per GPU, got {layout!r}")
    slots: list[tuple[str, int]] = []
    for host, counts in layout.items():
        if not isinstance(counts, list) or not all(isinstance(n, int) and n >= 0 for n in counts):
            raise FieldError(key, f"host {host!r}: expected a list of process counts per GPU, e.g. [2, 1], got {counts!r}")
        for gpu, count in enumerate(counts):
            slots.extend([(str(host), gpu)] * count)
    return slots


def read_gpu_mapping(path: str | Path, key: str | None) -> list[tuple[str, int]]:
    """The slots of layout ``key`` in FedML's mapping file ``path``; errors name the ``device_args`` key."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FieldError("gpu_mapping_file", f"{str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not key:
        raise FieldError("gpu_mapping_key", f"empty: name one of the layouts in {path}: {', '.join(map(str, data)) or 'none'}")
    if key not in data:
        raise FieldError("gpu_mapping_key", f"{key!r} is not a layout in {path}; it has {', '.join(map(str, data)) or 'none'}")
    return gpu_slots(data[key])


def gpu_for_rank(slots: list[tuple[str, int]], rank: int, world: int) -> tuple[str, int]:
    """The (host, GPU index) of ``rank`` among ``world`` processes.

    A multi-process run needs one slot per process (as FedML checks); a single process
    (standalone) takes the first slot of any layout, so a cross-silo config runs standalone too.
    """
    if world == 1 and slots:
        return slots[0]
    if len(slots) != world:
        raise FieldError(
            "gpu_mapping_key",
            f"the layout has {len(slots)} process slots but the run has {world} processes (server + clients); "
            f"make the counts add up to {world}",
        )
    if not 0 <= rank < world:
        raise FieldError("gpu_mapping_key", f"rank {rank} is outside the run's {world} processes")
    return slots[rank]


def resolve_device(config: RunConfig, rank: int = 0, world: int = 1) -> torch.device:
    """The device of process ``rank`` of ``world``: CPU, ``cuda:gpu_id`` or the mapping file's slot.

    Falls back to CPU with a warning when ``using_gpu`` is set but CUDA is not available.
    """
    if not config.using_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("device_args.using_gpu is true but CUDA is not available; running on CPU")
        return torch.device("cpu")
    index = config.gpu_id
    if config.gpu_mapping_file:
        host, index = gpu_for_rank(read_gpu_mapping(config.gpu_mapping_file, config.gpu_mapping_key), rank, world)
        if host != socket.gethostname():
            log.info("rank %d: gpu mapping names host %r, this is %r; using its GPU %d", rank, host, socket.gethostname(), index)
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        field = "gpu_mapping_key" if config.gpu_mapping_file else "gpu_id"
        raise FieldError(field, f"GPU {index} requested for rank {rank}, but this machine has {count} (0..{count - 1})")
    return torch.device(f"cuda:{index}")
