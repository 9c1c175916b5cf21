"""MQTT_S3 settings without a broker: missing keys, redaction, per-run names, refused messages, the Octopus packages."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from fedml_progfed.config import check_sections, explain, redacted
from fedml_progfed.errors import FieldError
from fedml_progfed.fedml_plugin.mqtt_s3_settings import MQTT_KEY, S3_KEY, mqtt_s3_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "fashion_mnist_mqtt_s3.yaml"


def comm() -> dict:
    return yaml.safe_load(CONFIG.read_text())["comm_args"]


def test_both_dicts_are_known_keys_and_a_missing_one_names_itself():
    sections = yaml.safe_load(CONFIG.read_text())
    assert not [w for w in check_sections(sections) if "customized" in w]
    for key in (MQTT_KEY, S3_KEY):
        flat = {k: v for k, v in comm().items() if k != key}
        with pytest.raises(FieldError) as err:
            mqtt_s3_settings(flat, "r1")
        assert explain(err.value).startswith(f"comm_args.{key}: ")
    flat = comm()
    del flat[S3_KEY]["CN_S3_SAK"]
    with pytest.raises(FieldError, match="CN_S3_SAK missing"):
        mqtt_s3_settings(flat, "r1")


def test_credentials_are_redacted_and_never_in_repr():
    sections = yaml.safe_load(CONFIG.read_text())
    safe = redacted(sections)
    text = yaml.safe_dump(safe)
    for secret in ("local-demo-password", "local-demo-access-key", "local-demo-secret-key"):
        assert secret not in text
        assert secret not in repr(mqtt_s3_settings(comm(), "r1"))
    settings = mqtt_s3_settings(comm(), "r1")
    assert settings.scrub("key local-demo-access-key refused") == "key <redacted> refused"
    assert safe["comm_args"][MQTT_KEY]["BROKER_HOST"] == "127.0.0.1"  # only credentials go
    assert sections["comm_args"][MQTT_KEY]["MQTT_PWD"] == "local-demo-password"  # the original is untouched


def test_topics_and_keys_carry_the_run_id():
    a, b = mqtt_s3_settings(comm(), "run-a"), mqtt_s3_settings(comm(), "run-b")
    assert a.will(2) == "progfed/run-a/will/2" and a.will(2) != b.will(2)
    assert a.inbox(0, 1) == "progfed/run-a/msg/1/0" and a.prefix != b.prefix


def test_a_pickle_or_a_foreign_key_is_refused_without_unpickling():
    import pickle

    from fedml_progfed.comm.envelope import RefusedMessage, encode
    from fedml_progfed.fedml_plugin.comm import CommOptions
    from fedml_progfed.fedml_plugin.mqtt_s3_comm import ProgFedMqttS3CommManager, control_message

    manager = object.__new__(ProgFedMqttS3CommManager)  # no broker: only the receiving checks
    manager.settings, manager.client_rank = mqtt_s3_settings(comm(), "r1"), 0
    manager.options = CommOptions(None, lambda exc: None)
    topic = manager.settings.inbox(0, 1)
    with pytest.raises(RefusedMessage, match="not JSON"):
        manager._read(topic, pickle.dumps({"msg_type": 3}))
    forged = {"v": 1, "run": "r1", "type": 3, "sender": 1, "receiver": 0, "bytes": 10, "sha256": "0",
              "s3_key": "progfed/other-run/1-to-0/x"}
    with pytest.raises(RefusedMessage, match="outside this run"):
        manager._read(topic, json.dumps(forged).encode())
    params = {"msg_type": 5, "sender": 1, "receiver": 0, "client_status": "ONLINE"}
    body = encode(params, "r1")
    good = control_message(manager.settings, body, params, None)
    assert manager._read(topic, good).params["client_status"] == "ONLINE"
    with pytest.raises(RefusedMessage, match="differ from the topic"):
        manager._read(manager.settings.inbox(0, 2), good)  # rank 2 cannot speak as rank 1
    other = control_message(mqtt_s3_settings(comm(), "r2"), encode(params, "r2"), params, None)
    with pytest.raises(RefusedMessage, match="not a message of this run"):
        manager._read(topic, other)


@pytest.mark.slow
def test_octopus_packages_carry_the_mqtt_s3_keys(tmp_path, fmnist_fixture):
    dest, plain = tmp_path / "dist", tmp_path / "plain.yaml"
    sections = yaml.safe_load(CONFIG.read_text())
    sections["comm_args"] = {"backend": "GRPC"}  # the keys come from --mqtt-s3 alone
    plain.write_text(yaml.safe_dump(sections))
    built = subprocess.run(["bash", str(ROOT / "run_scripts" / "build_octopus_packages.sh"), str(dest), str(plain),
                            "--backend", "MQTT_S3", "--mqtt-s3", str(CONFIG)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(dest / "dist-packages" / "client-package.zip") as package:
        name = next(n for n in package.namelist() if n.endswith("config/fedml_config.yaml"))
        packaged = yaml.safe_load(package.read(name))["comm_args"]
        package.extractall(tmp_path / "unpacked")
    assert packaged["backend"] == "MQTT_S3" and packaged[MQTT_KEY]["BROKER_PORT"] == 1883
    root = tmp_path / "unpacked" / "client-package" / "fedml"
    started = subprocess.run([sys.executable, "main.py", "--cf", "config/fedml_config.yaml", "--rank", "1",
                              "--role", "client", "--dry-run", "--set", f"data_args.data_cache_dir={fmnist_fixture}"],
                             cwd=root, capture_output=True, text=True, timeout=300)
    assert "transport MQTT_S3: rank 1 via broker 127.0.0.1:1883, bucket progfed-local" in started.stdout, \
        started.stdout[-1500:] + started.stderr[-1500:]
    assert "local-demo-password" not in started.stdout + started.stderr
