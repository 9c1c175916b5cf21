#!/usr/bin/env bash
# Builds FedML Octopus (cross-silo) server and client packages with `fedml build`.
#   bash run_scripts/build_octopus_packages.sh [DEST] [CONFIG]
# DEST   (default dist/octopus) receives dist-packages/server-package.zip and client-package.zip.
# CONFIG (default config/brats_unet3d_octopus.yaml) becomes the packages' fedml_config.yaml.
# Each package holds our entry main.py, a copy of the fedml_progfed package (so the
# agents need only FedML and torch installed), config/fedml_config.yaml and conf/fedml.yaml.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
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
