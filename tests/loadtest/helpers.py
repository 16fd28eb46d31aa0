"""Synthetic runs for the pure parts of the load tests (no Locust, no server)."""

from __future__ import annotations

from loadtest.arrivals import RateCurve, schedule
from loadtest.results import RunResult, Sample

UNAVAILABLE_STATS = {
    "window_s": 60.0,
    "requests": {"total": 100, "ok": 100, "error": 0, "in_flight": 0},
    "energy": {"status": "unavailable", "reason": "no NVML, no RAPL", "source": None, "total_j": None},
    "cost": {
        "currency": "VND",
        "price_per_kwh": 2998.0,
        "usd_rate": 25000.0,
        "api_equivalent": {"gpt-4.1": {"cost_usd": 0.4}, "deepseek-v3.2": {"cost_usd": 0.021}},
    },
    "upstream": {"url": "http://127.0.0.1:8001", "running": 0, "waiting": 0, "kv_cache_usage": 0.0},
}


def run_of(
    curve: RateCurve,
    ttft_ms=lambda arrival: 50.0,
    ok=lambda arrival: True,
    late_s: float = 0.0,
    gateway: dict | None = None,
    memory: list | None = None,
    gateway_series: list | None = None,
) -> RunResult:
    """Every arrival of `curve` answered: sent `late_s` after schedule, 10 + 20 tokens."""
    samples = []
    for arrival in schedule(curve, seed=0):
        good = ok(arrival)
        sent = arrival.offset_s + late_s
        samples.append(
            Sample(
                arrival.index,
                arrival.phase,
                arrival.offset_s,
                sent,
                sent + 0.5,
                good,
                ttft_ms(arrival) if good else None,
                20.0 if good else None,
                500.0,
                10,
                20,
                None if good else "HTTP 429: busy",
            )
        )
    return RunResult(
        samples=samples,
        started_at="2025-01-01T00:00:00+00:00",
        t0_epoch=0.0,
        elapsed_s=curve.span_s,
        stopped_early=None,
        users_initial=4,
        users_max=4,
        worker_count=0,
        cpu_warning=False,
        gateway_series=gateway_series or [],
        memory_series=memory or [],
        processes={
            "gateway": {"pid": 1, "includes_children": False, "reason": None},
            "vllm": {"pid": None, "includes_children": True, "reason": "not measured (remote target)"},
        },
        gateway_window=gateway or UNAVAILABLE_STATS,
        vllm_url="http://127.0.0.1:8001",
    )
