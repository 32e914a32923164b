// What the four load tests share: settings from the environment, the request mix
// (unique texts, repeats, batches, X-Idempotency-Key), the checks and the thresholds.
//
// Every setting is an environment variable (k6 reads the process environment, or
// `k6 run -e NAME=value`); a bad value stops k6 before the first request with a
// message naming the variable. scripts/load_test.sh runs the scripts; the
// defaults are sized for a 2-core box that runs k6 and the service side by side.
//
//   LOAD_URL               the service (default http://127.0.0.1:8000, `make run`)
//   FALCON_API_KEY         sent as "Authorization: Bearer ..." when set
//   LOAD_REPEAT_SHARE      share of /infer requests with a text from a small fixed
//                          pool: cache hits after the first of each (default 0.2)
//   LOAD_BATCH_SHARE       share of /infer/batch requests (default 0.1)
//   LOAD_BATCH_SIZE        unique texts per batch (default 8)
//   LOAD_IDEMPOTENT_SHARE  share of /infer requests with X-Idempotency-Key; every
//                          second one replays the VU's previous key and body, so
//                          half of them are replays (default 0.1)
//   LOAD_REQUIRE_IDEMPOTENCY=1  a replay must come back replayed (Redis up), as a
//                          threshold; otherwise a service without Redis passes
//   LOAD_MAX_FAILED        the highest share of failed requests, of failed checks,
//                          and of requests an arrival-rate run could not send for
//                          lack of a free VU (default 0.01)
//   LOAD_P95_MS, LOAD_P99_MS  latency limits; each script has its own defaults
//   LOAD_TIMEOUT           one request's timeout (default 10s)
//   LOAD_ABORT_AFTER       stress only: how long after the start a broken limit
//                          may end the run (k6's delayAbortEval), so the first
//                          few requests alone never decide (default 10s)
//
// Failed means http_req_failed: a status outside 200-399 (so 429 and 503 count)
// or no response at all.

import { check, fail } from "k6";
import exec from "k6/execution";
import http from "k6/http";
import { Rate } from "k6/metrics";

// The request kinds, each a `kind` tag, so the summary has a latency per kind.
export const KINDS = ["unique", "repeat", "batch", "idempotent", "replay"];

// Texts sent again and again: after the first of each, the service answers from
// its cache. Few on purpose, so nearly every repeat is a hit.
const REPEATED_TEXTS = [
  "The delivery was excellent and the staff were friendly.",
  "Customer support was terrible and I asked for a refund.",
  "This laptop is fine but the price is high.",
  "The hotel room was clean and the view was wonderful.",
  "My order arrived late again, which ruined the weekend.",
  "The new update is confusing and the app feels slow.",
  "The battery lasts all day, great value for the money.",
  "Our waiter was slow but the food was delicious.",
];

const SUBJECTS = ["The delivery", "Customer support", "This laptop", "The hotel room", "My order",
  "The new update", "The battery", "Our waiter", "The checkout page", "The train"];
const VERBS = ["was", "seemed", "felt", "turned out", "is"];
const ADJECTIVES = ["excellent", "terrible", "fine", "slow", "wonderful", "broken", "on time",
  "confusing", "great value", "disappointing", "clean", "late again"];
const TAILS = ["and I would buy it again.", "but the price is high.", "so I asked for a refund.",
  "as described on the website.", "and the staff were friendly.", "which ruined the weekend.",
  "according to the receipt.", "after the second attempt."];

/** Return the number in environment variable `name`, or `fallback`; stop k6 on a bad value. */
export function envNumber(name, fallback, { min = 0, max = Number.MAX_SAFE_INTEGER, integer = false } = {}) {
  const raw = (__ENV[name] ?? "").trim();
  if (raw === "") {
    return fallback;
  }
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
    const kind = integer ? "an integer" : "a number";
    throw new Error(`${name}='${raw}' must be ${kind} from ${min} to ${max}`);
  }
  return value;
}

/** Return the k6 duration in environment variable `name` (e.g. 30s, 2m, 1h30m), or `fallback`. */
export function envDuration(name, fallback) {
  const raw = (__ENV[name] ?? "").trim();
  if (raw === "") {
    return fallback;
  }
  if (!/^(\d+(ms|s|m|h))+$/.test(raw)) {
    throw new Error(`${name}='${raw}' must be a duration such as 30s, 2m or 1h30m`);
  }
  return raw;
}

/** Return a k6 duration such as 1h30m, 45s or 500ms in milliseconds. */
export function durationMs(text) {
  const units = { ms: 1, s: 1000, m: 60000, h: 3600000 };
  let total = 0;
  for (const [, amount, unit] of text.matchAll(/(\d+)(ms|s|m|h)/g)) {
    total += Number(amount) * units[unit];
  }
  return total;
}

/**
 * Return the threshold on requests an arrival-rate run could not send (no free VU:
 * the service fell behind the offered rate): at most LOAD_MAX_FAILED of the total.
 */
export function droppedLimit(rate, duration) {
  return [`count<=${Math.ceil((rate * durationMs(duration) * settings.maxFailed) / 1000)}`];
}

/** Return the service's base URL (LOAD_URL) without a trailing slash. */
function baseUrl() {
  const url = (__ENV.LOAD_URL ?? "").trim() || "http://127.0.0.1:8000";
  if (!/^https?:\/\/[^\s/]+(\/\S*)?$/.test(url)) {
    throw new Error(`LOAD_URL='${url}' must be an http:// or https:// URL`);
  }
  return url.replace(/\/+$/, "");
}

function loadMix() {
  const mix = {
    repeat: envNumber("LOAD_REPEAT_SHARE", 0.2, { max: 1 }),
    batch: envNumber("LOAD_BATCH_SHARE", 0.1, { max: 1 }),
    idempotent: envNumber("LOAD_IDEMPOTENT_SHARE", 0.1, { max: 1 }),
  };
  if (mix.repeat + mix.batch + mix.idempotent > 1) {
    throw new Error("LOAD_REPEAT_SHARE + LOAD_BATCH_SHARE + LOAD_IDEMPOTENT_SHARE must be at most 1");
  }
  return mix;
}

export const settings = {
  url: baseUrl(),
  apiKey: (__ENV.FALCON_API_KEY ?? "").trim(),
  mix: loadMix(),
  batchSize: envNumber("LOAD_BATCH_SIZE", 8, { min: 1, max: 1000, integer: true }),
  maxFailed: envNumber("LOAD_MAX_FAILED", 0.01, { max: 1 }),
  requireIdempotency: (__ENV.LOAD_REQUIRE_IDEMPOTENCY ?? "").trim() === "1",
  timeout: envDuration("LOAD_TIMEOUT", "10s"),
  abortAfter: envDuration("LOAD_ABORT_AFTER", "10s"),
};

// Of the replays of an idempotency key, the share the service answered as replays
// (Idempotent-Replayed: true); a service whose Redis is down answers them afresh.
export const idempotentReplayed = new Rate("idempotent_replayed");
// Of the repeated texts, the share answered from the cache ("cache_hit": true).
export const repeatCacheHit = new Rate("repeat_cache_hit");

/**
 * Return the thresholds every script sets: failures, p95/p99 overall, p99 per kind.
 *
 * A threshold per kind also makes k6 keep that kind's latency in the summary export
 * (it exports a tagged sub-metric only when a threshold names it). A batch carries
 * LOAD_BATCH_SIZE texts, so its p99 limit is `batchFactor` times the others'.
 */
export function thresholds({ p95, p99, batchFactor = 3, abortOnFail = false }) {
  const limit = (expression) => (abortOnFail ? { threshold: expression, abortOnFail, delayAbortEval: settings.abortAfter } : expression);
  const result = {
    http_req_failed: [limit(`rate<${settings.maxFailed}`)],
    http_req_duration: [`p(95)<${p95}`, limit(`p(99)<${p99}`)],
    checks: [`rate>${1 - settings.maxFailed}`],
  };
  for (const kind of KINDS) {
    result[`http_req_duration{kind:${kind}}`] = [`p(99)<${kind === "batch" ? p99 * batchFactor : p99}`];
  }
  if (settings.requireIdempotency) {
    result.idempotent_replayed = ["rate>0.99"];
  }
  return result;
}

/** Return a run id: texts and idempotency keys of one run differ from every other run's. */
export function newRunId() {
  return `${Date.now().toString(36)}${Math.floor(Math.random() * 36 ** 6).toString(36)}`;
}

function pick(list, n) {
  return list[n % list.length];
}

/** Return a realistic text no other (run, VU, iteration, slot) gets: always a cache miss. */
export function uniqueText(runId, vu, iteration, slot = 0) {
  const n = iteration * 7919 + vu * 104729 + slot * 31;
  return `${pick(SUBJECTS, n)} ${pick(VERBS, Math.floor(n / 3))} ${pick(ADJECTIVES, Math.floor(n / 7))} `
    + `${pick(TAILS, Math.floor(n / 11))} Ref ${runId}-${vu}-${iteration}-${slot}.`;
}

/**
 * Return the kind of request number `iteration` of VU `vu`.
 *
 * A low-discrepancy sequence (golden-ratio steps, a different start per VU): over
 * any stretch of iterations each kind's share is close to its configured share,
 * with no random draws, so two runs send the same mix.
 */
export function kindOf(vu, iteration, mix = settings.mix) {
  const u = (iteration * 0.6180339887498949 + vu * 0.7548776662466927) % 1;
  if (u < mix.repeat) {
    return "repeat";
  }
  if (u < mix.repeat + mix.batch) {
    return "batch";
  }
  if (u < mix.repeat + mix.batch + mix.idempotent) {
    return "idempotent";
  }
  return "unique";
}

// This VU's last idempotent request (module state is per VU in k6).
let lastIdempotent = null;

function headers(extra = {}) {
  const result = { "Content-Type": "application/json", ...extra };
  if (settings.apiKey) {
    result.Authorization = `Bearer ${settings.apiKey}`;
  }
  return result;
}

function post(path, body, kind, extraHeaders = {}) {
  return http.post(`${settings.url}${path}`, JSON.stringify(body), {
    headers: headers(extraHeaders),
    tags: { kind, name: path },
    timeout: settings.timeout,
  });
}

function jsonOf(response) {
  try {
    return response.json();
  } catch (_ex) {
    return null;
  }
}

function checkSingle(response, kind) {
  const body = jsonOf(response);
  return check(response, {
    "status is 200": (r) => r.status === 200,
    "has a label": () => body !== null && typeof body.label === "string",
  }, { kind });
}

/**
 * Send one request of the mix (the kind `kindOf` picks for this iteration) and check it.
 *
 * `data.runId` comes from the script's setup(), so every VU of a run shares it.
 */
export function sendMixed(data) {
  const vu = exec.vu.idInTest;
  const iteration = exec.vu.iterationInInstance;
  const kind = kindOf(vu, iteration);
  if (kind === "repeat") {
    const response = post("/infer", { text: pick(REPEATED_TEXTS, iteration + vu) }, kind);
    if (checkSingle(response, kind)) {
      repeatCacheHit.add(jsonOf(response).cache_hit === true);
    }
  } else if (kind === "batch") {
    const texts = [];
    for (let slot = 0; slot < settings.batchSize; slot++) {
      texts.push(uniqueText(data.runId, vu, iteration, slot));
    }
    const response = post("/infer/batch", { texts }, kind);
    const body = jsonOf(response);
    check(response, {
      "status is 200": (r) => r.status === 200,
      "answers every text": () => body !== null && body.count === texts.length,
    }, { kind });
  } else if (kind === "idempotent") {
    sendIdempotent(data, vu, iteration);
  } else {
    checkSingle(post("/infer", { text: uniqueText(data.runId, vu, iteration) }, kind), kind);
  }
}

// A first request with a new key, then a replay of it (same key, same body) the next
// time: the replay follows the first's answer, so it is never a 409 "in flight".
function sendIdempotent(data, vu, iteration) {
  if (lastIdempotent !== null) {
    const { key, body } = lastIdempotent;
    lastIdempotent = null;
    const response = post("/infer", body, "replay", { "X-Idempotency-Key": key });
    if (checkSingle(response, "replay")) {
      idempotentReplayed.add(response.headers["Idempotent-Replayed"] === "true");
    }
    return;
  }
  const key = `load-${data.runId}-${vu}-${iteration}`;
  const body = { text: uniqueText(data.runId, vu, iteration) };
  const response = post("/infer", body, "idempotent", { "X-Idempotency-Key": key });
  if (checkSingle(response, "idempotent")) {
    lastIdempotent = { key, body };
  }
}

/** Stop the run before it starts when the service does not answer its readiness probe. */
export function requireReady() {
  const response = http.get(`${settings.url}/readyz`, { headers: headers(), timeout: settings.timeout, tags: { kind: "setup" } });
  if (response.status !== 200) {
    fail(`${settings.url}/readyz answered ${response.status || response.error}: is the service up (LOAD_URL)?`);
  }
  return { runId: newRunId() };
}
