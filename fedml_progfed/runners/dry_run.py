"""The one dry run behind both entries: everything a run checks before training, then a summary.

``fedml-progfed run --dry-run`` checks a config on any machine: it reads no data
(the data set's files must exist; the model is built from the spec's static
shape). ``python -m fedml_progfed.main --dry-run`` checks one party of a FedML
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


@dataclass(frozen=True)
class Party:
    """The party of a FedML job a dry run checks (``--role``, ``--rank``)."""

    role: str
    rank: int


def dry_run(cf: str, sections: dict, config: RunConfig, party: Party | None = None) -> str:
    """Check ``config`` up to training and say what a run would do; trains nothing.

    Validation of the config happened when it was loaded. Then: the cross-silo rules
    and the transport (for a party of a ``cross_silo`` job), the data set's files (one
    ``data_args.data_cache_dir`` error naming the first missing file), the model, and
    the algorithm (schedule, codecs and strategy against the model).

    Parameters
    ----------
    cf
        The config file, named in the summary.
    sections, config
        The loaded config (``load_config(cf, overrides)``).
    party
        ``None``: read no data, build model and algorithm from the static shape.
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
        model, algorithm = _build_without_data(config, spec.name)
    else:
        from fedml_progfed.runners.federation import build_federation

        fed = build_federation(config, sections)
        model, algorithm = fed.server.model, fed.server.algorithm
        found += f"; read, {fed.data.num_clients} clients"
        prefix = f"config OK: role {party.role} rank {party.rank}, {config.training_type}/{config.backend} on {fed.device}; "
    summary = prefix + _summary(cf, config, model, algorithm) + f"; data {spec.name} at {where}: {found}. Nothing was trained."
    return summary if transport is None else f"{summary}\n{transport}"


def _build_without_data(config: RunConfig, dataset: str) -> tuple[StagedModel, Algorithm]:
    """The model from the data set's static shape (read only if its spec has none) and the algorithm on it."""
    from fedml_progfed.algorithms import build_algorithm
    from fedml_progfed.data import FederatedData, load_federated_data, static_shape, task_for
    from fedml_progfed.runners.federation import build_model_for_shape

    shape = static_shape(config)
    if shape is None:  # a data set registered without a static shape: only loading tells
        data = load_federated_data(config)
        shape = (tuple(data.input_shape), data.num_classes)
    input_shape, num_classes = shape
    model = build_model_for_shape(config, input_shape, num_classes)
    # A task depends on the shape alone; an empty FederatedData carries it.
    empty = FederatedData(fedml_dataset=[], input_shape=input_shape, num_classes=num_classes, name=dataset)
    algorithm = build_algorithm(config, model.num_stages, task_for(config, empty))
    algorithm.prepare_model(model)
    return model, algorithm


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
