"""The broker and bucket of an MQTT_S3 job: read from FedML's offline keys, checked, probed, named per run.

FedML 0.9.6 takes the broker from ``comm_args.customized_training_mqtt_config`` and the
bucket from ``comm_args.customized_training_s3_config``; when either is missing it asks
its hosted platform and dies offline with a ``KeyError`` (FEDML_NOTES, "MQTT_S3").
:func:`mqtt_s3_settings` makes a missing dict or key one error naming it, before any
network call; :func:`probe` makes a broker or endpoint that does not answer one error
before start-up. Topics and S3 keys carry the run id, so runs sharing a broker or a
bucket never see each other's messages, last wills or objects.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from fedml_progfed.errors import FieldError

MQTT_KEY = "customized_training_mqtt_config"
S3_KEY = "customized_training_s3_config"
MQTT_FIELDS = ("BROKER_HOST", "BROKER_PORT")
S3_FIELDS = ("BUCKET_NAME", "CN_S3_AKI", "CN_S3_SAK", "CN_REGION_NAME")  # CN_S3_ENDPOINT: optional, AWS's without
#: How long start-up waits for the broker and the S3 endpoint to answer.
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class MqttS3Settings:
    """One party's view of an MQTT_S3 job (``repr`` never shows a credential)."""

    run_id: str
    broker_host: str
    broker_port: int
    keepalive_s: int
    bucket: str
    region: str
    endpoint: str | None
    max_message_bytes: int = 64 << 20
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    s3_access_key: str = ""
    s3_secret_key: str = ""

    def __repr__(self) -> str:  # credentials stay out of every log line and traceback
        return (f"MqttS3Settings(run_id={self.run_id!r}, broker={self.broker_host}:{self.broker_port}, "
                f"bucket={self.bucket!r}, endpoint={self.endpoint!r})")

    def scrub(self, text: str) -> str:
        """``text`` with every credential value of these settings replaced (for errors quoting a library's message)."""
        for secret in (self.mqtt_password, self.s3_access_key, self.s3_secret_key):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    # ------------------------------------------------------------ names per run

    @property
    def prefix(self) -> str:
        """Topic root and S3 key prefix of this run."""
        return f"progfed/{self.run_id}"

    def inbox(self, receiver: int, sender: int | str = "+") -> str:
        """The topic of messages from ``sender`` to ``receiver`` (``+``: any sender)."""
        return f"{self.prefix}/msg/{sender}/{receiver}"

    def will(self, rank: int | str = "+") -> str:
        """The last-will topic of ``rank``: the broker publishes there when the party's connection drops."""
        return f"{self.prefix}/will/{rank}"

    @property
    def broker_is_loopback(self) -> bool:
        return is_loopback_host(self.broker_host)

    def describe(self) -> str:
        return f"broker {self.broker_host}:{self.broker_port}, bucket {self.bucket} at {self.endpoint or 'AWS S3'}"

    def s3_client(self) -> Any:
        """A boto3 S3 client for the configured endpoint (signature v4, short timeouts, no retries storm)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region or None,
            aws_access_key_id=self.s3_access_key, aws_secret_access_key=self.s3_secret_key,
            config=Config(signature_version="s3v4", connect_timeout=PROBE_TIMEOUT_S, read_timeout=60,
                          retries={"max_attempts": 2}),
        )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _section(comm: Mapping[str, Any], key: str, fields: tuple[str, ...], what: str) -> Mapping[str, Any]:
    value = comm.get(key)
    if not isinstance(value, Mapping) or not value:
        raise FieldError(key, f"backend MQTT_S3 needs the {what} as a mapping with {', '.join(fields)} "
                              f"(without it FedML asks its hosted platform); see config/fashion_mnist_mqtt_s3.yaml")
    missing = [f for f in fields if value.get(f) in (None, "")]
    if missing:
        raise FieldError(key, f"{', '.join(missing)} missing; backend MQTT_S3 needs {', '.join(fields)}")
    return value


def mqtt_s3_settings(flat: Mapping[str, Any], run_id: str, max_message_bytes: int = 64 << 20) -> MqttS3Settings:
    """The checked settings from FedML's flattened args (or the ``comm_args`` section); no network call.

    Raises
    ------
    FieldError
        A missing ``customized_training_mqtt_config`` / ``customized_training_s3_config`` or key in it.
    """
    mqtt = _section(flat, MQTT_KEY, MQTT_FIELDS, "broker (MQTT)")
    s3 = _section(flat, S3_KEY, S3_FIELDS, "bucket (S3)")
    try:
        port = int(mqtt["BROKER_PORT"])
        keepalive = int(mqtt.get("MQTT_KEEPALIVE") or 60)
    except (TypeError, ValueError):
        raise FieldError(MQTT_KEY, "BROKER_PORT and MQTT_KEEPALIVE must be integers") from None
    user = mqtt.get("MQTT_USER") or None
    return MqttS3Settings(
        run_id=str(run_id), broker_host=str(mqtt["BROKER_HOST"]), broker_port=port, keepalive_s=max(5, keepalive),
        bucket=str(s3["BUCKET_NAME"]), region=str(s3["CN_REGION_NAME"]), endpoint=s3.get("CN_S3_ENDPOINT") or None,
        max_message_bytes=max_message_bytes, mqtt_user=None if user is None else str(user),
        mqtt_password=None if mqtt.get("MQTT_PWD") in (None, "") else str(mqtt["MQTT_PWD"]),
        s3_access_key=str(s3["CN_S3_AKI"]), s3_secret_key=str(s3["CN_S3_SAK"]),
    )


def has_both(flat: Mapping[str, Any]) -> bool:
    """Whether the config names both the broker and the bucket (else only FedML's platform can)."""
    return all(isinstance(flat.get(k), Mapping) and flat.get(k) for k in (MQTT_KEY, S3_KEY))


def probe(settings: MqttS3Settings) -> None:
    """The broker accepts TCP and the bucket answers, each within :data:`PROBE_TIMEOUT_S`; else one error naming the key.

    Raises
    ------
    FieldError
        The broker does not answer, the S3 endpoint does not answer, or the bucket is missing / refused.
    """
    try:
        with socket.create_connection((settings.broker_host, settings.broker_port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise FieldError(MQTT_KEY, f"no MQTT broker answers at {settings.broker_host}:{settings.broker_port} "
                                   f"({exc.strerror or exc}); start it or fix BROKER_HOST/BROKER_PORT") from None
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        settings.s3_client().head_bucket(Bucket=settings.bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        fix = "create it first" if code in ("404", "NoSuchBucket") else "check CN_S3_AKI/CN_S3_SAK and its policy"
        raise FieldError(S3_KEY, f"bucket {settings.bucket!r} at {settings.endpoint or 'AWS S3'}: {code}; {fix}") from None
    except (BotoCoreError, ValueError) as exc:
        raise FieldError(S3_KEY, f"no S3 endpoint answers at {settings.endpoint or 'AWS S3'} ({type(exc).__name__}); "
                                 f"start it or fix CN_S3_ENDPOINT") from None
