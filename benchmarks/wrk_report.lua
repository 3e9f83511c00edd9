-- Prints one line "WRK_JSON {...}" when wrk finishes, for benchmarks/run.py to parse.
-- Latencies and the duration are in microseconds, as wrk reports them.

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"latency_mean_us":%.3f,"latency_p50_us":%d,"latency_p99_us":%d,"latency_max_us":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
      summary.requests, summary.duration, summary.bytes,
      latency.mean, latency:percentile(50), latency:percentile(99), latency.max,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
