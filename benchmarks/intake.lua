-- wrk script for benchmarks/intake.py: subject deletion requests for random subjects, each with
-- its own Idempotency-Key, sent the same way to Lethe and to the ceiling app.
--
--   wrk -t2 -c64 -d30s --latency -s intake.lua URL -- RUN_ID SUBJECTS API_KEY
--
-- RUN_ID makes the keys unique across runs; SUBJECTS is how many were seeded
-- (customer-0 .. customer-<SUBJECTS-1>); API_KEY goes into the Authorization header.

local thread_count = 0

function setup(thread)
   thread_count = thread_count + 1
   thread:set("thread_id", thread_count)
end

function init(args)
   run_id = args[1] or "run"
   subjects = tonumber(args[2] or "10000")
   sent = 0
   math.randomseed(os.time() * 1000 + thread_id)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   if args[3] then
      wrk.headers["Authorization"] = "Bearer " .. args[3]
   end
end

function request()
   sent = sent + 1
   wrk.headers["Idempotency-Key"] = string.format("%s-%d-%d", run_id, thread_id, sent)
   local body = string.format('{"kind":"subject","subject_ref":"customer-%d"}',
                              math.random(0, subjects - 1))
   return wrk.format(nil, nil, nil, body)
end

-- One machine-readable line for intake.py; latencies in microseconds.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
      '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
      '"latency_mean_us":%.1f,"latency_p50_us":%d,"latency_p90_us":%d,' ..
      '"latency_p99_us":%d,"latency_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
