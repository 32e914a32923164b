-- wrk script: the texts of ../unique_texts.lua, sent as an Open Inference Protocol v2
-- body (one BYTES input "text", shape [1]) to /v2/models/sentiment/infer, which both
-- falcon-svc and MLServer serve: the same bytes go to both servers.
-- Env: as unique_texts.lua (BENCH_PATH overrides the path, BENCH_REPEAT=1 sends one
-- fixed text, FALCON_API_KEY), plus BENCH_RUN: a tag put into every unique text, so
-- a later round's texts are not already in falcon-svc's cache from an earlier one
-- (unique_texts.lua numbers its texts from 1 in every run).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "../unique_texts.lua")

local base_init = init
local run = os.getenv("BENCH_RUN") or ""

-- Turn unique_texts.lua's {"text": "..."} into the v2 body. Its texts come from fixed
-- word lists (no quote or backslash), so the JSON string can be moved as it is.
local function v2_body(body)
  local text = body:match('^{"text": "(.*)"}$')
  assert(text, "unexpected body from unique_texts.lua: " .. body)
  if run ~= "" then text = text:gsub(" Ref ", " Ref " .. run .. "-", 1) end
  return '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["' .. text .. '"]}]}'
end

function init(args)
  base_init(args)
  if not os.getenv("BENCH_PATH") then wrk.path = "/v2/models/sentiment/infer" end
  local format = wrk.format
  -- NOTE: wrk itself calls wrk.format() without a body too; that passes through.
  wrk.format = function(method, path, headers, body)
    return format(method, path, headers, body and v2_body(body))
  end
end
