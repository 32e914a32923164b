// Baseline: a steady, modest arrival rate with the full request mix; every threshold
// must hold. The rate is offered whatever the latency (an open model), so a slow
// service shows in the latency, not in fewer requests.
//
//   LOAD_RATE      requests/s offered (default 100)
//   LOAD_DURATION  how long (default 30s)
//   LOAD_MAX_VUS   the most requests in flight (default 32)
//   LOAD_P95_MS / LOAD_P99_MS  latency limits (default 25 / 50)
// and the mix settings of lib.js.

import { droppedLimit, envDuration, envNumber, requireReady, sendMixed, thresholds } from "./lib.js";

const rate = envNumber("LOAD_RATE", 100, { min: 1, integer: true });
const maxVUs = envNumber("LOAD_MAX_VUS", 32, { min: 1, integer: true });
const duration = envDuration("LOAD_DURATION", "30s");

export const options = {
  scenarios: {
    baseline: {
      executor: "constant-arrival-rate",
      rate,
      timeUnit: "1s",
      duration,
      preAllocatedVUs: Math.min(maxVUs, 8),
      maxVUs,
    },
  },
  thresholds: {
    ...thresholds({ p95: envNumber("LOAD_P95_MS", 25), p99: envNumber("LOAD_P99_MS", 50) }),
    dropped_iterations: droppedLimit(rate, duration),
  },
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
};

export function setup() {
  return requireReady();
}

export default function (data) {
  sendMixed(data);
}
