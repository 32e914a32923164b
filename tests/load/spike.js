// Spike: LOAD_BASE_VUS users, then LOAD_SPIKE_VUS within LOAD_SPIKE_RISE seconds, held,
// then back: requests must keep succeeding through the jump and the recovery. Each
// user waits LOAD_THINK_S between requests, so the offered rate follows the users
// (about users / (think + latency)) instead of saturating two cores from the start.
//
//   LOAD_BASE_VUS    users before and after the spike (default 10)
//   LOAD_SPIKE_VUS   users at the spike's top (default 50: about 500 requests/s, below
//                    the ~760/s knee of `make run` plus k6 on 2 cores)
//   LOAD_SPIKE_RISE  how long the jump takes (default 5s)
//   LOAD_SPIKE_HOLD  how long the top lasts (default 20s)
//   LOAD_CALM        how long LOAD_BASE_VUS run before and after (default 10s)
//   LOAD_THINK_S     seconds each user waits between requests (default 0.1)
//   LOAD_P95_MS / LOAD_P99_MS  latency limits over the whole run (default 100 / 250)
// and the mix settings of lib.js.

import { sleep } from "k6";
import { envDuration, envNumber, requireReady, sendMixed, thresholds } from "./lib.js";

const baseVUs = envNumber("LOAD_BASE_VUS", 10, { min: 1, integer: true });
const spikeVUs = envNumber("LOAD_SPIKE_VUS", 50, { min: 1, integer: true });
const rise = envDuration("LOAD_SPIKE_RISE", "5s");
const calm = envDuration("LOAD_CALM", "10s");
const think = envNumber("LOAD_THINK_S", 0.1, { max: 60 });

export const options = {
  scenarios: {
    spike: {
      executor: "ramping-vus",
      startVUs: baseVUs,
      stages: [
        { target: baseVUs, duration: calm },
        { target: spikeVUs, duration: rise },
        { target: spikeVUs, duration: envDuration("LOAD_SPIKE_HOLD", "20s") },
        { target: baseVUs, duration: rise },
        { target: baseVUs, duration: calm },
      ],
      gracefulRampDown: "10s",
    },
  },
  thresholds: thresholds({ p95: envNumber("LOAD_P95_MS", 100), p99: envNumber("LOAD_P99_MS", 250) }),
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(95)", "p(99)"],
};

export function setup() {
  return requireReady();
}

export default function (data) {
  sendMixed(data);
  sleep(think);
}
