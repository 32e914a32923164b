#!/usr/bin/env bash
# Rolling-restart check: restart every falcon-worker unit, one at a time, under load,
# the way the Ansible handler does (wait for /readyz, then for nginx to trust the
# worker again, before the next). Run on the falcon-svc host as root. Expect: no
# failed request, a new main pid for every unit, one request_log row per request.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init rolling_restart
require_ready_workers 2
# nginx marks a worker down for fail_timeout (10 s) after max_fails connection
# failures during its restart; restarting the next one sooner could leave nginx
# with no live upstream.
SETTLE_SECONDS=${SETTLE_SECONDS:-10}
mapfile -t ports < <(worker_ports)
declare -A pid_before
for port in "${ports[@]}"; do pid_before[$port]=$(unit_prop "$port" MainPID); done

load_start $((5 + ${#ports[@]} * (SETTLE_SECONDS + 8)))
sleep 4
for port in "${ports[@]}"; do
  say "systemctl restart falcon-worker@$port"
  systemctl restart "falcon-worker@$port.service"
  wait_ready "$port" 90 || die "falcon-worker@$port not ready after its restart"
  say "falcon-worker@$port ready; settling ${SETTLE_SECONDS} s"
  sleep "$SETTLE_SECONDS"
done
load_wait

for port in "${ports[@]}"; do
  check "falcon-worker@$port has a new main pid (${pid_before[$port]} -> $(unit_prop "$port" MainPID))" \
    test "$(unit_prop "$port" MainPID)" != "${pid_before[$port]}"
done
check_no_failed_requests
check_rows "$(json_get "$WORK/load.json" ok)"
verdict
