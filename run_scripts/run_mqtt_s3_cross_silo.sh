#!/usr/bin/env bash
# An MQTT_S3 (FedML's edge/Octopus transport) cross-silo job on this machine: 1 server + N clients
# (N = client_num_per_round), each its own process, talking through an MQTT broker and an S3 bucket.
#   bash run_scripts/run_mqtt_s3_cross_silo.sh CONFIG [--set section.key=value ...] [--out DIR] [--overwrite | --resume DIR]
# The broker and bucket are the config's comm_args.customized_training_mqtt_config / _s3_config. When they
# point at 127.0.0.1 and nothing listens there yet, this starts a local mosquitto (Debian's `mosquitto`;
# run_scripts/setup.sh installs it) and a local S3 endpoint (`moto_server`, pip install 'moto[server]' or
# the `edge` extra), creates the bucket, starts the parties under one fresh run id, waits for all of them,
# forwards Ctrl-C, stops what it started and exits with the server's status.
# Logs: DIR/logs/rank<R>.log (the server's also on this terminal), DIR/logs/mosquitto.log, DIR/logs/s3.log.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: run_mqtt_s3_cross_silo.sh CONFIG [--set section.key=value ...] [--out DIR] [--overwrite | --resume DIR]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
config="$1"; shift
[ -f "$config" ] || { echo "run_mqtt_s3_cross_silo: config $config not found" >&2; exit 2; }
python="$root/.venv/bin/python"; [ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

args=("$@")
out=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --resume) out="${args[$((i + 1))]:-}"; resume=1 ;;
  esac
done
[ -n "$out" ] || [ -z "${resume:-}" ] || { echo "run_mqtt_s3_cross_silo: --resume needs the run folder" >&2; exit 2; }
[ -n "$out" ] || { out="runs/$(basename "${config%.*}")-cross_silo"; args+=(--out "$out"); }
mkdir -p "$out/logs"

# Parties, broker and S3 endpoint from the config with the same overrides the run gets (no credential printed).
read -r parties mqtt_local mqtt_port s3_local s3_port < <("$python" - "$config" "${args[@]}" <<'PY' || exit 2
import sys
from urllib.parse import urlparse
from fedml_progfed.config import explain, flatten, load_config
from fedml_progfed.errors import ProgFedError
from fedml_progfed.fedml_plugin.mqtt_s3_settings import is_loopback_host, mqtt_s3_settings
from fedml_progfed.main import build_parser
ns, _ = build_parser().parse_known_args(["--cf", *sys.argv[1:]])
try:
    sections, config = load_config(ns.cf, ns.overrides)
    if config.backend != "MQTT_S3" or config.training_type != "cross_silo":
        raise ProgFedError("run_mqtt_s3_cross_silo needs common_args.training_type: cross_silo and comm_args.backend: "
                           f"MQTT_S3 (the config has {config.training_type}/{config.backend})")
    s = mqtt_s3_settings(flatten(sections), "check")
except ProgFedError as exc:
    print(f"error: {explain(exc)}", file=sys.stderr); sys.exit(2)
url = urlparse(s.endpoint)
print(config.client_num_per_round + 1, int(s.broker_is_loopback), s.broker_port,
      int(is_loopback_host(url.hostname or "")), url.port or 80)
PY
)

listening() { "$python" -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1" 2>/dev/null; }
wait_listening() {  # wait_listening PORT PID WHAT
  for _ in $(seq 1 100); do listening "$1" && return 0; kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  echo "error: run_mqtt_s3_cross_silo: $3 did not start on 127.0.0.1:$1 (see $out/logs)" >&2; return 1
}
started=()
cleanup() { for pid in "${started[@]}"; do kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done; rm -rf "${tmp:-}"; }
trap cleanup EXIT
tmp="$(mktemp -d)"

if [ "$mqtt_local" = 1 ] && ! listening "$mqtt_port"; then
  mosquitto="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
  [ -x "$mosquitto" ] || { echo "error: run_mqtt_s3_cross_silo: mosquitto is not installed; run run_scripts/setup.sh (apt-get install mosquitto)" >&2; exit 2; }
  # loopback only, nothing kept on disk: the broker lives as long as this job
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$mqtt_port" > "$tmp/mosquitto.conf"
  "$mosquitto" -c "$tmp/mosquitto.conf" > "$out/logs/mosquitto.log" 2>&1 &
  started+=("$!"); wait_listening "$mqtt_port" "$!" mosquitto || exit 2
fi
if [ "$s3_local" = 1 ] && ! listening "$s3_port"; then
  moto="$(dirname "$python")/moto_server"; [ -x "$moto" ] || moto="$(command -v moto_server || true)"
  [ -n "$moto" ] || { echo "error: run_mqtt_s3_cross_silo: moto_server is not installed; pip install 'moto[server]' (or .[edge])" >&2; exit 2; }
  "$moto" -H 127.0.0.1 -p "$s3_port" > "$out/logs/s3.log" 2>&1 &
  started+=("$!"); wait_listening "$s3_port" "$!" moto_server || exit 2
fi

# The bucket (FedML never creates it); an existing one is kept.
"$python" - "$config" "${args[@]}" <<'PY' || exit 2
import sys
from fedml_progfed.config import flatten, load_config
from fedml_progfed.fedml_plugin.mqtt_s3_settings import mqtt_s3_settings
from fedml_progfed.main import build_parser
ns, _ = build_parser().parse_known_args(["--cf", *sys.argv[1:]])
sections, _ = load_config(ns.cf, ns.overrides)
s = mqtt_s3_settings(flatten(sections), "setup")
client = s.s3_client()
try:
    client.head_bucket(Bucket=s.bucket)
except Exception:
    try:
        client.create_bucket(Bucket=s.bucket)
    except Exception as exc:
        print(f"error: run_mqtt_s3_cross_silo: cannot create bucket {s.bucket} at {s.endpoint} ({type(exc).__name__})",
              file=sys.stderr); sys.exit(2)
PY

# One run id per job: topics, last wills and S3 keys carry it, so jobs sharing a broker never meet.
run_id="$("$python" -c 'import secrets; print(secrets.token_hex(8))')"

pids=()
stop_all() {
  trap - INT TERM
  echo "run_mqtt_s3_cross_silo: interrupting ${#pids[@]} processes" >&2
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null; done
}
trap stop_all INT TERM

party() {  # party RANK ROLE
  exec "$python" -m fedml_progfed.main --cf "$config" "${args[@]}" --rank "$1" --role "$2" --run_id "$run_id"
}
party 0 server > >(tee "$out/logs/rank0.log") 2>&1 &
server=$!; pids+=("$server")
for ((r = 1; r < parties; r++)); do  # in any order: the broker holds no one's place, the handshake repeats
  party "$r" client > "$out/logs/rank$r.log" 2>&1 &
  pids+=("$!")
done

# Wait for every party. A party that fails before it reached the broker (data error, bad flag) cannot
# leave a will, and its abort notice may precede its peers' subscriptions: 3 s after the first failure the
# others are stopped, so the job never waits out the start-up timeout for it.
declare -A code=()
failed_at=""
while [ ${#code[@]} -lt ${#pids[@]} ]; do
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [ -n "${code[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    wait "${pids[$i]}"; code[$i]=$?
    [ "${code[$i]}" -eq 0 ] || [ -n "$failed_at" ] || failed_at=$SECONDS
  done
  if [ -n "$failed_at" ] && [ $((SECONDS - failed_at)) -ge 3 ]; then
    for ((i = 0; i < ${#pids[@]}; i++)); do [ -n "${code[$i]:-}" ] || kill -TERM "${pids[$i]}" 2>/dev/null; done
  fi
  sleep 0.2
done
status=${code[0]}
for ((i = 1; i < ${#pids[@]}; i++)); do
  [ "${code[$i]}" -eq 0 ] && continue
  echo "run_mqtt_s3_cross_silo: client rank $i exited with ${code[$i]}:" >&2; grep -h "^error:" "$out/logs/rank$i.log" >&2
  [ "$status" -ne 0 ] || status=${code[$i]}  # the job failed even if the server ended cleanly
done
exit $status
