"""Our MQTT_S3 transport for FedML's cross-silo runtime: the edge (Octopus) path, finishing and failing cleanly.

FedML 0.9.6's ``MqttS3MultiClientsCommManager`` never ends a job: a client publishes
FINISHED (QoS 2) and disconnects before the broker's handshake completes, so the
server waits forever; it publishes ``retain=True`` and drops retained messages (one
published before its peer subscribed is lost), never reads the last wills it sets (on
topics shared by every run of a broker), never deletes its S3 objects and
``pickle.load``-s whatever object a message names. :class:`ProgFedMqttS3CommManager`
keeps FedML's observer interface and replaces the rest:

- a message is one :mod:`~fedml_progfed.comm.envelope` body (JSON header and raw
  tensors, no pickle); a body with tensors goes to S3 under the run's prefix and the
  MQTT message (JSON) names its key, size and SHA-256; a small one rides inline;
- every publish waits for QoS 2 to complete, so the last message is delivered before
  the party disconnects; nothing is retained;
- topics carry the run id (``progfed/<run>/msg/<sender>/<receiver>``); a party's last
  will is on ``progfed/<run>/will/<rank>``: a party whose connection drops is named
  within seconds, and runs sharing a broker never trip each other;
- :class:`~fedml_progfed.fedml_plugin.comm.WatchedComm` adds the deadlines
  (``progfed_round_timeout_s``) and abort notices (sent through the broker);
- the receiver deletes each object it read; the server deletes the run's prefix at the end.

Wire bytes are the S3 object bytes plus the MQTT payload bytes of every message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import secrets
import threading
from typing import Any, Mapping

from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager
from fedml.core.distributed.communication.message import Message

from fedml_progfed.comm.envelope import RefusedMessage, decode, encode
from fedml_progfed.errors import PeerError
from fedml_progfed.fedml_plugin.comm import (
    ABORT, ABORT_REASON, C2S_CLIENT_STATUS, CLIENT_STATUS, FINISHED, CommOptions, OwnTransport, WatchedComm,
)
from fedml_progfed.fedml_plugin.mqtt_s3_settings import MqttS3Settings

log = logging.getLogger("fedml_progfed")

#: Largest MQTT payload accepted: the JSON of a message (bodies with tensors travel through S3).
MAX_CONTROL_BYTES = 256 << 10
#: Bodies up to this size ride inline in the MQTT message (status, finish, abort notices).
INLINE_BYTES = 16 << 10
QOS = 2
ONLINE = "ONLINE"
#: How long connecting to the broker and its acknowledgements may take.
CONNECT_TIMEOUT_S = 15.0


def control_message(settings: MqttS3Settings, body: bytes, params: Mapping[str, Any], s3_key: str | None) -> bytes:
    """The MQTT payload (JSON) of one message: who, what, and the body inline or its S3 key."""
    doc: dict[str, Any] = {
        "v": 1, "run": settings.run_id, "type": params.get("msg_type"), "sender": int(params.get("sender")),
        "receiver": int(params.get("receiver")), "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(),
    }
    if s3_key is None:
        doc["body"] = base64.b64encode(body).decode("ascii")
    else:
        doc["s3_key"] = s3_key
    return json.dumps(doc, separators=(",", ":")).encode()


def connect_client(settings: MqttS3Settings, rank: int, on_message: Any = None) -> Any:
    """A connected paho client for ``rank`` with its last will set, its network loop running.

    Raises
    ------
    PeerError
        The broker refused or did not answer within :data:`CONNECT_TIMEOUT_S`.
    """
    import paho.mqtt.client as mqtt

    client = mqtt.Client(client_id=f"progfed-{settings.run_id}-{rank}-{secrets.token_hex(4)}", clean_session=True)
    if settings.mqtt_user is not None:
        client.username_pw_set(settings.mqtt_user, settings.mqtt_password)
    will = json.dumps({"v": 1, "run": settings.run_id, "rank": rank})
    client.will_set(settings.will(rank), will, qos=1, retain=False)
    connected, result = threading.Event(), {}

    def on_connect(_client: Any, _userdata: Any, _flags: Any, rc: int) -> None:
        result["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    if on_message is not None:
        client.on_message = on_message
    try:
        client.connect(settings.broker_host, settings.broker_port, settings.keepalive_s)
    except OSError as exc:
        raise PeerError(settings.scrub(f"cannot reach the MQTT broker at {settings.broker_host}:{settings.broker_port} "
                                       f"({exc}); start it or fix comm_args.customized_training_mqtt_config")) from None
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT_S) or result.get("rc") != 0:
        client.loop_stop()
        raise PeerError(f"the MQTT broker at {settings.broker_host}:{settings.broker_port} refused rank {rank} "
                        f"(code {result.get('rc', 'timeout')}); check MQTT_USER/MQTT_PWD")
    return client


def publish(client: Any, topic: str, payload: bytes, timeout_s: float | None) -> None:
    """Publish once (QoS 2, not retained) and wait until the broker completed the handshake."""
    info = client.publish(topic, payload, qos=QOS, retain=False)
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError) as exc:  # paho: not connected, or its queue is full
        raise PeerError(f"the MQTT broker took no message on {topic} ({exc}): the connection dropped") from None
    if not info.is_published():
        raise PeerError(f"the MQTT broker did not confirm a message on {topic} within {timeout_s} s "
                        f"(progfed_args.progfed_round_timeout_s): it is gone or overloaded")


def send_abort_notices(settings: MqttS3Settings, rank: int, parties: int, reason: str, skip: int | None) -> None:
    """Tell every other party (through the broker) that the job ends and why; best effort, a few seconds at most."""
    try:
        client = connect_client(settings, rank)
    except PeerError:
        return
    try:
        for peer in range(parties):
            if peer in (rank, skip):
                continue
            params = {"msg_type": ABORT, "sender": rank, "receiver": peer, ABORT_REASON: reason[:2000]}
            body = encode(params, settings.run_id)
            try:
                publish(client, settings.inbox(peer, rank), control_message(settings, body, params, None), 3.0)
            except PeerError:
                pass
    finally:
        client.disconnect()
        client.loop_stop()


def delete_run_objects(settings: MqttS3Settings) -> int:
    """Delete every S3 object under this run's prefix; the count (best effort: a failure is a warning)."""
    try:
        s3 = settings.s3_client()
        count = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=settings.prefix + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=settings.bucket, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
        return count
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the job's own outcome
        log.warning("could not delete the run's S3 objects under %s/ (%s: %s)", settings.prefix, type(exc).__name__,
                    settings.scrub(str(exc)))
        return 0


class ProgFedMqttS3CommManager(OwnTransport, WatchedComm, BaseCommunicationManager):
    """FedML's MQTT_S3 comm manager that finishes, fails fast and decodes no pickle (see the module docstring).

    Parameters
    ----------
    config_path, s3_config_path, topic, client_rank, client_num, args
        As FedML's ``MqttS3MultiClientsCommManager`` (FedML's runtime passes them; the
        broker and bucket come from ``settings``, checked before start-up).
    options
        Deadlines, the ``fatal`` callback, device and meter.
    settings
        Broker, bucket, run id and message bound (:class:`MqttS3Settings`).
    """

    def __init__(
        self,
        config_path: Any = None,
        s3_config_path: Any = None,
        topic: str = "fedml",
        client_rank: int = 0,
        client_num: int = 0,
        args: Any = None,
        *,
        options: CommOptions,
        settings: MqttS3Settings,
    ) -> None:
        self._topic, self._observers, self.args = topic, [], args
        self.client_rank = self.client_id = int(client_rank)
        self.client_num = int(client_num)
        self.settings = settings
        self._setup_watch(self.client_rank, self.client_num, options)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._online: set[int] = set()  # clients whose ONLINE the server passed on (repeats are dropped)
        self._finished: set[int] = set()
        self._s3 = settings.s3_client()
        self.is_running = True
        self._client = connect_client(settings, self.client_rank, self._on_mqtt)
        self._subscribe()

    def _subscribe(self) -> None:
        """Subscribe to this party's inbox and its peers' last wills, and wait for the broker's acknowledgement:
        FedML's handshake (ONLINE, check-status) then cannot be published into a topic nobody listens to yet."""
        wills = self.settings.will("+") if self.client_rank == 0 else self.settings.will(0)
        acked, ids = threading.Event(), set()

        def on_subscribe(_client: Any, _userdata: Any, mid: int, _granted: Any) -> None:
            ids.discard(mid)
            if not ids:
                acked.set()

        self._client.on_subscribe = on_subscribe
        for topic in (self.settings.inbox(self.client_rank), wills):
            result, mid = self._client.subscribe(topic, qos=QOS)
            ids.add(mid)
        if not acked.wait(CONNECT_TIMEOUT_S):
            raise PeerError(f"the MQTT broker at {self.settings.broker_host}:{self.settings.broker_port} did not "
                            f"acknowledge rank {self.client_rank}'s subscriptions; is it overloaded?")

    def _on_mqtt(self, _client: Any, _userdata: Any, message: Any) -> None:
        """paho's network thread: queue the raw message (decoding and S3 reads happen in the receive loop)."""
        if message.retain:
            return  # published before this run's parties: not ours
        self.inbox.put((message.topic, bytes(message.payload)))

    # ---------------------------------------------------------------- FedML's interface

    def handle_receive_message(self) -> None:
        """FedML's order: tell the observers the connection is ready, then run the (blocking) receive loop."""
        self._announce_ready(self.client_rank)
        self._receive_loop()

    def stop_receive_message(self) -> None:
        """The run is over for this party: every message already waited for its QoS handshake, so disconnect."""
        self.is_running = False
        self._client.disconnect()
        self._client.loop_stop()
        if self.client_rank == 0:
            delete_run_objects(self.settings)

    # ---------------------------------------------------------------- sending

    def send_message(self, msg: Any) -> None:
        """Send one FedML message; raises :class:`PeerError` when the broker or the bucket fails."""
        self._stamp_device(msg)
        receiver = int(msg.get_receiver_id())
        params = msg.get_params()
        body = encode(params, self.settings.run_id)
        key = None
        if len(body) > INLINE_BYTES:
            key = f"{self.settings.prefix}/{self.client_rank}-to-{receiver}/{secrets.token_hex(8)}"
            try:
                self._s3.put_object(Bucket=self.settings.bucket, Key=key, Body=body)
            except Exception as exc:  # noqa: BLE001 - boto3's errors differ; all mean the upload failed
                raise PeerError(self.settings.scrub(f"uploading a message for {self._describe(receiver)} to bucket "
                                                    f"{self.settings.bucket} failed ({type(exc).__name__}: {exc})")) from None
        payload = control_message(self.settings, body, params, key)
        publish(self._client, self.settings.inbox(receiver, self.client_rank), payload, self.options.round_timeout_s)
        if self.options.meter is not None:
            self.options.meter.sent(len(payload) + (len(body) if key is not None else 0))
        self._after_send(msg)

    # ---------------------------------------------------------------- receiving

    def _running(self) -> bool:
        return self.is_running

    def _next_message(self, timeout: float) -> Any:
        """The next message that passed every check (``None`` when the one taken was dropped)."""
        topic, payload = self.inbox.get(timeout=timeout)
        if topic.startswith(self.settings.prefix + "/will/"):
            return self._last_will(topic)
        if self.options.meter is not None:
            self.options.meter.received(len(payload))
        try:
            envelope = self._read(topic, payload)
        except RefusedMessage as exc:
            log.warning("dropped a message on %s: %s", topic, exc)
            if self.options.meter is not None:
                self.options.meter.rejected(str(exc))
            return None
        if self.client_rank == 0 and envelope.type == C2S_CLIENT_STATUS:
            status = envelope.params.get(CLIENT_STATUS)
            if status == ONLINE and envelope.sender in self._online:
                return None  # a repeat (ONLINE crossed the server's check-status): FedML would start twice
            if status == ONLINE:
                self._online.add(envelope.sender)
            elif status == FINISHED:
                self._finished.add(envelope.sender)  # its connection may close now: not a failure
        msg = Message(envelope.type, envelope.sender, envelope.receiver)
        for key, value in envelope.params.items():
            msg.add_params(key, value)
        return msg

    def _read(self, topic: str, payload: bytes) -> Any:
        """Check the JSON, fetch the body (inline or from S3, which is then deleted), decode the envelope."""
        if len(payload) > MAX_CONTROL_BYTES:
            raise RefusedMessage(f"an MQTT payload of {len(payload)} bytes (at most {MAX_CONTROL_BYTES})")
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise RefusedMessage("the MQTT payload is not JSON (FedML's own format, or garbage)") from None
        if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("run") != self.settings.run_id:
            raise RefusedMessage("not a message of this run")
        sender, receiver = doc.get("sender"), doc.get("receiver")
        if topic != self.settings.inbox(self.client_rank, sender) or receiver != self.client_rank:
            raise RefusedMessage(f"sender {sender!r} / receiver {receiver!r} differ from the topic")
        size = doc.get("bytes")
        if not isinstance(size, int) or not 0 < size <= self.settings.max_message_bytes:
            raise RefusedMessage(f"a body of {size!r} bytes (at most {self.settings.max_message_bytes})")
        body = self._body(doc, size)
        if hashlib.sha256(body).hexdigest() != doc.get("sha256"):
            raise RefusedMessage("the body's SHA-256 differs from the one its message names")
        envelope = decode(body, self.settings.max_message_bytes)
        if (envelope.sender, envelope.receiver, envelope.run, envelope.type) != (sender, receiver, self.settings.run_id,
                                                                                 doc.get("type")):
            raise RefusedMessage("the body's sender, receiver, run or type differ from its message")
        if self.options.meter is not None and "s3_key" in doc:
            self.options.meter.received(len(body))
        return envelope

    def _body(self, doc: Mapping[str, Any], size: int) -> bytes:
        if "body" in doc:
            try:
                body = base64.b64decode(str(doc["body"]), validate=True)
            except ValueError:
                raise RefusedMessage("the inline body is not base64") from None
        else:
            key = doc.get("s3_key")
            if not isinstance(key, str) or not key.startswith(f"{self.settings.prefix}/{doc.get('sender')}-to-{self.client_rank}/"):
                raise RefusedMessage(f"S3 key {str(key)[:120]!r} is outside this run's prefix for its sender")
            try:
                got = self._s3.get_object(Bucket=self.settings.bucket, Key=key, Range=f"bytes=0-{size}")
                body = got["Body"].read(size + 1)
                self._s3.delete_object(Bucket=self.settings.bucket, Key=key)  # read once, by its one receiver
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable object drops this message only
                raise RefusedMessage(f"S3 object {key} unreadable ({type(exc).__name__})") from None
        if len(body) != size:
            raise RefusedMessage(f"the body has {len(body)} bytes, its message says {size}")
        return body

    def _last_will(self, topic: str) -> None:
        """A peer's broker connection dropped (the broker published its will): the job ends, naming it."""
        rank_text = topic.rsplit("/", 1)[-1]
        rank = int(rank_text) if rank_text.isdigit() else None
        if rank is None or rank == self.client_rank or rank in self._finished:
            return None
        raise PeerError(f"{self._describe(rank)} is gone: its connection to the MQTT broker dropped (its last will "
                        f"on {topic}); the process ended or lost the network", peer=rank)

    def _describe(self, rank: int) -> str:
        return "the server (rank 0)" if rank == 0 else f"client rank {rank}"
