// Stress: ramp the offered rate until requests fail or p99 breaks, then stop. The run
// aborts (exit 99) at the first broken limit (from LOAD_ABORT_AFTER, default 10s, on);
// `offered_rps` in the summary is the rate offered then: the knee. A run that
// reaches LOAD_MAX_RATE within every limit passes (raise LOAD_MAX_RATE to find it).
//
//   LOAD_START_RATE  requests/s at the start (default 50)
//   LOAD_MAX_RATE    requests/s at the end of the ramp (default 2000: k6 itself needs
//                    about half a core at that rate on a 2-core box)
//   LOAD_RAMP        how long the ramp takes (default 60s)
//   LOAD_HOLD        how long LOAD_MAX_RATE is held after it (default 10s)
//   LOAD_MAX_VUS     the most requests in flight (default 64)
//   LOAD_P95_MS / LOAD_P99_MS  the limits whose break ends the run (default 50 / 100)
// and the mix settings of lib.js.

import exec from "k6/execution";
import { Gauge } from "k6/metrics";
import { durationMs, envDuration, envNumber, requireReady, sendMixed, thresholds } from "./lib.js";

const startRate = envNumber("LOAD_START_RATE", 50, { min: 1, integer: true });
const maxRate = envNumber("LOAD_MAX_RATE", 2000, { min: 1, integer: true });
const ramp = envDuration("LOAD_RAMP", "60s");
const hold = envDuration("LOAD_HOLD", "10s");
const maxVUs = envNumber("LOAD_MAX_VUS", 64, { min: 1, integer: true });

export const options = {
  scenarios: {
    stress: {
      executor: "ramping-arrival-rate",
      startRate,
      timeUnit: "1s",
      stages: [
        { target: maxRate, duration: ramp },
        { target: maxRate, duration: hold },
      ],
      preAllocatedVUs: Math.min(maxVUs, 16),
      maxVUs,
    },
  },
  thresholds: thresholds({
    p95: envNumber("LOAD_P95_MS", 50),
    p99: envNumber("LOAD_P99_MS", 100),
    abortOnFail: true,
  }),
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
};

// The rate the ramp offers now: its last value in the summary is where the run ended.
const offeredRps = new Gauge("offered_rps");
const rampMs = durationMs(ramp);

export function setup() {
  return requireReady();
}

export default function (data) {
  const ramped = rampMs > 0 ? Math.min(Date.now() - exec.scenario.startTime, rampMs) / rampMs : 1;
  offeredRps.add(Math.round(startRate + (maxRate - startRate) * ramped));
  sendMixed(data);
}
