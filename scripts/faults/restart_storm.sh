#!/usr/bin/env bash
# Restarts the way an operator really types them, under saturation load (closed loop,
# LOAD_CONCURRENCY connections, nginx's loopback limits lifted). Run on the falcon-svc
# host as root. Phases, with no wait for nginx in between:
#   back-to-back   `systemctl restart` of each unit in turn, not waiting for the last
#   one command    `systemctl restart` of every unit in one command
#   target         `systemctl restart falcon-svc.target` (every unit at once)
#   reload         `systemctl reload` of every unit
# Expect: not one failed request. Each unit's listening socket stays open through its
# restart (systemd's fd store), so nginx's connections queue for the new master
# instead of being refused; the phase's slowest request says how long they queued.
# And one request_log row per answered request, none twice.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init restart_storm
require_ready_workers 2
mapfile -t ports < <(worker_ports)
units=("${ports[@]/#/falcon-worker@}")
units=("${units[@]/%/.service}")
remember_main_pids

# phase NAME COMMAND...: run one phase and wait until every unit is ready again; what
# the requests in flight meanwhile saw is printed once the load is over.
phase() {
  local name=$1 from to port
  shift
  from=$(date +%s%N)
  say "$name: $*"
  "$@"
  for port in "${ports[@]}"; do wait_ready "$port" 90 || die "falcon-worker@$port not ready after $name"; done
  to=$(date +%s%N)
  say "$name: every unit ready again after $(((to - from) / 1000000)) ms"
  WINDOWS+=("$name $from $to")
  sleep 3
}
WINDOWS=()
# shellcheck disable=SC2329  # run by phase(), by name
restart_each() {
  local unit
  for unit in "${units[@]}"; do systemctl restart "$unit"; done
}

load_start 240
sleep 5
phase back-to-back restart_each
phase one-command systemctl restart "${units[@]}"
phase target systemctl restart falcon-svc.target
phase reload systemctl reload "${units[@]}"
load_stop

for window in "${WINDOWS[@]}"; do
  read -r name from to <<<"$window"
  read -r count failed slowest < <(window_line "$from" "$to")
  say "$name: $count requests in flight, $failed failed, the slowest took $slowest ms"
  # NOTE: with every unit restarting at once, all the load's connections wait on the
  # restarting sockets, so a phase may see few requests: but at least one per connection.
  check "$name: the load ran through it ($count requests in flight, want >= $LOAD_CONCURRENCY)" \
    test "$count" -ge "$LOAD_CONCURRENCY"
done
check_new_main_pids
check_no_failed_requests
check_rows "$(json_get "$WORK/load.json" ok)"
verdict
