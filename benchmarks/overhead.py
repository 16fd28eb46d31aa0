"""What does putting the gateway in front of vLLM cost? `student bench overhead`.

    student bench overhead [--num-prompts N] [--rounds R] [--input-len I] [--output-len O]
                           [--litellm PATH] [--out FILE.json]

One vLLM (a tiny random Llama, or `--model DIR`) and three gateways in front of it: telemetry off,
telemetry on (power source detected as in production) and on + meter (the energy meter on a
steady stand-in source, so vLLM sends running usage on every chunk, as on a GPU machine), plus
LiteLLM's proxy (one worker) as the peer when `--litellm` names its executable.

The load is `vllm bench serve` itself (`benchmarks.vllm_bench`): random prompts of I tokens,
exactly O output tokens (`--ignore-eos`), streamed chat completions, at concurrency 1 and 8. Per
concurrency, every target gets R blocks of N/R prompts, alternating A/B/A/B with the order
rotated every round, so drift on a shared box hits every target alike. Every figure is vLLM's
benchmark's own; the exact command of each block is printed and saved.

Reported per target and concurrency, with the goals (reported, never asserted):

- throughput ratio gateway / direct (completed requests over the blocks' summed duration);
- added time to first token: gateway p50 minus direct p50, and p99 as a ratio to direct's;
- the gateway's CPU per request: utime + stime of its process tree over the whole concurrency
  phase (its own blocks, the other targets' blocks and everything in between, so background
  work counts), divided by the requests it relayed;
- late bursts: answers whose first token came after half their time (vLLM's API server, or a
  proxy that stopped reading, sent the stream as one late burst), and the added TTFT p50 over
  the answers that did stream;
- stream shape: a deterministic request answered with the same events and text as direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks import vllm_bench
from benchmarks.harness import (
    DIRECT,
    GW_ON,
    MODEL_NAME,
    Sample,
    Services,
    Target,
    build_tiny_model,
    check_tokens,
    energy_status,
    environment,
    fmt,
    prompts,
    request_body,
    rotated,
    say,
    start_stack,
    table,
)
from benchmarks.vllm_bench import Workload
from server.runtime.ports import free_port
from server.telemetry.percentiles import percentile

CONCURRENCIES = (1, 8)
GOALS: dict[str, Any] = {
    "throughput_ratio": {1: 0.95, 8: 0.90},  # gateway / direct, at least
    "added_ttft_p50_ms": {1: 5.0},  # at most, at concurrency 1
    "ttft_p99_ratio": {8: 1.5},  # gateway p99 / direct p99, at most, at concurrency 8
    "cpu_ms_per_request": 3.0,  # at most, telemetry on, a 64-token streamed request
}
LITELLM = "litellm"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (not its children), seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# --- load -------------------------------------------------------------------------------------


@dataclass
class Block:
    """One target's turn in one round: `vllm bench serve` with `requests` prompts at `concurrency`."""

    target: str
    concurrency: int
    round: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    command: str


def tree_cpu_s(pid: int) -> float:
    """utime + stime of a process and its children alive now, seconds."""
    total = proc_cpu_s(pid)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, OSError):
                total += proc_cpu_s(child.pid)
    return total


def run_level(
    targets: list[Target], workload: Workload, concurrency: int, per_block: int, rounds: int, workdir: Path
) -> tuple[list[Block], list[Sample], dict[str, float]]:
    """Every target's blocks at one concurrency; the gateways' CPU seconds over the whole phase."""
    blocks: list[Block] = []
    samples: list[Sample] = []
    gateways = {t.name: t.service.process.pid for t in targets if t.service}
    cpu0 = {name: tree_cpu_s(pid) for name, pid in gateways.items()}
    for round_index in range(rounds):
        for target in rotated(targets, round_index):
            name = f"c{concurrency}-r{round_index}-{target.name.replace(' ', '-').replace('+', '-')}.json"
            args = vllm_bench.bench_args(workload, target.url, per_block, concurrency, workdir, name)
            result = vllm_bench.run_block(args, workdir / name, workdir / "vllm-bench.log")
            blocks.append(
                Block(
                    target.name,
                    concurrency,
                    round_index,
                    len(result.requests),
                    result.failed,
                    result.duration_s,
                    result.output_tokens,
                    vllm_bench.shown(args),
                )
            )
            samples += [
                Sample(
                    f"c{concurrency}",
                    target.name,
                    round_index,
                    r.ttft_s if not r.error else math.nan,
                    r.e2e_s if not r.error else math.nan,
                    r.output_tokens,
                    r.error or None,
                )
                for r in result.requests
            ]
        say(
            f"  concurrency {concurrency}: round {round_index + 1}/{rounds} done ("
            + ", ".join(f"{b.target} {b.requests / b.wall_s:.2f} req/s" for b in blocks[-len(targets) :])
            + ")"
        )
    cpu = {name: tree_cpu_s(pid) - cpu0[name] for name, pid in gateways.items()}
    return blocks, samples, cpu


@dataclass
class StreamShape:
    """A deterministic request's stream as one client saw it."""

    events: int
    text: str
    reads: int
    multi_event_reads: int


async def stream_shape(session: aiohttp.ClientSession, target: Target, body: dict[str, Any]) -> StreamShape:
    """Read with `iter_any` (each read as it arrives) and count events and reads holding > 1 event."""
    events = reads = multi = 0
    text: list[str] = []
    pending = b""
    async with session.post(target.url + "/v1/chat/completions", json=body) as response:
        async for chunk in response.content.iter_any():
            reads += 1
            complete = (pending + chunk).count(b"\n\n")
            multi += complete > 1
            pending = (pending + chunk).rsplit(b"\n\n", 1)[-1]
            for line in chunk.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                events += 1
                if line.startswith(b'data: {"'):
                    for choice in json.loads(line[6:]).get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
    return StreamShape(events, "".join(text), reads, multi)


async def check_stream_shapes(
    session: aiohttp.ClientSession, targets: list[Target], body: dict[str, Any], repeats: int = 3
) -> dict[str, list[StreamShape]]:
    shapes: dict[str, list[StreamShape]] = {t.name: [] for t in targets}
    for repeat in range(repeats):
        for target in rotated(targets, repeat):
            shapes[target.name].append(await stream_shape(session, target, body))
    return shapes


# --- analysis (pure) --------------------------------------------------------------------------


def summarize(
    blocks: list[Block], samples: list[Sample], names: list[str], cpu_s: dict[str, float] | None = None
) -> dict[str, Any]:
    """Per target: throughput, TTFT and TPOT percentiles, late bursts, gateway CPU per request;
    ratios and differences over direct."""
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [b for b in blocks if b.target == name]
        ok = [s for s in samples if s.target == name and s.error is None]
        wall_s = sum(b.wall_s for b in mine)
        requests = sum(b.requests for b in mine)
        good = requests - sum(b.errors for b in mine)
        ttft_ms = [s.ttft_s * 1e3 for s in ok]
        streamed = [s for s in ok if not late_first_event(s)]
        cpu = None if cpu_s is None else cpu_s.get(name)
        rows[name] = {
            "requests": requests,
            "errors": requests - good,
            "wall_s": wall_s,
            "requests_per_s": good / wall_s if wall_s else None,
            "output_tokens_per_s": sum(b.output_tokens for b in mine) / wall_s if wall_s else None,
            "ttft_ms_p50": percentile(ttft_ms, 50),
            "ttft_ms_p99": percentile(ttft_ms, 99),
            "tpot_ms_p50": percentile([tpot_ms(s) for s in ok], 50),
            "e2e_ms_p50": percentile([s.e2e_s * 1e3 for s in ok], 50),
            "late_first_event_share": (len(ok) - len(streamed)) / len(ok) if ok else None,
            "ttft_ms_p50_streamed": percentile([s.ttft_s * 1e3 for s in streamed], 50),
            "cpu_ms_per_request": cpu * 1e3 / requests if cpu is not None and requests else None,
            "block_requests_per_s": [b.requests / b.wall_s for b in mine if b.wall_s],
        }
    direct = rows[DIRECT]
    for name in names:
        if name == DIRECT:
            continue
        row = rows[name]
        row["throughput_ratio_requests"] = _ratio(row["requests_per_s"], direct["requests_per_s"])
        row["throughput_ratio_tokens"] = _ratio(row["output_tokens_per_s"], direct["output_tokens_per_s"])
        row["added_ttft_ms_p50"] = _minus(row["ttft_ms_p50"], direct["ttft_ms_p50"])
        row["ttft_p99_ratio"] = _ratio(row["ttft_ms_p99"], direct["ttft_ms_p99"])
        row["added_ttft_ms_p50_streamed"] = _minus(row["ttft_ms_p50_streamed"], direct["ttft_ms_p50_streamed"])
    return rows


def tpot_ms(sample: Sample) -> float | None:
    """Time per output token after the first, ms (vLLM's TPOT): (E2E - TTFT) / (tokens - 1)."""
    if sample.error is not None or sample.events < 2:
        return None
    return (sample.e2e_s - sample.ttft_s) * 1e3 / (sample.events - 1)


def late_first_event(sample: Sample) -> bool:
    """The answer's first event came after half its time: vLLM's API server fell behind and sent
    the stream as one late burst (on a busy 2-core box it does, for direct clients too), so its
    TTFT measures CPU scheduling, not streaming."""
    return sample.ttft_s > sample.e2e_s / 2


def shapes_verdict(shapes: dict[str, list[StreamShape]]) -> dict[str, dict[str, Any]]:
    """Per gateway: same events and text as direct, and no more multi-event reads than direct."""
    direct = shapes[DIRECT]
    verdicts = {}
    for name, mine in shapes.items():
        if name == DIRECT:
            continue
        same = all(a.events == b.events and a.text == b.text for a in mine for b in direct)
        direct_multi = max(s.multi_event_reads for s in direct)
        batched = max(s.multi_event_reads for s in mine) > direct_multi
        verdicts[name] = {
            "events": [s.events for s in mine],
            "direct_events": [s.events for s in direct],
            "same_events_and_text": same,
            "multi_event_reads": [s.multi_event_reads for s in mine],
            "direct_multi_event_reads": [s.multi_event_reads for s in direct],
            "more_multi_event_reads_than_direct": batched,
            # A read holding several events also happens direct when vLLM's API server falls behind
            # on a busy 2-core box, so multi-event reads are reported, and the verdict is the count.
            "preserved": same,
        }
    return verdicts


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def goal_lines(levels: dict[int, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows of the report: what, target, concurrency, value, goal, result. LiteLLM, when measured,
    is the peer: each gateway figure is also compared with its."""

    def check(value: float | None, goal: float | None, at_least: bool) -> str:
        if value is None or goal is None or math.isnan(value):
            return "–"
        return "pass" if (value >= goal if at_least else value <= goal) else "MISS"

    def peer(result: dict[str, Any], key: str, higher_is_better: bool, value: float | None) -> str:
        litellm = result.get(LITELLM, {}).get(key)
        if litellm is None or value is None:
            return ""
        better = value > litellm if higher_is_better else value < litellm
        return f" ({'better' if better else 'NOT better'} than LiteLLM {fmt(litellm, 3 if higher_is_better else 2)})"

    rows = []
    for concurrency, result in levels.items():
        for name, row in result.items():
            if name == DIRECT:
                continue
            tag = f"c={concurrency}"
            gateway = name != LITELLM
            goal = GOALS["throughput_ratio"].get(concurrency)
            value = row["throughput_ratio_requests"]
            rows.append(
                [
                    "throughput ratio (req/s vs direct)",
                    name,
                    tag,
                    fmt(value, 3) + (peer(result, "throughput_ratio_requests", True, value) if gateway else ""),
                    f"≥ {goal:.2f}" if goal else "–",
                    check(value, goal, True),
                ]
            )
            goal = GOALS["added_ttft_p50_ms"].get(concurrency)
            value = row["added_ttft_ms_p50"]
            rows.append(
                [
                    "added TTFT p50, ms",
                    name,
                    tag,
                    fmt(value, 2, sign=True) + (peer(result, "added_ttft_ms_p50", False, value) if gateway else ""),
                    f"≤ {goal:g}" if goal else "(info)",
                    check(value, goal, False),
                ]
            )
            goal = GOALS["ttft_p99_ratio"].get(concurrency)
            value = row["ttft_p99_ratio"]
            rows.append(
                [
                    "TTFT p99 vs direct's",
                    name,
                    tag,
                    fmt(value, 2) + (peer(result, "ttft_p99_ratio", False, value) if gateway else ""),
                    f"≤ {goal:g}×" if goal else "(info)",
                    check(value, goal, False),
                ]
            )
            rows.append(
                [
                    "added TTFT p50, streamed answers only, ms",
                    name,
                    tag,
                    fmt(row["added_ttft_ms_p50_streamed"], 2, sign=True),
                    "(info)",
                    "–",
                ]
            )
            value = row["cpu_ms_per_request"]
            on = name == GW_ON
            rows.append(
                [
                    "proxy CPU per request, ms",
                    name,
                    tag,
                    fmt(value, 2) + (peer(result, "cpu_ms_per_request", False, value) if gateway else ""),
                    f"≤ {GOALS['cpu_ms_per_request']:g}" if on else "(info)",
                    check(value, GOALS["cpu_ms_per_request"], False) if on else "–",
                ]
            )
    for name, verdict in verdicts.items():
        events = "/".join(map(str, sorted(set(verdict["events"]))))
        direct = "/".join(map(str, sorted(set(verdict["direct_events"]))))
        multi = f"{max(verdict['multi_event_reads'])} vs {max(verdict['direct_multi_event_reads'])}"
        rows.append(
            [
                "stream events per request (vs direct)",
                name,
                "c=1",
                f"{events} vs {direct}",
                "same",
                "pass" if verdict["preserved"] else "MISS",
            ]
        )
        rows.append(["reads holding >1 event, max (vs direct)", name, "c=1", multi, "(info)", "–"])
    return rows


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    args = results["arguments"]
    lines = [
        f"Machine: {env['host']}, {env['cpus']} CPUs, {env['platform']}; Python {env['python']}, vLLM {env['vllm']}; "
        f"load average {env['loadavg_at_start'][0]:.2f} at start, {env['loadavg_at_end'][0]:.2f} at end",
        f"Load: vllm bench serve, random prompts of {args['input_len']} tokens, {args['output_len']} output tokens "
        f"(ignore_eos), streamed chat; {args['rounds']} rounds of alternating blocks per concurrency, "
        f"{args['num_prompts']} prompts per target and concurrency. Proxy CPU: its process tree over each phase.",
        f"One block, as run: {results['example_command']}",
        "",
    ]
    for concurrency, result in results["levels"].items():
        rows = [
            [
                name,
                f"{r['requests'] - r['errors']}/{r['requests']}",
                fmt(r["requests_per_s"], 2),
                fmt(r["output_tokens_per_s"], 0),
                fmt(r["ttft_ms_p50"]),
                fmt(r["ttft_ms_p99"]),
                fmt(r["tpot_ms_p50"], 2),
                fmt(r["e2e_ms_p50"]),
                _percent(r["late_first_event_share"]),
                fmt(r["cpu_ms_per_request"], 2),
            ]
            for name, r in result.items()
        ]
        lines += [
            f"concurrency {concurrency}",
            table(
                [
                    "target",
                    "ok",
                    "req/s",
                    "out tok/s",
                    "TTFT p50 ms",
                    "TTFT p99 ms",
                    "TPOT p50 ms",
                    "E2E p50 ms",
                    "late burst",
                    "CPU ms/req",
                ],
                rows,
            ),
            "",
        ]
    for concurrency, summary in results.get("gw_on_trace", {}).items():
        lines.append(
            f"gw on, inside the gateway, concurrency {concurrency} ({summary['streams']} streams, ms since the "
            f"request came): upstream headers p50 {fmt(summary['headers_ms_p50'], 2)}; first token read p50 "
            f"{fmt(summary['first_read_ms_p50'], 2)} (p99 {fmt(summary['first_read_ms_p99'], 2)}), written p50 "
            f"{fmt(summary['first_written_ms_p50'], 2)}; read-to-written lag p50 "
            f"{fmt(summary['write_lag_ms_p50'], 3)} (p99 {fmt(summary['write_lag_ms_p99'], 3)}); first read holding "
            f"several events: {_percent(summary['first_read_holding_several_events'])}"
        )
    lines.append(
        table(
            ["measure", "target", "load", "value", "goal", "result"],
            goal_lines(results["levels"], results["stream_shape"]),
        )
    )
    return "\n".join(lines)


# --- command ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=100,
        help="prompts per target and concurrency, split over the rounds (default 100)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per concurrency (default 2)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--model", type=Path, help="serve this model directory (default: a tiny random Llama)")
    parser.add_argument(
        "--litellm", metavar="PATH", help="LiteLLM's `litellm` executable: measure its proxy (1 worker) as the peer"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also time every stream inside `gw on` (STUDENT_STREAM_TRACE_PATH) and report where first tokens wait",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("overhead-benchmark.json"),
        help="results JSON (default ./overhead-benchmark.json)",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.num_prompts, args.rounds, args.input_len, args.output_len) < 1:
        print(
            "student bench overhead: --num-prompts, --rounds, --input-len and --output-len must be positive",
            file=sys.stderr,
        )
        return 2
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    results: dict[str, Any] = {
        "environment": environment(),
        "arguments": {
            "num_prompts": args.num_prompts,
            "rounds": args.rounds,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "model": None if args.model is None else str(args.model),
        },
        "goals": {k: ({str(c): g for c, g in v.items()} if isinstance(v, dict) else v) for k, v in GOALS.items()},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="overhead-bench-") as tmp, Services(Path(tmp)) as services:
            workdir = Path(tmp)
            if args.model is None:
                say("building the tiny random Llama")
                model_dir = build_tiny_model(workdir / "tiny-model")
            else:
                model_dir = args.model.expanduser().resolve()
            trace_path = workdir / "gw-on-trace.jsonl" if args.trace else None
            targets = start_stack(services, workdir, model_dir, max(CONCURRENCIES), trace_path)
            if args.litellm:
                targets.append(start_litellm(services, workdir, args.litellm, targets[0].url))
            results["energy"] = {t.name: energy_status(t) for t in targets if t.service and t.name != LITELLM}
            workload = Workload(MODEL_NAME, model_dir, args.input_len, args.output_len)
            measure(args, targets, workload, workdir, results)
            say("stopping the stack")
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["environment"]["loadavg_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print("\n" + "=" * 100)
    print(report(results))
    say(f"results written to {args.out}")
    return 0


def start_litellm(services: Services, workdir: Path, executable: str, vllm_url: str) -> Target:
    """LiteLLM's proxy (one worker) in front of the same vLLM, model `student` passed through."""
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL_NAME}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL_NAME}\n"
        f"      api_base: {vllm_url}/v1\n"
        "      api_key: none\n"
    )
    port = free_port()
    # On loopback, for this benchmark only: no master key, as the gateways here run without keys.
    env = {"LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true", "LITELLM_TELEMETRY": "False"}
    argv = [executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    service = services.start(LITELLM, argv, port, env)
    services.wait_ready(service, "/health/liveliness", timeout_s=180)
    return Target(LITELLM, service.url, service)


def measure(
    args: argparse.Namespace, targets: list[Target], workload: Workload, workdir: Path, results: dict[str, Any]
) -> None:
    names = [t.name for t in targets]
    asyncio.run(_shapes(targets, args.output_len, results))
    say("warm-up: one short block per target")
    for index, target in enumerate(targets):
        warm = vllm_bench.bench_args(workload, target.url, 4, 2, workdir, f"warm-{index}.json")
        vllm_bench.run_block(warm, workdir / warm[-1], workdir / "vllm-bench.log")
    results["levels"], results["blocks"], results["proxy_cpu_s"] = {}, [], {}
    for concurrency in CONCURRENCIES:
        per_block = max(concurrency, math.ceil(args.num_prompts / args.rounds / concurrency) * concurrency)
        say(f"concurrency {concurrency}: {args.rounds} rounds × {len(targets)} targets × {per_block} prompts")
        traced = _trace_lines(workdir)
        blocks, samples, cpu = run_level(targets, workload, concurrency, per_block, args.rounds, workdir)
        results["levels"][concurrency] = summarize(blocks, samples, names, cpu)
        if args.trace:
            results.setdefault("gw_on_trace", {})[concurrency] = trace_summary(_trace_lines(workdir)[len(traced) :])
        results["blocks"] += [asdict(b) for b in blocks]
        results["proxy_cpu_s"][concurrency] = cpu
        results["example_command"] = blocks[-1].command


def _trace_lines(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "gw-on-trace.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trace_summary(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Where `gw on`'s streams spent their time, from its own per-event timing (ms since the
    request came): upstream headers, the first token's read (upstream's doing, plus the gateway's
    own delay in reading), and the write lag (read to written: the gateway's doing)."""
    firsts: list[list[float]] = []
    for line in lines:
        if line["status"] == 200:
            firsts += [read for read in line["reads"] if read[2] > 0][:1]
    lags = [written - read for line in lines for read, _, _, written in line["reads"]]
    return {
        "streams": len(lines),
        "headers_ms_p50": percentile([line["headers_ms"] for line in lines], 50),
        "first_read_ms_p50": percentile([read[0] for read in firsts], 50),
        "first_read_ms_p99": percentile([read[0] for read in firsts], 99),
        "first_written_ms_p50": percentile([read[3] for read in firsts], 50),
        "write_lag_ms_p50": percentile(lags, 50),
        "write_lag_ms_p99": percentile(lags, 99),
        "first_read_holding_several_events": sum(read[2] > 1 for read in firsts) / len(firsts) if firsts else None,
    }


async def _shapes(targets: list[Target], max_tokens: int, results: dict[str, Any]) -> None:
    chats = prompts(2)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await check_tokens(session, targets, chats[0], max_tokens)
        say("stream shape: a deterministic request, 3 times per target")
        shapes = await check_stream_shapes(session, targets, request_body(chats[0], max_tokens))
    results["stream_shape"] = shapes_verdict(shapes)
    results["stream_shape_raw"] = {name: [asdict(s) for s in mine] for name, mine in shapes.items()}
