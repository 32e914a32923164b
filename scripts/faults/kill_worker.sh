#!/usr/bin/env bash
# Failure injection: SIGKILL every process of one falcon-worker unit under saturation
# load, KILLS times (3) in a row. Run on the falcon-svc host as root. Expect: nginx
# retries the cut requests on the other workers (no failed request), systemd restarts
# the unit each time (Restart=on-failure; the listening socket stays in its fd store
# meanwhile), and it is ready again. And no
# request-log row lost or doubled: each answered request's row was in its process's
# write-ahead file before the answer left, and whatever PostgreSQL had not taken yet
# is replayed from there (MAX_LOST_ROWS, default 0, allows a known loss for a study).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init kill_worker
require_ready_workers 2
victim=${VICTIM_PORT:-$(worker_ports | tail -1)}
MAX_LOST_ROWS=${MAX_LOST_ROWS:-0}
pid_before=$(unit_prop "$victim" MainPID)
restarts_before=$(unit_prop "$victim" NRestarts)

KILLS=${KILLS:-3}

load_start 120
sleep 6
for ((kill = 1; kill <= KILLS; kill++)); do
  say "SIGKILL $kill of $KILLS to every process of falcon-worker@$victim (main pid $(unit_prop "$victim" MainPID))"
  systemctl kill --signal=SIGKILL "falcon-worker@$victim.service"
  # Its connections wait in the listening socket meanwhile (the fd store outlives the kill).
  wait_ready "$victim" 90 || die "falcon-worker@$victim not ready after kill $kill"
  sleep 2
done
load_stop

check "falcon-worker@$victim is ready again after the kills" wait_ready "$victim" 90
pid_after=$(unit_prop "$victim" MainPID)
restarts_after=$(unit_prop "$victim" NRestarts)
say "main pid $pid_before -> $pid_after, NRestarts $restarts_before -> $restarts_after"
check "systemd restarted the unit after each kill (NRestarts went up by $KILLS, new main pid)" \
  test "$restarts_after" -eq $((restarts_before + KILLS)) -a "$pid_after" != "$pid_before"
check_no_failed_requests
check_rows "$(json_get "$WORK/load.json" ok)" "$MAX_LOST_ROWS"
verdict
