-- Shared by the pclease wrk scripts: the bearer token comes from the environment
-- (PCLEASE_BENCH_TOKEN), and done() prints one JSON line the bench driver parses.
local M = {}

function M.headers()
   local token = os.getenv("PCLEASE_BENCH_TOKEN")
   local h = { ["Content-Type"] = "application/json" }
   if token and token ~= "" then
      h["Authorization"] = "Bearer " .. token
   end
   return h
end

function M.done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
      '"status_errors": %d, "timeouts": %d, ' ..
      '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean))
end

return M
