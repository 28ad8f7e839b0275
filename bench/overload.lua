-- wrk script for bench/overload.py: POST one image as base64 JSON with the inference key, and count
-- the answers: good (200 with the expected top-1 label), wrong (200 with another), each other status,
-- and refusals that lack Retry-After or a JSON message. The body file, the key and the expected label
-- come from the environment (OVERLOAD_BODY, OVERLOAD_KEY, OVERLOAD_LABEL): never on a command line.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(os.getenv("OVERLOAD_BODY"), "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("OVERLOAD_KEY")
  expected = os.getenv("OVERLOAD_LABEL")
  counts = {}
end

local function count(name)
  counts[name] = (counts[name] or 0) + 1
end

function response(status, headers, body)
  if status == 200 then
    -- TorchServe's answer lists labels highest first: {"3": 0.96, ...}
    count(body:match('^%s*{%s*"([^"]+)"') == expected and "good" or "wrong")
    return
  end
  count(tostring(status))
  if status == 429 or status == 503 then
    if not (headers["Retry-After"] or headers["retry-after"]) then count("no_retry_after") end
    if not body:find('"message"', 1, true) then count("no_json_message") end
  end
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format('"%s": %d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    '{"counts": {%s}, "requests": %d, "seconds": %.3f, "p50_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f, ' ..
    '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}}\n',
    table.concat(parts, ", "), summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.connect, e.read, e.write, e.timeout))
end
