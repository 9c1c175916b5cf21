"""Rules a gRPC party checks before start-up: TLS or loopback, a free port, the deadline's companions."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedml_progfed.config import explain, load_config
from fedml_progfed.errors import ConfigError, FieldError
from fedml_progfed.fedml_plugin.grpc_dial import BindError, Endpoint, check_port_free
from fedml_progfed.runners.cross_silo.endpoints import describe_transport
from fedml_progfed.runners.cross_silo.provision import provision
from fedml_progfed.runners.cross_silo.rules import check_cross_silo
from fedml_progfed.runners.cross_silo.security import transport_security

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "fashion_mnist_grpc.yaml"


def _ipconfig(tmp_path: Path, hosts: tuple[str, str, str]) -> Path:
    path = tmp_path / "ip.csv"
    path.write_text("eid,rank,grpc_server_ip,grpc_server_port\n" + "".join(f"{r},{r},{h},{8890 + r}\n" for r, h in enumerate(hosts)))
    return path


def _load(tmp_path: Path, hosts=("127.0.0.1",) * 3, *sets: str):
    return load_config(CONFIG, [f"comm_args.grpc_ipconfig_path={_ipconfig(tmp_path, hosts)}", *sets])[1]


def _endpoints(config):
    from fedml_progfed.runners.cross_silo.endpoints import grpc_endpoints

    return grpc_endpoints(config, 0, "server", str(CONFIG))


def test_plain_tcp_is_allowed_on_loopback_only(tmp_path):
    config = _load(tmp_path)
    assert transport_security(config, 0, _endpoints(config), str(CONFIG)) is None
    assert "plain TCP on loopback" in describe_transport(config, 0, str(CONFIG))
    config = _load(tmp_path, ("10.0.0.1", "10.0.1.7", "127.0.0.1"))
    with pytest.raises(FieldError) as error:
        transport_security(config, 0, _endpoints(config), str(CONFIG))
    text = explain(error.value)
    assert "10.0.0.1, 10.0.1.7" in text and "fedml-progfed provision" in text and "progfed_allow_insecure" in text


def test_the_insecure_key_is_explicit_and_warned_about(tmp_path, caplog):
    config = _load(tmp_path, ("10.0.0.1", "10.0.1.7", "10.0.2.9"), "comm_args.progfed_allow_insecure=true")
    with caplog.at_level("WARNING", logger="fedml_progfed"):
        assert transport_security(config, 1, _endpoints(config), str(CONFIG)) is None
    assert "plain TCP without TLS on 10.0.0.1, 10.0.1.7, 10.0.2.9" in caplog.text
    assert "progfed_allow_insecure" in describe_transport(config, 0, str(CONFIG))


def test_certificates_under_comm_args_switch_tls_on(tmp_path):
    ip = _ipconfig(tmp_path, ("10.0.0.1", "10.0.1.7", "10.0.2.9"))
    provision(CONFIG, tmp_path / "certs", [f"comm_args.grpc_ipconfig_path={ip}"])
    sets = [f"comm_args.grpc_ipconfig_path={ip}", f"comm_args.progfed_tls_ca={tmp_path / 'certs/ca.crt'}",
            f"comm_args.progfed_tls_cert={tmp_path / 'certs/rank-{rank}.crt'}",
            f"comm_args.progfed_tls_key={tmp_path / 'certs/rank-{rank}.key'}"]
    config = load_config(CONFIG, sets)[1]
    material = transport_security(config, 2, _endpoints(config), str(CONFIG))
    assert material is not None and material.rank == 2
    assert "mutual TLS" in describe_transport(config, 0, str(CONFIG))
    with pytest.raises(FieldError, match="tls_key"):  # two of three files
        load_config(CONFIG, sets[:3])


def test_a_port_in_use_is_one_error_naming_the_rank_and_address():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(BindError) as error:
            check_port_free(Endpoint(1, "127.0.0.1", port))
        assert f"rank 1 cannot listen on 127.0.0.1:{port}" in str(error.value) and "--rank 1" in str(error.value)
        assert error.value.tell_peers is False  # the running job is not this process's to end
    finally:
        holder.close()
    check_port_free(Endpoint(1, "127.0.0.1", port))  # free again


def test_a_round_deadline_needs_broadcasts_that_do_not_assume_what_a_silo_holds(tmp_path):
    config = _load(tmp_path, ("127.0.0.1",) * 3, "progfed_args.progfed_round_deadline_s=5")
    with pytest.raises(FieldError, match="cache_unchanged"):
        check_cross_silo(config)
    check_cross_silo(_load(tmp_path, ("127.0.0.1",) * 3, "progfed_args.progfed_round_deadline_s=5",
                           "progfed_args.progfed_cache_unchanged=false"))
    with pytest.raises(ConfigError, match="round_deadline_s"):
        _load(tmp_path, ("127.0.0.1",) * 3, "progfed_args.progfed_round_deadline_s=700")  # above the 600 s timeout
