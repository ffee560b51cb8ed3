-- wrk script of prealloc's benchmark: cycles through pre-built requests
-- (one per line of the file named after `--`; a line holds tab-separated
-- "Name: value" headers, an empty line none) and prints a JSON summary.
-- Requests are formatted once in init, so per-request Lua work is an index.
-- `-- FILE METHOD PATH BODY` sends METHOD PATH with BODY instead of GET /.
local reqs = {}
local n = 0
local i = 0

function init(args)
  local f = assert(io.open(args[1], "r"), "cannot open the request file " .. tostring(args[1]))
  for line in f:lines() do
    local headers = {}
    for h in string.gmatch(line, "[^\t]+") do
      local k, v = string.match(h, "^([^:]+):%s*(.*)$")
      if k then
        headers[k] = v
      end
    end
    n = n + 1
    reqs[n] = wrk.format(args[2] or "GET", args[3] or "/", headers, args[4])
  end
  f:close()
  if n == 0 then
    n = 1
    reqs[1] = wrk.format(args[2] or "GET", args[3] or "/", {}, args[4])
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
