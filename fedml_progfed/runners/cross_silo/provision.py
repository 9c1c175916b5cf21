"""Certificates for a gRPC job's mutual TLS: one CA per federation, one certificate and key per rank.

``provision`` reads the job's config and ip-config, so every rank gets a certificate
that names it (subject CN ``rank-R``, how a receiver learns who called) and the
addresses peers dial (IP or DNS names, for the TLS host check). The CA's key signs
new parties later: an ``out`` folder that already holds a CA keeps it, so adding a
hospital does not mean new files for every other party.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedml_progfed.config import load_config
from fedml_progfed.errors import ConfigError
from fedml_progfed.fedml_plugin.grpc_dial import Endpoint
from fedml_progfed.fedml_plugin.grpc_tls import is_loopback, rank_name
from fedml_progfed.runners.cross_silo.endpoints import job_endpoints

#: Lifetime of a party certificate (the longest public CAs issue; short enough to be renewed).
PARTY_DAYS = 825
#: Lifetime of the CA, longer than any certificate it signs.
CA_DAYS = 3650
#: Certificates start an hour in the past so a party whose clock lags a little accepts them.
CLOCK_SKEW = timedelta(hours=1)

_CA_CERT, _CA_KEY = "ca.crt", "ca.key"


@dataclass(frozen=True)
class Provisioned:
    """What :func:`provision` left in ``out``.

    Attributes
    ----------
    out, ca_cert, ca_key
        The folder and the CA's files (``ca.key`` stays with whoever provisions).
    new_ca
        True when this call created the CA, False when it reused the one in ``out``.
    written
        Party files written by this call (``rank-R.crt`` and ``rank-R.key`` of each rank).
    kept
        Party files that were already there, checked and left as they were.
    """

    out: Path
    ca_cert: Path
    ca_key: Path
    new_ca: bool
    written: tuple[Path, ...]
    kept: tuple[Path, ...]


@dataclass(frozen=True)
class _Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def party_files(out: Path, rank: int) -> tuple[Path, Path]:
    """``out/rank-R.crt`` and ``out/rank-R.key``."""
    return out / f"{rank_name(rank)}.crt", out / f"{rank_name(rank)}.key"


def provision(
    config_file: str | Path, out: Path, overrides: Sequence[str] = (), *, rank: int | None = None, force: bool = False
) -> Provisioned:
    """Write the CA and the certificate and key of every rank of the job (or only ``rank``) into ``out``.

    A CA already in ``out`` is reused; party files already there are checked (signed by
    that CA, issued to that rank for the ip-config's addresses, key matching) and kept,
    unless ``force`` rewrites them. The CA itself is never replaced: move ``ca.crt`` and
    ``ca.key`` away to start a new federation (every party then needs new files).

    Raises
    ------
    ConfigError
        No or bad ip-config, a ``rank`` outside the job, a CA whose certificate and key
        do not match (or only one of them), party files that no longer fit the CA or the
        ip-config (``force`` rewrites them). Nothing is written when it is raised.
    """
    _, config = load_config(config_file, overrides)
    endpoints = job_endpoints(config, config_file, rank, needed_by=(
        "provisioning reads every party's rank and address from the ip-config (CSV: eid,rank,grpc_server_ip,"
        "grpc_server_port[,ingress_ip]); name it in the config or with --set"))
    parties = config.client_num_per_round + 1
    ranks = range(parties) if rank is None else [rank]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; name a folder (it is created if missing)")
    now = datetime.now(timezone.utc)
    authority = _load_authority(out, now)

    # check everything before writing anything, so an error leaves the folder as it was
    to_write, kept = [], []
    for r in ranks:
        cert_path, key_path = party_files(out, r)
        if force or not (cert_path.exists() and key_path.exists()):
            to_write.append(r)
            continue
        problem = _stale(cert_path, key_path, authority, r, subject_names(endpoints[r]), now)
        if problem:
            again = f"--force --rank {r}" if rank is not None else "--force"
            raise ConfigError(f"--out {out}: {cert_path.name} {problem}; {again} writes new files for it")
        kept += [cert_path, key_path]

    new_ca = authority is None
    if new_ca:
        authority = _new_authority(Path(config_file).stem, now)
        _write(out / _CA_KEY, _key_pem(authority.key), private=True)
        _write(out / _CA_CERT, authority.cert.public_bytes(serialization.Encoding.PEM))
    written = []
    for r in to_write:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _party_certificate(authority, key, r, subject_names(endpoints[r]), now)
        cert_path, key_path = party_files(out, r)
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        written += [cert_path, key_path]
    return Provisioned(out, out / _CA_CERT, out / _CA_KEY, new_ca, tuple(written), tuple(kept))


def subject_names(endpoint: Endpoint) -> list[x509.GeneralName]:
    """The names a party's certificate holds: ``rank-R``, then its listen and ingress addresses.

    An IP address becomes an IP name and anything else a DNS name; loopback adds both
    ``localhost`` and 127.0.0.1 (peers on the same machine dial either); a wildcard bind
    address (0.0.0.0, ::) is left out, no peer dials it.
    """
    names: list[x509.GeneralName] = [x509.DNSName(rank_name(endpoint.rank))]
    for host in (endpoint.host, endpoint.ingress):
        if not host:
            continue
        if is_loopback(host):
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not host.isascii() or not host.strip() or " " in host:
                raise ConfigError(
                    f"comm_args.grpc_ipconfig_path: rank {endpoint.rank}'s address {host!r} is neither an IP address "
                    f"nor a host name; write the address peers dial"
                ) from None
            names.append(x509.DNSName(host.lower()))
            continue
        if not address.is_unspecified:
            names.append(x509.IPAddress(address))
    return list(dict.fromkeys(names))  # each once, in order


# ---------------------------------------------------------------- the CA


def _load_authority(out: Path, now: datetime) -> _Authority | None:
    """The CA already in ``out``, checked; None when there is none."""
    cert_path, key_path = out / _CA_CERT, out / _CA_KEY
    fresh = "or move both away to start a new federation (every party then needs new files)"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not key_path.exists() or not cert_path.exists():
        present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise ConfigError(f"--out {out}: {present.name} is there but {absent.name} is not; restore it, {fresh}")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise ConfigError(f"--out {out}: {_CA_CERT} is not a PEM certificate; restore it, {fresh}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--out {out}: {_CA_KEY} is not an unencrypted PEM key; restore it, {fresh}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _public_der(key) != _public_der(cert):
        raise ConfigError(
            f"--out {out}: {_CA_KEY} is not the key of {_CA_CERT} (the two files come from different CAs); "
            f"restore the pair written together, {fresh}"
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"--out {out}: {_CA_CERT} is not a CA certificate; restore the CA's files, {fresh}")
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"--out {out}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}; move its files away "
                          f"to start a new federation (every party then needs new files)")
    return _Authority(cert, key)


def _new_authority(label: str, now: datetime) -> _Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedml-progfed CA ({label})")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # signs parties, no sub-CAs
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(cert, key)


def _party_certificate(
    authority: _Authority, key: ec.EllipticCurvePrivateKey, rank: int, names: list[x509.GeneralName], now: datetime
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rank_name(rank))]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        # a reused CA may end sooner than a new certificate would
        .not_valid_after(min(now + timedelta(days=PARTY_DAYS), authority.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        # every party is a gRPC server (it receives) and a client (it sends)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False)
        .sign(authority.key, hashes.SHA256())
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    uses = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    return x509.KeyUsage(**{**uses, **allowed})


# ---------------------------------------------------------------- party files already there


def _stale(
    cert_path: Path, key_path: Path, authority: _Authority | None, rank: int, names: list[x509.GeneralName], now: datetime
) -> str | None:
    """Why existing party files can no longer be used (None when they can)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return f"or {key_path.name} is not a PEM file this tool wrote"
    if authority is None:
        return f"was signed by a CA that is no longer in the folder ({_CA_CERT} and {_CA_KEY} are missing)"
    try:
        cert.verify_directly_issued_by(authority.cert)
    except (ValueError, TypeError, InvalidSignature):  # other issuer, other key type, bad signature: not this CA's
        return f"is not signed by the CA in {_CA_CERT}"
    if cert.subject != x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rank_name(rank))]):
        return f"names {cert.subject.rfc4514_string()!r}, not {rank_name(rank)}"
    if _public_der(key) != _public_der(cert):
        return f"does not match {key_path.name}"
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        held = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        held = set()
    if held != set(names):
        return (f"names {_describe(held)} but the ip-config gives rank {rank} {_describe(set(names))} "
                f"(peers check the address they dial against it)")
    return None


def _describe(names: set[x509.GeneralName]) -> str:
    return ", ".join(sorted(str(n.value) for n in names)) or "no addresses"


# ---------------------------------------------------------------- files


def _public_der(item: PrivateKeyTypes | x509.Certificate) -> bytes:
    return item.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # unencrypted: gRPC takes the key as bytes and has no passphrase; the file mode protects it
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write through a temporary file and a rename, so a reader never sees half a file; keys get mode 0600."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the folder holds the CA's key
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            if private:
                os.fchmod(handle.fileno(), 0o600)  # a leftover temporary file keeps its old mode under O_CREAT
            handle.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigError(f"--out {path.parent}: cannot write {path.name} ({exc.strerror or exc})") from None
