-- wrk script: POST /infer with a different, realistic text on every request, so
-- nothing can be served from a cache; prints one JSON summary line at the end.
-- Env: BENCH_PATH (default /infer), BENCH_REPEAT=1 to send one fixed text,
-- FALCON_API_KEY (sent as "Authorization: Bearer", when the service requires a key).
local subjects = {"The delivery", "Customer support", "This laptop", "The hotel room", "My order",
  "The new update", "The battery", "Our waiter", "The checkout page", "The train"}
local verbs = {"was", "seemed", "felt", "turned out", "is"}
local adjectives = {"excellent", "terrible", "fine", "slow", "wonderful", "broken", "on time",
  "confusing", "great value", "disappointing", "clean", "late again"}
local tails = {"and I would buy it again.", "but the price is high.", "so I asked for a refund.",
  "as described on the website.", "and the staff were friendly.", "which ruined the weekend.",
  "according to the receipt.", "after the second attempt."}

local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = tid or 0
  wrk.method = "POST"
  wrk.path = os.getenv("BENCH_PATH") or "/infer"
  wrk.headers["Content-Type"] = "application/json"
  local key = os.getenv("FALCON_API_KEY")
  if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
end

local function pick(list, n) return list[(n % #list) + 1] end

function request()
  counter = counter + 1
  local n = counter * 7919 + thread_id * 104729
  local text
  if os.getenv("BENCH_REPEAT") == "1" then
    text = "The delivery was excellent and the staff were friendly."
  else
    text = string.format("%s %s %s %s Ref %d-%d.", pick(subjects, n), pick(verbs, math.floor(n / 3)),
      pick(adjectives, math.floor(n / 7)), pick(tails, math.floor(n / 11)), thread_id, counter)
  end
  return wrk.format(nil, nil, nil, '{"text": "' .. text .. '"}')
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local non2xx = summary.errors.status
  local socket_errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    '{"requests": %d, "seconds": %.2f, "rps": %.1f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "non2xx": %d, "socket_errors": %d}\n',
    summary.requests, seconds, summary.requests / seconds, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000, non2xx, socket_errors))
end
