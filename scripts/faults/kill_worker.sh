#!/usr/bin/env bash
# Failure injection: SIGKILL every process of one falcon-worker unit under load.
# Run on the falcon-svc host as root. Expect: nginx retries the cut requests on the
# other workers (no failed request), systemd restarts the unit (Restart=on-failure),
# and it is ready again. The request-log rows still buffered in the killed processes
# (at most LOG_FLUSH_INTERVAL_MS of that worker's traffic) die with them: SIGKILL
# leaves no time to flush, so up to MAX_LOST_ROWS may be missing (reported exactly).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init kill_worker
require_ready_workers 2
victim=${VICTIM_PORT:-$(worker_ports | tail -1)}
MAX_LOST_ROWS=${MAX_LOST_ROWS:-$((LOAD_RATE / 2))}
pid_before=$(unit_prop "$victim" MainPID)
restarts_before=$(unit_prop "$victim" NRestarts)

load_start 20
sleep 6
say "SIGKILL to every process of falcon-worker@$victim (main pid $pid_before)"
systemctl kill --signal=SIGKILL "falcon-worker@$victim.service"
load_wait

check "falcon-worker@$victim is ready again after the kill" wait_ready "$victim" 90
pid_after=$(unit_prop "$victim" MainPID)
restarts_after=$(unit_prop "$victim" NRestarts)
say "main pid $pid_before -> $pid_after, NRestarts $restarts_before -> $restarts_after"
check "systemd restarted the unit (NRestarts went up, new main pid)" \
  test "$restarts_after" -gt "$restarts_before" -a "$pid_after" != "$pid_before"
check_no_failed_requests
check_rows "$(json_get "$WORK/load.json" ok)" "$MAX_LOST_ROWS"
verdict
