#!/usr/bin/env bash
# Installs everything fedml-progfed needs on a bare Debian machine with Python 3.11:
# the venv (.venv), the package with its pinned FedML/torch stack, and the real
# Fashion-MNIST files (Debian package dataset-fashion-mnist), and mosquitto plus moto_server
# for local MQTT_S3 jobs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# Debian's system Python needs python3-venv for `python -m venv`.
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv || { echo "setup: cannot create a venv; install python3-venv" >&2; exit 1; }
    "$PYTHON" -m venv .venv
  fi
fi

# The real data set, read from disk at run time (nothing is downloaded by the package).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist || echo "setup: could not install dataset-fashion-mnist; set data_args.data_cache_dir to your copy" >&2
fi

# The MQTT broker of a local MQTT_S3 job (run_scripts/run_mqtt_s3_cross_silo.sh; FedML's edge transport).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto || echo "setup: could not install mosquitto; MQTT_S3 jobs need a broker (comm_args.customized_training_mqtt_config)" >&2
fi

stamp=.venv/.fedml-progfed-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade "pip>=23"
  .venv/bin/python -m pip install -q -e ".[test,edge]"
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/fedml-progfed)"
