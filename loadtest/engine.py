"""Runs one arrival schedule with Locust: in this process, or as master of N worker processes.

- Local: a `LocalRunner` whose users share one `ArrivalFeed`.
- Distributed: a `MasterRunner`; `workers` local worker processes are started here (and/or
  `remote_workers` connect from other hosts with `student load worker --master-host ...`). Each
  worker gets every N-th arrival in a custom `loadtest_plan` message and sends its finished
  samples back on Locust's own stats reports (`report_to_master` → `worker_report`), so the
  master holds one merged result and Locust merges its own statistics as usual.

While it runs, a monitor polls the gateway's `/stats` and the served processes' memory, prints
progress, adds users when all are busy (so the arrival rate holds) and warns loudly when
arrivals go out late. Import only in load processes: Locust monkey-patches with gevent.
"""

from __future__ import annotations

import csv
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gevent
import locust.runners
from locust.env import Environment
from locust.html import get_html_report
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV, StatsCSVFileWriter, stats_history

from loadtest.arrivals import Arrival, RateCurve
from loadtest.customer import SupportCustomer
from loadtest.feed import FEED_ATTRIBUTE, ArrivalFeed
from loadtest.probes import ProcessWatch, fetch_stats, watch_processes
from loadtest.results import LATE_FRACTION_LIMIT, LATE_THRESHOLD_S, RunResult, Sample, percentiles
from loadtest.workload import Workload
from server.runtime.ports import free_port

logger = logging.getLogger("loadtest")

PLAN_MESSAGE = "loadtest_plan"
SAMPLES_KEY = "loadtest_samples"
IN_FLIGHT_KEY = "loadtest_in_flight"
START_LEAD_S = 2.0  # users are spawned (and workers planned) before the first arrival is due
WORKER_REPORT_INTERVAL_S = 1.0
WORKER_CONNECT_TIMEOUT_S = 60.0
BUSY_SHARE_TO_GROW = 0.8  # more users are added when this share of them is busy
USER_CHECK_INTERVAL_S = 1.0  # how often busy users and the stop rule are checked

StopRule = Callable[[list[Sample], float], "str | None"]


@dataclass
class RunPlan:
    scenario: str
    target: str
    curve: RateCurve
    arrivals: list[Arrival]
    workload: Workload
    users: int
    max_users: int
    out_dir: Path
    workers: int = 0  # local worker processes; 0 and no remote workers: run in this process
    remote_workers: int = 0
    master_bind_host: str = "127.0.0.1"
    master_port: int | None = None
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 60.0
    progress_interval_s: float = 5.0
    sample_interval_s: float = 2.0
    stop_rule: StopRule | None = None
    gateway_pid: int | None = None
    vllm_pid: int | None = None

    @property
    def distributed(self) -> bool:
        return self.workers + self.remote_workers > 0


def execute(plan: RunPlan) -> RunResult:
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    env = Environment(user_classes=[SupportCustomer], host=plan.target)
    t0_epoch = time.time() + START_LEAD_S
    feed = ArrivalFeed(plan.target, t0_epoch, plan.arrivals, plan.workload, plan.request_timeout_s)
    collected: list[Sample] = []
    in_flight_by_worker: dict[str, int] = {}
    processes: list[subprocess.Popen] = []

    if plan.distributed:
        locust.runners.WORKER_REPORT_INTERVAL = WORKER_REPORT_INTERVAL_S
        port = plan.master_port or free_port()
        master = env.create_master_runner(plan.master_bind_host, port)

        def on_worker_report(client_id: str, data: dict[str, Any]) -> None:
            collected.extend(Sample.from_wire(s) for s in data.get(SAMPLES_KEY, []))
            in_flight_by_worker[client_id] = data.get(IN_FLIGHT_KEY, 0)

        env.events.worker_report.add_listener(on_worker_report)
        processes = [_start_worker(port, plan.out_dir / f"worker-{k}.log") for k in range(plan.workers)]
        expected = plan.workers + plan.remote_workers
        _say(f"master on port {port}: waiting for {expected} worker(s)")
        _wait_for_workers(master, expected, processes)
        t0_epoch = time.time() + START_LEAD_S
        feed.t0_epoch = t0_epoch
        for k, client_id in enumerate(sorted(master.clients, key=master.get_worker_index)):
            master.send_message(PLAN_MESSAGE, feed.share(k, expected).to_plan(), client_id=client_id)

        def in_flight() -> int:
            return sum(in_flight_by_worker.values())

        runner: locust.runners.Runner = master
    else:
        runner = env.create_local_runner()
        setattr(env, FEED_ATTRIBUTE, feed)

        def in_flight() -> int:
            return feed.in_flight

    base = str(plan.out_dir / "locust")
    csv_writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, base, full_history=True)
    background = [gevent.spawn(csv_writer), gevent.spawn(stats_history, runner)]
    stats_before = fetch_stats(plan.target)
    vllm_url = (stats_before.get("upstream") or {}).get("url")
    watches = watch_processes(plan.target, vllm_url, plan.gateway_pid, plan.vllm_pid)
    monitor = _Monitor(plan, t0_epoch, watches)
    background.append(gevent.spawn(monitor.run))

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runner.start(plan.users, spawn_rate=max(plan.users, 1))
    stopped_early = None
    total = len(plan.arrivals)
    deadline = plan.curve.span_s + plan.drain_timeout_s
    next_progress = next_check = 0.0
    users_max = plan.users
    try:
        while True:
            gevent.sleep(0.2)
            if not plan.distributed:
                collected.extend(feed.drain())
            now = time.time() - t0_epoch
            if len(collected) >= total:
                break
            if now > deadline:
                unfinished = total - len(collected)
                after_s = plan.drain_timeout_s
                stopped_early = f"{unfinished} request(s) unfinished {after_s:g} s after the schedule ended"
                break
            if now >= next_check:
                next_check = now + USER_CHECK_INTERVAL_S
                if plan.stop_rule and (reason := plan.stop_rule(collected, now)):
                    stopped_early = reason
                    break
                if total - len(collected) > in_flight():  # arrivals still to send
                    _grow_users(runner, plan, in_flight())
                users_max = max(users_max, runner.user_count)
            if now >= next_progress:
                next_progress = now + plan.progress_interval_s
                _progress(plan, collected, now, in_flight(), runner.user_count, monitor)
    except KeyboardInterrupt:
        stopped_early = "interrupted"
    elapsed = time.time() - t0_epoch
    if not plan.distributed:
        collected.extend(feed.drain())
    cpu_warning = bool(runner.cpu_warning_emitted or getattr(runner, "worker_cpu_warning_emitted", False))
    worker_count = len(master.clients) if plan.distributed else 0
    runner.quit()  # a worker sends a last report (with its last samples) when told to quit
    if plan.distributed:
        gevent.sleep(WORKER_REPORT_INTERVAL_S)
        _stop_workers(processes)
    for greenlet in background:
        greenlet.kill()
    gateway_window = fetch_stats(plan.target, window_s=math.ceil(time.time() - t0_epoch) + 1)  # the whole run
    files = _write_locust_files(env, csv_writer, base, plan.out_dir)
    _say(
        f"done: {len(collected)}/{total} requests in {elapsed:.1f} s"
        + (f" (stopped early: {stopped_early})" if stopped_early else "")
    )
    return RunResult(
        samples=sorted(collected, key=lambda s: s.index),
        started_at=started_at,
        t0_epoch=t0_epoch,
        elapsed_s=round(elapsed, 3),
        stopped_early=stopped_early,
        users_initial=plan.users,
        users_max=users_max,
        worker_count=worker_count,
        cpu_warning=cpu_warning,
        gateway_series=monitor.gateway_series,
        memory_series=monitor.memory_series,
        processes={w.name: w.describe() for w in watches},
        gateway_window=gateway_window,
        vllm_url=vllm_url,
        locust_files=files,
    )


class _Monitor:
    """Polls `/stats?window=` and the processes' memory every `sample_interval_s`."""

    def __init__(self, plan: RunPlan, t0_epoch: float, watches: list[ProcessWatch]):
        self.plan = plan
        self.t0_epoch = t0_epoch
        self.watches = watches
        self.gateway_series: list[dict[str, Any]] = []
        self.memory_series: list[dict[str, Any]] = []

    def run(self) -> None:
        interval = self.plan.sample_interval_s
        while True:
            t = round(time.time() - self.t0_epoch, 3)
            stats = fetch_stats(self.plan.target, window_s=max(interval, 1.0), timeout_s=min(5.0, interval * 2))
            energy = stats.get("energy") or {}
            upstream = stats.get("upstream") or {}
            self.gateway_series.append(
                {
                    "t": t,
                    "error": stats.get("error"),
                    "power_w": energy.get("power_w") if energy.get("status") == "ok" else None,
                    "completion_tokens_per_s": (stats.get("throughput") or {}).get("completion_tokens_per_s"),
                    "in_flight": (stats.get("requests") or {}).get("in_flight"),
                    "running": upstream.get("running"),
                    "waiting": upstream.get("waiting"),
                    "kv_cache_usage": upstream.get("kv_cache_usage"),
                }
            )
            self.memory_series.append({"t": t, **{w.name: w.rss_mib() for w in self.watches}})
            gevent.sleep(interval)

    def latest(self) -> dict[str, Any]:
        return self.gateway_series[-1] if self.gateway_series else {}


def _grow_users(runner: Any, plan: RunPlan, busy: int) -> None:
    """Add users when most are busy, so that a free one is there when the next arrival is due."""
    users = runner.user_count
    if users and busy >= BUSY_SHARE_TO_GROW * users and users < plan.max_users:
        grown = min(plan.max_users, max(users + 1, users * 2))
        _say(f"{busy} of {users} users busy: growing to {grown} users to hold the arrival rate")
        runner.start(grown, spawn_rate=grown)


def _progress(plan: RunPlan, samples: list[Sample], now: float, busy: int, users: int, monitor: _Monitor) -> None:
    recent = [s for s in samples if s.sent >= now - max(plan.progress_interval_s * 2, 10.0)]
    ttft = percentiles(s.ttft_ms for s in recent if s.ok)["p95"]
    late = [s for s in samples if s.late_s > LATE_THRESHOLD_S]
    errors = sum(1 for s in samples if not s.ok)
    gateway = monitor.latest()
    line = (
        f"[{plan.scenario}] {min(now, plan.curve.span_s):6.1f}/{plan.curve.span_s:g} s"
        f"  done {len(samples)}/{len(plan.arrivals)}  errors {errors}"
        f"  target {plan.curve.rate_at(now):.2f}/s  in flight {busy}  users {users}"
        f"  ttft p95 {_ms(ttft)}"
    )
    if gateway.get("waiting") is not None:
        line += f"  vllm waiting {gateway['waiting']:g} kv {100 * (gateway.get('kv_cache_usage') or 0):.0f}%"
    if gateway.get("power_w") is not None:
        line += f"  {gateway['power_w']:.0f} W"
    _say(line)
    if samples and len(late) > LATE_FRACTION_LIMIT * len(samples):
        _say(
            f"WARNING: the load generator is LAGGING: {len(late)} of {len(samples)} requests went out more than "
            f"{LATE_THRESHOLD_S * 1000:.0f} ms late; results understate the load (add --workers or --users)",
            level=logging.WARNING,
        )


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def _say(message: str, level: int = logging.INFO) -> None:
    logger.log(level, message)


def _start_worker(port: int, log_path: Path) -> subprocess.Popen:
    """A worker process writing to `log_path` (the child keeps the file open, this process does not)."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "loadtest.worker", "--master-host", "127.0.0.1", "--master-port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_for_workers(runner: Any, expected: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WORKER_CONNECT_TIMEOUT_S
    while len(runner.clients.ready) < expected:
        dead = [p.pid for p in processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            _stop_workers(processes)
            runner.quit()
            why = f"worker process(es) {dead} exited" if dead else f"timed out after {WORKER_CONNECT_TIMEOUT_S:g} s"
            raise RuntimeError(f"only {len(runner.clients.ready)} of {expected} workers connected: {why}")
        gevent.sleep(0.2)


def _stop_workers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def _write_locust_files(env: Environment, csv_writer: StatsCSVFileWriter, base: str, out_dir: Path) -> list[str]:
    """Locust's own CSV (stats, history, failures, exceptions) and HTML report, final numbers."""
    csv_writer.close_files()
    final = StatsCSV(env, PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", final.requests_csv),
        ("_failures.csv", final.failures_csv),
        ("_exceptions.csv", final.exceptions_csv),
    ):
        with open(base + suffix, "w", newline="") as handle:
            write(csv.writer(handle))
    html = out_dir / "locust.html"
    html.write_text(get_html_report(env, show_download_link=False), encoding="utf-8")
    names = [
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_failures.csv",
        "locust_exceptions.csv",
        "locust.html",
    ]
    return [n for n in names if (out_dir / n).exists()]
