"""A whole ProgFed run driven through the algorithm protocol and the engine, with no FedML import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedml_progfed.comm.messages import Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CLIENTS = 3


def test_algorithm_and_engine_layers_do_not_import_fedml():
    code = (
        "import sys, fedml_progfed.algorithms, fedml_progfed.engine, fedml_progfed.core.staged_model, "
        "fedml_progfed.comm.messages, fedml_progfed.describe\n"
        "loaded = sorted(m for m in sys.modules if m == 'fedml' or m.startswith('fedml.'))\n"
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _data(seed: int) -> dict[int, list]:
    g = torch.Generator().manual_seed(seed)
    return {
        c: [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
        for c in range(CLIENTS)
    }


def run(config: RunConfig):
    """Every client every round, in FedML's order, on the engine's framework-free ends."""
    task = ClassificationTask()
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), config.random_seed)  # noqa: E731
    server, client = build_server(config, make(), task), build_client(config, make(), task)
    data, snapshots = _data(0), []
    for _ in range(server.algorithm.total_rounds):
        uploads = []
        for c in range(CLIENTS):
            client.receive(broadcast(server, c))
            client.train(data[c], torch.device("cpu"), c)
            uploads.append((16, client.upload()))
        aggregate(server, uploads)
        snapshots.append({k: v.clone() for k, v in server.model.state_dict().items()})
    return server, snapshots


BASE = dict(
    comm_round=8, client_num_in_total=CLIENTS, client_num_per_round=CLIENTS, learning_rate=0.05,
    progfed=dict(stages=4, schedule=(1, 2, 2, 3), warmup_rounds=1),
)


def config(**progfed) -> RunConfig:
    return RunConfig().replace(**{**BASE, "progfed": {**BASE["progfed"], **progfed}})


def test_growth_and_warmup_through_the_protocol():
    server, snapshots = run(config(cache_unchanged=False))
    rows = server.state.ledger.rows
    assert [r["stage"] for r in rows] == [1, 2, 2, 3, 3, 4, 4, 4]
    assert [r["warmup"] for r in rows] == [0, 1, 0, 1, 0, 1, 0, 0]
    for row in rows:  # the broadcast carries the round's whole sub-model: 4 bytes a value plus the header
        per_client = row["bytes_down"] / CLIENTS
        assert 4 * row["active_params"] < per_client < 4 * row["active_params"] + 400
    # round 1 is stage 2's warm-up: block 1 (frozen) is bit-identical, the entering block and head moved
    before, after = snapshots[0], snapshots[1]
    assert torch.equal(before["blocks.0.0.weight"], after["blocks.0.0.weight"])
    assert not torch.equal(before["blocks.1.0.weight"], after["blocks.1.0.weight"])
    assert rows[1]["bytes_up"] < rows[2]["bytes_up"]  # only the entering block and head travel up
    # the first stage's head left the active set when the model grew and is no longer trained
    assert torch.equal(snapshots[1]["heads.0.2.weight"], snapshots[-1]["heads.0.2.weight"])



def test_blocks_a_client_holds_unchanged_are_not_sent_again_and_training_is_the_same():
    """After a warm-up round the frozen block is unchanged: every client holds it, so it is left out."""
    cached, cached_snapshots = run(config())
    full, full_snapshots = run(config(cache_unchanged=False))
    for ours, theirs in zip(cached_snapshots, full_snapshots):  # the same training, round by round
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    rows, full_rows = cached.state.ledger.rows, full.state.ledger.rows
    block0 = sum(t.numel() for n, t in cached.model.state_dict().items() if n.startswith("blocks.0."))
    saved = [f["bytes_down"] - c["bytes_down"] for c, f in zip(rows, full_rows)]
    # round 2 follows stage 2's warm-up (round 1): block 0 did not move, so nobody is sent it again
    assert saved[2] > CLIENTS * (4 * block0 - 200) and saved[2] < CLIENTS * 4 * block0
    assert saved[0] == saved[1] == 0  # nothing held yet, then a growth round (every tensor new or changed)
    assert all(s >= 0 for s in saved)
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in full_rows]

def test_seeded_entering_modules_save_bytes_and_give_the_same_model():
    sent, _ = run(config())
    seeded, _ = run(config(send_entering=False))
    for name, value in sent.model.state_dict().items():
        assert torch.equal(value, seeded.model.state_dict()[name]), name
    growth = [r["round"] for r in sent.state.ledger.rows if r["round"] in (1, 3, 5)]
    for a, b in zip(sent.state.ledger.rows, seeded.state.ledger.rows):
        if a["round"] in growth:
            assert b["seeded_params"] > 0 and b["bytes_down"] < a["bytes_down"]
        else:
            assert b["seeded_params"] == 0 and abs(b["bytes_down"] - a["bytes_down"]) < 20 * CLIENTS


def test_end_to_end_is_the_full_model_every_round():
    server, _ = run(RunConfig().replace(**{**BASE, "progfed": {"strategy": "e2e"}}))
    assert {r["stage"] for r in server.state.ledger.rows} == {4}
    assert {r["warmup"] for r in server.state.ledger.rows} == {0}


@pytest.mark.parametrize("weights", ["samples", "uniform"])
def test_aggregation_weights(weights):
    """Two different updates merge to the sample-weighted or the plain mean (ProFL spec 5.7 / Alg. 1 l. 27).

    Client 0 trains on 4 samples, client 1 on 12 other ones, so their changes differ
    and the two weightings give different models: a swapped or ignored weighting fails.
    """
    cfg = RunConfig().replace(comm_round=1, client_num_in_total=2, client_num_per_round=2,
                              progfed={"strategy": "e2e", "aggregation_weights": weights})
    task = ClassificationTask()
    server = build_server(cfg, initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), task)
    client = build_client(cfg, initialize(build_model("convnet", (1, 28, 28), 10, 4), 0), task)
    g = torch.Generator().manual_seed(1)
    data = {c: [(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]
            for c, n in ((0, 1), (1, 3))}
    start = {k: v.clone() for k, v in server.model.state_dict().items()}
    uploads, deltas = [], []
    for c in (0, 1):
        client.receive(broadcast(server, c))
        client.train(data[c], torch.device("cpu"), c)
        wire = client.upload()
        deltas.append(Message.unpack(wire, "upload").tensors)
        uploads.append((4 * len(data[c]), wire))  # FedML's tuple: the client's real sample count
    aggregate(server, uploads)
    plain = {n: start[n] + (deltas[0][n] + deltas[1][n]) / 2 for n in deltas[0]}
    weighted = {n: start[n] + (4 * deltas[0][n] + 12 * deltas[1][n]) / 16 for n in deltas[0]}
    expected, other = (weighted, plain) if weights == "samples" else (plain, weighted)
    merged = server.model.state_dict()
    assert deltas[0].keys() == deltas[1].keys() and deltas[0]
    for name in deltas[0]:
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
    far = max(float((merged[n] - other[n]).abs().max()) for n in deltas[0])
    assert far > 1e-4  # the other weighting's model is clearly a different one
