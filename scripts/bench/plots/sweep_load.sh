#!/usr/bin/env bash
# Latency against offered load: the k6 baseline at each rate of RATES against URL, to
# find the knee (issue 13 item 4; plot.py --load draws it).
#
#   scripts/bench/plots/sweep_load.sh [URL]
#
# URL: as scripts/load_test.sh takes it (default $LOAD_URL, else the `make run` stack;
# a host other than loopback needs LOAD_ALLOW_REMOTE=1). Each rate is one
# `scripts/load_test.sh baseline URL` with LOAD_RATE set to it: an open model (the rate
# is offered whatever the latency), the full request mix, the baseline's thresholds.
#
# Env: RATES (requests/s, space-separated, ascending; default "100 200 400 800"; at
# most 20 rates, each 1 to 100000), LOAD_DURATION (each rate's length, default 30s),
# RESULTS_DIR (default var/plots/load-TIME), and whatever else load_test.sh and
# tests/load/lib.js read (LOAD_MAX_VUS, LOAD_P95_MS, LOAD_P99_MS, FALCON_API_KEY, K6...).
#
# Writes to RESULTS_DIR: k6-RATE.json (k6's summary export) and k6-RATE.log (its output)
# per rate, runs.tsv (RATE<TAB>EXIT<TAB>FILE, a line per finished rate) and meta.json
# (the machine, the date, the settings: run_meta.py).
#
# A rate whose run crosses a threshold (k6 exits 99: latency, failures, or requests k6
# could not send because the service fell behind) is recorded and the sweep goes on:
# that is the knee it is looking for. Any other failure (no k6, a bad setting, a
# service that is not ready: exit 2 or 107) stops the sweep with that status, since
# the rates after it would measure nothing. Bounded: load_test.sh stops each k6 run
# 60 s after its own length.
set -euo pipefail
cd "$(dirname "$0")/../../.."

MAX_RATES=20
MAX_RATE=100000
url=${1:-${LOAD_URL:-http://127.0.0.1:8000}}
rates=${RATES:-100 200 400 800}
duration=${LOAD_DURATION:-30s}
results=${RESULTS_DIR:-var/plots/load-$(date -u +%Y%m%dT%H%M%SZ)}
python=${PYTHON:-python3}

fail() {
  echo "sweep_load: $*" >&2
  exit 2
}

[ $# -le 1 ] || fail "usage: $0 [URL]"
read -r -a rate_list <<<"$rates"
[ "${#rate_list[@]}" -ge 1 ] || fail "RATES is empty"
[ "${#rate_list[@]}" -le "$MAX_RATES" ] || fail "RATES has ${#rate_list[@]} rates; at most $MAX_RATES"
previous=0
for rate in "${rate_list[@]}"; do
  [[ $rate =~ ^[1-9][0-9]*$ ]] && [ "$rate" -le "$MAX_RATE" ] ||
    fail "RATES: '$rate' is not a whole number of requests/s from 1 to $MAX_RATE"
  [ "$rate" -gt "$previous" ] || fail "RATES must ascend: $rate after $previous"
  previous=$rate
done

scratch=""
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$results"
"$python" scripts/bench/plots/run_meta.py "$results/meta.json" kind=load "url=$url" "rates=$rates" \
  "duration=$duration" "max_vus=${LOAD_MAX_VUS:-}" "p95_ms=${LOAD_P95_MS:-}" "p99_ms=${LOAD_P99_MS:-}"
: >"$results/runs.tsv"
echo "sweep_load: k6 baseline at ${rate_list[*]} requests/s, $duration each, against $url; results in $results"

for rate in "${rate_list[@]}"; do
  # load_test.sh names its summary after the time; a directory per rate finds it.
  scratch=$(mktemp -d)
  status=0
  LOAD_RATE=$rate LOAD_DURATION=$duration LOAD_RESULTS_DIR=$scratch \
    bash scripts/load_test.sh baseline "$url" >"$results/k6-$rate.log" 2>&1 || status=$?
  summary=$(find "$scratch" -name 'baseline-*.json' -size +0 | head -n 1)
  if [ -n "$summary" ]; then mv "$summary" "$results/k6-$rate.json"; fi
  rm -rf "$scratch"
  line=$(grep '^baseline: ' "$results/k6-$rate.log" || true)
  case $status in
    0 | 99)
      [ -n "$summary" ] || {
        tail -n 20 "$results/k6-$rate.log" >&2
        fail "k6 at $rate/s exited $status without a summary"
      }
      printf '%s\t%s\t%s\n' "$rate" "$status" "k6-$rate.json" >>"$results/runs.tsv"
      verdict="thresholds held"
      [ "$status" = 0 ] || verdict="thresholds crossed: $(grep '^thresholds crossed: ' "$results/k6-$rate.log" | cut -d' ' -f3-)"
      echo "  $rate/s: ${line#baseline: } -- $verdict"
      ;;
    *)
      tail -n 20 "$results/k6-$rate.log" >&2
      echo "sweep_load: the run at $rate/s failed (exit $status), not at a threshold; stopping" >&2
      exit "$status"
      ;;
  esac
done
echo "sweep_load: done; plot with scripts/bench/plots/plot.py --load $results --out DIR"
