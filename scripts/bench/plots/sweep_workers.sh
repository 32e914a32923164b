#!/usr/bin/env bash
# Throughput per worker count: falcon-svc started here with WORKERS=n for each n of
# WORKER_COUNTS, loaded with a bounded wrk of unique texts (issue 13 item 4; plot.py
# --workers draws it).
#
#   scripts/bench/plots/sweep_workers.sh
#
# Each server is `.venv/bin/falcon-svc serve` on a free loopback port with a fresh
# metrics and spool directory. Without REDIS_URL/DATABASE_URL in the environment it
# gets ports where nothing listens, and serves degraded (no shared cache, request-log
# rows spooled to disk), as the units do while Redis or PostgreSQL is down; set them
# to measure with a real Redis and PostgreSQL. Every other setting of the service
# (WORKER_CLASS, THREADS, ACCESS_LOG, ...) comes from the environment as usual.
#
# Env: WORKER_COUNTS (default "1 2 3 4"; at most 8 counts, each 1 to 32), ROUNDS (1:
# each round runs every count, so a noisy minute spreads over all of them; the plot
# takes the median), DURATION (wrk s, 10; at most 600), WARMUP (s, 2; not recorded),
# CONNECTIONS (8), THREADS_WRK (wrk threads, 1), MODEL_DIR (models/sentiment),
# RESULTS_DIR (default var/plots/workers-TIME), FALCON_API_KEY (when API_KEYS_FILE is set).
#
# Writes to RESULTS_DIR: workers.tsv (ROUND<TAB>WORKERS<TAB>wrk's JSON summary line of
# scripts/bench/unique_texts.lua), wrk-ROUND-WORKERS.log, server-ROUND-WORKERS.log and
# meta.json (run_meta.py). Every server is stopped after its run, and by the exit trap
# whatever happens: SIGTERM to the gunicorn master, then SIGKILL to its process group
# after STOP_TIMEOUT (30) s. Exit status 1 when a run had non-2xx replies or socket
# errors (its rps counts failures), after every count has run.
set -euo pipefail
cd "$(dirname "$0")/../../.."

counts=${WORKER_COUNTS:-1 2 3 4}
rounds=${ROUNDS:-1}
duration=${DURATION:-10}
warmup=${WARMUP:-2}
connections=${CONNECTIONS:-8}
wrk_threads=${THREADS_WRK:-1}
model_dir=${MODEL_DIR:-models/sentiment}
stop_timeout=${STOP_TIMEOUT:-30}
results=${RESULTS_DIR:-var/plots/workers-$(date -u +%Y%m%dT%H%M%SZ)}
python=.venv/bin/python
lua=scripts/bench/unique_texts.lua
work=$(mktemp -d)
server_pid=""
wrk_pid=""

fail() {
  echo "sweep_workers: $*" >&2
  exit 2
}

stop_server() {
  [ -n "$server_pid" ] || return 0
  # SIGTERM: gunicorn's graceful stop (workers finish what they hold). setsid made
  # the master a process group leader: whatever of the group outlives the timeout
  # is killed with it.
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 1 $((stop_timeout * 5))); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

cleanup() {
  if [ -n "$wrk_pid" ]; then kill -TERM "$wrk_pid" 2>/dev/null || true; fi
  stop_server
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# whole NAME VALUE LOW HIGH: fail unless VALUE is a whole number from LOW to HIGH.
whole() {
  [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] && [ "$2" -le "$4" ] || fail "$1='$2' must be a whole number from $3 to $4"
}

read -r -a count_list <<<"$counts"
[ "${#count_list[@]}" -ge 1 ] && [ "${#count_list[@]}" -le 8 ] || fail "WORKER_COUNTS must name 1 to 8 counts"
for count in "${count_list[@]}"; do whole WORKER_COUNTS "$count" 1 32; done
whole ROUNDS "$rounds" 1 20
whole DURATION "$duration" 1 600
whole WARMUP "$warmup" 0 60
whole CONNECTIONS "$connections" 1 1024
whole THREADS_WRK "$wrk_threads" 1 64
[ -f "$model_dir/metadata.json" ] || fail "no model in $model_dir: run make model, or set MODEL_DIR"
command -v wrk >/dev/null || fail "wrk is not installed (apt-get install wrk)"
[ -x .venv/bin/falcon-svc ] || fail ".venv/bin/falcon-svc is missing: run make venv"

free_port() { $python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_server WORKERS LOG: start falcon-svc with WORKERS workers; sets server_pid and url.
start_server() {
  local workers=$1 log=$2 port nowhere
  port=$(free_port)
  nowhere=$(free_port)
  rm -rf "$work/metrics" "$work/spool"
  mkdir -p "$work/metrics"
  # LOG_LEVEL info: the "worker ready" lines are what start_server waits for.
  LOG_LEVEL=info BIND=127.0.0.1:$port WORKERS=$workers MODEL_DIR=$model_dir PROMETHEUS_MULTIPROC_DIR=$work/metrics \
    LOG_SPOOL_DIR=$work/spool REDIS_URL=${REDIS_URL:-redis://127.0.0.1:$nowhere/0} \
    DATABASE_URL=${DATABASE_URL:-postgresql://falcon@127.0.0.1:$nowhere/falcon} \
    setsid .venv/bin/falcon-svc serve >"$log" 2>&1 &
  server_pid=$!
  url=http://127.0.0.1:$port
  echo "  WORKERS=$workers on $url (master pid $server_pid)"
  for _ in $(seq 1 300); do
    # /readyz answers 200 from any one worker with the model loaded; each worker logs
    # "worker ready" when it has loaded it: measured only once all of them have.
    if [ "$(grep -c "worker ready" "$log")" -ge "$workers" ] && curl -fs -o /dev/null "$url/readyz"; then
      return 0
    fi
    kill -0 "$server_pid" 2>/dev/null || { tail -n 20 "$log" >&2; fail "falcon-svc exited at start-up"; }
    sleep 0.2
  done
  tail -n 20 "$log" >&2
  fail "falcon-svc was not ready within 60 s"
}

# run_wrk SECONDS OUTPUT: one bounded wrk run of unique texts against url.
# NOTE: in the background and waited for: bash runs a trap only once the foreground
# command ends, and `wait` returns at a signal, so a SIGTERM stops the sweep (and its
# server) now, not when wrk is done.
run_wrk() {
  timeout --kill-after=5 $(($1 + 30)) wrk -t"$wrk_threads" -c"$connections" -d"$1s" -s "$lua" "$url" >"$2" &
  wrk_pid=$!
  wait "$wrk_pid"
  wrk_pid=""
}

mkdir -p "$results"
$python scripts/bench/plots/run_meta.py "$results/meta.json" kind=workers "worker_counts=$counts" \
  "rounds=$rounds" "duration_s=$duration" "connections=$connections" "threads=$wrk_threads" \
  "worker_class=${WORKER_CLASS:-}" "model_dir=$model_dir" "redis=${REDIS_URL:+set}" "postgres=${DATABASE_URL:+set}"
: >"$results/workers.tsv"
echo "sweep_workers: WORKERS=${count_list[*]}, $rounds round(s), wrk -t$wrk_threads -c$connections -d${duration}s" \
  "(unique texts), $(nproc) cores; results in $results"
failed=0
for round in $(seq 1 "$rounds"); do
  for count in "${count_list[@]}"; do
    start_server "$count" "$results/server-$round-$count.log"
    if [ "$warmup" -gt 0 ]; then run_wrk "$warmup" /dev/null; fi
    echo "  measuring WORKERS=$count for ${duration}s"
    run_wrk "$duration" "$results/wrk-$round-$count.log"
    stop_server
    summary=$(grep '^{' "$results/wrk-$round-$count.log" | tail -n 1)
    [ -n "$summary" ] || fail "wrk printed no summary line: $results/wrk-$round-$count.log"
    printf '%s\t%s\t%s\n' "$round" "$count" "$summary" >>"$results/workers.tsv"
    echo "  round $round, WORKERS=$count: $summary"
    if ! $python -c 'import json, sys; s = json.loads(sys.argv[1]); sys.exit(1 if s["non2xx"] or s["socket_errors"] else 0)' \
      "$summary"; then
      echo "sweep_workers: WORKERS=$count had failed requests: its rps counts failures" >&2
      failed=1
    fi
  done
done
echo "sweep_workers: done; plot with scripts/bench/plots/plot.py --workers $results --out DIR"
exit "$failed"
