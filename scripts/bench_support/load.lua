-- wrk script of scripts/bench: resolve requests for the warm paths, each from a client that a
-- trusted proxy names in X-Forwarded-For. The (path, client IP) pairs come from the data file
-- named by the first script argument, written by scripts/bench (deterministic per seed), so
-- this file stays fixed. Requests are formatted once, in init(): wrk shares the two cores with
-- the server, so its per-request work is an array index.

local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_number", thread_count)
end

function init(args)
  local data = dofile(args[1])
  ring = {}
  for i, pair in ipairs(data.requests) do
    ring[i] = wrk.format("GET", pair[1], { ["X-Forwarded-For"] = pair[2] })
  end
  -- Threads start at different places in the ring, so they do not send in lockstep.
  position = ((thread_number or 1) - 1) * 7919 % #ring
end

function request()
  position = position % #ring + 1
  return ring[position]
end

-- One JSON line for scripts/bench: exact counts and percentiles (microseconds), no unit parsing.
function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "mean_us": %.1f, '
      .. '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, "max_us": %.0f, '
      .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
