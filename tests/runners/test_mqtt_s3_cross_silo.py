"""MQTT_S3 (FedML's edge transport) on loopback: a local mosquitto and moto_server, every party its own process.

A job finishes with the same weights as ``mpirun -np 3``; a killed client ends it within
seconds, named; a missing broker dict is one error before any network call; no credential
reaches a log or the run folder; no retained message and no S3 object of the run is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_mpi_cross_silo import write_config  # same folder: pytest puts it on the path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).with_name("mpirun")
SCRIPT = ROOT / "run_scripts" / "run_mqtt_s3_cross_silo.sh"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOTO = Path(sys.executable).with_name("moto_server")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
SECRETS = ("mqtt-secret-pw-4711", "s3-access-key-4711", "s3-secret-key-4711")

if not Path(MOSQUITTO).exists() or not MOTO.exists():
    pytest.skip("needs mosquitto (apt-get install -y mosquitto) and moto_server (pip install 'moto[server]')",
                allow_module_level=True)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def mqtt_s3_config(small_config: Path, tmp_path: Path, rounds: int = 3, **update) -> Path:
    """The small fixture as 1 server + 2 clients over a broker and endpoint of its own (free loopback ports)."""
    broker, s3 = free_ports(2)
    comm = {
        "customized_training_mqtt_config": {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": broker, "MQTT_USER": "progfed",
                                            "MQTT_PWD": SECRETS[0], "MQTT_KEEPALIVE": 5},
        "customized_training_s3_config": {"BUCKET_NAME": "progfed-test", "CN_S3_AKI": SECRETS[1], "CN_S3_SAK": SECRETS[2],
                                          "CN_REGION_NAME": "us-east-1", "CN_S3_ENDPOINT": f"http://127.0.0.1:{s3}"},
    }
    sections = {"comm_args": comm, "train_args": {"comm_round": rounds}, **update}
    return write_config(small_config, tmp_path, "MQTT_S3", "mqtt_s3.yaml", **sections)


def settings_of(config: Path):
    from fedml_progfed.fedml_plugin.mqtt_s3_settings import mqtt_s3_settings

    return mqtt_s3_settings(yaml.safe_load(config.read_text())["comm_args"], "probe")


class Services:
    """mosquitto and moto_server on the config's ports, for tests that start the parties themselves."""

    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.settings = s = settings_of(config)
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(f"listener {s.broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.procs = [
            subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", s.endpoint.rsplit(":", 1)[1]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        for port in (s.broker_port, int(s.endpoint.rsplit(":", 1)[1])):
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
        s.s3_client().create_bucket(Bucket=s.bucket)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


def retained_messages(settings, seconds: float = 1.5) -> list[str]:
    """Topics under progfed/ on which the broker still holds a retained message."""
    import paho.mqtt.client as mqtt

    found: list[str] = []
    client = mqtt.Client()
    client.on_message = lambda _c, _u, m: found.append(m.topic) if m.retain else None
    client.connect(settings.broker_host, settings.broker_port, 10)
    client.subscribe("#", qos=1)
    client.loop_start()
    time.sleep(seconds)
    client.loop_stop()
    client.disconnect()
    return found


def s3_objects(settings) -> list[str]:
    listing = settings.s3_client().list_objects_v2(Bucket=settings.bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def assert_no_secret(texts: dict[str, str]) -> None:
    for where, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"a credential in {where}"


def run_folder_texts(folder: Path) -> dict[str, str]:
    """Every file of a run folder (logs, checkpoints, tensors too), as text a byte-wise search can use."""
    return {str(p): p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def job(fmnist_fixture, tmp_path_factory):
    """One 3-round MQTT_S3 job through the script (a growth after round 1), with its broker and bucket kept for checks."""
    tmp_path = tmp_path_factory.mktemp("mqtt_s3_job")
    sections = yaml.safe_load((ROOT / "config" / "quickstart.yaml").read_text())
    sections["data_args"]["data_cache_dir"] = str(fmnist_fixture)
    sections["train_args"].update(learning_rate=0.05, epochs=2, batch_size=32)
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(sections))
    config = mqtt_s3_config(small, tmp_path, rounds=3, progfed_args={"progfed_checkpoint_keep": 10, "progfed_stages": 2})
    out = tmp_path / "mqtt"
    # the script reuses a broker and endpoint that already listen (and stops only what it started): keep them
    services = Services(config, tmp_path)
    done = subprocess.run(["bash", str(SCRIPT), str(config), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=ENV)
    yield config, out, done, services
    services.stop()


def test_mqtt_s3_job_ends_with_mpiruns_weights(job, tmp_path):
    config, out, done, _ = job
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "error:" not in done.stderr
    mpi_out = tmp_path / "mpi"
    ran = subprocess.run(
        [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config),
         "--set", "comm_args.backend=MPI", "--out", str(mpi_out)],
        capture_output=True, text=True, timeout=240, env=ENV,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(mpi_out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "MQTT_S3 vs mpirun"

    from fedml_progfed.report import read_metrics_csv

    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["stage"] for r in rows] == [1, 2, 2]
    assert all(r["wire_bytes_down"] > r["bytes_down"] and r["wire_bytes_up"] > r["bytes_up"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "MQTT_S3" and summary["devices"] == {"0": "cpu", "1": "cpu", "2": "cpu"}
    assert 1.0 < summary["wire"]["overhead_ratio"] < 1.05
    print("wire", json.dumps(summary["wire"]))


def test_no_credential_retained_message_or_s3_object_is_left(job):
    _, out, done, services = job
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_secret({"stdout": done.stdout, "stderr": done.stderr, **run_folder_texts(out)})
    assert (out / "logs" / "rank1.log").is_file()
    assert "<redacted>" in (out / "config.yaml").read_text()
    assert retained_messages(services.settings) == []
    assert s3_objects(services.settings) == []


def test_a_resumed_mqtt_s3_job_ends_bit_identical(job, tmp_path):
    """The server restores after round 1; the clients take the round from its first model."""
    config, out, done, services = job
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for checkpoint in (resumed / "checkpoints").glob("round-*"):
        if int(checkpoint.name.split("-")[1]) > 1:
            shutil.rmtree(checkpoint)
    (resumed / "model.safetensors").unlink()
    ran = subprocess.run(["bash", str(SCRIPT), str(config), "--resume", str(resumed)],
                         capture_output=True, text=True, timeout=240, env=ENV)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert "1 of 3 rounds done" in ran.stdout + ran.stderr
    a, c = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), "resumed vs full"
    assert s3_objects(services.settings) == [] and retained_messages(services.settings, 0.5) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_killed_client_ends_the_job_within_seconds_naming_it(sig, small_config, tmp_path):
    """Killed: the broker publishes its will at once. Stopped: it misses its keep-alive (5 s here), and the
    broker publishes its will after 1.5 x that: well before progfed_round_timeout_s."""
    config = mqtt_s3_config(small_config, tmp_path, rounds=60)
    services = Services(config, tmp_path)
    run_id = f"kill-{os.getpid()}"
    procs = []
    try:
        for rank in range(3):
            role = "server" if rank == 0 else "client"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(tmp_path / "out"),
                 "--rank", str(rank), "--role", role, "--run_id", run_id],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
        deadline = time.monotonic() + 120
        metrics = tmp_path / "out" / "metrics.csv"
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        procs[2].send_signal(sig)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed_at
        assert procs[0].returncode != 0
        assert took < 20, took
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "client rank 2" in errors[0] and "last will" in errors[0], err[-2000:]
        print(f"named after {took:.1f} s: {errors[0]}")
        _, err1 = procs[1].communicate(timeout=30)
        assert procs[1].returncode != 0 and "ended the job" in err1, err1[-2000:]
        assert_no_secret({"server": err, "client": err1})
        assert s3_objects(services.settings) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        services.stop()


def test_missing_broker_dict_is_one_error_before_any_network_call(small_config, tmp_path):
    config = mqtt_s3_config(small_config, tmp_path)
    sections = yaml.safe_load(config.read_text())
    del sections["comm_args"]["customized_training_mqtt_config"]
    config.write_text(yaml.safe_dump(sections))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(tmp_path / "o"),
                           "--rank", "0", "--role", "server", "--run_id", "x"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "comm_args.customized_training_mqtt_config" in errors[0], done.stderr[-2000:]
    assert "unknown" not in done.stderr and "Fetch configs" not in done.stderr + done.stdout
    assert time.monotonic() - started < 60
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_a_broker_that_does_not_answer_is_one_error_naming_the_key(small_config, tmp_path):
    config = mqtt_s3_config(small_config, tmp_path)  # nothing listens on its ports
    done = subprocess.run([sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(tmp_path / "o"),
                           "--rank", "1", "--role", "client", "--run_id", "x"],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "customized_training_mqtt_config" in errors[0] and "no MQTT broker" in errors[0]
    assert_no_secret({"stderr": done.stderr, "stdout": done.stdout})


def test_clients_started_before_the_server_still_run_the_job(small_config, tmp_path):
    """A client's ONLINE published before the server subscribed is lost (nothing is retained); the server's
    check-status on start-up asks again, and a repeated ONLINE does not start the job twice."""
    config = mqtt_s3_config(small_config, tmp_path, rounds=2, progfed_args={"progfed_stages": 2})
    services = Services(config, tmp_path)
    run_id, out = f"order-{os.getpid()}", tmp_path / "out"
    procs = []

    def start(rank: int) -> None:
        role = "server" if rank == 0 else "client"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(out),
             "--rank", str(rank), "--role", role, "--run_id", run_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))

    try:
        start(1)
        start(2)
        time.sleep(12)  # the clients are up, subscribed and have said ONLINE to nobody
        start(0)
        results = [proc.communicate(timeout=150) for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0, 0], [r[1][-1500:] for r in results]
        from fedml_progfed.report import read_metrics_csv

        assert [r["round"] for r in read_metrics_csv(out / "metrics.csv")] == [0, 1]
        assert s3_objects(services.settings) == [] and retained_messages(services.settings, 0.5) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        services.stop()


def test_a_killed_server_ends_every_client_naming_it(small_config, tmp_path):
    config = mqtt_s3_config(small_config, tmp_path, rounds=60)
    services = Services(config, tmp_path)
    run_id, out = f"server-{os.getpid()}", tmp_path / "out"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(out), "--rank", str(rank),
         "--role", "server" if rank == 0 else "client", "--run_id", run_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for rank in range(3)]
    try:
        metrics, deadline = out / "metrics.csv", time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            time.sleep(0.2)
        procs[0].kill()
        for proc in procs[1:]:
            _, err = proc.communicate(timeout=30)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert proc.returncode != 0 and len(errors) == 1 and "the server (rank 0) is gone" in errors[0], err[-2000:]
        assert s3_objects(services.settings) == []  # the clients ending the job deleted what the server left
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        services.stop()
