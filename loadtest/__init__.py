"""Load tests for the gateway with Locust: `student load daily|capacity|soak|burst` (see docs/load-testing.md).

Pure modules (arrivals, profile, workload, results, slo, scenarios, report, probes, feed) never
import Locust; `customer`, `engine` and `worker` do (gevent monkey-patching): load processes only.
"""
