"""Mutual TLS material: every bad file is one error naming its key, and a real gRPC server admits only the CA's parties."""

from __future__ import annotations

import ipaddress
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc

from fedml_progfed.errors import ConfigError
from fedml_progfed.fedml_plugin.grpc_tls import TLSMaterial, is_loopback, peer_rank
from fedml_progfed.runners.cross_silo.provision import provision

ROOT = Path(__file__).resolve().parents[2]
# ranks 0 and 1 on loopback; rank 2's certificate names only an address that is not this machine
ROWS = "0,0,127.0.0.1,8890\n1,1,127.0.0.1,8891\n2,2,10.9.8.7,8892\n"
CA, CERT, KEY = "comm_args.progfed_tls_ca", "comm_args.progfed_tls_cert", "comm_args.progfed_tls_key"
TIMEOUT = 5


def _provision(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ip.csv").write_text("eid,rank,grpc_server_ip,grpc_server_port\n" + ROWS)
    provision(ROOT / "config" / "fashion_mnist_grpc.yaml", folder / "certs",
              [f"comm_args.grpc_ipconfig_path={folder / 'ip.csv'}"])
    return folder / "certs"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return _provision(tmp_path_factory.mktemp("tls") / "ours")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """Files of another federation: the same ranks under another CA."""
    return _provision(tmp_path_factory.mktemp("tls") / "theirs")


def _material(folder: Path, rank: int) -> TLSMaterial:
    return TLSMaterial.load(str(folder / "ca.crt"), str(folder / "rank-{rank}.crt"), str(folder / "rank-{rank}.key"), rank)


def _issue(certs: Path, out: Path, cn: str, start: timedelta = timedelta(hours=-1), end: timedelta = timedelta(days=1),
           uses: list | None = None) -> tuple[Path, Path]:
    """A certificate and key signed by the CA in ``certs``, with a chosen CN, validity and extended key usages."""
    ca_cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    uses = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if uses is None else uses
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + start).not_valid_after(now + end)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{cn}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out / f"{cn}.crt", out / f"{cn}.key"


# ---------------------------------------------------------------- loading


def test_load_substitutes_the_rank_and_keeps_the_key_out_of_repr(certs):
    material = _material(certs, 1)
    assert material.rank == 1 and material.cert_pem == (certs / "rank-1.crt").read_bytes()
    assert material.ca_pem == (certs / "ca.crt").read_bytes() and material.key_pem == (certs / "rank-1.key").read_bytes()
    assert "PRIVATE KEY" not in repr(material) and "key_pem" not in repr(material)


def _load_error(ca: Path, cert: Path, key: Path, rank: int) -> str:
    with pytest.raises(ConfigError) as info:
        TLSMaterial.load(str(ca), str(cert), str(key), rank)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_unreadable_and_non_pem_files_name_their_key(certs, tmp_path):
    ca, cert, key = certs / "ca.crt", certs / "rank-1.crt", certs / "rank-1.key"
    missing = tmp_path / "nope.pem"
    assert _load_error(missing, cert, key, 1).startswith(f"{CA}: {missing} does not exist; fedml-progfed provision")
    assert _load_error(ca, missing, key, 1).startswith(f"{CERT}: {missing} does not exist")
    assert _load_error(ca, cert, missing, 1).startswith(f"{KEY}: {missing} does not exist")
    folder = tmp_path / "a-folder"  # unreadable even for root
    folder.mkdir()
    assert _load_error(ca, cert, folder, 1).startswith(f"{KEY}: {folder} cannot be read (")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert _load_error(junk, cert, key, 1) == f"{CA}: {junk} is not PEM (no -----BEGIN line); fedml-progfed provision --cf CONFIG --out DIR writes them"
    assert _load_error(ca, junk, key, 1).startswith(f"{CERT}: {junk} is not PEM")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert _load_error(ca, broken, key, 1).startswith(f"{CERT}: {broken} is not a PEM certificate")
    assert _load_error(broken, cert, key, 1).startswith(f"{CA}: {broken} is not a PEM certificate")
    assert _load_error(ca, cert, cert, 1).startswith(f"{KEY}: {cert} is not a PEM private key")  # a certificate as key


def test_files_that_do_not_belong_together_are_refused(certs, foreign):
    ca, cert, key = certs / "ca.crt", certs / "rank-1.crt", certs / "rank-1.key"
    assert _load_error(cert, cert, key, 1).startswith(f"{CA}: {cert} holds 'rank-1', which is not a CA certificate")
    message = _load_error(ca, foreign / "rank-1.crt", foreign / "rank-1.key", 1)
    assert message.startswith(f"{CERT}: {foreign / 'rank-1.crt'} is not signed by the CA in {ca} ({CA})")
    message = _load_error(ca, certs / "rank-2.crt", certs / "rank-2.key", 1)
    assert message.startswith(f"{CERT}: certificate rank-2.crt names rank 2 but this process is --rank 1; ")
    assert "DIR/rank-{rank}.crt" in message
    message = _load_error(ca, cert, certs / "rank-0.key", 1)
    assert message.startswith(f"{KEY}: {certs / 'rank-0.key'} is not the key of {cert} ({CERT})")


def test_a_certificate_must_name_a_rank_be_valid_now_and_allow_both_uses(certs, tmp_path):
    ca = certs / "ca.crt"
    assert "names 'hospital-a', not a rank (rank-R)" in _load_error(ca, *_issue(certs, tmp_path / "a", "hospital-a"), 1)
    assert "names 'rank-01', not a rank" in _load_error(ca, *_issue(certs, tmp_path / "b", "rank-01"), 1)
    expired = _issue(certs, tmp_path / "c", "rank-1", start=timedelta(days=-10), end=timedelta(days=-1))
    assert " the certificate expired on " in _load_error(ca, *expired, 1)
    early = _issue(certs, tmp_path / "d", "rank-1", start=timedelta(hours=2), end=timedelta(days=2))
    assert "the certificate is valid only from" in _load_error(ca, *early, 1) and "clock" in _load_error(ca, *early, 1)
    server_only = _issue(certs, tmp_path / "e", "rank-1", uses=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert _load_error(ca, *server_only, 1).startswith(f"{CERT}: {server_only[0]} lacks the extended key usage clientAuth")
    assert TLSMaterial.load(str(ca), *map(str, _issue(certs, tmp_path / "f", "rank-1")), 1).rank == 1  # control


def test_an_encrypted_key_is_refused(certs, tmp_path):
    key = serialization.load_pem_private_key((certs / "rank-1.key").read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    assert _load_error(certs / "ca.crt", certs / "rank-1.crt", locked, 1).startswith(f"{KEY}: {locked} is encrypted")


# ---------------------------------------------------------------- identities


def test_peer_rank_reads_only_a_single_rank_name():
    def context(**props: list[bytes]) -> SimpleNamespace:
        return SimpleNamespace(auth_context=lambda: props)

    assert peer_rank(context(x509_common_name=[b"rank-3"])) == 3
    assert peer_rank(context(x509_common_name=[b"rank-0"])) == 0
    assert peer_rank(context()) is None  # insecure: no certificate properties at all
    for names in ([b"hospital"], [b"rank-"], [b"rank-01"], [b"rank-1x"], [b"rank-1", b"rank-2"], [b"rank-\xff"]):
        assert peer_rank(context(x509_common_name=names)) is None, names


def test_is_loopback():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"):
        assert is_loopback(host), host
    for host in ("10.0.0.1", "0.0.0.0", "::", "hospital.example.org", "localhost.example.org", ""):
        assert not is_loopback(host), host


# ---------------------------------------------------------------- a real server


class _Recorder(grpc_comm_manager_pb2_grpc.gRPCCommManagerServicer):
    def __init__(self) -> None:
        self.callers: list[int | None] = []

    def sendMessage(self, request, context):  # noqa: N802 - FedML's method name
        self.callers.append(peer_rank(context))
        return grpc_comm_manager_pb2.CommResponse(client_id=0, message=request.message)


@pytest.fixture
def server(certs):
    """Rank 0's server on 127.0.0.1 with mutual TLS; yields (port, recorder)."""
    recorder = _Recorder()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(recorder, srv)
    port = srv.add_secure_port("127.0.0.1:0", _material(certs, 0).server_credentials())
    srv.start()
    yield port, recorder
    srv.stop(None)


def _send(channel: grpc.Channel) -> bytes:
    with channel:
        stub = grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel)
        return stub.sendMessage(grpc_comm_manager_pb2.CommRequest(client_id=1, message=b"x"), timeout=TIMEOUT).message


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _send(channel)
    return info.value.code()


def test_a_party_of_the_federation_is_admitted_and_known_by_its_certificate(server, certs):
    port, recorder = server
    assert _send(grpc.secure_channel(f"127.0.0.1:{port}", _material(certs, 1).channel_credentials())) == b"x"
    assert _send(grpc.secure_channel(f"localhost:{port}", _material(certs, 2).channel_credentials())) == b"x"
    assert recorder.callers == [1, 2]  # from the certificate, not from the request's client_id (1 both times)


def test_callers_without_the_federations_certificate_are_refused(server, certs, foreign):
    port, recorder = server
    address = f"127.0.0.1:{port}"
    ca = (certs / "ca.crt").read_bytes()
    # trusts our server but shows no certificate
    assert _refused(grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))) == grpc.StatusCode.UNAVAILABLE
    # trusts our server, shows another federation's rank-1 certificate
    other = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(foreign / "rank-1.key").read_bytes(),
                                         certificate_chain=(foreign / "rank-1.crt").read_bytes())
    assert _refused(grpc.secure_channel(address, other)) == grpc.StatusCode.UNAVAILABLE
    # plaintext
    assert _refused(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    assert recorder.callers == []


def test_a_party_refuses_a_server_of_another_federation(certs, foreign):
    recorder = _Recorder()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(recorder, srv)
    port = srv.add_secure_port("127.0.0.1:0", _material(foreign, 0).server_credentials())
    srv.start()
    try:
        assert _refused(grpc.secure_channel(f"127.0.0.1:{port}", _material(certs, 1).channel_credentials())) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(None)
    assert recorder.callers == []


def test_the_server_certificate_must_name_the_dialled_address_or_the_rank_override(certs):
    # rank 2's certificate names 10.9.8.7 and rank-2, not 127.0.0.1: the client's host check refuses it,
    # unless the channel names the expected rank as the TLS target (the DNS name rank-R)
    recorder = _Recorder()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(recorder, srv)
    port = srv.add_secure_port("127.0.0.1:0", _material(certs, 2).server_credentials())
    srv.start()
    try:
        credentials = _material(certs, 1).channel_credentials()
        assert _refused(grpc.secure_channel(f"127.0.0.1:{port}", credentials)) == grpc.StatusCode.UNAVAILABLE
        assert recorder.callers == []
        wrong_rank = [("grpc.ssl_target_name_override", "rank-0")]
        assert _refused(grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=wrong_rank)) == grpc.StatusCode.UNAVAILABLE
        override = [("grpc.ssl_target_name_override", "rank-2")]
        assert _send(grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=override)) == b"x"
        assert recorder.callers == [1]
    finally:
        srv.stop(None)


def test_an_insecure_server_gives_no_identity():
    recorder = _Recorder()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(recorder, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        assert _send(grpc.insecure_channel(f"127.0.0.1:{port}")) == b"x"
    finally:
        srv.stop(None)
    assert recorder.callers == [None]
