-- wrk script for benchmarks/run.py: method, paths and body come from the environment.
--   BENCH_METHOD  GET | POST | PUT
--   BENCH_PATHS   file with one request path per line (taken in turn, or at random)
--   BENCH_RANDOM  "1" picks paths at random
--   BENCH_BODY    request body; "__N__" is replaced by a per-request counter (every write differs)
-- done() prints one line "BENCHJSON {...}" that run.py parses.

local method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY")
local random_paths = os.getenv("BENCH_RANDOM") == "1"
local paths = {}
local counter = 0
local thread_id = 0
local headers = {}

local threads = {}
local next_id = 0

function setup(thread)
   next_id = next_id + 1
   thread:set("tid", next_id)
   table.insert(threads, thread)
end

function init(args)
   for line in io.lines(os.getenv("BENCH_PATHS")) do
      if #line > 0 then paths[#paths + 1] = line end
   end
   thread_id = tid or 1
   math.randomseed(os.time() * 1000 + thread_id)
   counter = math.random(1, 1000000) * 1000
   if body then headers["Content-Type"] = "application/json" end
end

function request()
   counter = counter + 1
   local path
   if random_paths then
      path = paths[math.random(#paths)]
   else
      path = paths[(counter % #paths) + 1]
   end
   if body then
      local b = string.gsub(body, "__N__", tostring(thread_id * 1000000000 + counter))
      return wrk.format(method, path, headers, b)
   end
   return wrk.format(method, path, headers)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
      summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
