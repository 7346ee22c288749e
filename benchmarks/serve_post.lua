-- wrk script for benchmarks/serve_latency.py: POSTs one file as every request's body and prints a
-- JSON summary line at the end.
--   wrk -t1 -c32 -d10s -s benchmarks/serve_post.lua http://127.0.0.1:8080/v1/predict -- BODY_FILE [CONTENT_TYPE]
-- Without BODY_FILE it sends GETs (for /ping).

function init(args)
  if args[1] then
    local f = assert(io.open(args[1], "rb"))
    wrk.body = f:read("*a")
    f:close()
    wrk.method = "POST"
    wrk.headers["Content-Type"] = args[2] or "image/png"
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SUMMARY {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "non_2xx": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
