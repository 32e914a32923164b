#!/usr/bin/env bash
# Failure injection: make PostgreSQL slow under load by holding an ACCESS EXCLUSIVE
# lock on request_log (every insert waits). Run on the falcon-svc host as root.
# Expect: requests do not wait for the database (no failed request, p99 stays far
# below the lock time), the request-log backlog shows in the metrics (queue depth,
# retries or spooled rows), and once the lock is gone every row lands exactly once.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init postgres_slow
require_ready_workers 1
LOCK_SECONDS=${LOCK_SECONDS:-15}
P99_LIMIT_MS=${P99_LIMIT_MS:-1000}
backlog_metrics='falcon_request_log_queue_depth|falcon_request_log_rows_total[{]outcome="spooled"|falcon_dependency_retries_total[{]dependency="postgres"'
before=$(metric_total "^($backlog_metrics)")

load_start $((LOCK_SECONDS + 15))
sleep 5
say "locking request_log for $LOCK_SECONDS s"
(cd / && runuser -u postgres -- psql -X -q -d "$FALCON_DB" \
  -c "BEGIN; LOCK TABLE request_log IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep($LOCK_SECONDS); COMMIT;") \
  >"$WORK/lock.out" 2>&1 &
lock_pid=$!
on_exit kill "$lock_pid"
sleep $((LOCK_SECONDS - 3))
during=$(metric_total "^($backlog_metrics)")
say "backlog metrics (queue depth + spooled rows + retries): $before before, $during during the lock"
wait "$lock_pid" || die "the lock session failed: $(cat "$WORK/lock.out")"
say "lock released"
load_wait

p99=$(json_get "$WORK/load.json" latency_ms.p99)
check_no_failed_requests
check "requests did not wait for the database (p99 $p99 ms < $P99_LIMIT_MS ms, lock held $LOCK_SECONDS s)" \
  "$PYTHON" -c "import sys; sys.exit(not float('$p99') < $P99_LIMIT_MS)"
check "the metrics showed the log backlog ($before -> $during)" test "$during" -gt "$before"
check_rows "$(json_get "$WORK/load.json" ok)"
verdict
