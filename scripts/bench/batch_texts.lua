-- wrk script: POST /infer/batch with BENCH_BATCH (default 10) unique texts per request,
-- the texts of unique_texts.lua (every one a cache miss); prints its JSON summary line.
-- Multiply rps by BENCH_BATCH for texts/s (docs/CAPACITY_PLAN.md).
-- Env: as unique_texts.lua (FALCON_API_KEY), BENCH_BATCH.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "unique_texts.lua")

local base_init = init
local base_request = request
local size = tonumber(os.getenv("BENCH_BATCH") or "10")

function init(args)
  base_init(args)
  wrk.path = os.getenv("BENCH_PATH") or "/infer/batch"
end

function request()
  local texts = {}
  local format = wrk.format
  -- NOTE: unique_texts.lua's request() returns wrk.format(..., body); while the texts are
  -- gathered, wrk.format hands the body back as it is: {"text": "..."}, with no quote or
  -- backslash in the text.
  wrk.format = function(_, _, _, body) return body end
  for i = 1, size do
    texts[i] = '"' .. base_request():match('^{"text": "(.*)"}$') .. '"'
  end
  wrk.format = format
  return format(nil, nil, nil, '{"texts": [' .. table.concat(texts, ", ") .. ']}')
end
