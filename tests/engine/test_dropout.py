"""Seeded client dropout: a pure decision per (seed, round, client), and a client that stays silent trains nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedml_progfed.comm.messages import METRICS_KEY, Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.engine.dropout import silent_clients, stays_silent
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import broadcast

CPU = torch.device("cpu")
CONFIG = RunConfig().replace(comm_round=4, client_num_in_total=8, client_num_per_round=8, progfed={"stages": 4})


def test_the_decision_is_deterministic_and_p_zero_silences_nobody():
    draws = [(seed, r, c) for seed in (0, 1, 2**62) for r in range(20) for c in range(20)]
    first = [stays_silent(s, r, c, 0.4) for s, r, c in draws]
    assert first == [stays_silent(s, r, c, 0.4) for s, r, c in draws]
    assert not any(stays_silent(s, r, c, 0.0) for s, r, c in draws)
    assert any(first) and not all(first)


def test_the_rate_is_p():
    n = 20000
    for p in (0.1, 0.5, 0.9):
        rate = sum(stays_silent(7, r, c, p) for r in range(n // 100) for c in range(100)) / n
        assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (p, rate)  # within four standard errors


def test_the_decision_ignores_call_order_and_every_other_random_stream():
    draws = [(r, c) for r in range(10) for c in range(10)]
    expected = {d: stays_silent(3, *d, 0.5) for d in draws}
    shuffled = draws[:]
    random.Random(1).shuffle(shuffled)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    for d in shuffled:
        torch.rand(3), np.random.rand(3)  # other streams move in between: no effect
        assert stays_silent(3, *d, 0.5) == expected[d]
    torch.set_rng_state(torch_state), np.random.set_state(numpy_state)
    before_torch, before_numpy = torch.get_rng_state(), np.random.get_state()[1].copy()
    [stays_silent(3, *d, 0.5) for d in draws]
    assert torch.equal(torch.get_rng_state(), before_torch)  # nothing consumed from training's streams
    assert np.array_equal(np.random.get_state()[1], before_numpy)


def test_seed_round_and_client_each_change_the_draw():
    pattern = lambda seed, r: [stays_silent(seed, r, c, 0.5) for c in range(64)]  # noqa: E731
    assert pattern(0, 0) != pattern(1, 0) and pattern(0, 0) != pattern(0, 1)


def test_silent_clients_lists_the_picked_ones_ascending():
    clients = [9, 3, 5, 0, 7, 1]
    picked = silent_clients(0, 2, clients, 0.5)
    assert picked == sorted(c for c in clients if stays_silent(0, 2, c, 0.5))
    assert silent_clients(0, 2, clients, 0.0) == []


def test_negative_inputs_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        stays_silent(0, -1, 0, 0.5)


# --------------------------------------------------------------------------- the client end


def make(dropout: float):
    config = CONFIG.replace(progfed={"client_dropout": dropout})
    task = ClassificationTask()
    model = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)  # noqa: E731
    return build_server(config, model(), task), build_client(config, model(), task)


def batches(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))]


def _round_zero(dropout: float) -> dict[int, dict]:
    server, client = make(dropout)
    uploads = {}
    for c in range(CONFIG.client_num_in_total):
        client.receive(broadcast(server, c))
        client.train(batches(c), CPU, c)
        uploads[c] = client.upload()
    return uploads


def test_a_silent_client_trains_nothing_consumes_no_randomness_and_answers_silent(monkeypatch):
    server, client = make(0.5)
    silent = silent_clients(CONFIG.random_seed, 0, range(8), 0.5)
    assert 0 < len(silent) < 8
    trained = []
    original = client.algorithm.client_update
    monkeypatch.setattr(client.algorithm, "client_update", lambda *a, **k: trained.append(a[-1]) or original(*a, **k))
    for c in range(8):
        client.receive(broadcast(server, c))
        state = torch.get_rng_state()
        untouched = type("Data", (), {"__iter__": lambda self: pytest.fail("a silent client read its data")})()
        client.train(untouched if c in silent else batches(c), CPU, c)
        wire = client.upload()
        header = Message.unpack(wire, "t").header
        if c in silent:
            assert client.silent and client.result is None
            assert torch.equal(torch.get_rng_state(), state)
            assert (header.type, header.client, header.round, dict(header.plan)) == ("silent", c, 0, server.current.plan.tag())
            assert list(wire) == ["__progfed_header__"]
        else:
            assert header.type == "update" and not client.silent
    assert trained == [c for c in range(8) if c not in silent]


def test_the_clients_that_train_send_the_same_update_with_or_without_dropout():
    without, with_dropout = _round_zero(0.0), _round_zero(0.5)
    silent = silent_clients(CONFIG.random_seed, 0, range(8), 0.5)
    for c, wire in with_dropout.items():
        if c in silent:
            continue
        other = without[c]
        assert list(wire) == list(other)
        for name in wire:
            if name != METRICS_KEY:  # the metrics hold a timing
                assert torch.equal(wire[name], other[name]), (c, name)
        assert wire[METRICS_KEY][:3].tolist() == other[METRICS_KEY][:3].tolist()  # samples, loss, FLOPs
