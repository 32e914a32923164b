# shellcheck shell=bash
# Shared by the failure-injection scripts. They run ON the deployed host, as root
# (systemctl, journalctl, psql as postgres), and load it only on loopback through
# nginx with loadgen.py (standard-library Python: the host's python3 runs it).
#
# Each script: drive steady load, inject one fault, undo it (also on failure or
# Ctrl-C), then check what must hold and print one PASS/FAIL line per check and a
# final "VERDICT: PASS" (exit 0) or "VERDICT: FAIL" (exit 1).
#
# Environment (all optional):
#   FALCON_URL      nginx in front of the workers        (default http://127.0.0.1)
#   FALCON_PORTS    worker ports, space separated        (default: every falcon-worker@PORT unit)
#   FALCON_DB       database holding request_log         (default falcon)
#   LOAD_RATE       steady requests per second, total    (default 0: closed loop, the host's saturation)
#   LOAD_CONCURRENCY  connections of the steady load      (default 6)
#   DRILL_UNLIMITED exempt loopback from nginx's rate limits for the drill (default 1; the
#                   role's /etc/nginx/falcon-svc-unlimited.conf is put back when it ends)
#   PYTHON          interpreter for loadgen.py           (default python3)
#   FALCON_API_KEY  API key sent as "Authorization: Bearer" (default none: API keys off)
set -euo pipefail

FAULTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FALCON_URL=${FALCON_URL:-http://127.0.0.1}
FALCON_DB=${FALCON_DB:-falcon}
LOAD_RATE=${LOAD_RATE:-0}
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-6}
DRILL_UNLIMITED=${DRILL_UNLIMITED:-1}
UNLIMITED_FILE=/etc/nginx/falcon-svc-unlimited.conf
PYTHON=${PYTHON:-python3}

FAULT_NAME=fault
RUN_ID=
WORK=
LOAD_PID=
CHECKS_FAILED=0
# curl arguments that send FALCON_API_KEY (fault_init fills them in).
AUTH_CURL=()
UNDO=()

say() { printf '[%s %s] %s\n' "$FAULT_NAME" "$(date +%T)" "$*"; }
die() { say "ERROR: $*"; exit 2; }

# fault_init NAME: a run id (the X-Request-ID prefix of every request: RUN_ID-load-N
# for the steady load), a work dir, and the exit trap that stops the load and undoes
# the fault whatever happens.
fault_init() {
  FAULT_NAME=$1
  [[ $EUID -eq 0 ]] || die "run as root on the falcon-svc host (systemctl, psql as postgres)"
  RUN_ID="$1-$(date +%s)-$RANDOM"
  WORK=$(mktemp -d "/tmp/falcon-fault-$1.XXXXXX")
  trap fault_cleanup EXIT
  # NOTE: the key reaches curl through a 0600 header file (printf is a builtin), never a
  # command line, where ps shows it to every user of the host; loadgen.py reads the env.
  if [[ -n ${FALCON_API_KEY:-} ]]; then
    (umask 077 && printf 'Authorization: Bearer %s\n' "$FALCON_API_KEY" >"$WORK/auth.header")
    # shellcheck disable=SC2034  # read by the drills that source this file (redis_down.sh)
    AUTH_CURL=(-H "@$WORK/auth.header")
  fi
  trap 'exit 130' INT TERM
  if ((DRILL_UNLIMITED)); then unlimit_loopback; fi
  say "run id $RUN_ID (X-Request-ID prefix), load $(load_description) through $FALCON_URL"
}

load_description() {
  if [[ $LOAD_RATE == 0 ]]; then
    echo "closed loop on $LOAD_CONCURRENCY connections (saturation)"
  else
    echo "${LOAD_RATE}/s on $LOAD_CONCURRENCY connections"
  fi
}

# unlimit_loopback: take 127.0.0.1 and ::1 out of nginx's rate limits for this drill
# (nginx/falcon-svc.conf.j2, "Addresses exempt"), and put them back at exit. Only
# connections made from this host's loopback match, whatever X-Forwarded-For says.
unlimit_loopback() {
  [[ -f $UNLIMITED_FILE ]] || die "no $UNLIMITED_FILE: provision the host with the nginx role"
  cp -p "$UNLIMITED_FILE" "$WORK/unlimited.conf"
  on_exit nginx_reload_settled
  on_exit cp -p "$WORK/unlimited.conf" "$UNLIMITED_FILE"
  printf '# written by the %s drill (scripts/faults/lib.sh), put back when it ends\n127.0.0.1 1;\n::1 1;\n' \
    "$FAULT_NAME" >"$UNLIMITED_FILE"
  nginx_reload_settled
  say "nginx rate limits lifted for loopback (until the drill ends)"
}

# nginx_reload_settled: reload nginx and give the new worker processes a moment to take
# new connections (systemctl returns once the master has the signal).
nginx_reload_settled() {
  systemctl reload nginx.service
  sleep 1
}

# on_exit CMD...: undo a fault at exit (last registered runs first; a no-op undo,
# such as killing what already ended, is fine).
on_exit() { UNDO+=("$(printf '%q ' "$@")"); }

fault_cleanup() {
  local i
  if [[ -n $LOAD_PID ]]; then kill "$LOAD_PID" 2>/dev/null || true; fi
  for ((i = ${#UNDO[@]} - 1; i >= 0; i--)); do
    eval "${UNDO[i]}" 2>/dev/null || true
  done
  UNDO=()
  [[ -n $WORK ]] && rm -rf "$WORK"
}

worker_ports() {
  if [[ -n ${FALCON_PORTS:-} ]]; then
    tr ' ' '\n' <<<"$FALCON_PORTS"
    return
  fi
  systemctl list-units --all --plain --no-legend 'falcon-worker@*.service' \
    | sed -nE 's/^falcon-worker@([0-9]+)\.service.*/\1/p' | sort -n
}

unit_prop() { systemctl show --property="$2" --value "falcon-worker@$1.service"; }

# remember_main_pids, then check_new_main_pids: every unit got a new main process.
declare -A MAIN_PID_BEFORE=()
remember_main_pids() {
  local port
  for port in $(worker_ports); do MAIN_PID_BEFORE[$port]=$(unit_prop "$port" MainPID); done
}
check_new_main_pids() {
  local port
  for port in "${!MAIN_PID_BEFORE[@]}"; do
    check "falcon-worker@$port has a new main pid (${MAIN_PID_BEFORE[$port]} -> $(unit_prop "$port" MainPID))" \
      test "$(unit_prop "$port" MainPID)" != "${MAIN_PID_BEFORE[$port]}"
  done
}

# wait_ready PORT [SECONDS]: until the worker answers /readyz 200.
wait_ready() {
  local port=$1 limit=${2:-90} i
  for ((i = 0; i < limit * 2; i++)); do
    curl -fsS -o /dev/null -m 2 "http://127.0.0.1:$port/readyz" 2>/dev/null && return 0
    sleep 0.5
  done
  return 1
}

require_ready_workers() {
  local port ports
  mapfile -t ports < <(worker_ports)
  ((${#ports[@]} >= ${1:-1})) || die "need at least ${1:-1} falcon-worker units, found ${#ports[@]}"
  for port in "${ports[@]}"; do
    wait_ready "$port" 60 || die "falcon-worker@$port is not ready before the fault"
  done
}

# load_start SECONDS [loadgen args...]: steady load in the background, for at most
# SECONDS (load_stop ends it sooner). LOAD_TAG (default "load") names the load in
# its request ids: RUN_ID-LOAD_TAG-N.
load_start() {
  local seconds=$1
  shift
  rm -f "$WORK/load.stop"
  "$PYTHON" "$FAULTS_DIR/loadgen.py" --url "$FALCON_URL" --run-id "$RUN_ID-${LOAD_TAG:-load}" \
    --duration "$seconds" --rate "$LOAD_RATE" --concurrency "$LOAD_CONCURRENCY" \
    --timeline "$WORK/timeline.tsv" --stop-file "$WORK/load.stop" --out "$WORK/load.json" "$@" \
    >/dev/null 2>"$WORK/load.err" &
  LOAD_PID=$!
  say "load: up to $seconds s, $(load_description)"
}

# load_stop: end the load now (each connection finishes its request), and wait for it.
load_stop() {
  touch "$WORK/load.stop"
  load_wait
}

# extra_wait_ms FROM_NS TO_NS: "EXTRA SLOWEST NORMAL COUNT" for the requests in flight
# between FROM_NS and TO_NS (date +%s%N): the slowest of them, less the p99 of the
# requests answered in the 10 s before FROM_NS ("normal"), in ms.
extra_wait_ms() {
  "$PYTHON" - "$WORK/timeline.tsv" "$1" "$2" <<'EOF'
import sys
path, start, end = sys.argv[1], int(sys.argv[2]) / 1e9, int(sys.argv[3]) / 1e9
rows = [tuple(map(float, line.split()[:2])) for line in open(path) if line.strip()]
before = sorted(ms for sent, ms in rows if start - 10 <= sent and sent + ms / 1000 < start)
during = [ms for sent, ms in rows if sent <= end and sent + ms / 1000 >= start]
normal = before[int(0.99 * (len(before) - 1))] if before else 0.0
slowest = max(during, default=0.0)
print(f"{slowest - normal:.0f} {slowest:.0f} {normal:.0f} {len(during)}")
EOF
}

load_wait() {
  wait "$LOAD_PID" || { LOAD_PID=; die "load generator failed: $(cat "$WORK/load.err")"; }
  LOAD_PID=
  say "load done: $(summary_line "$WORK/load.json")"
}

# json_get FILE KEY.PATH: one value of a loadgen summary (0 when absent).
json_get() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print(0 if value is None else value)
EOF
}

summary_line() {
  "$PYTHON" - "$1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"sent {s['sent']}, 2xx {s['ok']}, non-2xx {s['non_2xx']}, errors {s['errors']} "
      f"{s['error_kinds'] or ''}, p50 {s['latency_ms']['p50']} ms, p99 {s['latency_ms']['p99']} ms, "
      f"max {s['latency_ms']['max']} ms, statuses {s['statuses']}")
if s["first_failures"]:
    print("  first failures:", json.dumps(s["first_failures"][:5]))
EOF
}

# check DESCRIPTION COMMAND...: one PASS/FAIL line; a FAIL makes the verdict fail.
check() {
  local description=$1
  shift
  if "$@"; then
    say "PASS  $description"
  else
    say "FAIL  $description"
    CHECKS_FAILED=$((CHECKS_FAILED + 1))
  fi
}

check_no_failed_requests() {
  local file=${1:-$WORK/load.json} sent bad errors
  sent=$(json_get "$file" sent)
  bad=$(json_get "$file" non_2xx)
  errors=$(json_get "$file" errors)
  check "every request answered 2xx ($sent sent, $bad non-2xx, $errors connection errors)" \
    test "$sent" -gt 0 -a "$bad" -eq 0 -a "$errors" -eq 0
}

psql_value() {
  (cd / && runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d "$FALCON_DB" -c "$1")
}

# rows_for PREFIX: "distinct total" request_log rows whose request_id starts with PREFIX-.
rows_for() {
  psql_value "SELECT count(DISTINCT request_id) || ' ' || count(*) FROM request_log
              WHERE starts_with(request_id, '$1-') AND received_at > now() - interval '1 hour'"
}

# check_rows EXPECTED [MAX_MISSING] [PREFIX]: one request_log row per answered request.
# Rows reach PostgreSQL from a background writer (and after an outage from the
# spool), so wait for them up to 90 s.
check_rows() {
  local expected=$1 max_missing=${2:-0} prefix=${3:-$RUN_ID-load} distinct=0 total=0 last=-1 same=0 i
  for ((i = 0; i < 90; i++)); do
    read -r distinct total < <(rows_for "$prefix")
    ((distinct >= expected)) && break
    # Where rows may be missing, stop once the count has stood still for 10 s.
    if ((distinct == last)); then same=$((same + 1)); else same=0; fi
    ((max_missing > 0 && same >= 10)) && break
    last=$distinct
    sleep 1
  done
  say "request_log: $distinct distinct request ids in $total rows for $expected answered requests (after ${i} s)"
  check "no request has two request_log rows ($((total - distinct)) duplicated)" test "$total" -eq "$distinct"
  if ((max_missing == 0)); then
    check "one request_log row per answered request ($distinct of $expected)" test "$distinct" -eq "$expected"
  else
    check "request_log rows missing at most $max_missing ($((expected - distinct)) of $expected missing)" \
      test "$distinct" -le "$expected" -a $((expected - distinct)) -le "$max_missing"
  fi
}

# window_line FROM_NS TO_NS: "COUNT FAILED SLOWEST_MS" of the requests in flight
# between FROM_NS and TO_NS (date +%s%N).
window_line() {
  "$PYTHON" - "$WORK/timeline.tsv" "$1" "$2" <<'EOF'
import sys
path, start, end = sys.argv[1], int(sys.argv[2]) / 1e9, int(sys.argv[3]) / 1e9
rows = [line.split() for line in open(path) if line.strip()]
during = [(float(ms), status) for sent, ms, status in rows if float(sent) <= end and float(sent) + float(ms) / 1000 >= start]
failed = sum(not status.startswith("2") for _, status in during)
print(len(during), failed, f"{max((ms for ms, _ in during), default=0):.0f}")
EOF
}

# replay_state: "PENDING_BYTES ROWS_PER_SECOND" of the spool replay, from the workers'
# /readyz detail (loopback): the spool's backlog (the host's: any worker tells), and the
# fastest rate of the workers' last replay batches.
replay_state() {
  local port
  for port in $(worker_ports); do
    curl -fsS -m 2 "http://127.0.0.1:$port/readyz" 2>/dev/null || true
    echo
  done | "$PYTHON" -c '
import json, sys
replays = [json.loads(line)["request_log"]["replay"] for line in sys.stdin if line.strip()]
if not replays:
    print("unknown 0")
else:
    print(replays[0]["pending_bytes"], max(r["last_batch_rows_per_second"] for r in replays))'
}

# metric_sum PORT REGEX: sum of a worker's /metrics samples whose name{labels} match.
metric_sum() {
  curl -fsS -m 5 "http://127.0.0.1:$1/metrics" | awk -v re="$2" '
    $0 !~ /^#/ && $1 ~ re { sum += $2 } END { printf "%.0f\n", sum }'
}

# metric_total REGEX: metric_sum over every worker.
metric_total() {
  local port sum=0 value
  for port in $(worker_ports); do
    value=$(metric_sum "$port" "$1" 2>/dev/null || echo 0)
    sum=$((sum + value))
  done
  echo "$sum"
}

verdict() {
  if ((CHECKS_FAILED == 0)); then
    say "VERDICT: PASS"
    exit 0
  fi
  say "VERDICT: FAIL ($CHECKS_FAILED check(s) failed)"
  exit 1
}
