-- wrk script for bench/run.py: POSTs the form in WRK_BODY when it is set,
-- and prints, when done, the responses counted by status, the latency
-- percentiles (microseconds) and wrk's socket errors, one line each.
local body = os.getenv("WRK_BODY")
if body then
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end

local threads = {}
counts = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      total[status] = (total[status] or 0) + n
    end
  end
  io.write("STATUS")
  for status, n in pairs(total) do
    io.write(string.format(" %d=%d", status, n))
  end
  io.write("\n")
  io.write(string.format("LATENCY p50=%d p99=%d\n",
    latency:percentile(50), latency:percentile(99)))
  local e = summary.errors
  io.write(string.format("ERRORS connect=%d read=%d write=%d timeout=%d\n",
    e.connect, e.read, e.write, e.timeout))
end
