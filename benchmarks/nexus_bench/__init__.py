"""Building blocks of benchmarks/run.py: servers, wrk, transfers and the report."""
