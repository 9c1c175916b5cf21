#!/usr/bin/env bash
# A gRPC cross-silo job on this machine: 1 server + N clients (N = client_num_per_round), each its own process.
#   bash run_scripts/run_grpc_cross_silo.sh CONFIG [--set section.key=value ...] [--out DIR] [--overwrite | --resume DIR]
# Writes an ip-config of 127.0.0.1 entries on free ports and (first use) a CA and per-rank certificates
# into DIR/certs, so the parties speak mutual TLS; starts the server and the clients in the background
# under one fresh run id, waits for all of them, forwards Ctrl-C, and exits with the server's status.
# Logs: DIR/logs/rank<R>.log (the server's also on this terminal). On real machines run one command
# per party instead (README, "gRPC cross-silo").
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: run_grpc_cross_silo.sh CONFIG [--set section.key=value ...] [--out DIR] [--overwrite | --resume DIR]" >&2; exit 2; }
config="$1"; shift
[ -f "$config" ] || { echo "run_grpc_cross_silo: config $config not found" >&2; exit 2; }
python="$root/.venv/bin/python"; [ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# The overrides as given, and the results folder (default as main.py's: runs/<config>-cross_silo).
args=("$@")
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --resume) out="${args[$((i + 1))]:-}"; resume=1 ;;
  esac
done
[ -n "$out" ] || [ -z "${resume:-}" ] || { echo "run_grpc_cross_silo: --resume needs the run folder" >&2; exit 2; }
[ -n "$out" ] || { out="runs/$(basename "${config%.*}")-cross_silo"; args+=(--out "$out"); }
mkdir -p "$out/logs"

# Parties and free loopback ports, from the config with the same overrides the run gets.
read -r parties ports tls_given < <("$python" - "$config" "${args[@]}" <<'PY' || exit 2
import socket, sys
from fedml_progfed.config import load_config
from fedml_progfed.errors import ProgFedError
from fedml_progfed.main import build_parser
ns, _ = build_parser().parse_known_args(["--cf", *sys.argv[1:]])
try:
    sections, config = load_config(ns.cf, ns.overrides)
except ProgFedError as exc:
    from fedml_progfed.config import explain
    print(f"error: {explain(exc)}", file=sys.stderr); sys.exit(2)
if config.backend != "GRPC" or config.training_type != "cross_silo":
    print("error: run_grpc_cross_silo needs common_args.training_type: cross_silo and comm_args.backend: GRPC "
          f"(the config has {config.training_type}/{config.backend})", file=sys.stderr); sys.exit(2)
parties = config.client_num_per_round + 1
held = []
for _ in range(parties):  # bound together so that no two parties get the same port
    s = socket.socket(); s.bind(("127.0.0.1", 0)); held.append(s)
print(parties, ",".join(str(s.getsockname()[1]) for s in held), int(bool(config.progfed.tls_ca)))
PY
)
ipconfig="$out/grpc_ipconfig.csv"
IFS=, read -r -a port <<< "$ports"
{ echo "eid,rank,grpc_server_ip,grpc_server_port"
  for ((r = 0; r < parties; r++)); do echo "$r,$r,127.0.0.1,${port[$r]}"; done; } > "$ipconfig"

# Mutual TLS by default: a CA and one certificate per rank, written into the run folder on first use
# (kept for --resume). A config that names its own files (comm_args.progfed_tls_*) keeps them.
tls=()
if [ "${tls_given:-0}" = 0 ]; then
  certs="$out/certs"
  "$python" - "$config" "$certs" "$ipconfig" "${args[@]}" <<'PY' || exit 2
import sys
from fedml_progfed.errors import ProgFedError
from fedml_progfed.main import build_parser
from fedml_progfed.runners.cross_silo.provision import provision
config, certs, ipconfig, *rest = sys.argv[1:]
ns, _ = build_parser().parse_known_args(["--cf", config, *rest])
try:
    provision(config, certs, [*ns.overrides, f"comm_args.grpc_ipconfig_path={ipconfig}"])
except ProgFedError as exc:
    from fedml_progfed.config import explain
    print(f"error: {explain(exc)}", file=sys.stderr); sys.exit(2)
PY
  tls=(--set "comm_args.progfed_tls_ca=$certs/ca.crt" "comm_args.progfed_tls_cert=$certs/rank-{rank}.crt"
       "comm_args.progfed_tls_key=$certs/rank-{rank}.key")
fi
# One run id per job: every message carries it, and parties drop messages of any other run.
run_id="$("$python" -c 'import secrets; print(secrets.token_hex(8))')"

pids=()
stop_all() {  # Ctrl-C: pass it on to every party, then wait for them below
  trap - INT TERM
  echo "run_grpc_cross_silo: interrupting ${#pids[@]} processes" >&2
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null; done
}
trap stop_all INT TERM

party() {  # party RANK ROLE: one process of the job
  exec "$python" -m fedml_progfed.main --cf "$config" "${args[@]}" "${tls[@]}" \
    --set "comm_args.grpc_ipconfig_path=$ipconfig" --rank "$1" --role "$2" --run_id "$run_id"
}
party 0 server > >(tee "$out/logs/rank0.log") 2>&1 &
server=$!; pids+=("$server")
# All at once: a client that is up before its server waits for it (start-up wait, at least 300 s).
for ((r = 1; r < parties; r++)); do
  party "$r" client > "$out/logs/rank$r.log" 2>&1 &
  pids+=("$!")
done

wait "$server"; status=$?
while [ $status -gt 128 ] && kill -0 "$server" 2>/dev/null; do wait "$server"; status=$?; done  # a trap interrupted wait
if [ $status -ne 0 ]; then  # the job is over: clients that missed the server's abort notice (still starting) stop now
  sleep 3
  for ((i = 1; i < ${#pids[@]}; i++)); do kill -TERM "${pids[$i]}" 2>/dev/null; done
fi
for ((i = 1; i < ${#pids[@]}; i++)); do
  wait "${pids[$i]}"; code=$?
  [ $code -eq 0 ] || { echo "run_grpc_cross_silo: client rank $i exited with $code:" >&2; grep -h "^error:" "$out/logs/rank$i.log" >&2; }
done
exit $status
