"""The parts of the cross-silo glue that need no running job: deadlines, ip-config, wire sizes, GPU placement."""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.config import explain, load_config
from fedml_progfed.errors import ConfigError, FieldError, PeerError
from fedml_progfed.fedml_plugin.watch import PeerWatch
from fedml_progfed.runners import placement
from fedml_progfed.runners.cross_silo.endpoints import describe_transport, processes_on_this_host
from fedml_progfed.runners.cross_silo.wire import wire_summary


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peer_watch_names_every_overdue_peer_and_forgets_those_that_answered():
    clock = Clock()
    watch = PeerWatch(lambda r: f"client rank {r}", clock=clock)
    watch.expect(1, "no reply to the model of round 3", 10)
    watch.expect(2, "no reply to the model of round 3", 10)
    watch.expect(3, "forever", None)  # no timeout: never overdue
    clock.now += 9.9
    assert watch.overdue() is None
    watch.heard(1)
    clock.now += 0.2
    error = watch.overdue()
    assert isinstance(error, PeerError) and error.peer == 2
    assert "client rank 2 sent nothing for 10 s (no reply to the model of round 3)" in str(error)
    assert "client rank 1" not in str(error) and "progfed_round_timeout_s (10 s)" in str(error)
    assert watch.has_heard(1) and not watch.has_heard(2)
    watch.clear()
    assert watch.overdue() is None


def test_request_size_is_the_serialized_size_of_fedmls_request():
    from fedml.core.distributed.communication.grpc.grpc_comm_manager_pb2 import CommRequest

    from fedml_progfed.fedml_plugin.grpc_dial import request_size

    for client_id in (0, 1, 2, 127, 128, 300, -1):
        for size in (0, 1, 127, 128, 16383, 16384, 70000):
            expected = CommRequest(client_id=client_id, message=b"x" * size).ByteSize()
            assert request_size(client_id, size) == expected, (client_id, size)


def test_ip_config_must_list_every_party(tmp_path):
    from fedml_progfed.fedml_plugin.grpc_dial import read_ip_config

    path = tmp_path / "ip.csv"
    path.write_text("eid,rank,grpc_server_ip,grpc_server_port,ingress_ip\n0,0,10.0.0.1,8890,\n1,1,10.0.0.2,8891,203.0.113.7\n")
    endpoints = read_ip_config(path, 2)
    assert endpoints[0].address == "10.0.0.1:8890" and endpoints[1].address == "203.0.113.7:8891"
    with pytest.raises(ConfigError, match="no row for rank 2.*0.0.0.0"):
        read_ip_config(path, 3)
    with pytest.raises(ConfigError, match="does not exist"):
        read_ip_config(tmp_path / "missing.csv", 2)
    path.write_text("rank,ip\n0,1.2.3.4\n")
    with pytest.raises(ConfigError, match="columns"):
        read_ip_config(path, 1)


def _grpc_config(tmp_path, small_config, ipconfig_rows: str, *more: str):
    ip = tmp_path / "ip.csv"
    ip.write_text("eid,rank,grpc_server_ip,grpc_server_port\n" + ipconfig_rows)
    return load_config(small_config, [
        "common_args.training_type=cross_silo", "comm_args.backend=GRPC", f"comm_args.grpc_ipconfig_path={ip.name}",
        "train_args.client_num_in_total=2", "train_args.client_num_per_round=2", *more,
    ])[1]


def test_transport_line_of_a_dry_run_and_parties_per_host(tmp_path, small_config, monkeypatch):
    # a relative ip-config path is found beside the config file when not in the working folder
    monkeypatch.chdir(tmp_path.parent)
    config = _grpc_config(tmp_path, small_config, "0,0,127.0.0.1,9000\n1,1,127.0.0.1,9001\n2,2,10.1.1.2,9002\n")
    line = describe_transport(config, 1, str(small_config))
    assert line.startswith("transport GRPC: rank 1 listens on 127.0.0.1:9001, peers 0=127.0.0.1:9000, 2=10.1.1.2:9002")
    from fedml_progfed.fedml_plugin.grpc_dial import read_ip_config

    endpoints = read_ip_config(tmp_path / "ip.csv", 3)
    assert processes_on_this_host(endpoints, 0) == 2 and processes_on_this_host(endpoints, 2) == 1
    mqtt = load_config(small_config, ["common_args.training_type=cross_silo", "comm_args.backend=MQTT_S3"])[1]
    assert describe_transport(mqtt, 1, None).startswith("transport MQTT_S3: MQTT broker and S3 bucket")


def test_grpc_needs_an_ip_config_and_a_rank_that_matches_the_role(tmp_path, small_config):
    from fedml_progfed.runners.cross_silo.endpoints import grpc_endpoints

    config = load_config(small_config, ["common_args.training_type=cross_silo", "comm_args.backend=GRPC"])[1]
    with pytest.raises(FieldError) as caught:
        grpc_endpoints(config, 0, "server", str(small_config))
    assert explain(caught.value).startswith("comm_args.grpc_ipconfig_path: backend GRPC needs the ip-config")
    config = _grpc_config(tmp_path, small_config, "0,0,127.0.0.1,9000\n1,1,127.0.0.1,9001\n2,2,127.0.0.1,9002\n")
    with pytest.raises(ConfigError, match="rank 0 is the server"):
        grpc_endpoints(config, 0, "client", str(small_config))
    with pytest.raises(ConfigError, match="ranks 0 .server. to 2"):
        grpc_endpoints(config, 3, "client", str(small_config))


def test_wire_summary_relates_wire_to_payload_bytes():
    rows = [{"bytes_down": 100, "bytes_up": 50, "wire_bytes_down": 110, "wire_bytes_up": 60},
            {"bytes_down": 100, "bytes_up": 50, "wire_bytes_down": 102, "wire_bytes_up": 51}]
    wire = wire_summary(rows)
    assert wire["overhead_ratio_down"] == pytest.approx(212 / 200)
    assert wire["overhead_ratio_up"] == pytest.approx(111 / 100)
    assert wire["overhead_ratio"] == pytest.approx(323 / 300)
    assert wire_summary([{"bytes_down": 1, "bytes_up": 1}]) is None  # standalone, MPI: nothing measured


# --------------------------------------------------------------------------- GPU placement


def test_gpu_slots_follow_fedmls_layout_order():
    slots = placement.gpu_slots({"host1": [2, 1], "host2": [0, 1]})
    assert slots == [("host1", 0), ("host1", 0), ("host1", 1), ("host2", 1)]
    assert placement.gpu_for_rank(slots, 2, 4) == ("host1", 1)
    assert placement.gpu_for_rank(slots, 0, 1) == ("host1", 0)  # standalone: the first slot of any layout
    with pytest.raises(FieldError, match="4 process slots but the run has 3"):
        placement.gpu_for_rank(slots, 0, 3)
    with pytest.raises(FieldError, match="list of process counts"):
        placement.gpu_slots({"host1": "2,1"})


def _device(small_config, tmp_path, monkeypatch, gpus: int, *overrides: str, rank: int = 0, world: int = 3):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = load_config(small_config, ["device_args.using_gpu=true", *overrides])[1]
    return placement.resolve_device(config, rank, world)


def test_device_from_gpu_id_mapping_file_or_cpu(small_config, tmp_path, monkeypatch):
    mapping = tmp_path / "gpu_mapping.yaml"
    mapping.write_text("mapping_3:\n  host1: [1, 2]\nmapping_2:\n  host1: [2]\n")
    use_map = [f"device_args.gpu_mapping_file={mapping}", "device_args.gpu_mapping_key=mapping_3"]
    assert _device(small_config, tmp_path, monkeypatch, 2, "device_args.gpu_id=1") == torch.device("cuda:1")
    assert [_device(small_config, tmp_path, monkeypatch, 2, *use_map, rank=r) for r in range(3)] == [
        torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cuda:1")]
    assert _device(small_config, tmp_path, monkeypatch, 0, *use_map) == torch.device("cpu")  # no CUDA: CPU, warned
    with pytest.raises(FieldError) as caught:
        _device(small_config, tmp_path, monkeypatch, 1, *use_map, rank=1)
    assert explain(caught.value).startswith("device_args.gpu_mapping_key: GPU 1 requested for rank 1, but this machine has 1")
    with pytest.raises(FieldError) as caught:
        _device(small_config, tmp_path, monkeypatch, 2, f"device_args.gpu_mapping_file={mapping}",
                "device_args.gpu_mapping_key=nope")
    assert "'nope' is not a layout" in explain(caught.value) and "mapping_3, mapping_2" in explain(caught.value)
    with pytest.raises(FieldError, match="2 process slots but the run has 3"):
        _device(small_config, tmp_path, monkeypatch, 2, f"device_args.gpu_mapping_file={mapping}",
                "device_args.gpu_mapping_key=mapping_2")
