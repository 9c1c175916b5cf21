#!/usr/bin/env bash
# Cross-silo BraTS federation over MPI: 1 server + N clients (N = client_num_per_round; 10 -> mpirun -np 11).
#   bash run_scripts/run_brats_mpi.sh [CONFIG] [--set section.key=value ...] [--out DIR]
# CONFIG defaults to config/brats_unet3d_mpi_demo.yaml, whose synthetic demo data is created on first use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
config="${1:-$root/config/brats_unet3d_mpi_demo.yaml}"
[ $# -gt 0 ] && shift
python="$root/.venv/bin/python"; [ -x "$python" ] || python="$(command -v python3)"
mpirun="$root/.venv/bin/mpirun"; [ -x "$mpirun" ] || mpirun="$(command -v mpirun || true)"
if [ -z "$mpirun" ]; then
  echo "run_brats_mpi: mpirun not found; run 'bash run_scripts/setup.sh' (installs mpi4py and mpich into .venv)" >&2
  exit 1
fi
[ -f "$config" ] || { echo "run_brats_mpi: config $config not found" >&2; exit 1; }

# Resolve the config with the same --set overrides the run will get: data folder and process count.
read -r data_dir processes is_demo < <("$python" - "$config" "$@" <<'PY'
import sys
from fedml_progfed.config import load_config
from fedml_progfed.main import build_parser
ns, _ = build_parser().parse_known_args(["--cf", *sys.argv[1:]])
sections, config = load_config(ns.cf, ns.overrides)
demo = "brats-demo-data" in str(config.data_cache_dir)
print(config.data_cache_dir, config.client_num_per_round + 1, int(demo))
PY
)
data_dir="${data_dir/#\~/$HOME}"
if ! ls "$data_dir"/*/*_seg.nii* >/dev/null 2>&1; then
  if [ "$is_demo" = 1 ]; then
    echo "run_brats_mpi: creating SYNTHETIC demo cases in $data_dir" >&2
    "$python" -m fedml_progfed make-brats-demo --out "$data_dir" --cases 30 --shape 64,64,64
  else
    echo "run_brats_mpi: no BraTS cases under '$data_dir'. Set data_args.data_cache_dir (or --set data_args.data_cache_dir=DIR) to a BraTS training folder (<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz), or make demo data: $python -m fedml_progfed make-brats-demo --out DIR --cases 30" >&2
    exit 1
  fi
fi
cd "$root"
exec "$mpirun" -np "$processes" "$python" -m fedml_progfed.main --cf "$config" "$@"
