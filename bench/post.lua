-- wrk script for bench/bench.py: POST images as binary bodies with the inference key, cycling through the
-- files listed (one path per line) in $BENCH_BODIES; $BENCH_KEY is the Bearer key, $BENCH_TYPE the
-- Content-Type (default application/octet-stream). Never on a command line. Ends with one JSON line:
-- statuses, requests, seconds and latency percentiles in ms (wrk's own histogram, microsecond resolution).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local headers = {
    ["Content-Type"] = os.getenv("BENCH_TYPE") or "application/octet-stream",
    ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY"),
  }
  requests = {}
  for path in io.lines(os.getenv("BENCH_BODIES")) do
    local f = assert(io.open(path, "rb"))
    -- Formatted once here: request() below only hands out prepared bytes, so the client stays cheap.
    table.insert(requests, wrk.format("POST", nil, headers, f:read("*a")))
    f:close()
  end
  n = 0
  statuses = {}
end

function request()
  n = n + 1
  return requests[(n - 1) % #requests + 1]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do table.insert(parts, string.format('"%d": %d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    '{"statuses": {%s}, "requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
    '"max_ms": %.3f, "socket_errors": %d}\n',
    table.concat(parts, ", "), summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3,
    e.connect + e.read + e.write + e.timeout))
end
