"""Compressed broadcasts as the change since what each client holds: both ends keep the same bits."""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.comm.messages import Message, nbytes
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.engine.sampling import sample_clients
from fedml_progfed.errors import FieldError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask

CPU = torch.device("cpu")
MODEL = ("convnet", (1, 28, 28), 10, 4)


def pair(rounds=10, clients=6, per_round=3, down="lq8+sp25", history=8, **progfed):
    config = RunConfig().replace(
        comm_round=rounds, client_num_in_total=clients, client_num_per_round=per_round, learning_rate=0.05,
        progfed={"strategy": "progfed", "compression_up": "lq8", "compression_down": down,
                 "broadcast_history": history, "invalid_update": "abort", **progfed},
    )
    make = lambda: initialize(build_model(*MODEL), 0)  # noqa: E731
    return config, build_server(config, make(), ClassificationTask()), build_client(config, make(), ClassificationTask())


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g))]


def play(server, client, round_clients, on_round=None):
    """Run the rounds, calling ``on_round(round, called, messages)`` after each finished round."""
    while not server.finished:
        current = server.start_round()
        called = round_clients(current.plan.round)
        uploads, messages = [], {}
        for c in called:
            messages[c] = current.message(c)
            client.receive(messages[c])
            client.train(batches(100 * current.plan.round + c), CPU, c)
            uploads.append((10, client.upload()))
        server.finish_round(uploads)
        if on_round is not None:
            on_round(current.plan.round, called, messages)


def test_every_client_reconstructs_the_very_bits_the_server_recorded_every_round_through_growth():
    config, server, client = pair(rounds=8)
    kinds = set()

    def check(round_idx, called, messages):
        for c in called:
            recorded = server.changes.references.held(c, round_idx + 1)
            held = client.reference(c)
            assert recorded is not None and recorded.keys() == held.keys()
            assert all(torch.equal(recorded[n], held[n]) for n in held), (round_idx, c)
            header = Message.unpack(messages[c], "m").header
            kinds.add("change" if header.changes else "full" if header.client is None else "exact")

    play(server, client, lambda r: sample_clients(r, 6, 3), check)
    assert {"change", "full"} <= kinds
    assert [row["stage"] for row in server.state.ledger.rows][-1] == 4


def test_a_change_broadcast_costs_a_fraction_of_the_full_one_and_the_ledger_counts_each_clients_message():
    config, server, client = pair(rounds=6, clients=2, per_round=2, down="lq8+sp25")
    sent = {}
    play(server, client, lambda r: [0, 1], lambda r, called, messages: sent.update({r: messages}))
    rows = server.state.ledger.rows
    full = server.start_round().full_message_bytes  # what a client holding nothing would be sent now
    assert rows[-1]["bytes_down"] < 0.1 * 2 * full
    assert all(row["bytes_down"] == sum(nbytes(m) for m in sent[row["round"]].values()) for row in rows)


def test_a_client_absent_longer_than_the_history_gets_the_full_model_and_then_holds_the_servers_weights():
    config, server, client = pair(rounds=8, clients=3, per_round=3, history=2, down="lq4")
    seen = {}

    def record(round_idx, called, messages):
        seen[round_idx] = {c: Message.unpack(messages[c], "m").header for c in called}

    # client 2 takes part in round 0, then is away for rounds 1-4 (more than 2), then returns
    play(server, client, lambda r: [0, 1, 2] if r in (0, 5, 6, 7) else [0, 1], record)
    assert seen[5][2].client is None and seen[5][0].changes  # full for the returning client, changes for the others
    assert seen[6][2].changes  # and from then on its changes
    assert server.changes.references.held(2, 8) is not None


def test_the_full_model_a_returning_client_loads_is_the_servers_exact_model():
    config, server, client = pair(rounds=4, clients=2, per_round=2, history=1)
    for round_idx in range(3):  # client 1 away for three rounds
        current = server.start_round()
        client.receive(current.message(0))
        client.train(batches(round_idx), CPU, 0)
        server.finish_round([(10, client.upload())])
    current = server.start_round()
    assert Message.unpack(current.message(0), "m").header.changes
    assert Message.unpack(current.message(1), "m").header.client is None  # the full (float) model
    client.receive(current.message(1))
    mine, servers = client.model.state_dict(), server.model.state_dict()
    assert all(torch.equal(mine[n], servers[n]) for n in current.layout.sent)


@pytest.mark.parametrize("down", ["lq2", "sp10"])  # sp10's unbiased n/k scale would make the fed-back error explode
def test_change_broadcasts_keep_the_reconstruction_unbiased_and_its_error_bounded(down):
    config, server, client = pair(rounds=24, clients=1, per_round=1, down=down, strategy="e2e")
    errors, offsets = [], []

    def measure(round_idx, called, messages):
        held = client.reference(0)
        state = {n: t for n, t in server.state.model.state_dict().items() if n in held}
        before = server.changes.references.held(0, round_idx + 1)
        errors.append(sum(float((before[n] - t).pow(2).sum()) for n, t in state.items()) ** 0.5)
        offsets.append(torch.cat([(before[n] - t).flatten() for n, t in state.items()]))

    play(server, client, lambda r: [0], measure)
    # what a round's 2-bit code leaves out is sent in the next change: the error does not accumulate
    assert max(errors[12:]) < 3 * max(errors[1:6])
    if down == "lq2":  # stochastic rounding: no lag (random-k lags a steady drift by its residual)
        mean_offset = torch.stack(offsets[4:]).mean(dim=0)
        assert float(mean_offset.abs().mean()) < 0.5 * float(torch.stack(offsets[4:]).abs().mean())


def test_the_references_memory_is_bounded_by_the_history_and_reported_each_round():
    config, server, client = pair(rounds=10, clients=6, per_round=3, history=2)
    play(server, client, lambda r: sample_clients(r, 6, 3))
    full = sum(t.numel() * t.element_size() for t in server.model.state_dict().values())
    columns = [row["references_mb"] for row in server.state.ledger.rows]
    assert all(c > 0 for c in columns[1:]) and server.changes.references.peak_bytes <= (2 + 1) * 3 * full


@pytest.mark.parametrize("changes,match", [
    ({"compression_down": "lq8+ef"}, "drop '\\+ef'"),
    ({"strategy": "heterofl"}, "sub-models of their own"),
    ({"round_deadline_s": 5.0}, "no known base"),
])
def test_settings_where_no_client_base_is_known_are_one_error(changes, match):
    with pytest.raises(FieldError, match=match):
        pair(**changes)


def test_a_resumed_run_sends_every_client_the_full_model_once_then_changes_again(small_config, tmp_path):
    import shutil

    from fedml_progfed.cli import main
    from fedml_progfed.report import read_metrics_csv

    sets = ["train_args.comm_round=6", "train_args.epochs=1", "train_args.client_num_in_total=2",
            "train_args.client_num_per_round=2", "progfed_args.progfed_compression_down=lq8+sp25",
            "progfed_args.progfed_checkpoint_keep=10"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(["run", "--cf", str(small_config), "--out", str(full), "--quiet", "--set", *sets]) == 0
    shutil.copytree(full, resumed)
    for done in (5, 6):  # as if the run had stopped after round 4
        shutil.rmtree(resumed / "checkpoints" / f"round-{done:06d}")
    assert main(["run", "--cf", str(small_config), "--resume", str(resumed), "--quiet", "--set", *sets]) == 0
    before, after = read_metrics_csv(full / "metrics.csv"), read_metrics_csv(resumed / "metrics.csv")
    assert [r["round"] for r in after] == list(range(6))
    assert after[4]["bytes_down"] > 3 * before[4]["bytes_down"]  # the full model once, to both clients
    assert after[5]["bytes_down"] < after[4]["bytes_down"] / 3  # then changes again
