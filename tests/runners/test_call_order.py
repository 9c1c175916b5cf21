"""The standalone loop calls the pair in exactly FedML's cross-silo order.

The expected order is read from the installed FedML's own cross-silo source, so
the test fails if either FedML or our loop changes the order.
"""

import inspect
import re

import pytest
from fedml.cross_silo.client.fedml_trainer import FedMLTrainer
from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

from fedml_progfed.config import load_config
from fedml_progfed.data import load_federated_data
from fedml_progfed.fedml_plugin.aggregator import ProgFedServerAggregator
from fedml_progfed.fedml_plugin.trainer import ProgFedClientTrainer
from fedml_progfed.runners import federation as standalone
from fedml_progfed.runners.federation import Federation
from fedml_progfed.runners.standalone import (
    CLIENT_CALL_ORDER,
    SERVER_CALL_ORDER,
    SERVER_TEST_ORDER,

    run_rounds,
    sample_clients,
)


def _calls(source: str, receiver: str) -> list[str]:
    seen: list[str] = []
    for name in re.findall(rf"{receiver}\.(\w+)\(", source):
        name = {"set_global_model_params": "set_model_params"}.get(name, name)
        if name not in seen and "enc_" not in name:
            seen.append(name)
    return seen


def test_constants_match_fedml_cross_silo_source():
    client = _calls(inspect.getsource(FedMLTrainer.update_model), r"self\.trainer") + _calls(
        inspect.getsource(FedMLTrainer.train), r"self\.trainer"
    )
    assert tuple(client) == CLIENT_CALL_ORDER
    server = _calls(inspect.getsource(FedMLAggregator.aggregate), r"self(?:\.aggregator)?")
    server = [c for c in server if c in {"on_before_aggregation", "aggregate", "on_after_aggregation", "set_model_params"}]
    assert tuple(server) == SERVER_CALL_ORDER
    tests = _calls(inspect.getsource(FedMLAggregator.test_on_server_for_all_clients), r"self\.aggregator")
    assert tuple(tests) == SERVER_TEST_ORDER


def test_sampling_matches_fedml_cross_silo():
    """FedML draws round r's clients with seed r-1 (seed 0 for rounds 0 and 1), without replacement."""
    import numpy as np

    class Probe(FedMLAggregator):
        def __init__(self):  # only data_silo_selection is exercised
            pass

    probe = Probe()
    seeds = [0] + list(range(0, 9))  # the seed FedML uses for rounds 0..9
    for round_idx, seed in enumerate(seeds):
        expected = [int(i) for i in probe.data_silo_selection(seed, 100, 10)]
        assert sample_clients(round_idx, 100, 10) == expected
        assert len(set(expected)) == 10
    assert sample_clients(5, 10, 10) == list(range(10))


class RecordingTrainer(ProgFedClientTrainer):
    log: list


class RecordingAggregator(ProgFedServerAggregator):
    log: list


def _record(cls, names):
    for name in names:
        def method(self, *args, _name=name, **kwargs):
            self.log.append(_name)
            return getattr(super(cls, self), _name)(*args, **kwargs)
        setattr(cls, name, method)


_record(RecordingTrainer, CLIENT_CALL_ORDER)
_record(RecordingAggregator, SERVER_CALL_ORDER + SERVER_TEST_ORDER + ("get_model_params",))


def test_standalone_loop_calls_in_cross_silo_order(small_config):
    sections, config = load_config(small_config, ["train_args.comm_round=4", "validation_args.frequency_of_the_test=2", "progfed_args.progfed_schedule=[1,1,1,1]"])
    data = load_federated_data(config)
    log: list[str] = []
    RecordingTrainer.log = RecordingAggregator.log = log
    fed = Federation(
        config, data,
        RecordingTrainer(standalone.build_model_for(config, data), object(), config),
        RecordingAggregator(standalone.build_model_for(config, data), object(), config, test_data=data.test_global),
        standalone.resolve_device(config), sections,
    )
    rows = run_rounds(fed)
    assert [r["round"] for r in rows if r["test_metric"] == r["test_metric"]] == [0, 2, 3]  # the server's choice
    expected = ["get_model_params"]
    for round_idx in range(4):
        expected += list(CLIENT_CALL_ORDER) * config.client_num_per_round + list(SERVER_CALL_ORDER)
        expected += list(SERVER_TEST_ORDER)  # every round, as FedML does with frequency 1
    assert log == expected
