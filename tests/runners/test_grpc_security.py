"""A gRPC job on an open network: attacks on a running job over loopback, with and without TLS, and silos that go quiet.

Every party is its own process; the attacker is this test process, calling the parties'
ports with FedML's own service. Each attack must leave the job completing with the
weights of an undisturbed run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import grpc
import pytest
import torch
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc

from fedml_progfed.cli import main as cli_main
from fedml_progfed.comm.envelope import encode
from fedml_progfed.comm.messages import HEADER_KEY, Header
from fedml_progfed.report import read_metrics_csv
from fedml_progfed.runners.cross_silo.provision import provision
from test_grpc_cross_silo import ENV, error_lines, free_ports, grpc_config, load_weights, wait_for

pytestmark = pytest.mark.slow

RUN_ID = "job-under-attack"
TIMEOUT = 10


class Party:
    """The processes of a 1 server + 2 clients job, started one by one, with the flags every party shares."""

    def __init__(self, config: Path, tmp_path: Path, extra: list[str], certs: Path | None = None) -> None:
        self.tmp_path, self.config, self.out = tmp_path, config, tmp_path / "out"
        self.ports = free_ports(3)
        self.ipconfig = tmp_path / "ipconfig.csv"
        self.ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n"
                                 + "".join(f"{r},{r},127.0.0.1,{p}\n" for r, p in enumerate(self.ports)))
        self.sets = [f"comm_args.grpc_ipconfig_path={self.ipconfig}", *extra]
        if certs is not None:
            provision(config, certs, [f"comm_args.grpc_ipconfig_path={self.ipconfig}"])
            self.sets += [f"comm_args.progfed_tls_ca={certs / 'ca.crt'}",
                          f"comm_args.progfed_tls_cert={certs / 'rank-{rank}.crt'}",
                          f"comm_args.progfed_tls_key={certs / 'rank-{rank}.key'}"]
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.starts = 0

    def start(self, rank: int) -> subprocess.Popen:
        self.starts += 1
        log = self.tmp_path / f"rank{rank}-{self.starts}.log"
        command = [sys.executable, "-m", "fedml_progfed.main", "--cf", str(self.config), "--out", str(self.out),
                   "--rank", str(rank), "--role", "server" if rank == 0 else "client", "--run_id", RUN_ID,
                   "--set", *self.sets]
        with log.open("w") as handle:
            self.procs[rank] = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV)
        self.logs[rank] = log
        return self.procs[rank]

    def start_all(self) -> None:
        for rank in range(3):
            self.start(rank)

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def standalone_weights(config: Path, out: Path, *sets: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each cross-silo party runs: the same kernels, so the same float rounding
    try:
        assert cli_main(["run", "--cf", str(config), "--out", str(out), "--quiet", "--set",
                         "common_args.training_type=simulation", "comm_args.backend=sp", *sets]) == 0
    finally:
        torch.set_num_threads(threads)
    return load_weights(out)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def call(port: int, body: bytes, credentials: grpc.ChannelCredentials | None = None, target: str | None = None) -> None:
    """One sendMessage call to a party, as anyone on the network could make it."""
    request = grpc_comm_manager_pb2.CommRequest(client_id=1, message=body)
    options = [("grpc.ssl_target_name_override", target)] if target else []
    channel = (grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) if credentials
               else grpc.insecure_channel(f"127.0.0.1:{port}"))
    with channel:
        grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(request, timeout=5)


class _Reduce:
    """Unpickling this runs ``touch MARKER``: the request the issue's attacker sent."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def forged_update(round_: int, silo: int, sender: int = 1, run: str = RUN_ID, scale: float = 1000.0) -> bytes:
    """A well-formed update body of our wire format: changes of 1000 for every tensor named, 1e6 samples."""
    header = Header(type="update", kind="delta", algorithm="progfed", round=round_, plan={}, client=silo,
                    metrics={"samples": 1e6, "train_loss": 0.0, "flops": 0.0, "compute_s": 0.0})
    wire = OrderedDict([(HEADER_KEY, header.to_tensor()), ("blocks.0.0.weight", torch.full((4,), scale))])
    return encode({"msg_type": 3, "sender": sender, "receiver": 0, "model_params": wire, "num_samples": 1e6}, run)


def abort_notice(sender: int, receiver: int, run: str = RUN_ID) -> bytes:
    return encode({"msg_type": "progfed_abort", "sender": sender, "receiver": receiver,
                   "progfed_reason": "forged: the job must end"}, run)


def attacks(marker: Path) -> list[tuple[str, bytes]]:
    return [
        ("pickle", pickle.dumps(_Reduce(marker))),
        ("random", os.urandom(4096)),
        ("sender 7", forged_update(0, 0, sender=7)),
        ("abort", abort_notice(1, 0)),
        *((f"update x1000 round {r}", forged_update(r, 5)) for r in range(6)),  # silo 5 was never asked of rank 1
    ]


def test_attacks_on_a_loopback_job_without_tls_change_nothing(small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, train_args={"comm_round": 6},
                         progfed_args={"progfed_round_timeout_s": 60})
    job = Party(config, tmp_path, [])
    marker = tmp_path / "pwned"
    try:
        job.start_all()
        wait_for(lambda: "round 0: stage" in job.log(0), 180, "round 0 to be tested")
        for name, body in attacks(marker):
            for port in (job.ports[0], job.ports[1]):  # the server's port and a client's
                call(port, body)
        # a forged abort to a client, claiming the server
        call(job.ports[2], abort_notice(0, 2))
        assert job.procs[0].wait(timeout=240) == 0, job.log(0)[-3000:]
        for rank in (1, 2):
            assert job.procs[rank].wait(timeout=60) == 0, job.log(rank)[-3000:]
    finally:
        job.kill_all()
    assert not marker.exists()  # nothing ran
    server = job.log(0)
    assert "dropped a message from an uncertified caller at ipv4:127.0.0.1:" in server
    assert "pickle" in server and "ignored an abort notice claiming rank 1" in server
    assert error_lines(server) == []
    rows = read_metrics_csv(job.out / "metrics.csv")
    assert sum(int(r["rejected_messages"]) for r in rows) >= len(attacks(marker)) - 1  # the abort is judged later
    assert "silo 5" in " ".join(str(r["rejected_reasons"]) for r in rows)
    assert_same(load_weights(job.out), standalone_weights(config, tmp_path / "standalone"))


def _credentials(certs: Path, rank: int) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), (certs / f"rank-{rank}.key").read_bytes(),
                                        (certs / f"rank-{rank}.crt").read_bytes())


def test_a_tls_job_refuses_strangers_and_impostors_and_drops_replays(small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, train_args={"comm_round": 30},
                         progfed_args={"progfed_round_timeout_s": 60})
    certs, foreign = tmp_path / "certs", tmp_path / "foreign"
    job = Party(config, tmp_path, [], certs=certs)
    provision(config, foreign, [f"comm_args.grpc_ipconfig_path={job.ipconfig}"])  # the same ranks, another CA
    try:
        job.start_all()
        wait_for(lambda: "round 2: stage" in job.log(0), 180, "round 2 to be tested")
        server = job.ports[0]
        with pytest.raises(grpc.RpcError):  # no certificate: no TLS handshake
            call(server, forged_update(0, 0))
        with pytest.raises(grpc.RpcError):  # a certificate of another CA
            call(server, forged_update(0, 0), _credentials(foreign, 1), "rank-0")
        with pytest.raises(grpc.RpcError):  # plain TCP to a TLS port
            call(server, pickle.dumps(_Reduce(tmp_path / "pwned")))
        # rank 2's valid certificate, claiming rank 1; then rank 1's own: a replay and another run's update
        call(server, forged_update(0, 0, sender=1), _credentials(certs, 2), "rank-0")
        call(server, abort_notice(1, 0), _credentials(certs, 2), "rank-0")
        call(server, forged_update(0, 0, sender=1), _credentials(certs, 1), "rank-0")
        call(server, forged_update(2, 0, sender=1, run="another-run"), _credentials(certs, 1), "rank-0")
        # the table's rows from a certified party (its own abort notice would be real: a party may end its job)
        for _, body in [row for row in attacks(tmp_path / "pwned") if row[0] != "abort"]:
            call(server, body, _credentials(certs, 1), "rank-0")
            call(job.ports[2], body, _credentials(certs, 1), "rank-2")  # a client's port, from another client
        assert job.procs[0].wait(timeout=240) == 0, job.log(0)[-3000:]
    finally:
        job.kill_all()
    log = job.log(0)
    assert "claims sender 1 but its caller holds the certificate of rank 2" in log
    reasons = " ".join(str(r["rejected_reasons"]) for r in read_metrics_csv(job.out / "metrics.csv"))
    assert "an update for round 0 (silo 0) from rank 1" in reasons  # the replay
    assert "belongs to run 'another-run'" in reasons
    assert "the body is a pickle" in reasons and "silo 5" in reasons
    assert "dropped a message from rank 1 (certified)" in job.log(2) and error_lines(job.log(2)) == []
    assert not (tmp_path / "pwned").exists()
    assert_same(load_weights(job.out), standalone_weights(config, tmp_path / "standalone"))


def test_a_second_process_for_a_running_rank_fails_alone(small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, train_args={"comm_round": 40},
                         progfed_args={"progfed_round_timeout_s": 60})
    job = Party(config, tmp_path, [])
    try:
        job.start_all()
        wait_for(lambda: "round 0: stage" in job.log(0), 180, "round 0 to be tested")
        first = job.procs[1]
        twin = job.start(1)
        assert twin.wait(timeout=60) == 2
        [line] = error_lines(job.log(1))
        assert f"rank 1 cannot listen on 127.0.0.1:{job.ports[1]}" in line and "--rank 1 is running" in line, line
        job.procs[1] = first
        assert job.procs[0].wait(timeout=240) == 0, job.log(0)[-3000:]
    finally:
        job.kill_all()


DEADLINE = {"progfed_round_deadline_s": 4, "progfed_round_timeout_s": 60, "progfed_cache_unchanged": False}


def silent(rows: list[dict]) -> list[str]:
    """``silent_clients`` as written (the CSV reader turns "" into NaN and "1" into 1)."""
    def text(value) -> str:
        if isinstance(value, float):
            return "" if value != value else str(int(value))
        return str(value)

    return [text(r["silent_clients"]) for r in rows]


@pytest.mark.parametrize("how", ["stop", "restart"])
def test_a_silo_that_goes_quiet_is_left_out_and_comes_back(how, small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, train_args={"comm_round": 14}, progfed_args=DEADLINE)
    job = Party(config, tmp_path, [])
    try:
        job.start_all()
        wait_for(lambda: "round 2: stage" in job.log(0), 180, "round 2 to be tested")
        victim = job.procs[2]
        victim.send_signal(signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        wait_for(lambda: "sent nothing within progfed_round_deadline_s" in job.log(0), 60, "the deadline to pass")
        time.sleep(6)  # at least one more round without it
        if how == "stop":
            victim.send_signal(signal.SIGCONT)
        else:
            victim.wait()
            job.start(2)
        assert job.procs[0].wait(timeout=300) == 0, job.log(0)[-3000:]
        assert job.procs[2].wait(timeout=60) == 0, job.log(2)[-3000:]
    finally:
        job.kill_all()
    rows = read_metrics_csv(job.out / "metrics.csv")
    names = silent(rows)
    left_out = [i for i, s in enumerate(names) if s]
    assert left_out, names
    assert all(names[i] == "1" for i in left_out), names  # rank 2 trains data silo 1
    assert names[-1] == "" and left_out[-1] < len(names) - 1, names  # it came back and took part again
    assert all(int(r["dropped_clients"]) == 0 for r in rows)
    assert json.loads((job.out / "summary.json").read_text())["complete"] is True
