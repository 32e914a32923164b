#!/usr/bin/env bash
# Failure injection: stop PostgreSQL under saturation load for OUTAGE_SECONDS, with a
# worker unit restarted inside the outage, then start it again. Run on the falcon-svc
# host as root. Expect: no failed request (rows go to each process's write-ahead file
# and stay there), the restarted unit's rows are not lost with its old processes, and
# once PostgreSQL is back every row lands exactly once, within DRAIN_LIMIT_SECONDS, at
# REPLAY_RATE_MIN rows/s or more while replay runs (the workers' journal).
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
# The replay's rate as the workers' journal shows it: each replay pass logs "replayed N
# spooled rows in S s"; the rate is their rows over the time replay ran (the union of
# the passes, ending at their journal time: two workers replaying at once count once).
# The seconds before the first pass (each worker's PostgreSQL pool reconnecting, its
# breaker's next trial) are the drain time's, checked above, not the rate's.
REPLAY_RATE_MIN=${REPLAY_RATE_MIN:-20000}
read -r rate replayed passes < <(journalctl -u 'falcon-worker@*' --since "@$((back / 1000000000))" -o short-unix \
  --no-pager | "$PYTHON" -c '
import re, sys
passes = sorted((float(line.split()[0]) - float(m.group(2)), float(line.split()[0]), int(m.group(1)))
                for line in sys.stdin if (m := re.search(r"replayed (\d+) spooled rows in ([\d.]+) s", line)))
busy, end = 0.0, float("-inf")
for start, stop, _ in passes:
    busy += max(0.0, stop - max(start, end))
    end = max(end, stop)
rows = sum(rows for _, _, rows in passes)
print(int(rows / busy) if busy > 0 else 0, rows, len(passes))')
say "replay rate: $rate rows/s ($replayed rows in $passes passes, the workers' journal)"

check_no_failed_requests
check_rows "$answered"
check "the outage's backlog was replayed within $DRAIN_LIMIT_SECONDS s of PostgreSQL's start (${drained_ms} ms)" \
  test "$drained_ms" -ge 0
check "replay wrote >= $REPLAY_RATE_MIN rows/s while it ran ($rate rows/s, $replayed rows)" \
  test "$rate" -ge "$REPLAY_RATE_MIN"
verdict
