"""The report folder: `report.json`, `report.md` (a table a manager can read) and PNG plots.

The client's view (samples) is joined with the gateway's `/stats` over the same window. Locust's
own CSV and HTML are written beside them by the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.arrivals import RateCurve
from loadtest.results import (
    RunResult,
    arrival_accuracy,
    latency_summary,
    lateness,
    request_counts,
    time_buckets,
    token_summary,
)
from loadtest.workload import Workload

PLOT_BUCKETS = 40  # about this many points per time series
MIN_BUCKET_S = 1.0


def build_report(
    scenario: str,
    target: str,
    curve: RateCurve,
    run: RunResult,
    workload: Workload,
    *,
    seed: int,
    burstiness: float,
    scenario_block: dict[str, Any],
    verdict: dict[str, Any],
) -> dict[str, Any]:
    samples = run.samples
    late = lateness(samples)
    gateway = run.gateway_window
    report: dict[str, Any] = {
        "scenario": scenario,
        "target": target,
        "started_at": run.started_at,
        "elapsed_s": run.elapsed_s,
        "stopped_early": run.stopped_early,
        "arrivals": {
            "process": "poisson" if burstiness == 1.0 else "gamma",
            "burstiness": burstiness,
            "seed": seed,
            "peak_target_rps": round(curve.peak_rps, 4),
            **arrival_accuracy(_scheduled_count(curve, run), samples, _span(curve, run)),
        },
        "generator": {
            "workers": run.worker_count,
            "users_initial": run.users_initial,
            "users_max": run.users_max,
            **late,
            "cpu_overloaded": run.cpu_warning,
        },
        "requests": request_counts(samples),
        "latency_ms": latency_summary(samples),
        "tokens": token_summary(samples, run.elapsed_s),
        "workload": {
            "model": workload.model,
            "prompt_tokens_target": workload.prompt_tokens,
            "output_tokens_target": workload.output_tokens,
            "length_sigma": workload.length_sigma,
            "ignore_eos": workload.ignore_eos,
            "system_prompt_chars": len(workload.system),
            "topics": sorted(workload.prompt_set["topics"]),
        },
        "slo": verdict,
        "gateway": _gateway_excerpt(gateway, run.vllm_url),
        "memory": {
            name: {**found, "samples": sum(1 for row in run.memory_series if row.get(name) is not None)}
            for name, found in run.processes.items()
        },
        scenario: scenario_block,
    }
    return report


def _scheduled_count(curve: RateCurve, run: RunResult) -> int:
    """Arrivals due in the span that was played (all of them unless the run stopped early)."""
    span = _span(curve, run)
    pairs = zip(curve.segments, curve.counts(), strict=True)
    return sum(count for segment, count in pairs if segment.end_s <= span + 1e-9)


def _span(curve: RateCurve, run: RunResult) -> float:
    """The scheduled span that was played: the whole curve, or its segments that ended before an early stop."""
    if not run.stopped_early:
        return curve.span_s
    ends = [seg.end_s for seg in curve.segments if seg.end_s <= run.elapsed_s]
    return max(ends) if ends else curve.span_s


def _gateway_excerpt(stats: dict[str, Any], vllm_url: str | None) -> dict[str, Any]:
    if "error" in stats:
        return {"error": stats["error"]}
    keys = ("window_s", "requests", "tokens", "throughput", "latency_ms", "energy", "cost", "upstream")
    return {"vllm_url": vllm_url, **{k: stats.get(k) for k in keys}}


def write_report(report: dict[str, Any], run: RunResult, curve: RateCurve, out_dir: Path) -> list[str]:
    """Write report.json, report.md and the plots; returns the files written (relative names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(run, curve, out_dir)
    report["files"] = sorted({"report.json", "report.md", *plots, *run.locust_files})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    return report["files"]


def markdown(report: dict[str, Any]) -> str:
    slo = report["slo"]
    arrivals, generator, requests = report["arrivals"], report["generator"], report["requests"]
    latency, tokens = report["latency_ms"], report["tokens"]
    verdict = "PASSED" if slo["passed"] else "FAILED"
    lines = [
        f"# Load test: {report['scenario']}",
        "",
        f"**SLO {verdict}** ({slo['scope']})" + ("" if slo["passed"] else ": " + "; ".join(slo["reasons"])),
        "",
        f"Target `{report['target']}`, started {report['started_at']}, {report['elapsed_s']:.0f} s."
        + (f" Stopped early: {report['stopped_early']}." if report["stopped_early"] else ""),
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| arrival rate, target → achieved | {arrivals['target_rps']:g} → {arrivals['achieved_rps']:g} req/s "
        f"({arrivals['process']}, peak target {arrivals['peak_target_rps']:g} req/s) |",
        f"| requests ok / errors | {requests['ok']} / {requests['error']} |",
        f"| time to first token p50 / p95 / p99 | {_ms3(latency['ttft'])} |",
        f"| time per output token p50 / p95 / p99 | {_ms3(latency['tpot'])} |",
        f"| end-to-end latency p50 / p95 / p99 | {_ms3(latency['e2e'])} |",
        f"| tokens per request (prompt + answer) | {_num(tokens['prompt_mean'])} + {_num(tokens['completion_mean'])} |",
        f"| output tokens/s | {_num(tokens['completion_tokens_per_s'])} |",
        f"| SLO objective | p95 TTFT ≤ {slo['objective']['ttft_p95_ms']:g} ms, p95 TPOT ≤ "
        f"{slo['objective']['tpot_p95_ms']:g} ms, errors ≤ {100 * slo['objective']['max_error_rate']:g}% |",
        f"| load generator | {_workers(generator['workers'])}, up to {generator['users_max']} users, "
        f"{100 * generator['late_fraction']:.1f}% sent > {generator['late_threshold_ms']:.0f} ms late"
        + (" — **LAGGING: the load was not delivered as scheduled**" if generator["lagging"] else "")
        + " |",
    ]
    lines += _gateway_rows(report["gateway"])
    lines += SCENARIO_ROWS[report["scenario"]](report[report["scenario"]])
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in report.get("files", [])), ""]
    return "\n".join(lines)


def _gateway_rows(gateway: dict[str, Any]) -> list[str]:
    if "error" in gateway:
        return [f"| gateway /stats | unreadable: {gateway['error']} |"]
    energy, upstream = gateway.get("energy") or {}, gateway.get("upstream") or {}
    rows = [
        f"| gateway: requests in window / TTFT p95 | {(gateway.get('requests') or {}).get('total')} / "
        f"{_num(((gateway.get('latency_ms') or {}).get('ttft') or {}).get('p95'))} ms |"
    ]
    if energy.get("status") == "ok":
        rows.append(
            f"| gateway: energy in window | {energy.get('total_j', 0):.0f} J ({energy.get('source')}, "
            f"idle {_num(energy.get('idle_w'))} W) |"
        )
    else:
        rows.append(f"| gateway: energy | not measured: {energy.get('reason')} |")
    if upstream.get("kv_cache_usage") is not None:
        rows.append(
            f"| vLLM at the end: running / waiting / KV cache | {upstream.get('running')} / "
            f"{upstream.get('waiting')} / {100 * upstream['kv_cache_usage']:.0f}% |"
        )
    return rows


def _daily_rows(block: dict[str, Any]) -> list[str]:
    peak, energy, cost = block["peak_hour"], block["energy"], block["cost"]
    rows = [
        f"| day played | {block['requests_per_day']} requests in {block['day_seconds']:g} s "
        f"(×{block['time_compression']:g} faster) |",
        f"| peak hour {peak['hour']:02d}:00 | {peak['requests']} requests at {peak['target_rps']:g} req/s "
        f"(real day: {peak['real_day_rps']:g} req/s); SLO {'held' if peak['slo_passed'] else 'broken'} |",
    ]
    if energy["status"] == "ok":
        day = energy["projected_day"]
        rows.append(
            f"| energy per real day | {day['kwh']:g} kWh (idle {day['idle_kwh']:g} + active {day['active_kwh']:g}; "
            f"{energy['measured']['energy_per_request_j']:g} J per request) |"
        )
        rows.append(
            f"| electricity per day / month | {cost['electricity_per_day']:,.0f} / "
            f"{cost['electricity_per_month']:,.0f} {cost['currency']} "
            f"(${cost['electricity_per_month_usd']:,.2f} a month) |"
        )
    else:
        rows.append(f"| energy and electricity per day | not measured: {energy['reason']} |")
    for name, api in cost.get("api_equivalent", {}).items():
        if api["per_day_usd"] is not None:
            rows.append(
                f"| same tokens on {name} | ${api['per_day_usd']:,.2f} a day, ${api['per_month_usd']:,.2f} a month |"
            )
    return rows


def _capacity_rows(block: dict[str, Any]) -> list[str]:
    rows = [
        f"| highest sustainable rate | {block['max_sustainable_rps']:g} req/s ({block['limit_note']}) |",
        f"| largest daily volume meeting the SLO at its peak hour | {block['max_requests_per_day']:,} requests/day "
        f"(peak factor {block['peak_factor']:g}); required {block['required_requests_per_day']:,} |",
    ]
    for step in block["steps"]:
        state = {True: "ok", False: "broken", None: "not judged"}[step["passed"]]
        p95 = ((step.get("latency_ms") or {}).get("ttft") or {}).get("p95")
        rows.append(
            f"| step {step['target_rps']:g} req/s | {state}: {step['done']}/{step['scheduled']} requests, "
            f"TTFT p95 {_num(p95)} ms" + (f" — {'; '.join(step['reasons'])}" if step.get("reasons") else "") + " |"
        )
    return rows


def _soak_rows(block: dict[str, Any]) -> list[str]:
    change = block["latency_drift"]["first_to_last"]
    rows = [
        f"| latency drift, first → last window | TTFT p95 {_pct(change['ttft_p95_pct'])}, "
        f"TPOT p95 {_pct(change['tpot_p95_pct'])}, e2e p95 {_pct(change['e2e_p95_pct'])} |"
    ]
    for name, memory in block["memory_drift"].items():
        if memory["measured"]:
            rows.append(
                f"| {name} memory (RSS) | {memory['start_mib']:g} → {memory['end_mib']:g} MiB "
                f"(max {memory['max_mib']:g}, {memory['slope_mib_per_hour']:+g} MiB/h) |"
            )
        else:
            rows.append(f"| {name} memory | {memory['reason']} |")
    return rows


def _burst_rows(block: dict[str, Any]) -> list[str]:
    recovery = block["recovery_s"]
    return [
        f"| spike | ×{block['factor']:g} for {block['burst_seconds']:g} s over {block['base_rps']:g} req/s |",
        f"| recovery time (TTFT back under {_num(block['recovery_threshold_ms'])} ms) | "
        + ("not recovered before the end" if recovery is None else f"{recovery:g} s")
        + " |",
        "| vLLM queue empty again after | "
        + (f"{block['queue_recovery_s']:g} s" if block.get("queue_recovery_s") is not None else "–")
        + " |",
        f"| errors before / during / after | {block['errors']['before']} / {block['errors']['spike']} / "
        f"{block['errors']['after']} |",
    ]


SCENARIO_ROWS = {"daily": _daily_rows, "capacity": _capacity_rows, "soak": _soak_rows, "burst": _burst_rows}


def _ms3(summary: dict[str, Any]) -> str:
    return " / ".join(_num(summary.get(p)) for p in ("p50", "p95", "p99")) + " ms"


def _workers(count: int) -> str:
    return f"{count} Locust worker processes" if count else "one process"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+g}%"


def write_plots(run: RunResult, curve: RateCurve, out_dir: Path) -> list[str]:
    """arrival_rate.png, latency.png, throughput.png (tokens/s, watts, vLLM queue) and memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    span = max(curve.span_s, run.elapsed_s)
    bucket_s = max(MIN_BUCKET_S, span / PLOT_BUCKETS)
    rows = time_buckets(run.samples, span, bucket_s)
    t = [r["t"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(9, 4))
    edges = [s.start_s for s in curve.segments] + [curve.span_s]
    ax.stairs([s.rps for s in curve.segments], edges, label="target", linewidth=2)
    ax.plot(t, [r["sent_rps"] for r in rows], marker=".", label=f"achieved (sent per {bucket_s:.3g} s)")
    _finish(ax, "arrival rate: target vs achieved", "requests/s")
    written.append(_save(fig, out_dir / "arrival_rate.png"))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (("ttft_ms_p50", "TTFT p50"), ("ttft_ms_p95", "TTFT p95"), ("e2e_ms_p95", "e2e p95")):
        top.plot(t, [r[key] for r in rows], marker=".", label=label)
    _finish(top, "latency percentiles over time (by send time)", "ms")
    for key, label in (("tpot_ms_p50", "TPOT p50"), ("tpot_ms_p95", "TPOT p95")):
        bottom.plot(t, [r[key] for r in rows], marker=".", label=label)
    _finish(bottom, "", "ms per output token")
    written.append(_save(fig, out_dir / "latency.png"))

    series = run.gateway_series
    watts = [(g["t"], g["power_w"]) for g in series if g.get("power_w") is not None]
    queue = [(g["t"], g["waiting"], g["running"], g["kv_cache_usage"]) for g in series if g.get("waiting") is not None]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [r["completion_tokens_per_s"] for r in rows], marker=".", label="client: output tokens/s")
    gateway_tps = [
        (g["t"], g["completion_tokens_per_s"]) for g in series if g.get("completion_tokens_per_s") is not None
    ]
    if gateway_tps:
        axes[0].plot(*zip(*gateway_tps, strict=True), label="gateway /stats: output tokens/s")
    _finish(axes[0], "throughput, power and vLLM load", "tokens/s")
    if watts:
        axes[1].plot(*zip(*watts, strict=True), color="tab:red", label="power (gateway /stats)")
        _finish(axes[1], "", "W")
    else:
        reason = (run.gateway_window.get("energy") or {}).get("reason") or run.gateway_window.get("error") or ""
        axes[1].text(
            0.5,
            0.5,
            f"power: not measured\n{reason[:110]}",
            ha="center",
            va="center",
            transform=axes[1].transAxes,
            fontsize="small",
        )
        axes[1].set_axis_off()
    if queue:
        qt, waiting, running, kv = zip(*queue, strict=True)
        axes[2].plot(qt, running, label="vLLM running")
        axes[2].plot(qt, waiting, label="vLLM waiting")
        kv_axis = axes[2].twinx()
        kv_axis.plot(qt, [100 * (k or 0) for k in kv], color="tab:gray", linestyle="--", label="KV cache %")
        kv_axis.set_ylabel("KV cache %")
        _finish(axes[2], "", "requests")
    else:
        axes[2].text(0.5, 0.5, "vLLM load: not reported", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_xlabel("seconds since start")
    written.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    measured = False
    for name in run.processes:
        points = [(row["t"], row[name]) for row in run.memory_series if row.get(name) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=f"{name} RSS")
            measured = True
    if not measured:
        reasons = "; ".join(f"{n}: {p.get('reason')}" for n, p in run.processes.items())
        ax.text(
            0.5, 0.5, f"memory not measured\n{reasons}", ha="center", va="center", transform=ax.transAxes, wrap=True
        )
    _finish(ax, "memory of the served processes", "MiB")
    written.append(_save(fig, out_dir / "memory.png"))
    return written


def _finish(ax: Any, title: str, ylabel: str) -> None:
    if title:
        ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name
