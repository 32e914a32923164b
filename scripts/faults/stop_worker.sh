#!/usr/bin/env bash
# Failure injection: `systemctl stop` one worker under load, with large batches in
# flight. Run on the falcon-svc host as root. Expect:
# - the stopped worker finishes the requests it was serving (SIGTERM drain): its
#   request_log has their rows, written by that unit, answered after the stop began.
#   The batches go to the unit's own port, not through nginx: nginx hands a unit one
#   batch at a time as the unit frees up, and with one worker per unit a batch takes
#   ~10 ms, so through nginx none might be in flight on the unit when it is stopped;
# - nginx sends everything else to the other workers, including requests the worker
#   had not accepted yet (reset with its listen queue, retried by nginx): no failed
#   request, in-flight batches included;
# - every request has its request_log row (the drain flushes the log buffer);
# - the unit stops well before TimeoutStopSec, and comes back when started;
# - a stop delays nobody: no request in flight meanwhile took more than
#   STOP_DELAY_LIMIT_MS longer than the p99 before it (the master takes the
#   listening socket out of systemd's fd store on a stop for good, and meinheld's
#   workers close theirs as the drain starts, so the port closes at once; nginx
#   retries what was queued there on the other unit).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init stop_worker
require_ready_workers 2
victim=${VICTIM_PORT:-$(worker_ports | tail -1)}
# Batches sent straight to the unit (no nginx, so no nginx_conn_limit): ~10 ms of work
# each, queued there at once.
BURST=${BURST:-24}
# The unit's TimeoutStopSec is 35 s; a drain that needs most of it is a defect.
STOP_LIMIT_SECONDS=${STOP_LIMIT_SECONDS:-15}
STOP_DELAY_LIMIT_MS=${STOP_DELAY_LIMIT_MS:-250}
on_exit systemctl start "falcon-worker@$victim.service"

load_start 120
sleep 4
say "sending $BURST batches of 50 long texts to falcon-worker@$victim's own port"
"$PYTHON" "$FAULTS_DIR/loadgen.py" --url "http://127.0.0.1:$victim" --run-id "$RUN_ID-burst" \
  --burst "$BURST" --ready-file "$WORK/burst.sent" --out "$WORK/burst.json" >/dev/null 2>"$WORK/burst.err" &
burst_pid=$!
for _ in $(seq 1 100); do [[ -e $WORK/burst.sent ]] && break; sleep 0.05; done
[[ -e $WORK/burst.sent ]] || die "the burst was not sent: $(cat "$WORK/burst.err")"
# Stop only once the worker has accepted every batch's connection: one still in the
# listen queue would be reset when the unit closes its socket, and no nginx is there
# to retry it. (Recv-Q of a listening socket: connections not yet accepted.)
for _ in $(seq 1 100); do
  [[ $(ss -Hltn "sport = :$victim" | awk '{queued += $2} END {print queued + 0}') == 0 ]] && break
  sleep 0.02
done
since=$(date -u '+%Y-%m-%d %H:%M:%S.%3N+00')
say "all $BURST in flight: systemctl stop falcon-worker@$victim"
stop_started=$(date +%s%N)
systemctl stop "falcon-worker@$victim.service"
stop_ms=$((($(date +%s%N) - stop_started) / 1000000))
say "falcon-worker@$victim stopped in $stop_ms ms"
wait "$burst_pid" || die "burst failed: $(cat "$WORK/burst.err")"
say "batches: $(summary_line "$WORK/burst.json")"
# NOTE: from request_log, not the journal: the role's ACCESS_LOG=errors writes no access
# line for a 200. A row names its unit (worker_id HOST-PORT:PID) and when it was answered
# (received_at + latency_ms: a lower bound, as the time a batch queued in the worker is
# left out, so it can only undercount). Rows the drain left in its write-ahead log come by replay:
# wait for every batch's row first.
for _ in $(seq 1 60); do
  read -r burst_rows _ < <(rows_for "$RUN_ID-burst")
  ((burst_rows >= BURST)) && break
  sleep 0.5
done
drained=$(psql_value "SELECT count(*) FROM request_log WHERE starts_with(request_id, '$RUN_ID-burst-')
  AND status = 200 AND worker_id LIKE '%-$victim:%'
  AND received_at + latency_ms * interval '1 millisecond' > '$since'")
say "falcon-worker@$victim answered $drained of the batches after the stop began"
sleep 3
say "starting falcon-worker@$victim again"
systemctl start "falcon-worker@$victim.service"
wait_ready "$victim" 90 || die "falcon-worker@$victim not ready after its start"

# The stop's delay, measured alone: the batches above load both cores for seconds,
# which slows every request whatever the stop does. nginx takes a started unit back
# only after fail_timeout (10 s): wait for that, and for the latency to settle
# (extra_wait_ms compares with the 10 s before the stop).
sleep 22
say "steady load only: systemctl stop falcon-worker@$victim"
stopping=$(date +%s%N)
systemctl stop "falcon-worker@$victim.service"
stopped=$(date +%s%N)
say "falcon-worker@$victim stopped in $(((stopped - stopping) / 1000000)) ms"
sleep 3
systemctl start "falcon-worker@$victim.service"
sleep 2
load_stop

check "the stopping worker finished the batches it was serving ($drained answered after SIGTERM)" \
  test "$drained" -gt 0
check_no_failed_requests "$WORK/burst.json"
check_no_failed_requests
read -r extra slowest normal in_flight < <(extra_wait_ms "$stopping" "$stopped")
say "stop delay: $in_flight requests in flight during the stop, slowest $slowest ms, p99 in the 10 s before $normal ms"
check "the load ran through the stop ($in_flight requests in flight, want >= 20)" test "$in_flight" -ge 20
check "the stop delayed no request more than $STOP_DELAY_LIMIT_MS ms (the slowest took $extra ms longer than the p99)" \
  test "$extra" -le "$STOP_DELAY_LIMIT_MS"
check "the drain ended well before TimeoutStopSec (stopped in $stop_ms ms, want < ${STOP_LIMIT_SECONDS} s)" \
  test "$stop_ms" -lt $((STOP_LIMIT_SECONDS * 1000))
check "falcon-worker@$victim is ready again" wait_ready "$victim" 90
check_rows "$(json_get "$WORK/load.json" ok)"
check_rows "$BURST" 0 "$RUN_ID-burst"
verdict
