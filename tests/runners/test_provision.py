"""``fedml-progfed provision``: one CA, one certificate per rank naming its rank and addresses, reused CA, clear refusals."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedml_progfed.cli import main
from fedml_progfed.config import explain
from fedml_progfed.errors import ConfigError
from fedml_progfed.fedml_plugin.grpc_tls import TLSMaterial
from fedml_progfed.runners.cross_silo.provision import provision

ROOT = Path(__file__).resolve().parents[2]
HEADER = "eid,rank,grpc_server_ip,grpc_server_port,ingress_ip\n"
ROWS = "0,0,127.0.0.1,8890,\n1,1,10.0.1.7,8891,203.0.113.9\n2,2,hospital2.example.org,8892,\n"


def _job(folder: Path, rows: str = ROWS, clients: int = 2) -> Path:
    """The gRPC example config with ``clients`` clients and its ip-config beside it (named relatively)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ip.csv").write_text(HEADER + rows)
    text = (ROOT / "config" / "fashion_mnist_grpc.yaml").read_text()
    text = text.replace("grpc_ipconfig_path: config/grpc_ipconfig_local.csv", "grpc_ipconfig_path: ip.csv")
    text = text.replace("client_num_in_total: 2", f"client_num_in_total: {clients}")
    text = text.replace("client_num_per_round: 2", f"client_num_per_round: {clients}")
    (folder / "job.yaml").write_text(text)
    return folder / "job.yaml"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_rank_gets_a_key_and_a_certificate_naming_its_rank_and_addresses(tmp_path):
    config = _job(tmp_path / "job")
    before = datetime.now(timezone.utc)
    done = provision(config, tmp_path / "certs")
    out = tmp_path / "certs"

    assert done.new_ca and done.kept == () and done.ca_cert == out / "ca.crt" and done.ca_key == out / "ca.key"
    assert sorted(p.name for p in done.written) == [f"rank-{r}.{e}" for r in range(3) for e in ("crt", "key")]
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key"] + sorted(p.name for p in done.written)
    for name in ("ca.key", "rank-0.key", "rank-1.key", "rank-2.key"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o077 == 0  # the folder holding ca.key is the owner's alone

    ca = _cert(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    assert ca_key.curve.name == "secp256r1"

    expected = {
        0: (["rank-0", "localhost"], ["127.0.0.1"]),  # loopback: both names a local peer may dial
        1: (["rank-1"], ["10.0.1.7", "203.0.113.9"]),  # listen and ingress address
        2: (["rank-2", "hospital2.example.org"], []),  # a host name is a DNS name
    }
    for rank, (dns, ips) in expected.items():
        cert = _cert(out / f"rank-{rank}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"rank-{rank}"
        assert _names(cert) == (dns, ips)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.signature_hash_algorithm.name == "sha256"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        assert before - timedelta(hours=1, seconds=5) <= start <= before - timedelta(minutes=59)
        assert abs(end - start - timedelta(days=825, hours=1)) < timedelta(seconds=5)
        key = serialization.load_pem_private_key((out / f"rank-{rank}.key").read_bytes(), None)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == cert.public_key()


def test_wildcard_and_ipv6_loopback_addresses(tmp_path):
    rows = "0,0,0.0.0.0,8890,198.51.100.4\n1,1,::1,8891,\n2,2,localhost,8892,\n"
    provision(_job(tmp_path / "job", rows), tmp_path / "certs")
    assert _names(_cert(tmp_path / "certs" / "rank-0.crt")) == (["rank-0"], ["198.51.100.4"])  # nobody dials 0.0.0.0
    assert _names(_cert(tmp_path / "certs" / "rank-1.crt")) == (["rank-1", "localhost"], ["127.0.0.1", "::1"])
    assert _names(_cert(tmp_path / "certs" / "rank-2.crt")) == (["rank-2", "localhost"], ["127.0.0.1"])


def test_an_existing_ca_is_reused_and_only_missing_parties_are_written(tmp_path):
    config, out = _job(tmp_path / "job"), tmp_path / "certs"
    provision(config, out)
    first = _listing(out)

    again = provision(config, out)
    assert not again.new_ca and again.written == () and len(again.kept) == 6
    assert _listing(out) == first  # nothing rewritten

    (out / "rank-2.crt").unlink()
    (out / "rank-2.key").unlink()
    refill = provision(config, out)
    assert [p.name for p in refill.written] == ["rank-2.crt", "rank-2.key"] and len(refill.kept) == 4
    _cert(out / "rank-2.crt").verify_directly_issued_by(_cert(out / "ca.crt"))
    assert (out / "rank-2.key").read_bytes() != first["rank-2.key"]

    # a party added later: the others keep their files, the new one is signed by the same CA
    bigger = _job(tmp_path / "job", ROWS + "3,3,10.0.3.3,8893,\n", clients=3)
    added = provision(bigger, out)
    assert [p.name for p in added.written] == ["rank-3.crt", "rank-3.key"]
    _cert(out / "rank-3.crt").verify_directly_issued_by(_cert(out / "ca.crt"))
    assert all(_listing(out)[name] == data for name, data in first.items() if not name.startswith("rank-2"))

    forced = provision(bigger, out, force=True)
    assert not forced.new_ca and len(forced.written) == 8 and forced.kept == ()
    assert (out / "ca.crt").read_bytes() == first["ca.crt"] and (out / "ca.key").read_bytes() == first["ca.key"]
    assert (out / "rank-0.key").read_bytes() != first["rank-0.key"]


def test_rank_writes_one_party_and_must_be_in_the_job(tmp_path):
    config, out = _job(tmp_path / "job"), tmp_path / "certs"
    done = provision(config, out, rank=1)
    assert done.new_ca and [p.name for p in done.written] == ["rank-1.crt", "rank-1.key"]
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "rank-1.crt", "rank-1.key"]
    with pytest.raises(ConfigError, match=r"--rank 3: a gRPC job of 3 parties has ranks 0 \(server\) to 2"):
        provision(config, out, rank=3)


def test_a_ca_whose_certificate_and_key_do_not_match_is_refused_and_nothing_is_written(tmp_path):
    config, out = _job(tmp_path / "job"), tmp_path / "certs"
    provision(config, out)
    provision(config, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "ca.key", out / "ca.key")
    (out / "rank-2.crt").unlink()
    before = _listing(out)
    with pytest.raises(ConfigError, match=r"ca\.key is not the key of ca\.crt"):
        provision(config, out)
    assert _listing(out) == before

    (out / "ca.key").unlink()
    with pytest.raises(ConfigError, match=r"ca\.crt is there but ca\.key is not"):
        provision(config, out)
    assert _listing(out) == {k: v for k, v in before.items() if k != "ca.key"}


def test_party_files_that_no_longer_fit_are_refused_until_forced(tmp_path):
    config, out = _job(tmp_path / "job"), tmp_path / "certs"
    provision(config, out)

    moved = _job(tmp_path / "job", ROWS.replace("10.0.1.7", "10.0.1.8"))
    with pytest.raises(ConfigError, match=r"rank-1\.crt names .*10\.0\.1\.7.* but the ip-config gives rank 1 .*10\.0\.1\.8.*--force"):
        provision(moved, out)
    provision(moved, out, rank=1, force=True)
    assert _names(_cert(out / "rank-1.crt"))[1] == ["10.0.1.8", "203.0.113.9"]

    shutil.copy(out / "rank-0.key", out / "rank-2.key")
    with pytest.raises(ConfigError, match=r"rank-2\.crt does not match rank-2\.key"):
        provision(moved, out)

    # party files left from a CA that is gone: a new CA would not have signed them
    for name in ("ca.crt", "ca.key"):
        (out / name).unlink()
    with pytest.raises(ConfigError, match=r"rank-0\.crt was signed by a CA that is no longer in the folder"):
        provision(moved, out)
    assert not (out / "ca.crt").exists()


def test_an_ip_config_is_needed(tmp_path):
    config = _job(tmp_path / "job")
    with pytest.raises(ConfigError) as info:
        provision(config, tmp_path / "certs", ["comm_args.grpc_ipconfig_path=null"])
    assert explain(info.value).startswith("comm_args.grpc_ipconfig_path: provisioning reads every party's rank")
    with pytest.raises(ConfigError, match="comm_args.grpc_ipconfig_path: .*missing.csv.* does not exist"):
        provision(config, tmp_path / "certs", [f"comm_args.grpc_ipconfig_path={tmp_path}/missing.csv"])
    assert not (tmp_path / "certs").exists()


def test_cli_writes_the_files_and_says_how_to_use_them(tmp_path):
    config, out = _job(tmp_path / "job"), tmp_path / "certs"
    result = subprocess.run(
        [sys.executable, "-m", "fedml_progfed", "provision", "--cf", str(config), "--out", str(out),
         "--set", "train_args.client_num_in_total=1", "train_args.client_num_per_round=1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"wrote the CA: {out}/ca.crt {out}/ca.key" in text
    assert f"wrote {out}/rank-0.crt {out}/rank-0.key {out}/rank-1.crt {out}/rank-1.key" in text
    assert "rank-2" not in text  # --set made it a job of two parties
    ca, cert, key = f"{out}/ca.crt", f"{out}/rank-{{rank}}.crt", f"{out}/rank-{{rank}}.key"
    assert f"progfed_tls_ca: {ca}, progfed_tls_cert: {cert}, progfed_tls_key: {key}" in text
    assert "ca.key stays with whoever provisions" in text and "never copied to the silos" in text
    for rank in (0, 1):  # the printed settings load for every party
        assert TLSMaterial.load(ca, cert, key, rank).rank == rank


def test_cli_errors_are_one_line(tmp_path, capsys):
    config = _job(tmp_path / "job")
    out = tmp_path / "certs"
    assert main(["provision", "--cf", str(config), "--out", str(out), "--rank", "1"]) == 0
    assert "wrote the CA" in capsys.readouterr().out
    assert main(["provision", "--cf", str(config), "--out", str(out), "--rank", "1"]) == 0
    assert "reused the CA" in capsys.readouterr().out
    assert main(["provision", "--cf", str(config), "--out", str(out), "--rank", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --rank 7:"), err
    (tmp_path / "file").write_text("")
    assert main(["provision", "--cf", str(config), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err


def test_ipaddress_names_are_real_ip_entries(tmp_path):
    # an IP in the ip-config must be an IP name, not a DNS name "10.0.1.7": TLS clients match IPs only to IP names
    provision(_job(tmp_path / "job"), tmp_path / "certs", rank=1)
    san = _cert(tmp_path / "certs" / "rank-1.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.1.7") in san.get_values_for_type(x509.IPAddress)
    assert "10.0.1.7" not in san.get_values_for_type(x509.DNSName)
