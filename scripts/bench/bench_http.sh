#!/usr/bin/env bash
# HTTP benchmark of the bare service (no cache, no request log; see bench_full.py
# for those): 2 gunicorn workers, wrk at 8 connections, unique texts.
# Runs every worker class with the fast path on, and the default class with it
# off, side by side in one run; prints one table. Loopback only, bounded.
# Env: DURATION (s, default 10), CONNECTIONS (8), MODEL_DIR, WORKER_CLASSES.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=${DURATION:-10}
connections=${CONNECTIONS:-8}
threads=${THREADS:-1}
model_dir=${MODEL_DIR:-models/sentiment}
classes=${WORKER_CLASSES:-"sync gthread meinheld"}
default_class=${DEFAULT_CLASS:-meinheld}
python=.venv/bin/python
work=$(mktemp -d)
pid=""

cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { $python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_one() {  # run_one LABEL WORKER_CLASS FAST_PATH
  local label=$1 class=$2 fast=$3 port
  port=$(free_port)
  BIND=127.0.0.1:$port WORKERS=2 WORKER_CLASS=$class FAST_PATH=$fast MODEL_DIR=$model_dir \
    CACHE_ENABLED=false REQUEST_LOG_ENABLED=false LOG_LEVEL=info PROMETHEUS_MULTIPROC_DIR=$work/metrics-$port \
    $python -m falcon_svc.cli serve >"$work/$label.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then break; fi
    sleep 0.2
  done
  # Warm both workers (model pages, caches), then measure.
  wrk -t"$threads" -c"$connections" -d2s -s scripts/bench/unique_texts.lua "http://127.0.0.1:$port" >/dev/null
  local line
  line=$(wrk -t"$threads" -c"$connections" -d"${duration}s" -s scripts/bench/unique_texts.lua "http://127.0.0.1:$port" | grep '^{')
  printf '%-28s %s\n' "$label" "$line" | tee -a "$work/results"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

echo "HTTP: 2 workers, wrk -t$threads -c$connections -d${duration}s, unique texts, POST /infer ($(nproc) cores)"
for class in $classes; do
  run_one "$class fast-path" "$class" true
done
run_one "$default_class sklearn (fast off)" "$default_class" false

$python - "$work/results" "$default_class" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    label, _, data = line.partition(" {")
    rows[label.strip()] = json.loads("{" + data)
default = sys.argv[2]
fast = rows.get(f"{default} fast-path")
slow = rows.get(f"{default} sklearn (fast off)")
print()
print(f"{'configuration':28} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'non2xx':>7}")
for label, row in rows.items():
    print(f"{label:28} {row['rps']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['non2xx']:7d}")
if fast and slow:
    print(f"\n{default}: fast path / fast path off throughput = {fast['rps'] / slow['rps']:.1f}x (target >= 3x); "
          f"p99 {fast['p99_ms']:.2f} ms (target <= 5 ms)")
PY
