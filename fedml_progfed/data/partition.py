"""Split a training set over clients: a registry of partitioners.

A partitioner is ``fn(labels, num_clients, seed, alpha) -> list of index arrays``,
one ``int64`` array per client; together the arrays hold every sample index
exactly once. Results depend only on the arguments (``numpy.random.default_rng(seed)``),
so every process of an MPI run computes the same split.

Registered: ``iid`` (FedML: ``homo``), ``dirichlet`` (FedML: ``hetero``),
the label-skew split of Hsu et al. 2019 that FedML and the ProgFed paper use
for non-IID experiments, and ``shards``, the pathological non-IID split of
McMahan et al. 2017 (Sec. 3) that ProFL's authors use (``cifar_noniid``: two
label-sorted shards per client; ProFL spec Sec. 0).

Why not FedML's own ``non_iid_partition_with_dirichlet_distribution``
(``fedml/core/data/noniid_partition.py``, FedML 0.9.6)? Its rule is ours: per class
a shuffle and a ``Dir(alpha)`` draw, no more samples for a client already holding
``N / M``, the whole draw repeated until every client has 10 samples; driven by the
same random stream it deals every client the same samples (a test shows it). It does
not give the same split for the same seed, and we keep ours because:

* it takes no seed: it draws from numpy's legacy *global* ``RandomState``, so its
  split depends on every earlier use of that state (``fedml.init`` seeds it, FedML's
  client sampling re-seeds it with the round number, our code and libraries draw from
  it). Reproducing a split would mean seeding global state right before the call in
  every process; ours is a pure function of ``(labels, num_clients, seed, alpha)``;
* it retries forever when no split can satisfy the 10-sample minimum (e.g. more
  clients than ``N / 10``) and divides by zero when every client with remaining mass
  is full; ours checks the minimum up front and stops after
  :data:`MAX_DIRICHLET_DRAWS` draws with an error naming the field;
* it assumes classes ``0..K-1`` and returns shuffled lists of Python ints; ours takes
  any labels and returns sorted ``int64`` arrays (cache-friendly gathers).

FedML's own CIFAR loaders do not call it either: they inline the same rule, and the
CIFAR-10 one hard-codes ``np.random.seed(10)``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from fedml_progfed.core.registry import Registry, UnknownNameError
from fedml_progfed.errors import FieldError

#: Fewest samples a client may get from :func:`dirichlet_partition` (as in FedML).
MIN_CLIENT_SAMPLES = 10
#: Dirichlet draws tried before declaring the requested split impossible.
MAX_DIRICHLET_DRAWS = 1000
#: Label shards per client of :func:`shards_partition` (McMahan et al. 2017; ProFL's ``cifar_noniid``).
SHARDS_PER_CLIENT = 2


class Partitioner(Protocol):
    """Signature every registered partitioner has."""

    def __call__(self, labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> list[np.ndarray]: ...


#: Every accepted ``partition_method``, aliases included (FedML's ``homo``/``hetero``), case-insensitive.
PARTITIONERS: Registry[Partitioner] = Registry("partitioner", normalize=lambda name: str(name).strip().lower())


def register_partitioner(name: str, *aliases: str) -> Callable[[Partitioner], Partitioner]:
    """Decorator registering a partitioner under ``name`` and optional aliases.

    Raises
    ------
    ValueError
        If a name is already taken (a programming error, caught at import); then
        none of the names is registered.
    """

    def decorate(fn: Partitioner) -> Partitioner:
        taken = [key for key in (name, *aliases) if key in PARTITIONERS]
        if taken:
            raise ValueError(f"partitioner {taken[0]!r} is registered twice")
        for key in (name, *aliases):
            PARTITIONERS.add(key, fn)
        return fn

    return decorate


def available_partitioners() -> list[str]:
    """Every accepted value of ``partition_method``, aliases included."""
    return PARTITIONERS.names()


def get_partitioner(name: str) -> Partitioner:
    """Look up a partitioner by name.

    Raises
    ------
    FieldError
        ``partition_method``: ``name`` is not registered; the message lists the options.
    """
    try:
        return PARTITIONERS[name]
    except UnknownNameError as exc:
        raise FieldError("partition_method", f"unknown {name!r}; use one of {', '.join(exc.available)}") from None


def partition(method: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> list[np.ndarray]:
    """Split sample indices over ``num_clients`` clients with a registered method.

    Parameters
    ----------
    method
        A name from :func:`available_partitioners` (the ``partition_method`` field).
    labels
        Integer class label of every sample, shape (N,).
    num_clients
        ``client_num_in_total``, at least 1 (the config validates it).
    seed
        Seed of the split; the same arguments give the same split.
    alpha
        Dirichlet concentration (``partition_alpha``); ignored by ``iid`` and ``shards``.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted ``int64`` index arrays covering ``range(N)`` exactly once.
    """
    return get_partitioner(method)(labels, num_clients, seed, alpha)


def _check_clients(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    # num_clients >= 1 is a config rule (RunConfig.validate); only the data-dependent bound is checked here.
    if num_clients > labels.shape[0]:
        raise FieldError(
            "client_num_in_total",
            f"{num_clients} clients but only {labels.shape[0]} samples; use at most one client per sample",
        )
    return labels


@register_partitioner("iid", "homo")
def iid_partition(labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.0) -> list[np.ndarray]:
    """Shuffle all indices and cut them into ``num_clients`` near-equal parts.

    Client sizes differ by at most one. ``alpha`` is accepted for a uniform
    signature and ignored.
    """
    labels = _check_clients(labels, num_clients)
    order = np.random.default_rng(seed).permutation(labels.shape[0])
    # Sorted within a client: gathers stay cache-friendly; the loader shuffles anyway.
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


@register_partitioner("dirichlet", "hetero")
def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float,
    *,
    min_size: int = MIN_CLIENT_SAMPLES,
) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by Dirichlet(alpha) proportions.

    For every class ``k`` draw ``p ~ Dir(alpha * 1_M)`` over the ``M`` clients and
    deal that class's (shuffled) samples out in proportions ``p``. As in FedML's
    ``hetero`` split (after Hsu et al., 2019, "Measuring the effects of
    non-identical data distribution"), a client already holding its fair share
    ``N / M`` receives no more, which keeps sizes from running away. The whole
    draw is repeated until every client holds at least ``min_size`` samples.
    Small ``alpha`` (e.g. 0.1) gives strongly skewed label histograms; large
    ``alpha`` approaches IID.

    Raises
    ------
    FieldError
        ``partition_alpha``: ``alpha <= 0``, or no valid split found in
        :data:`MAX_DIRICHLET_DRAWS` draws; ``client_num_in_total``: too many
        clients for ``min_size`` samples each.
    """
    labels = _check_clients(labels, num_clients)
    if not np.isfinite(alpha) or alpha <= 0:
        raise FieldError("partition_alpha", f"{alpha!r} is not allowed for the Dirichlet (hetero) split; use a number > 0")
    n = labels.shape[0]
    if num_clients * min_size > n:
        raise FieldError(
            "client_num_in_total",
            f"{num_clients} clients x {min_size} samples each exceeds the {n} training samples of the "
            "Dirichlet (hetero) split; use fewer clients or partition_method iid",
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    fair_share = n / num_clients
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx_k in class_indices:
            idx_k = rng.permutation(idx_k)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = p * (sizes < fair_share)
            if p.sum() <= 0:
                # Tiny alpha can put all mass on full clients; spread over the rest instead.
                p = (sizes < fair_share).astype(np.float64)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx_k, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise FieldError(
        "partition_alpha",
        f"no Dirichlet split with alpha={alpha} gives each of {num_clients} clients at least {min_size} of "
        f"{n} samples after {MAX_DIRICHLET_DRAWS} draws; raise partition_alpha or lower client_num_in_total",
    )


@register_partitioner("shards")
def shards_partition(
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float = 0.0,
    *,
    shards_per_client: int = SHARDS_PER_CLIENT,
) -> list[np.ndarray]:
    """Pathological non-IID split: sort by label, cut into shards, deal each client ``shards_per_client``.

    McMahan et al. 2017 (Sec. 3, "pathological non-IID") and the ProFL authors'
    ``cifar_noniid`` (ProFL spec Sec. 0): the samples sorted by label are cut into
    ``num_clients * shards_per_client`` contiguous shards and every client gets
    ``shards_per_client`` of them at random, without replacement. Unlike the
    authors' code (fixed 200 shards of 250, drawn from numpy's global RNG), shard
    sizes follow the data (they differ by at most one, so every sample is dealt
    exactly once) and the split is a function of ``seed`` alone.

    A client holds at most ``shards_per_client`` labels when every label's count is
    a multiple of the shard size (e.g. 10 balanced classes, 100 clients, 2 shards),
    and fewer when it draws two shards of one label, as in the original; otherwise
    a shard can straddle two labels. ``alpha`` is accepted for a uniform signature
    and ignored.

    Parameters
    ----------
    labels
        Integer class label of every sample, shape (N,).
    num_clients
        ``client_num_in_total``.
    seed
        Seed of the order within each label and of the deal.
    alpha
        Ignored.
    shards_per_client
        Shards each client receives (2 in both sources).

    Raises
    ------
    FieldError
        ``client_num_in_total``: fewer samples than shards.
    ValueError
        ``shards_per_client`` < 1 (a programming error: no configuration key sets it).
    """
    if not isinstance(shards_per_client, int) or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive int, got {shards_per_client!r}")
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    # Checked before _check_clients so the message counts shards, not clients.
    if labels.ndim == 1 and num_shards > labels.shape[0]:
        raise FieldError(
            "client_num_in_total",
            f"{num_clients} clients x {shards_per_client} label shards each need at least {num_shards} samples, "
            f"but there are only {labels.shape[0]}; use fewer clients or partition_method iid",
        )
    labels = _check_clients(labels, num_clients)
    rng = np.random.default_rng(seed)
    # Shuffle, then sort stably by label: which samples of a label share a shard is seeded too.
    order = rng.permutation(labels.shape[0])
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in deal]
