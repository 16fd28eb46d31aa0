"""The overhead benchmark's pure parts: verdicts, CPU reading, and reading `vllm bench serve`'s results."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import vllm_bench
from benchmarks.harness import DIRECT, GW_ON, Sample
from benchmarks.overhead import (
    LITELLM,
    Block,
    StreamShape,
    goal_lines,
    proc_cpu_s,
    shapes_verdict,
    summarize,
    tpot_ms,
    trace_summary,
    tree_cpu_s,
)


def block(target: str, requests: int, wall_s: float) -> Block:
    return Block(target, 1, 0, requests, 0, wall_s, requests * 64, "vllm bench serve ...")


def test_cpu_time_of_this_process_comes_from_proc() -> None:
    before = proc_cpu_s(os.getpid())
    sum(i * i for i in range(300_000))
    assert proc_cpu_s(os.getpid()) >= before >= 0
    assert tree_cpu_s(os.getpid()) >= proc_cpu_s(os.getpid()) - 0.05


def test_ratios_added_ttft_cpu_and_goals() -> None:
    blocks = [block(DIRECT, 4, 2.0), block(GW_ON, 4, 2.1)]
    samples = [Sample("c1", DIRECT, 0, 0.010, 0.5, 64, None)] * 4 + [Sample("c1", GW_ON, 0, 0.011, 0.52, 64, None)] * 4
    rows = summarize(blocks, samples, [DIRECT, GW_ON], {GW_ON: 0.012})
    assert abs(rows[GW_ON]["throughput_ratio_requests"] - 2.0 / 2.1) < 1e-9
    assert abs(rows[GW_ON]["added_ttft_ms_p50"] - 1.0) < 1e-9
    assert abs(rows[GW_ON]["cpu_ms_per_request"] - 3.0) < 1e-9
    assert abs(rows[GW_ON]["ttft_p99_ratio"] - 1.1) < 1e-9
    verdicts = shapes_verdict({DIRECT: [StreamShape(130, "ab", 130, 0)], GW_ON: [StreamShape(130, "ab", 130, 0)]})
    results = {(line[0], line[2]): line[-1] for line in goal_lines({1: rows}, verdicts)}
    assert results[("throughput ratio (req/s vs direct)", "c=1")] == "pass"  # 0.952 >= 0.95
    assert results[("added TTFT p50, ms", "c=1")] == "pass"
    assert results[("proxy CPU per request, ms", "c=1")] == "pass"  # 3.0 <= 3
    assert results[("stream events per request (vs direct)", "c=1")] == "pass"


def test_tpot_is_the_time_after_the_first_token_per_further_token() -> None:
    assert tpot_ms(Sample("c1", DIRECT, 0, 0.1, 0.73, 64, None)) == (0.73 - 0.1) * 1e3 / 63
    assert tpot_ms(Sample("c1", DIRECT, 0, 0.1, 0.1, 1, None)) is None


def test_each_gateway_figure_is_compared_with_litellm() -> None:
    blocks = [block(DIRECT, 4, 2.0), block(GW_ON, 4, 2.1), block(LITELLM, 4, 3.0)]
    samples = [Sample("c1", DIRECT, 0, 0.010, 0.5, 64, None)] * 4 + [Sample("c1", GW_ON, 0, 0.011, 0.52, 64, None)] * 4
    samples += [Sample("c1", LITELLM, 0, 0.040, 0.7, 64, None)] * 4
    rows = summarize(blocks, samples, [DIRECT, GW_ON, LITELLM], {GW_ON: 0.012, LITELLM: 0.4})
    lines = {(line[0], line[1]): line[3] for line in goal_lines({1: rows}, {})}
    assert "better than LiteLLM" in lines[("throughput ratio (req/s vs direct)", GW_ON)]
    assert "better than LiteLLM" in lines[("added TTFT p50, ms", GW_ON)]
    assert "better than LiteLLM" in lines[("proxy CPU per request, ms", GW_ON)]
    assert "LiteLLM" not in lines[("added TTFT p50, ms", LITELLM)]


def test_a_gateway_that_merges_events_or_changes_text_is_caught() -> None:
    direct = [StreamShape(130, "ab", 130, 0)]
    assert not shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(129, "ab", 40, 20)]})[GW_ON]["preserved"]
    assert not shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(130, "abc", 130, 0)]})[GW_ON]["preserved"]
    assert shapes_verdict({DIRECT: direct, GW_ON: [StreamShape(130, "ab", 40, 20)]})[GW_ON][
        "more_multi_event_reads_than_direct"
    ]


def test_late_bursts_are_counted_and_left_out_of_the_streamed_ttft() -> None:
    """An answer whose first event came after half its time was one late burst."""
    blocks = [block(DIRECT, 4, 2.0), block(GW_ON, 4, 2.0)]
    direct = [Sample("c1", DIRECT, 0, 0.005, 0.1, 64, None)] * 3 + [Sample("c1", DIRECT, 0, 0.099, 0.1, 64, None)]
    gateway = [Sample("c1", GW_ON, 0, 0.006, 0.1, 64, None)] + [Sample("c1", GW_ON, 0, 0.098, 0.1, 64, None)] * 3
    rows = summarize(blocks, direct + gateway, [DIRECT, GW_ON])
    assert rows[DIRECT]["late_first_event_share"] == 0.25 and rows[GW_ON]["late_first_event_share"] == 0.75
    assert abs(rows[GW_ON]["added_ttft_ms_p50"] - 93.0) < 1e-9  # the verdict still uses every answer
    assert abs(rows[GW_ON]["added_ttft_ms_p50_streamed"] - 1.0) < 1e-9
    lines = {(line[0], line[2]): line for line in goal_lines({1: rows}, {})}
    assert lines[("added TTFT p50, ms", "c=1")][-1] == "MISS"
    assert lines[("added TTFT p50, streamed answers only, ms", "c=1")][3] == "+1.00"


def test_the_block_command_is_vllm_bench_serve_and_its_detailed_result_is_read() -> None:
    workload = vllm_bench.Workload("student", Path("/models/tiny"), 64, 64)
    args = vllm_bench.bench_args(workload, "http://127.0.0.1:8000", 100, 8, Path("/tmp/out"), "b.json")
    shown = vllm_bench.shown(args)
    assert shown.startswith("vllm bench serve --backend openai-chat --base-url http://127.0.0.1:8000 ")
    assert "--ignore-eos" in args and args[args.index("--max-concurrency") + 1] == "8"
    assert vllm_bench.command(args)[-len(args) :] == args
    result = vllm_bench.parse_result(
        {
            "duration": 2.0,
            "completed": 2,
            "failed": 1,
            "total_output_tokens": 128,
            "ttfts": [0.01, 0.02, 0.0],
            "latencies": [0.3, 0.4, 0.0],
            "output_lens": [64, 64, 0],
            "errors": ["", "", "HTTP 500"],
        }
    )
    assert (result.duration_s, result.completed, result.failed, result.output_tokens) == (2.0, 2, 1, 128)
    assert result.requests[0] == vllm_bench.Request(0.01, 0.3, 64, "") and result.requests[2].error == "HTTP 500"


def test_the_trace_summary_tells_upstream_time_from_gateway_time() -> None:
    lines = [
        {"status": 200, "headers_ms": 2.0, "reads": [[10.0, 90, 1, 10.1], [12.0, 90, 1, 12.2]]},
        {"status": 200, "headers_ms": 3.0, "reads": [[3.5, 10, 0, 3.6], [50.0, 300, 3, 50.5]]},
        {"status": 499, "headers_ms": 4.0, "reads": []},
    ]
    summary = trace_summary(lines)
    assert summary["streams"] == 3
    assert summary["first_read_ms_p50"] == 30.0  # 10.0 and 50.0: the first read that held an event
    assert summary["first_written_ms_p50"] == 30.3
    assert summary["first_read_holding_several_events"] == 0.5
    assert abs(summary["write_lag_ms_p50"] - 0.15) < 1e-9
