#!/usr/bin/env bash
# Rolling-restart check: restart every falcon-worker unit, one at a time, under load,
# the way the Ansible handler does (wait for /readyz before the next; no pause for
# nginx: a restarting unit keeps its listening socket, so nginx never marks it
# down). Run on the falcon-svc host as root. Expect: no failed request, a new main
# pid for every unit, one request_log row per request.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init rolling_restart
require_ready_workers 2
# The handler's falcon_svc_restart_settle_seconds (default 0).
SETTLE_SECONDS=${SETTLE_SECONDS:-0}
mapfile -t ports < <(worker_ports)
remember_main_pids

load_start $((5 + ${#ports[@]} * (SETTLE_SECONDS + 8)))
sleep 4
for port in "${ports[@]}"; do
  say "systemctl restart falcon-worker@$port"
  systemctl restart "falcon-worker@$port.service"
  wait_ready "$port" 90 || die "falcon-worker@$port not ready after its restart"
  say "falcon-worker@$port ready"
  sleep "$SETTLE_SECONDS"
done
load_wait

check_new_main_pids
check_no_failed_requests
check_rows "$(json_get "$WORK/load.json" ok)"
verdict
