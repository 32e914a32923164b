#!/usr/bin/env bash
# Failure injection: stop PostgreSQL under saturation load for OUTAGE_SECONDS, with a
# worker unit restarted inside the outage, then start it again. Run on the falcon-svc
# host as root. Expect: no failed request (rows go to each process's write-ahead file
# and stay there), the restarted unit's rows are not lost with its old processes, and
# once PostgreSQL is back every row lands exactly once; the drill prints how long the
# backlog took to drain, and the replay's rate as the workers' journal shows it.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init postgres_down
require_ready_workers 2
OUTAGE_SECONDS=${OUTAGE_SECONDS:-35}
POSTGRES_UNIT=${POSTGRES_UNIT:-postgresql.service}
victim=${VICTIM_PORT:-$(worker_ports | tail -1)}
on_exit systemctl start "$POSTGRES_UNIT"

# The load runs through the outage and ends as PostgreSQL comes back, so what follows
# measures the backlog's drain alone: how long until every answered request's row
# is in request_log.
load_start $((OUTAGE_SECONDS + 5))
sleep 5
say "systemctl stop $POSTGRES_UNIT for $OUTAGE_SECONDS s"
systemctl stop "$POSTGRES_UNIT"
sleep $((OUTAGE_SECONDS / 2))
say "restarting falcon-worker@$victim inside the outage"
systemctl restart "falcon-worker@$victim.service"
load_wait
say "backlog before PostgreSQL's return: $(replay_state | cut -d' ' -f1) bytes"
say "systemctl start $POSTGRES_UNIT"
back=$(date +%s%N)
systemctl start "$POSTGRES_UNIT"
answered=$(json_get "$WORK/load.json" ok)
read -r present _ < <(rows_for "$RUN_ID-load")
backlog=$((answered - present))
say "PostgreSQL is up after $((($(date +%s%N) - back) / 1000000)) ms; $backlog of $answered answered rows are not in it yet"
# The workers' PostgreSQL breakers admit one trial call per CIRCUIT_BREAKER_TIMEOUT_SECONDS
# (60 s) while open, so replay may start up to that long after PostgreSQL is back.
DRAIN_LIMIT_SECONDS=${DRAIN_LIMIT_SECONDS:-90}
drained_ms=-1
for _ in $(seq $((DRAIN_LIMIT_SECONDS * 10))); do
  read -r distinct _ < <(rows_for "$RUN_ID-load" 2>/dev/null || echo "0 0")
  if ((distinct >= answered)); then drained_ms=$((($(date +%s%N) - back) / 1000000)); break; fi
  sleep 0.1
done
say "replay: all $answered rows in PostgreSQL ${drained_ms} ms after its start ($backlog of them replayed)"
# The replay's rate as the workers' journal shows it: one line per replayed file
# ("replayed N request-log rows from ..."), rows over the time from the first such
# line to the last (the first file's rows not counted: its time is not in the span).
# Reported, not checked: the span also holds the gaps while each worker's PostgreSQL
# pool reconnects (5,500 to 52,000 rows/s measured); the replay's own rate is
# scripts/bench/bench_replay.py's (make bench).
read -r rate files < <(journalctl -u 'falcon-worker@*' --since "@$((back / 1000000000))" -o short-unix --no-pager \
  | "$PYTHON" -c '
import re, sys
seen = [(float(line.split()[0]), int(m.group(1))) for line in sys.stdin
        if (m := re.search(r"replayed (\d+) request-log rows from", line))]
if len(seen) < 2 or seen[-1][0] <= seen[0][0]:
    print(0, len(seen))
else:
    print(int(sum(rows for _, rows in seen[1:]) / (seen[-1][0] - seen[0][0])), len(seen))')
say "replay rate: $rate rows/s over $files files (the workers' journal)"

check_no_failed_requests
check_rows "$answered"
check "the outage's backlog was replayed within $DRAIN_LIMIT_SECONDS s of PostgreSQL's start (${drained_ms} ms)" \
  test "$drained_ms" -ge 0
verdict
