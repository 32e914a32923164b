#!/usr/bin/env bash
# `make bench-peers`: falcon-svc against MLServer 1.7.1 serving the same trained model,
# in alternating wrk rounds on the same texts and connections (issue 13).
#
# MLServer (requirements-peers.lock, hash-pinned) lives in its own venv under
# ${XDG_CACHE_HOME:-~/.cache}/falcon-svc/peers, installed again when the lock changes.
# The bench exports our fitted pipeline to a joblib file MLServer's scikit-learn runtime
# loads (peer_models.py), starts MLServer on free loopback ports with parallel_workers 2,
# checks both servers label probe texts alike, then runs ROUNDS rounds; each round runs
# both servers back to back (the first one swapped every round), on unique texts (cache
# misses) and then on one repeated text (falcon-svc's cache hits). Both get the same
# OIP v2 body at /v2/models/<name>/infer (v2_texts.lua). MLServer is stopped at exit,
# whatever happens (trap). falcon-svc is not started here: give its URL.
#
# Env: FALCON_URL (default http://127.0.0.1:8000, the `make run` stack), FALCON_API_KEY,
# MODEL_DIR (models/sentiment: the model falcon-svc serves), DURATION (s, 10),
# CONNECTIONS (8), THREADS (1), ROUNDS (3), WARMUP (s, 2), PARALLEL_WORKERS (2),
# PEERS_VENV, PYTHON (the interpreter that venv is made with: python3), KEEP_WORK=1 (keep
# the work directory: MLServer's log and the raw results), RESULTS_DIR (keep the raw
# results there as `results`, with summary.json, the numbers and ratios, and meta.json,
# the machine, date and settings: what scripts/bench/plots/plot.py --peers draws).
set -euo pipefail
cd "$(dirname "$0")/../../.."

falcon_url=${FALCON_URL:-http://127.0.0.1:8000}
falcon_url=${falcon_url%/}
model_dir=${MODEL_DIR:-models/sentiment}
duration=${DURATION:-10}
connections=${CONNECTIONS:-8}
threads=${THREADS:-1}
rounds=${ROUNDS:-3}
warmup=${WARMUP:-2}
parallel_workers=${PARALLEL_WORKERS:-2}
venv=${PEERS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/falcon-svc/peers}
python=.venv/bin/python
lua=scripts/bench/peers/v2_texts.lua
here=scripts/bench/peers
work=$(mktemp -d)
mlserver_pid=""

stop_mlserver() {
  [ -n "$mlserver_pid" ] || return 0
  # SIGTERM to MLServer itself: it stops its parallel workers (a SIGTERM to each of
  # them as well races its own shutdown). setsid made it a process group leader, so
  # whatever of the group outlives 20 s, or the main process, is then killed.
  kill -TERM "$mlserver_pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$mlserver_pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$mlserver_pid" 2>/dev/null || true
  wait "$mlserver_pid" 2>/dev/null || true
  mlserver_pid=""
}

cleanup() {
  stop_mlserver
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "bench-peers: $*" >&2
  exit 1
}

free_port() { $python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install_peers() {
  # The venv keeps a copy of the lock it was built from: a changed lock rebuilds it.
  if cmp -s requirements-peers.lock "$venv/requirements-peers.lock" 2>/dev/null; then return 0; fi
  echo "installing MLServer (requirements-peers.lock) into $venv" >&2
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --require-hashes -r requirements-build.lock
  "$venv/bin/python" -m pip install -q --require-hashes -r requirements-peers.lock
  cp requirements-peers.lock "$venv/"
}

command -v wrk >/dev/null || fail "wrk is not installed (apt-get install wrk)"
[ -x "$python" ] || fail "$python is missing: run make venv"
curl -fsS -o /dev/null "$falcon_url/v2/health/ready" ||
  fail "falcon-svc is not ready at $falcon_url: start it (make run) or set FALCON_URL"
if [ -n "${RESULTS_DIR:-}" ]; then mkdir -p "$RESULTS_DIR" || fail "cannot create RESULTS_DIR=$RESULTS_DIR"; fi
install_peers

model_path=$($python "$here/peer_models.py" export "$model_dir" "$work/models")
model=$(basename "$model_path")
infer_path=/v2/models/$model/infer
http_port=$(free_port)
grpc_port=$(free_port)
metrics_port=$(free_port)
# debug off: MLServer's default (on) logs at DEBUG level, which a production server would not.
cat >"$work/models/settings.json" <<EOF
{"debug": false, "host": "127.0.0.1", "http_port": $http_port, "grpc_port": $grpc_port,
 "metrics_port": $metrics_port, "parallel_workers": $parallel_workers,
 "metrics_dir": "$work/metrics", "environments_dir": "$work/envs"}
EOF
mlserver_url=http://127.0.0.1:$http_port
(cd "$work" && exec setsid "$venv/bin/mlserver" start "$work/models" >"$work/mlserver.log" 2>&1) &
mlserver_pid=$!
for _ in $(seq 1 600); do
  if curl -fs -o /dev/null "$mlserver_url/v2/models/$model/ready"; then break; fi
  kill -0 "$mlserver_pid" 2>/dev/null || { tail -n 30 "$work/mlserver.log" >&2; fail "MLServer exited at start-up"; }
  sleep 0.2
done
curl -fs -o /dev/null "$mlserver_url/v2/models/$model/ready" ||
  { tail -n 30 "$work/mlserver.log" >&2; fail "MLServer was not ready within 120 s"; }

$python "$here/peer_models.py" agree "$falcon_url" "$mlserver_url" "$model_dir" --api-key "${FALCON_API_KEY:-}"

# run_wrk ROUND SERVER TEXTS SECONDS: one bounded wrk run; appends its line to results.
run_wrk() {
  local round=$1 server=$2 texts=$3 seconds=$4 url=$mlserver_url key="" repeat=0 output
  if [ "$server" = falcon-svc ]; then url=$falcon_url key=${FALCON_API_KEY:-}; fi
  if [ "$texts" = repeated ]; then repeat=1; fi
  output=$(BENCH_RUN="$$-$round" BENCH_REPEAT=$repeat BENCH_PATH=$infer_path FALCON_API_KEY=$key \
    timeout $((seconds + 30)) wrk -t"$threads" -c"$connections" -d"${seconds}s" -s "$lua" "$url")
  if [ "$round" != warm-up ]; then
    printf '%s\t%s\t%s\t%s\n' "$round" "$server" "$texts" "$(grep '^{' <<<"$output")" >>"$work/results"
    printf '  round %s %-10s %-8s %s\n' "$round" "$server" "$texts" "$(grep '^{' <<<"$output")"
  fi
}

echo "bench-peers: wrk -t$threads -c$connections -d${duration}s, $rounds alternating rounds, $(nproc) cores, $(date -u +%FT%TZ)"
echo "  both: POST $infer_path, OIP v2 body, one BYTES text per request (v2_texts.lua)"
echo "  MLServer $("$venv/bin/mlserver" --version 2>/dev/null | awk '{print $NF}') (mlserver-sklearn, parallel_workers $parallel_workers) at $mlserver_url"
echo "  falcon-svc at $falcon_url"
for server in mlserver falcon-svc; do run_wrk warm-up "$server" unique "$warmup"; done
for round in $(seq 1 "$rounds"); do
  order="mlserver falcon-svc"
  if [ $((round % 2)) = 0 ]; then order="falcon-svc mlserver"; fi
  for texts in unique repeated; do
    for server in $order; do run_wrk "$round" "$server" "$texts" "$duration"; done
  done
done
echo
status=0
if [ -n "${RESULTS_DIR:-}" ]; then
  cp "$work/results" "$RESULTS_DIR/results"
  $python scripts/bench/plots/run_meta.py "$RESULTS_DIR/meta.json" kind=peers "falcon_url=$falcon_url" \
    "mlserver=$("$venv/bin/mlserver" --version 2>/dev/null | awk '{print $NF}')" "parallel_workers=$parallel_workers" \
    "duration_s=$duration" "connections=$connections" "threads=$threads" "rounds=$rounds"
  $python "$here/peer_results.py" "$work/results" --json "$RESULTS_DIR/summary.json" || status=$?
  echo "bench-peers: results kept in $RESULTS_DIR"
else
  $python "$here/peer_results.py" "$work/results" || status=$?
fi
exit "$status"
