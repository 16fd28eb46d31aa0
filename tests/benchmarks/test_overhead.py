"""The overhead benchmark's pure parts: its verdicts and its CPU reading (no stack started)."""

from __future__ import annotations

import os

from benchmarks.overhead import Block, StreamShape, goal_lines, proc_cpu_s, shapes_verdict, summarize
from benchmarks.telemetry import DIRECT, GW_ON, Sample


def test_cpu_time_of_this_process_comes_from_proc() -> None:
    before = proc_cpu_s(os.getpid())
    sum(i * i for i in range(300_000))
    assert proc_cpu_s(os.getpid()) >= before >= 0


def test_ratios_added_ttft_and_goals() -> None:
    blocks = [Block(DIRECT, 1, 0, 4, 0, 2.0, None), Block(GW_ON, 1, 0, 4, 0, 2.1, 0.024)]
    samples = [Sample("c1", DIRECT, 0, 0.010, 0.5, 130, None)] * 4 + [Sample("c1", GW_ON, 0, 0.011, 0.52, 130, None)] * 4
    rows = summarize(blocks, samples, [DIRECT, GW_ON], 128)
    assert abs(rows[GW_ON]["throughput_ratio_requests"] - 2.0 / 2.1) < 1e-9
    assert abs(rows[GW_ON]["added_ttft_ms_p50"] - 1.0) < 1e-9
    assert abs(rows[GW_ON]["cpu_ms_per_request"] - 6.0) < 1e-9
    verdicts = shapes_verdict({DIRECT: [StreamShape(130, "ab", 130, 0)], GW_ON: [StreamShape(130, "ab", 130, 0)]})
    lines = goal_lines({1: rows}, verdicts)
    results = {(line[0], line[2]): line[-1] for line in lines}
    assert results[("throughput ratio, requests/s", "c=1")] == "MISS"  # 0.952 < 0.98
    assert results[("added TTFT p50, ms", "c=1")] == "pass"
    assert results[("gateway CPU per request, ms", "c=1")] == "pass"
    assert results[("stream events per request (gw vs direct)", "c=1")] == "pass"


def test_a_gateway_that_merges_events_or_changes_text_is_caught() -> None:
    direct = [StreamShape(130, "ab", 130, 0)]
    assert not shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(129, "ab", 40, 20)]})[GW_ON]["preserved"]
    assert not shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(130, "abc", 130, 0)]})[GW_ON]["preserved"]
    assert shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(130, "ab", 40, 20)]})[GW_ON]["more_multi_event_reads_than_direct"]


def test_late_bursts_are_counted_and_left_out_of_the_streamed_ttft() -> None:
    """An answer whose first event came after half its time was one late burst from vLLM."""
    blocks = [Block(DIRECT, 1, 0, 4, 0, 2.0, None), Block(GW_ON, 1, 0, 4, 0, 2.0, 0.01)]
    direct = [Sample("c1", DIRECT, 0, 0.005, 0.1, 130, None)] * 3 + [Sample("c1", DIRECT, 0, 0.099, 0.1, 130, None)]
    gateway = [Sample("c1", GW_ON, 0, 0.006, 0.1, 130, None)] + [Sample("c1", GW_ON, 0, 0.098, 0.1, 130, None)] * 3
    rows = summarize(blocks, direct + gateway, [DIRECT, GW_ON], 128)
    assert rows[DIRECT]["late_first_event_share"] == 0.25 and rows[GW_ON]["late_first_event_share"] == 0.75
    assert abs(rows[GW_ON]["added_ttft_ms_p50"] - 93.0) < 1e-9  # the verdict still uses every answer
    assert abs(rows[GW_ON]["added_ttft_ms_p50_streamed"] - 1.0) < 1e-9
    lines = {(line[0], line[2]): line for line in goal_lines({1: rows}, {})}
    assert lines[("added TTFT p50, ms", "c=1")][-1] == "MISS"
    assert lines[("added TTFT p50, streamed answers only, ms", "c=1")][3] == "+1.00"
