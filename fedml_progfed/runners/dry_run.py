"""The one dry run behind both entries: everything a run checks before training, then a summary.

``fedml-progfed run --dry-run`` checks a config on any machine: it reads no data
(the data set's files must exist) and builds what a run builds before its first
round, with the run's own set-up function (:func:`~fedml_progfed.runners.federation.build_federation`:
models, algorithm, codecs, optimizer, memory plan, update checks, device) on a
stand-in for the data that has only its shape, so whatever a run refuses at
start-up the dry run refuses too (:func:`build_without_data`; ``compare`` checks each
of its runs with it before it trains the first). ``python -m fedml_progfed.main --dry-run`` checks one party of a FedML
job where it will run (e.g. a hospital's unpacked Octopus package): it also
applies the cross-silo rules, names the transport the party would use, and
builds what that party's run builds (data read, the trainer/aggregator pair, the
device), so nothing the run would build first fails later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedml_progfed.algorithms import Algorithm
    from fedml_progfed.config import RunConfig
    from fedml_progfed.core.staged_model import StagedModel
    from fedml_progfed.data import FederatedData
    from fedml_progfed.runners.federation import Federation


@dataclass(frozen=True)
class Party:
    """The party of a FedML job a dry run checks (``--role``, ``--rank``)."""

    role: str
    rank: int


def dry_run(cf: str, sections: dict, config: RunConfig, party: Party | None = None) -> str:
    """Check ``config`` up to training and say what a run would do; trains nothing.

    Validation of the config happened when it was loaded. Then: the cross-silo rules
    and the transport (for a party of a ``cross_silo`` job), the data set's files (one
    ``data_args.data_cache_dir`` error naming the first missing file), and everything a
    run builds before its first round (:func:`build_without_data`, or for a party its
    run's :func:`~fedml_progfed.runners.federation.build_federation` on the data read).

    Parameters
    ----------
    cf
        The config file, named in the summary.
    sections, config
        The loaded config (``load_config(cf, overrides)``).
    party
        ``None``: read no data, build the run on the data set's static shape.
        A party: build what its run builds (data, the pair, the device).

    Returns
    -------
    str
        A summary paragraph; for a cross-silo party, a second line with its transport.
    """
    from fedml_progfed.data import check_data, dataset_spec

    transport = None
    if party is not None and config.training_type == "cross_silo":
        from fedml_progfed.runners.cross_silo.endpoints import describe_transport
        from fedml_progfed.runners.cross_silo.rules import check_cross_silo

        check_cross_silo(config)
        transport = describe_transport(config, party.rank, cf)
    spec = dataset_spec(config.dataset)
    check_data(config)
    where = config.data_cache_dir or "the default location"
    found = "its files are all present" if spec.check is not None else "not checked up front (its spec has no check)"
    prefix = ""
    if party is None:
        fed = build_without_data(config, sections)
    else:
        from fedml_progfed.runners.federation import build_federation

        fed = build_federation(config, sections)
        found += f"; read, {fed.data.num_clients} clients"
        prefix = f"config OK: role {party.role} rank {party.rank}, {config.training_type}/{config.backend} on {fed.device}; "
    model, algorithm = fed.server.model, fed.server.algorithm
    summary = prefix + _summary(cf, config, model, algorithm) + f"; data {spec.name} at {where}: {found}. Nothing was trained."
    return summary if transport is None else f"{summary}\n{transport}"


def build_without_data(config: RunConfig, sections: dict) -> Federation:
    """What a run of ``config`` builds before its first round, reading no data; trains nothing.

    The run's own :func:`~fedml_progfed.runners.federation.build_federation` (so the two
    cannot diverge) on :func:`shape_only_data`: both models, the algorithm against the
    model (schedule, steps, strategy), the codecs of both directions, the server
    optimizer, the memory plan and budgets, the update policy and the device.

    Parameters
    ----------
    config, sections
        The loaded config (``load_config(cf, overrides)``).

    Returns
    -------
    Federation
        The built run (its data is the stand-in, without examples).

    Raises
    ------
    ProgFedError
        Whatever the run would refuse at start-up, with the same message.
    """
    from fedml_progfed.data import load_federated_data, static_shape
    from fedml_progfed.runners.federation import build_federation

    shape = static_shape(config)
    # a data set registered without a static shape: only loading tells
    data = load_federated_data(config) if shape is None else shape_only_data(config, *shape)
    return build_federation(config, sections, data)


def shape_only_data(config: RunConfig, input_shape: tuple[int, ...], num_classes: int) -> FederatedData:
    """A stand-in for ``config``'s data set with its shape and no examples (the set-up reads nothing else)."""
    from fedml_progfed.data import FederatedData, dataset_spec

    # FedML's 8-element list: no samples, no loaders, no clients; only the class count is real
    empty: list = [0, 0, [], [], {}, {}, {}, num_classes]
    return FederatedData(fedml_dataset=empty, input_shape=tuple(input_shape), num_classes=num_classes,
                         name=dataset_spec(config.dataset).name)


def _summary(cf: str, config: RunConfig, model: StagedModel, algorithm: Algorithm) -> str:
    """What the run would train: model, strategy, clients, rounds (per stage, with warm-up), local training."""
    from fedml_progfed.core.staged_model import count_parameters

    schedule = getattr(algorithm, "schedule", None)
    phases = [
        f"{phase['rounds']}" + (f" (incl. {phase['warmup']} warm-up)" if phase["warmup"] else "")
        for phase in (schedule.describe() if schedule is not None else [])
    ]
    plan = f" (stages of {' + '.join(phases)} rounds)" if phases else ""
    input_shape = tuple(model.input_shape)
    return (
        f"dry run of {cf}: model {config.model} ({count_parameters(model, model.num_stages):,} parameters, "
        f"{model.num_stages} stages; input {'x'.join(map(str, input_shape))}, {model.num_classes} classes), strategy "
        f"{config.progfed.strategy} with {config.progfed.optimizer}; {config.client_num_in_total} clients, "
        f"{config.client_num_per_round} per round, {algorithm.total_rounds} rounds{plan}, {config.epochs} local "
        f"epoch(s), batch {config.batch_size}, lr {config.learning_rate} ({config.progfed.lr_schedule})"
    )
