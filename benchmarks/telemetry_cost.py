"""What does the gateway's telemetry cost? Two measurements, each run side by side in one go.

    .venv/bin/student bench telemetry [--requests N] [--concurrency C] [--out results.json]

1. **The energy sampler's own CPU**, in this process, with no server running: the real
   `EnergyMeter` and its sampler thread reading a steady-watts stand-in source on the real clock,
   at 10 Hz and 100 Hz, next to an idle baseline (same process, no sampler). Short windows of the
   three variants alternate, so drift hits all of them alike. The sampler thread's CPU comes from
   `time.thread_time()` taken inside it at every reading (ns resolution); the process's from
   `time.process_time()` and psutil (10 ms ticks). The stand-in's `read()` costs almost nothing:
   this is the meter's and the thread's cost, not NVML's. NVML's own read cost is measured on a
   GPU machine by `student gpu-check` (docs/gpu-validation.md).

2. **Latency added by the gateway, telemetry on vs off.** A tiny random Llama (seconds to
   build) is served by ONE vLLM; several gateways front it over real HTTP:

   - `direct`: vLLM itself;
   - `gw off`: `student serve --upstream` with `STUDENT_TELEMETRY=false`;
   - `gw on`: the same with telemetry on. Its power source is detected as in production, so on
     a machine without NVML/RAPL its energy meter is off and it does not ask vLLM for per-chunk
     usage;
   - `gw on+meter`: telemetry on with the meter running on the steady stand-in (what a GPU
     machine does, minus NVML's read cost): sampler thread at 10 Hz, vLLM's
     `continuous_usage_stats` on every chunk, and the gateway stripping them again.

   vLLM is started by a `student serve` of its own whose gateway is not measured, so every
   measured gateway is the same kind of process and none of them relays vLLM's log. Prefix
   caching is off, so sending the same prompt to each target in turn does not make the later
   ones cheaper. Requests go round-robin across the targets (the order rotates every round), one
   at a time and then `--concurrency` at a time; every target gets the same prompts, greedy
   decoding, the same `max_tokens` and `ignore_eos`, streamed. Per target: TTFT (first streamed
   event) and end-to-end p50/p95, tokens/s per request, and each gateway process's own CPU
   seconds per request (psutil, the gateway pid only). Then the latency each gateway adds over
   `direct`: the median of per-round paired differences with a distribution-free 95% interval.

Everything it starts runs in its own session and is stopped (SIGTERM, then SIGKILL for what is
left, vLLM's engine processes included) on success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.harness import (
    DIRECT,
    GW_OFF,
    IDLE_W,
    Sample,
    Services,
    Target,
    build_tiny_model,
    check_tokens,
    energy_status,
    environment,
    fmt,
    one_request,
    prompts,
    request_body,
    rotated,
    say,
    start_stack,
    steady_source,
    table,
)
from server.telemetry.energy_attribution import EnergyMeter
from server.telemetry.percentiles import percentile
from server.telemetry.thread_cpu import ThreadCpuProbe

OPEN_REQUESTS_IN_SAMPLER = 8  # the meter's attribution path runs over this many open requests
SAMPLER_ROUNDS = 4


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float | None, float | None, float | None]:
    """Median and a distribution-free ~95% interval from order statistics (binomial, normal approx.)."""
    if not values:
        return None, None, None
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor((n - z * math.sqrt(n)) / 2) - 1)
    return statistics.median(ordered), ordered[k], ordered[n - 1 - k]


# --- 1. the energy sampler's own CPU ----------------------------------------------------------


@dataclass
class SamplerWindow:
    """One timed window of one variant (hz None: the idle baseline)."""

    variant: str
    hz: float | None
    wall_s: float
    process_cpu_s: float
    psutil_cpu_s: float
    ticks: int = 0
    tick_span_s: float = 0.0
    thread_cpu_s: float = 0.0


def sampler_window(variant: str, hz: float | None, seconds: float) -> SamplerWindow:
    proc = psutil.Process()
    psutil0, process0, wall0 = sum(proc.cpu_times()[:2]), time.process_time(), time.perf_counter()
    probe = None
    if hz is None:
        time.sleep(seconds)
    else:
        probe = ThreadCpuProbe(steady_source())
        meter = EnergyMeter(probe, idle_w=IDLE_W, sample_hz=hz)
        for request_id in range(OPEN_REQUESTS_IN_SAMPLER):
            meter.start_request(request_id)
        meter.start()
        try:
            time.sleep(seconds)
        finally:
            meter.stop()
    window = SamplerWindow(
        variant,
        hz,
        wall_s=time.perf_counter() - wall0,
        process_cpu_s=time.process_time() - process0,
        psutil_cpu_s=sum(proc.cpu_times()[:2]) - psutil0,
    )
    if probe is not None and len(probe.thread_cpu_s) >= 2:
        if len(probe.threads) != 1:
            raise RuntimeError("the meter was read from more than one thread; the per-tick figure would be wrong")
        window.ticks = len(probe.thread_cpu_s) - 1
        window.tick_span_s = probe.wall_s[-1] - probe.wall_s[0]
        window.thread_cpu_s = probe.thread_cpu_s[-1] - probe.thread_cpu_s[0]
    return window


def tick_alone_us(ticks: int = 20_000) -> float:
    """CPU µs of one `read()` + `tick()` in a tight loop on this thread (warm caches, no waiting)."""
    meter = EnergyMeter(steady_source(), idle_w=IDLE_W)
    for request_id in range(OPEN_REQUESTS_IN_SAMPLER):
        meter.start_request(request_id)
    source = steady_source()
    started_s = time.thread_time()
    for _ in range(ticks):
        meter.tick(source.read())
    return (time.thread_time() - started_s) / ticks * 1e6


def measure_sampler(seconds_per_variant: float) -> dict[str, Any]:
    """Idle, 10 Hz and 100 Hz in alternating windows; totals per variant."""
    variants: list[tuple[str, float | None]] = [
        ("idle (no sampler)", None),
        ("sampler 10 Hz", 10.0),
        ("sampler 100 Hz", 100.0),
    ]
    window_s = seconds_per_variant / SAMPLER_ROUNDS
    windows: list[SamplerWindow] = []
    for round_index in range(SAMPLER_ROUNDS):
        for name, hz in rotated(variants, round_index):
            windows.append(sampler_window(name, hz, window_s))
        say(f"sampler: round {round_index + 1}/{SAMPLER_ROUNDS} done ({len(variants)} × {window_s:.1f} s)")
    summary = {name: summarize_sampler([w for w in windows if w.variant == name]) for name, _ in variants}
    idle = summary[variants[0][0]]
    for row in summary.values():
        row["process_cpu_pct_over_idle"] = row["process_cpu_pct"] - idle["process_cpu_pct"]
    return {
        "tick_alone_us": statistics.median(tick_alone_us() for _ in range(5)),
        "seconds_per_variant": seconds_per_variant,
        "rounds": SAMPLER_ROUNDS,
        "open_requests": OPEN_REQUESTS_IN_SAMPLER,
        "source": steady_source().reason,
        "variants": summary,
        "windows": [asdict(w) for w in windows],
    }


def summarize_sampler(windows: list[SamplerWindow]) -> dict[str, Any]:
    wall_s = sum(w.wall_s for w in windows)
    ticks = sum(w.ticks for w in windows)
    span_s = sum(w.tick_span_s for w in windows)
    thread_cpu_s = sum(w.thread_cpu_s for w in windows)
    per_tick_us = [w.thread_cpu_s / w.ticks * 1e6 for w in windows if w.ticks]
    return {
        "wall_s": wall_s,
        "ticks": ticks,
        "achieved_hz": ticks / span_s if span_s else None,
        "thread_cpu_s": thread_cpu_s,
        "thread_cpu_pct": 100.0 * thread_cpu_s / span_s if span_s else None,
        "us_per_tick": thread_cpu_s / ticks * 1e6 if ticks else None,
        "us_per_tick_min": min(per_tick_us) if per_tick_us else None,
        "us_per_tick_max": max(per_tick_us) if per_tick_us else None,
        "process_cpu_s": sum(w.process_cpu_s for w in windows),
        "process_cpu_pct": 100.0 * sum(w.process_cpu_s for w in windows) / wall_s,
        "psutil_cpu_pct": 100.0 * sum(w.psutil_cpu_s for w in windows) / wall_s,
    }


def sampler_report(result: dict[str, Any]) -> str:
    rows = []
    for name, row in result["variants"].items():
        sampled = row["ticks"] > 0
        rows.append(
            [
                name,
                fmt(row["wall_s"]),
                str(row["ticks"]) if sampled else "–",
                fmt(row["achieved_hz"]) if sampled else "–",
                fmt(row["thread_cpu_pct"], 3) if sampled else "–",
                (
                    f"{fmt(row['us_per_tick'])} ({fmt(row['us_per_tick_min'])}–{fmt(row['us_per_tick_max'])})"
                    if sampled
                    else "–"
                ),
                fmt(row["process_cpu_pct"], 3),
                fmt(row["process_cpu_pct_over_idle"], 3, sign=True),
                fmt(row["psutil_cpu_pct"], 2),
            ]
        )
    headers = [
        "variant",
        "wall s",
        "ticks",
        "real Hz",
        "thread %core",
        "µs/tick (window min–max)",
        "process %core",
        "vs idle",
        "psutil %core",
    ]
    return "\n".join(
        [
            f"Energy sampler CPU: real EnergyMeter + sampler thread, {result['source']}, "
            f"{result['open_requests']} requests open; {result['rounds']} alternating windows per variant",
            table(headers, rows),
            "thread %core / µs/tick: time.thread_time() inside the sampler thread, whole loop iterations "
            "(read + tick + wait + wake).",
            "read() + tick() alone, tight loop on one thread (warm caches, no waiting): "
            f"{result['tick_alone_us']:.1f} µs; "
            "the rest of a tick is the thread sleeping and waking (timer, futex, GIL, cold caches).",
            "process %core: time.process_time() of this whole process; psutil %core has 10 ms resolution.",
            "NVML's (or RAPL's) own read() cost is not in these numbers: the stand-in's read() is a clock "
            "read. Measure it on a GPU machine: student gpu-check (nvml_read_cost, nvml_sampler_cpu).",
        ]
    )


async def run_phase(
    session: aiohttp.ClientSession,
    phase: str,
    targets: list[Target],
    chats: list[list[dict[str, str]]],
    max_tokens: int,
    concurrency: int,
) -> tuple[list[Sample], dict[str, float], float]:
    """Round r sends chat r to every target (rotated order); `concurrency` requests in flight.

    Returns the samples, each gateway's CPU seconds over the phase, and the phase's wall time.
    """
    jobs = iter([(r, t) for r in range(len(chats)) for t in rotated(targets, r)])
    samples: list[Sample] = []
    total = len(chats) * len(targets)
    last_note_s = time.monotonic()

    async def worker() -> None:
        nonlocal last_note_s
        for round_index, target in jobs:
            body = request_body(chats[round_index], max_tokens)
            samples.append(await one_request(session, target, body, phase, round_index))
            if time.monotonic() - last_note_s > 10:
                last_note_s = time.monotonic()
                errors = sum(s.error is not None for s in samples)
                say(f"  {phase}: {len(samples)}/{total} requests" + (f", {errors} errors" if errors else ""))

    cpu0 = {t.name: t.service.cpu_s() for t in targets if t.service}
    wall0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - wall0
    cpu = {t.name: t.service.cpu_s() - cpu0[t.name] for t in targets if t.service}
    return samples, cpu, wall_s


# --- analysis (pure) ------------------------------------------------------------------------


def analyse_phase(
    samples: list[Sample], cpu_s: dict[str, float], wall_s: float, target_names: list[str], max_tokens: int
) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    by_target = {name: [s for s in ok if s.target == name] for name in target_names}
    per_target: dict[str, dict[str, Any]] = {}
    for name in target_names:
        mine = by_target[name]
        ttft_ms = [s.ttft_s * 1e3 for s in mine]
        e2e_ms = [s.e2e_s * 1e3 for s in mine]
        sent = sum(s.target == name for s in samples)
        per_target[name] = {
            "requests": sent,
            "errors": sent - len(mine),
            "ttft_ms_p50": percentile(ttft_ms, 50),
            "ttft_ms_p95": percentile(ttft_ms, 95),
            "e2e_ms_p50": percentile(e2e_ms, 50),
            "e2e_ms_p95": percentile(e2e_ms, 95),
            "tokens_per_s_p50": percentile([max_tokens / s.e2e_s for s in mine], 50),
            # Share of answers whose first event came after half their time: the stream arrived
            # as one burst at the end (CPU starvation of vLLM's API server), so TTFT means little.
            "late_first_event_share": sum(s.ttft_s > s.e2e_s / 2 for s in mine) / len(mine) if mine else None,
            "tokens_per_s_phase": max_tokens * len(mine) / wall_s,
            "events_per_request": statistics.median([s.events for s in mine]) if mine else None,
            "gateway_cpu_s": cpu_s.get(name),
            "gateway_cpu_ms_per_request": cpu_s[name] * 1e3 / sent if name in cpu_s and sent else None,
            "gateway_cpu_us_per_token": cpu_s[name] * 1e6 / (sent * max_tokens) if name in cpu_s and sent else None,
        }
    added = {name: paired(by_target[name], by_target[DIRECT]) for name in target_names if name != DIRECT}
    on_vs_off = {
        name: paired(by_target[name], by_target[GW_OFF]) for name in target_names if name not in (DIRECT, GW_OFF)
    }
    for name, row in on_vs_off.items():
        off_added, on_added = added[GW_OFF]["e2e_ms"]["median"], added[name]["e2e_ms"]["median"]
        # A ratio of two medians means something only when both gateways measurably add latency.
        row["added_e2e_ratio"] = on_added / off_added if off_added > 0 and on_added > 0 else None
        off_cpu = per_target[GW_OFF]["gateway_cpu_ms_per_request"]
        on_cpu = per_target[name]["gateway_cpu_ms_per_request"]
        row["cpu_per_request_ratio"] = on_cpu / off_cpu if off_cpu else None
    return {"wall_s": wall_s, "targets": per_target, "added_over_direct": added, "versus_gw_off": on_vs_off}


def paired(samples: list[Sample], baseline: list[Sample]) -> dict[str, Any]:
    """Median (95% CI) of per-round differences samples − baseline, TTFT and E2E, in ms."""
    base = {s.round: s for s in baseline}
    pairs = [(s, base[s.round]) for s in samples if s.round in base]
    result: dict[str, Any] = {"pairs": len(pairs)}
    for key, attr in (("e2e_ms", "e2e_s"), ("ttft_ms", "ttft_s")):
        median, low, high = median_ci([(getattr(a, attr) - getattr(b, attr)) * 1e3 for a, b in pairs])
        result[key] = {"median": median, "ci95": [low, high]}
    ratios = [a.e2e_s / b.e2e_s for a, b in pairs if b.e2e_s > 0]
    result["e2e_ratio_median"] = statistics.median(ratios) if ratios else None
    return result


def phase_report(title: str, result: dict[str, Any]) -> str:
    targets = result["targets"]
    rows = [
        [
            name,
            f"{row['requests'] - row['errors']}/{row['requests']}",
            fmt(row["ttft_ms_p50"]),
            fmt(row["ttft_ms_p95"]),
            fmt(row["e2e_ms_p50"]),
            fmt(row["e2e_ms_p95"]),
            fmt(row["tokens_per_s_p50"], 0),
            f"{100 * row['late_first_event_share']:.0f}%" if row["late_first_event_share"] is not None else "–",
            fmt(row["gateway_cpu_ms_per_request"], 2),
            fmt(row["gateway_cpu_us_per_token"], 0),
        ]
        for name, row in targets.items()
    ]
    lines = [
        f"{title}  (phase wall {result['wall_s']:.1f} s)",
        table(
            [
                "target",
                "ok",
                "TTFT p50 ms",
                "TTFT p95 ms",
                "E2E p50 ms",
                "E2E p95 ms",
                "tok/s p50",
                "late 1st event",
                "gw CPU ms/req",
                "gw CPU µs/token",
            ],
            rows,
        ),
        "",
    ]

    def ci(block: dict[str, Any]) -> str:
        low, high = block["ci95"]
        return f"{fmt(block['median'], 2, sign=True)} [{fmt(low, 2, sign=True)}, {fmt(high, 2, sign=True)}]"

    added_rows = [
        [name, str(row["pairs"]), ci(row["e2e_ms"]), ci(row["ttft_ms"]), fmt(row["e2e_ratio_median"], 3)]
        for name, row in result["added_over_direct"].items()
    ]
    added_rows += [
        [f"{name} − gw off", str(row["pairs"]), ci(row["e2e_ms"]), ci(row["ttft_ms"]), fmt(row["e2e_ratio_median"], 3)]
        for name, row in result["versus_gw_off"].items()
    ]
    lines.append(
        table(
            ["paired difference", "pairs", "E2E ms median [95% CI]", "TTFT ms median [95% CI]", "E2E ratio p50"],
            added_rows,
        )
    )
    for name, row in result["versus_gw_off"].items():
        added = row["added_e2e_ratio"]
        low, high = row["e2e_ms"]["ci95"]
        if added is None:
            verdict = "ratio – (a median added latency is ≤ 0: within noise)"
        elif low is not None and low <= 0 <= high:
            verdict = f"×{added:.2f}, but the {name} − gw off interval includes 0: not distinguishable here"
        else:
            verdict = f"×{added:.2f}"
        lines.append(
            f"{name} / gw off: gateway CPU per request ×{fmt(row['cpu_per_request_ratio'], 2)}; "
            f"added E2E latency {verdict}"
        )
    lines.append(
        "late 1st event: answers whose first event arrived after half their E2E time (the stream came as one "
        "burst); where this is high, TTFT measures CPU scheduling, not the gateway."
    )
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests", type=int, default=60, help="rounds per phase; each sends one request to every target (default 60)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight in the second phase; 1 skips it (default 4)"
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request (default 128)")
    parser.add_argument("--sampler-seconds", type=float, default=20.0, help="seconds per sampler variant (default 20)")
    parser.add_argument("--skip-sampler", action="store_true", help="only the latency benchmark")
    parser.add_argument("--skip-latency", action="store_true", help="only the sampler benchmark")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("telemetry-benchmark.json"),
        help="results JSON (default ./telemetry-benchmark.json)",
    )


def setup_report(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"Machine: {env['host']}, {env['cpus']} CPUs, {env['platform']}; Python {env['python']}, vLLM {env['vllm']}; "
        f"load average at start {env['loadavg_at_start'][0]:.2f}, at end {env['loadavg_at_end'][0]:.2f}",
    ]
    latency = results.get("latency")
    if latency:
        lines.append(
            f"Latency: tiny random Llama (2 layers, hidden 128, float32) on one vLLM, max-num-seqs "
            f"{latency['max_num_seqs']}, prefix caching off; {latency['rounds']} rounds per phase, each one streamed "
            f"chat request to every target in rotating order; {latency['max_tokens']} completion tokens "
            "(ignore_eos, greedy); TTFT = first streamed event; gw CPU = the gateway pid's user+system (psutil)."
        )
        for name, status in latency["energy_at_start"].items():
            energy = (status or {}).get("energy")
            state = f"energy {energy['status']} ({energy['reason']})" if energy else "telemetry off"
            lines.append(f"  {name}: {state}")
    return "\n".join(lines)


def run_latency(args: argparse.Namespace, results: dict[str, Any], printed: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="telemetry-bench-") as tmp, Services(Path(tmp)) as services:
        workdir = Path(tmp)
        say("building the tiny random Llama")
        model_dir = build_tiny_model(workdir / "tiny-model")
        max_num_seqs = max(8, args.concurrency)
        targets = start_stack(services, workdir, model_dir, max_num_seqs)
        energy = {t.name: energy_status(t) for t in targets if t.service}
        for name, status in energy.items():
            block = (status or {}).get("energy") or {}
            say(
                f"  {name}: energy {block.get('status', 'n/a (telemetry off)')}"
                + (f" — {block.get('reason')}" if block else "")
            )
        results["latency"] = {
            "max_tokens": args.max_tokens,
            "max_num_seqs": max_num_seqs,
            "rounds": args.requests,
            "targets": [t.name for t in targets],
            "energy_at_start": energy,
            "phases": {},
        }
        asyncio.run(_latency_phases(args, targets, results["latency"], printed))
        results["latency"]["gateway_stats_at_end"] = {t.name: energy_status(t) for t in targets if t.service}
        say("stopping the stack")
    say("stack stopped")


async def _latency_phases(
    args: argparse.Namespace, targets: list[Target], out: dict[str, Any], printed: list[str]
) -> None:
    chats = prompts(args.requests)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await check_tokens(session, targets, chats[0], args.max_tokens)
        say("warm-up: 3 rounds")
        await run_phase(session, "warm-up", targets, chats[:3], args.max_tokens, 1)
        phases = [("sequential", 1)]
        if args.concurrency > 1:
            phases.append((f"concurrency {args.concurrency}", args.concurrency))
        for phase, concurrency in phases:
            say(f"{phase}: {args.requests} rounds × {len(targets)} targets, {args.max_tokens} tokens each")
            samples, cpu_s, wall_s = await run_phase(session, phase, targets, chats, args.max_tokens, concurrency)
            result = analyse_phase(samples, cpu_s, wall_s, [t.name for t in targets], args.max_tokens)
            result["concurrency"] = concurrency
            result["samples"] = [asdict(s) for s in samples]
            out["phases"][phase] = result
            printed.append(phase_report(f"Gateway latency, {phase} ({concurrency} in flight)", result))
            say(
                f"{phase} done in {wall_s:.0f} s; E2E p50 ms: "
                + ", ".join(f"{name} {fmt(row['e2e_ms_p50'])}" for name, row in result["targets"].items())
            )


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.sampler_seconds <= 0:
        print(
            "student bench telemetry: --requests, --concurrency, --max-tokens and --sampler-seconds must be positive",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    results: dict[str, Any] = {"environment": environment(), "arguments": {k: str(v) for k, v in vars(args).items()}}
    printed: list[str] = []
    try:
        if not args.skip_sampler:
            say(
                f"energy sampler: idle / 10 Hz / 100 Hz, {args.sampler_seconds:g} s each "
                f"in {SAMPLER_ROUNDS} alternating windows"
            )
            results["sampler"] = measure_sampler(args.sampler_seconds)
            printed.append(sampler_report(results["sampler"]))
            variants = results["sampler"]["variants"]
            say(
                "sampler done; thread CPU % of one core: "
                + ", ".join(f"{name} {fmt(row['thread_cpu_pct'], 3)}" for name, row in variants.items() if row["ticks"])
            )
        if not args.skip_latency:
            run_latency(args, results, printed)
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        results["environment"]["loadavg_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print("\n" + "=" * 100)
    print("\n\n".join([setup_report(results), *printed]))
    say(f"results written to {args.out}")
    return 0
