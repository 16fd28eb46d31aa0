"""`student load SCENARIO --target URL [options]`: Locust scenarios against a running gateway.

Scenarios: `daily`, `capacity`, `soak`, `burst` (see docs/load-testing.md); `worker` joins a
master on another host. Each run writes a report folder and exits 0 when the SLO held, 1 when it
failed (so it can gate a deploy), 2 when the run could not happen.

Only argparse and the standard library are imported here; Locust (and its gevent
monkey-patching) is imported by `run()`, in the load process only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from loadtest.worker import add_worker_arguments

EXIT_PASSED, EXIT_SLO_FAILED, EXIT_CANNOT_RUN = 0, 1, 2
DEFAULT_REQUESTS_PER_DAY = 10_000
USER_HEADROOM = 2.0  # users = peak rate × (latency at the SLO's limit) × this
AUTO_USERS_PER_PROCESS = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    _common_arguments(common)
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    daily = scenarios.add_parser(
        "daily",
        parents=[common],
        help="a day's requests over a 24-hour profile, time-compressed",
        description="Play a day of requests (hourly profile) in --day-seconds; SLO judged in the peak hour; "
        "the day's energy and cost projected to real time.",
    )
    _volume_arguments(daily)
    daily.add_argument(
        "--day-seconds",
        type=float,
        default=1440.0,
        help="play the 24 hours in this many seconds (default 1440: 1 min per hour)",
    )

    capacity = scenarios.add_parser(
        "capacity",
        parents=[common],
        help="raise the arrival rate in steps until the SLO breaks",
        description="Rising steps of arrival rate; reports the highest rate that meets the SLO "
        "and the largest daily volume whose peak hour does.",
    )
    _volume_arguments(capacity)
    capacity.add_argument("--start-rps", type=float, default=0.5, help="first step's rate, req/s (default 0.5)")
    capacity.add_argument("--step-rps", type=float, default=0.5, help="added per step, req/s (default 0.5)")
    capacity.add_argument("--max-rps", type=float, default=20.0, help="highest step tried, req/s (default 20)")
    capacity.add_argument("--step-seconds", type=float, default=60.0, help="length of a step (default 60)")
    capacity.add_argument(
        "--step-grace-s",
        type=float,
        default=30.0,
        help="a step's requests must finish within this after it ends (default 30)",
    )

    soak = scenarios.add_parser(
        "soak",
        parents=[common],
        help="a steady rate for a long time: latency and memory drift",
        description="A steady arrival rate; reports the drift of latency and of the gateway's and vLLM's memory.",
    )
    _rate_arguments(soak, duration_s=3600.0)
    soak.add_argument(
        "--drift-windows", type=int, default=3, help="compare the first and last of this many windows (default 3)"
    )

    burst = scenarios.add_parser(
        "burst",
        parents=[common],
        help="a sudden spike over a base rate: recovery and errors",
        description="A spike of ×--burst-factor for --burst-seconds over a base rate; "
        "reports recovery time and errors.",
    )
    _rate_arguments(burst, duration_s=300.0)
    burst.add_argument("--burst-factor", type=float, default=5.0, help="spike rate = base × this (default 5)")
    burst.add_argument("--burst-seconds", type=float, default=30.0, help="spike length (default 30)")
    burst.add_argument(
        "--burst-at-s", type=float, help="spike start, seconds into the run (default: a third of the run)"
    )
    burst.add_argument(
        "--recovery-threshold-ms",
        type=float,
        help="recovered when TTFT stays under this (default: max(1.5 × base p95, base p95 + 50 ms))",
    )

    worker = scenarios.add_parser(
        "worker",
        help="a load worker for a master on another host",
        description="Join `student load SCENARIO --remote-workers N` running on another host.",
    )
    add_worker_arguments(worker)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target and output")
    target.add_argument("--target", required=True, help="the gateway's base URL, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", default="student", help="the `model` to ask for (default student)")
    target.add_argument("--out", type=Path, help="report folder (default loadtest-reports/SCENARIO-TIME)")
    target.add_argument(
        "--gateway-pid", type=int, help="gateway process to watch (default: found by its port when local)"
    )
    target.add_argument("--vllm-pid", type=int, help="vLLM process to watch (default: found by its port when local)")

    arrivals = parser.add_argument_group("arrivals")
    arrivals.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="1 = Poisson arrivals (default); otherwise gamma gaps with this shape (< 1 burstier, > 1 more even)",
    )
    arrivals.add_argument("--seed", type=int, default=0, help="schedule and conversation seed (default 0)")

    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--prompt-set", type=Path, help="JSON prompt set (default: the bundled Vietnamese support chats)"
    )
    workload.add_argument("--system-prompt", help="system prompt (default: the prompt set's)")
    workload.add_argument(
        "--prompt-tokens", type=int, default=300, help="mean prompt length target, tokens (default 300)"
    )
    workload.add_argument(
        "--output-tokens", type=int, default=200, help="mean answer length (max_tokens), tokens (default 200)"
    )
    workload.add_argument(
        "--length-sigma", type=float, default=0.3, help="lognormal spread of both lengths; 0 = fixed (default 0.3)"
    )
    workload.add_argument(
        "--chars-per-token", type=float, default=3.0, help="for prompt length estimates (default 3.0)"
    )
    workload.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let the model stop before max_tokens (default: ignore_eos, answers are exactly max_tokens)",
    )
    workload.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")

    slo = parser.add_argument_group("service-level objective (exit 1 when it fails)")
    slo.add_argument("--slo-ttft-p95-ms", type=float, default=1000.0, help="p95 time to first token, ms (default 1000)")
    slo.add_argument("--slo-tpot-p95-ms", type=float, default=100.0, help="p95 time per output token, ms (default 100)")
    slo.add_argument("--slo-max-error-rate", type=float, default=0.01, help="share of failed requests (default 0.01)")

    generator = parser.add_argument_group("load generator")
    generator.add_argument("--users", type=int, help="Locust users (default: peak rate × latency at the SLO limit × 2)")
    generator.add_argument(
        "--max-users", type=int, default=2000, help="users are added when all are busy, up to this (default 2000)"
    )
    generator.add_argument(
        "--workers", type=int, default=0, help="local Locust worker processes (default 0: generate in this process)"
    )
    generator.add_argument(
        "--remote-workers",
        type=int,
        default=0,
        help="also wait for this many `student load worker` processes from other hosts",
    )
    generator.add_argument(
        "--master-bind-host", default="127.0.0.1", help="master's interface for workers (use 0.0.0.0 for remote ones)"
    )
    generator.add_argument(
        "--master-port", type=int, help="master's port (default: a free one; 5557 suits remote workers)"
    )
    generator.add_argument(
        "--request-timeout-s", type=float, default=600.0, help="longest silence accepted mid-answer (default 600)"
    )
    generator.add_argument(
        "--drain-timeout-s", type=float, default=60.0, help="wait this long after the schedule for answers (default 60)"
    )
    generator.add_argument(
        "--progress-interval-s", type=float, default=5.0, help="progress line every this many seconds (default 5)"
    )
    generator.add_argument(
        "--sample-interval-s",
        type=float,
        default=2.0,
        help="poll /stats and memory every this many seconds (default 2)",
    )


def _volume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests-per-day",
        type=int,
        default=DEFAULT_REQUESTS_PER_DAY,
        help=f"daily volume (default {DEFAULT_REQUESTS_PER_DAY:,})",
    )
    parser.add_argument(
        "--profile", type=Path, help="CSV of hour,weight (24 rows) for the day's shape (default: built in)"
    )


def _rate_arguments(parser: argparse.ArgumentParser, duration_s: float) -> None:
    parser.add_argument(
        "--rps", type=float, help="arrival rate, req/s (default: the peak-hour rate of --requests-per-day)"
    )
    parser.add_argument(
        "--requests-per-day",
        type=int,
        default=DEFAULT_REQUESTS_PER_DAY,
        help=f"sets the default --rps (default {DEFAULT_REQUESTS_PER_DAY:,})",
    )
    parser.add_argument("--profile", type=Path, help="CSV of hour,weight for that peak (default: built in)")
    parser.add_argument("--duration-s", type=float, default=duration_s, help=f"run length, s (default {duration_s:g})")


def run(args: argparse.Namespace) -> int:
    if args.scenario == "worker":
        from loadtest.worker import run_worker

        return run_worker(args.master_host, args.master_port)
    import locust  # noqa: F401  first, so gevent patches sockets before anything opens one

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("locust", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("loadtest")
    try:
        return _run(args, log)
    except (ValueError, RuntimeError, OSError) as exc:
        log.error(f"student load {args.scenario}: {exc}")
        return EXIT_CANNOT_RUN


def _run(args: argparse.Namespace, log: logging.Logger) -> int:
    from loadtest.arrivals import schedule
    from loadtest.engine import RunPlan, execute
    from loadtest.probes import fetch_stats
    from loadtest.profile import DailyProfile
    from loadtest.report import build_report, write_report
    from loadtest.slo import Slo
    from loadtest.workload import Workload, load_prompt_set

    target = args.target.rstrip("/").removesuffix("/v1")
    probe = fetch_stats(target)
    if "error" in probe:
        raise RuntimeError(f"the gateway does not answer: {probe['error']}")
    profile = DailyProfile.from_csv(args.profile) if args.profile else DailyProfile()
    slo = Slo(args.slo_ttft_p95_ms, args.slo_tpot_p95_ms, args.slo_max_error_rate)
    workload = Workload(
        prompt_set=load_prompt_set(args.prompt_set),
        model=args.model,
        system_prompt=args.system_prompt,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        length_sigma=args.length_sigma,
        chars_per_token=args.chars_per_token,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
    )
    scenario = _scenario(args, profile)
    curve = scenario.curve()
    arrivals = schedule(curve, seed=args.seed, burstiness=args.burstiness)
    if not arrivals:
        raise ValueError("the schedule has no arrivals: raise the rate or the duration")
    out = args.out or Path("loadtest-reports") / f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    users = args.users or _auto_users(curve.peak_rps, slo, args.output_tokens, args.workers + args.remote_workers)
    log.info(
        f"{args.scenario}: {len(arrivals)} requests over {curve.span_s:g} s (mean {curve.mean_rps:.3g}, "
        f"peak {curve.peak_rps:.3g} req/s) against {target}; {users} users; report in {out}"
    )
    plan = RunPlan(
        scenario=args.scenario,
        target=target,
        curve=curve,
        arrivals=arrivals,
        workload=workload,
        users=users,
        max_users=max(args.max_users, users),
        out_dir=out,
        workers=args.workers,
        remote_workers=args.remote_workers,
        master_bind_host=args.master_bind_host,
        master_port=args.master_port,
        request_timeout_s=args.request_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        progress_interval_s=args.progress_interval_s,
        sample_interval_s=args.sample_interval_s,
        stop_rule=scenario.stop_rule(curve, slo),
        gateway_pid=args.gateway_pid,
        vllm_pid=args.vllm_pid,
    )
    result = execute(plan)
    block, verdict = scenario.judge(result, curve, slo)
    report = build_report(
        args.scenario,
        target,
        curve,
        result,
        workload,
        seed=args.seed,
        burstiness=args.burstiness,
        scenario_block=block,
        verdict=verdict,
    )
    write_report(report, result, curve, out)
    if report["generator"]["lagging"]:
        log.warning("WARNING: the load generator LAGGED behind the schedule; see generator.* in report.json")
    state = "PASSED" if verdict["passed"] else "FAILED: " + "; ".join(verdict["reasons"])
    log.info(f"SLO {state}")
    log.info(
        f"arrival rate: target {report['arrivals']['target_rps']:g}, "
        f"achieved {report['arrivals']['achieved_rps']:g} req/s; "
        f"report: {out / 'report.md'}"
    )
    return EXIT_PASSED if verdict["passed"] else EXIT_SLO_FAILED


def _scenario(args: argparse.Namespace, profile):
    from loadtest.scenarios import Burst, Capacity, Daily, Soak

    if args.scenario == "daily":
        return Daily(args.requests_per_day, args.day_seconds, profile)
    if args.scenario == "capacity":
        return Capacity(
            args.start_rps,
            args.step_rps,
            args.step_seconds,
            args.max_rps,
            args.step_grace_s,
            profile,
            args.requests_per_day,
        )
    rps = args.rps if args.rps is not None else profile.peak_rps(args.requests_per_day)
    if args.scenario == "soak":
        return Soak(rps, args.duration_s, args.drift_windows)
    at_s = args.burst_at_s if args.burst_at_s is not None else args.duration_s / 3
    return Burst(rps, args.burst_factor, args.burst_seconds, at_s, args.duration_s, args.recovery_threshold_ms)


def _auto_users(peak_rps: float, slo, output_tokens: int, workers: int) -> int:
    """Enough users to hold the peak rate while answers take as long as the SLO allows, with headroom.

    At most `AUTO_USERS_PER_PROCESS` per load process to start with: more are added while running
    when most are busy (up to --max-users).
    """
    processes = max(workers, 1)
    latency_s = (slo.ttft_p95_ms + output_tokens * slo.tpot_p95_ms) / 1000
    users = int(peak_rps * latency_s * USER_HEADROOM) + 2
    return min(max(users, 4, 2 * processes), AUTO_USERS_PER_PROCESS * processes)
