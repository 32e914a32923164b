#!/usr/bin/env bash
# Failure injection: saturate every CPU for a while under load. Run on the
# falcon-svc host as root. Expect: requests keep succeeding (slower), no worker is
# killed by systemd's watchdog or restarted, node-exporter shows the CPUs busy, and
# every request has its request_log row.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init cpu_spike
require_ready_workers 1
SPIKE_SECONDS=${SPIKE_SECONDS:-15}
NODE_EXPORTER=${NODE_EXPORTER:-http://127.0.0.1:9100/metrics}
burners=$(($(nproc) * 2))
declare -A restarts_before
for port in $(worker_ports); do restarts_before[$port]=$(unit_prop "$port" NRestarts); done
idle_seconds() {
  curl -fsS -m 5 "$NODE_EXPORTER" | awk '/^node_cpu_seconds_total[{].*mode="idle"/ { s += $2 } END { printf "%.2f\n", s }'
}

load_start $((SPIKE_SECONDS + 10))
sleep 4
say "starting $burners CPU burners for $SPIKE_SECONDS s"
idle_start=$(idle_seconds)
spike_start=$(date +%s%N)
pids=()
for _ in $(seq 1 "$burners"); do
  timeout "$SPIKE_SECONDS" sh -c 'while :; do :; done' &
  pids+=($!)
done
on_exit kill "${pids[@]}"
wait "${pids[@]}" || true
idle_end=$(idle_seconds)
spike_ns=$(($(date +%s%N) - spike_start))
busy=$("$PYTHON" -c "print(round(100 * (1 - ($idle_end - $idle_start) / ($spike_ns / 1e9 * $(nproc))), 1))")
say "node-exporter: CPUs ${busy}% busy during the spike"
load_wait

check_no_failed_requests
for port in "${!restarts_before[@]}"; do
  check "falcon-worker@$port was not restarted (NRestarts ${restarts_before[$port]} -> $(unit_prop "$port" NRestarts))" \
    test "$(unit_prop "$port" NRestarts)" -eq "${restarts_before[$port]}"
  check "falcon-worker@$port is ready" wait_ready "$port" 30
done
check "node-exporter showed the CPUs saturated (${busy}% busy, want > 80%)" \
  "$PYTHON" -c "import sys; sys.exit(not $busy > 80)"
check_rows "$(json_get "$WORK/load.json" ok)"
verdict
