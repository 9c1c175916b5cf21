#!/usr/bin/env bash
# Builds FedML Octopus (cross-silo) server and client packages with `fedml build`.
#   bash run_scripts/build_octopus_packages.sh [DEST] [CONFIG] [--backend MQTT_S3|GRPC] [--ipconfig CSV] [--mqtt-s3 YAML]
# DEST   (default dist/octopus) receives dist-packages/server-package.zip and client-package.zip.
# CONFIG (default config/brats_unet3d_octopus.yaml) becomes the packages' fedml_config.yaml.
# --backend sets comm_args.backend in the packaged config (default: the config's own, MQTT_S3
#   for the default config). GRPC needs --ipconfig: the CSV every party shares
#   (eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]), packaged as config/grpc_ipconfig.csv.
# --mqtt-s3 YAML (MQTT_S3): a file with comm_args' customized_training_mqtt_config and
#   customized_training_s3_config (the keys of config/fashion_mnist_mqtt_s3.yaml), merged into the packaged
#   config so the parties use your broker and bucket; without it (and without them in CONFIG) the Octopus
#   agents' platform supplies both. The packages then hold those credentials: share them like the keys.
# Each package holds our entry main.py, a copy of the fedml_progfed package (so the
# agents need only FedML and torch installed), config/fedml_config.yaml and conf/fedml.yaml.
# `python main.py --cf config/fedml_config.yaml --rank R --role client --dry-run` inside a package
# prints the backend and endpoints it would use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
backend="" ipconfig="" mqtt_s3="" positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend="${2:?--backend needs MQTT_S3 or GRPC}"; shift 2 ;;
    --backend=*) backend="${1#--backend=}"; shift ;;
    --ipconfig) ipconfig="${2:?--ipconfig needs a CSV file}"; shift 2 ;;
    --ipconfig=*) ipconfig="${1#--ipconfig=}"; shift ;;
    --mqtt-s3) mqtt_s3="${2:?--mqtt-s3 needs a YAML file}"; shift 2 ;;
    --mqtt-s3=*) mqtt_s3="${1#--mqtt-s3=}"; shift ;;
    *) positional+=("$1"); shift ;;
  esac
done
set -- "${positional[@]+"${positional[@]}"}"
case "$backend" in
  ""|MQTT_S3|GRPC) ;;
  *) echo "build_octopus_packages: --backend $backend: use MQTT_S3 or GRPC" >&2; exit 2 ;;
esac
if [ "$backend" = GRPC ] && [ ! -f "$ipconfig" ]; then
  echo "build_octopus_packages: --backend GRPC needs --ipconfig CSV (eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]: the server, rank 0, and every client); got '${ipconfig}'" >&2
  exit 2
fi
if [ -n "$mqtt_s3" ] && { [ "$backend" = GRPC ] || [ ! -f "$mqtt_s3" ]; }; then
  echo "build_octopus_packages: --mqtt-s3 needs an existing YAML file and backend MQTT_S3; got '${mqtt_s3}'" >&2
  exit 2
fi
dest="$(mkdir -p "${1:-dist/octopus}" && cd "${1:-dist/octopus}" && pwd)"
config="${2:-$root/config/brats_unet3d_octopus.yaml}"
fedml_cli="${FEDML_CLI:-$root/.venv/bin/fedml}"
[ -x "$fedml_cli" ] || fedml_cli="$(command -v fedml || true)"
[ -n "$fedml_cli" ] || { echo "build_octopus_packages: the 'fedml' command is missing; run bash run_scripts/setup.sh" >&2; exit 1; }
[ -f "$config" ] || { echo "build_octopus_packages: config $config not found" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/config"
cp -r "$root/fedml_progfed" "$work/src/"
cp "$config" "$work/config/fedml_config.yaml"
if [ -n "$backend" ] || [ -n "$mqtt_s3" ]; then
  [ "$backend" = GRPC ] && cp "$ipconfig" "$work/config/grpc_ipconfig.csv"
  python="$root/.venv/bin/python"; [ -x "$python" ] || python="$(command -v python3)"
  "$python" - "$work/config/fedml_config.yaml" "$backend" "$mqtt_s3" <<'PY'
import sys
import yaml
path, backend, mqtt_s3 = sys.argv[1:]
sections = yaml.safe_load(open(path))
comm = sections.setdefault("comm_args", {})
comm["backend"] = backend = backend or comm.get("backend", "MQTT_S3")
if mqtt_s3:  # the same keys as a local MQTT_S3 config (fedml_plugin/mqtt_s3_settings.py checks them at start-up)
    given = yaml.safe_load(open(mqtt_s3)) or {}
    given = given.get("comm_args", given)
    keys = ("customized_training_mqtt_config", "customized_training_s3_config")
    missing = [k for k in keys if not isinstance(given.get(k), dict)]
    if missing:
        sys.exit(f"build_octopus_packages: --mqtt-s3 {mqtt_s3}: {', '.join(missing)} missing (a mapping each)")
    comm.update({k: given[k] for k in keys})
if backend == "GRPC":
    comm["grpc_ipconfig_path"] = "grpc_ipconfig.csv"  # found beside this file inside the package
else:
    comm.pop("grpc_ipconfig_path", None)
open(path, "w").write(yaml.safe_dump(sections, sort_keys=False))
PY
fi
cat > "$work/src/main.py" <<'PY'
"""Octopus entry: the agents run `python main.py --cf config/fedml_config.yaml --rank R --role client|server`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bundled fedml_progfed package

from fedml_progfed.main import main

if __name__ == "__main__":
    sys.exit(main())
PY
for role in server client; do
  (cd "$work" && "$fedml_cli" build -t "$role" -sf src -ep main.py -cf config -df "$dest" -ig "__pycache__,*.pyc" >/dev/null)
done
ls "$dest/dist-packages/server-package.zip" "$dest/dist-packages/client-package.zip"
