"""Mutual TLS for the gRPC transport: the checked certificate files of one party and who is calling.

Every party of a job holds the federation's CA certificate and its own certificate and
key (``fedml-progfed provision`` writes them). Each certificate's subject CN is
``rank-R``: with client certificates required and verified against the CA, the CN of
the caller's certificate is the caller's rank (:func:`peer_rank`), so a receiver need
not trust the rank a message claims.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedml_progfed.errors import ConfigError

#: The config keys that name the three files, for the errors.
CA_KEY, CERT_KEY, KEY_KEY = "comm_args.progfed_tls_ca", "comm_args.progfed_tls_cert", "comm_args.progfed_tls_key"

#: gRPC's auth-context property holding the verified peer certificate's subject CN.
COMMON_NAME_PROPERTY = "x509_common_name"

_RANK_NAME = re.compile(r"rank-(0|[1-9][0-9]*)")
_PROVISION = "fedml-progfed provision --cf CONFIG --out DIR writes them"


def rank_name(rank: int) -> str:
    """The subject CN (and DNS name) of ``rank``'s certificate: ``rank-R``."""
    return f"rank-{rank}"


def parse_rank_name(name: str) -> int | None:
    """The rank a ``rank-R`` name stands for; None for any other name."""
    match = _RANK_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ``::1`` (brackets allowed): an address only this machine reaches."""
    host = host.strip().strip("[]").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposed_addresses(endpoints: Mapping[int, Any]) -> list[str]:
    """Listen and ingress addresses of an ip-config (``Endpoint``s) that other machines can reach."""
    hosts = {h for e in endpoints.values() for h in (e.host, e.ingress) if h}
    return sorted(h for h in hosts if not is_loopback(h))


@dataclass(frozen=True)
class TLSMaterial:
    """One party's checked TLS files: the federation's CA, its own certificate and key, and its rank.

    Build it with :meth:`load`, which checks that the files fit together and belong to ``rank``.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never into a log line
    rank: int

    @classmethod
    def load(cls, ca: str, cert: str, key: str, rank: int) -> TLSMaterial:
        """Read and check the three PEM files of party ``rank``.

        ``{rank}`` in a path is replaced by the rank, so one config serves every party
        (``certs/rank-{rank}.crt``).

        Raises
        ------
        ConfigError
            One line naming the config key and the fix: a file missing, unreadable or not
            PEM; a CA file that is no CA; a certificate not signed by the CA, issued to
            another rank, expired or not yet valid, or without the TLS client and server uses;
            a key that is not the certificate's.
        """
        now = datetime.now(timezone.utc)
        ca_path, cert_path, key_path = (Path(p.replace("{rank}", str(rank))).expanduser() for p in (ca, cert, key))
        ca_pem, cert_pem, key_pem = _read(CA_KEY, ca_path), _read(CERT_KEY, cert_path), _read(KEY_KEY, key_path)

        try:
            authorities = x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise ConfigError(f"{CA_KEY}: {ca_path} is not a PEM certificate; name the federation's ca.crt") from None
        for authority in authorities:
            if not _is_ca(authority):
                raise ConfigError(
                    f"{CA_KEY}: {ca_path} holds {_subject(authority)!r}, which is not a CA certificate; "
                    f"name the federation's ca.crt, not a party's certificate"
                )
            _check_dates(CA_KEY, ca_path, authority, now, "the CA")
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ConfigError(f"{CERT_KEY}: {cert_path} is not a PEM certificate; name this party's rank-{rank}.crt") from None
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:  # cryptography's way of saying the key is encrypted
            raise ConfigError(f"{KEY_KEY}: {key_path} is encrypted; gRPC needs an unencrypted key (readable only by this account)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"{KEY_KEY}: {key_path} is not a PEM private key; name this party's rank-{rank}.key") from None

        if not any(_issued_by(certificate, authority) for authority in authorities):
            raise ConfigError(
                f"{CERT_KEY}: {cert_path} is not signed by the CA in {ca_path} ({CA_KEY}); use the files one "
                f"provisioning wrote together (a new CA means new files for every party)"
            )
        named = parse_rank_name(_subject(certificate))
        if named is None:
            raise ConfigError(
                f"{CERT_KEY}: certificate {cert_path.name} names {_subject(certificate)!r}, not a rank (rank-R); "
                f"{_PROVISION}"
            )
        if named != rank:
            raise ConfigError(
                f"{CERT_KEY}: certificate {cert_path.name} names rank {named} but this process is --rank {rank}; "
                f"give each party its own files (a path with {{rank}}, e.g. DIR/rank-{{rank}}.crt, picks them)"
            )
        _check_dates(CERT_KEY, cert_path, certificate, now, "the certificate")
        _check_uses(cert_path, certificate)
        if _public_der(private_key.public_key()) != _public_der(certificate.public_key()):
            raise ConfigError(
                f"{KEY_KEY}: {key_path} is not the key of {cert_path} ({CERT_KEY}); use the rank-{rank}.key "
                f"written with that certificate"
            )
        return cls(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, rank=rank)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for this party's gRPC server: callers must present a certificate signed by the CA."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for this party's channels: trust only the CA, and show this party's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


def peer_rank(context: grpc.ServicerContext) -> int | None:
    """The rank of the party calling, from its verified certificate; None without a TLS identity of the form rank-R.

    Only meaningful on a server built with :meth:`TLSMaterial.server_credentials`, which refuses
    callers whose certificate the CA did not sign.
    """
    names = context.auth_context().get(COMMON_NAME_PROPERTY) or []
    if len(names) != 1:  # none (insecure) or ambiguous: no identity
        return None
    try:
        return parse_rank_name(names[0].decode("ascii"))
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------- checks


def _read(key: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist; {_PROVISION}, then copy ca.crt and rank-R.crt/.key to party R") from None
    except OSError as exc:
        raise ConfigError(f"{key}: {path} cannot be read ({exc.strerror or exc}); let this process's account read it") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path} is not PEM (no -----BEGIN line); {_PROVISION}")
    return data


def _subject(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else certificate.subject.rfc4514_string()


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):  # other issuer name, unsupported key, bad signature
        return False
    return True


def _check_dates(key: str, path: Path, certificate: x509.Certificate, now: datetime, what: str) -> None:
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now < start:
        raise ConfigError(
            f"{key}: {path}: {what} is valid only from {start:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )
    if now > end:
        raise ConfigError(f"{key}: {path}: {what} expired on {end:%Y-%m-%d %H:%M} UTC; provision new files")


def _check_uses(path: Path, certificate: x509.Certificate) -> None:
    # every party both serves (it receives) and calls (it sends); a certificate limited to one
    # use would fail the TLS handshake with a message that names neither file
    try:
        uses = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return  # no restriction: any use
    missing = [name for oid, name in ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                                      (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")) if oid not in uses]
    if missing:
        raise ConfigError(
            f"{CERT_KEY}: {path} lacks the extended key usage {' and '.join(missing)}; every party is a gRPC "
            f"server and client, so it needs both ({_PROVISION})"
        )


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
