"""Whether a gRPC party speaks TLS: its checked certificate files, or plain TCP where nobody else can listen.

Without certificates every message is readable and forgeable by whoever reaches the
ports, so plain TCP is allowed only when every party of the ip-config is on loopback,
unless ``progfed_allow_insecure: true`` says the network is trusted (and every start
says so in the log).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

from fedml_progfed.fedml_plugin.grpc_tls import TLSMaterial, exposed_addresses
from fedml_progfed.runners.cross_silo.endpoints import resolve_config_path

if TYPE_CHECKING:
    from fedml_progfed.config import RunConfig

log = logging.getLogger("fedml_progfed")


def transport_security(config: RunConfig, rank: int, endpoints: Mapping[int, Any],
                       config_file: str | None) -> TLSMaterial | None:
    """This party's TLS material, or ``None`` for plain TCP where that is allowed.

    Raises
    ------
    ConfigError
        A bad certificate file (the key named), or plain TCP with an address off loopback
        and ``progfed_allow_insecure`` not set.
    """
    from fedml_progfed.errors import FieldError

    p = config.progfed
    if p.tls_ca:
        ca, cert, key = (str(resolve_config_path(path.replace("{rank}", str(rank)), config_file))
                         for path in (p.tls_ca, p.tls_cert, p.tls_key))
        return TLSMaterial.load(ca, cert, key, rank)
    exposed = exposed_addresses(endpoints)
    if exposed and not p.allow_insecure:
        raise FieldError(
            "progfed.tls_ca",
            f"the ip-config puts parties on {', '.join(exposed)}, off this machine, and no certificates are set: "
            f"anyone who reaches those ports could read the models and speak as any party. Run "
            f"`fedml-progfed provision --cf CONFIG --out DIR` and set comm_args.progfed_tls_ca: DIR/ca.crt, "
            f"progfed_tls_cert: DIR/rank-{{rank}}.crt, progfed_tls_key: DIR/rank-{{rank}}.key (or, on a network you "
            f"trust, comm_args.progfed_allow_insecure: true)",
        )
    if exposed:
        log.warning("rank %d: plain TCP without TLS on %s (progfed_allow_insecure: true): messages can be read and "
                    "forged by anyone who reaches these ports", rank, ", ".join(exposed))
    return None
