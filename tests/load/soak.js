// Soak: the baseline's steady rate for a long time, to show what builds up (memory,
// the request log's spool, connections). Short by default; set LOAD_DURATION=1h
// for a real soak. Requests are tagged by half (`phase`: early, late), so the
// summary shows whether latency drifted between the first and second half.
//
//   LOAD_RATE      requests/s offered (default 100)
//   LOAD_DURATION  how long (default 2m)
//   LOAD_MAX_VUS   the most requests in flight (default 32)
//   LOAD_P95_MS / LOAD_P99_MS  latency limits, also for each half (default 25 / 50)
// and the mix settings of lib.js.

import exec from "k6/execution";
import { durationMs, droppedLimit, envDuration, envNumber, requireReady, sendMixed, thresholds } from "./lib.js";

const rate = envNumber("LOAD_RATE", 100, { min: 1, integer: true });
const maxVUs = envNumber("LOAD_MAX_VUS", 32, { min: 1, integer: true });
const duration = envDuration("LOAD_DURATION", "2m");
const p95 = envNumber("LOAD_P95_MS", 25);
const p99 = envNumber("LOAD_P99_MS", 50);

export const options = {
  scenarios: {
    soak: {
      executor: "constant-arrival-rate",
      rate,
      timeUnit: "1s",
      duration,
      preAllocatedVUs: Math.min(maxVUs, 8),
      maxVUs,
    },
  },
  thresholds: {
    ...thresholds({ p95, p99 }),
    dropped_iterations: droppedLimit(rate, duration),
    "http_req_duration{phase:early}": [`p(95)<${p95}`, `p(99)<${p99}`],
    "http_req_duration{phase:late}": [`p(95)<${p95}`, `p(99)<${p99}`],
  },
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
};

const halfMs = durationMs(duration) / 2;

export function setup() {
  return requireReady();
}

export default function (data) {
  exec.vu.metrics.tags.phase = Date.now() - exec.scenario.startTime < halfMs ? "early" : "late";
  sendMixed(data);
}
